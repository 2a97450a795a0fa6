"""dlib's face ResNet: facepipe's reader of dlib's format, the torch port, and equality with dlib.

* A small network of the same family is written in dlib's format by a test-local writer
  and read back exactly; its torch forward pass is checked against a brute-force numpy
  forward pass of dlib's layer semantics (unpadded stride-2 convolutions and pools,
  zero-padded residual adds).
* The real ``dlib_face_recognition_resnet_model_v1.dat`` (PyPI ``face_recognition_models``,
  the ``[peers]`` extra, which CI installs) must be consumed to the last byte, and its
  port must reproduce dlib's descriptors of the committed fixture chips
  (``tests/fixtures/dlib_port``: real chips of ``skimage.data.astronaut()`` and dlib's raw
  outputs) to 1e-5; with dlib itself installed the comparison is also made live, on the
  fixture chips and on LFW chips from the development data.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from facepipe.embed.dlib_format import LayerSpec, face_resnet_schema, read_face_resnet
from facepipe.errors import CheckpointError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dlib_port"
HAVE_MODELS = importlib.util.find_spec("face_recognition_models") is not None
HAVE_DLIB = importlib.util.find_spec("dlib") is not None
needs_models = pytest.mark.skipif(not HAVE_MODELS, reason="face_recognition_models ([peers] extra) not installed")
needs_dlib = pytest.mark.skipif(not (HAVE_MODELS and HAVE_DLIB), reason="dlib ([peers] extra) not installed")


# -- a writer of dlib's format (test-only inverse of the reader) -------------------------------
def _int(v: int) -> bytes:
    neg, v = v < 0, abs(int(v))
    body = v.to_bytes(max(1, (v.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if neg else 0)]) + body


def _float(x: float) -> bytes:
    m, e = math.frexp(x)
    mant, exp = int(m * (1 << 53)), e - 53
    while mant and (mant & 0xFF) == 0:
        mant >>= 8
        exp += 8
    return _int(mant) + _int(exp)


def _str(s: str) -> bytes:
    return _int(len(s)) + s.encode()


def _tensor(a: np.ndarray, dims: tuple[int, int, int, int] | None = None) -> bytes:
    a = np.asarray(a, np.float32)
    dims = dims or ((a.size, 1, 1, 1) if a.size else (0, 0, 0, 0))
    return _int(2) + b"".join(_int(d) for d in dims) + a.astype("<f4").tobytes()


def _alias(dims: tuple[int, ...]) -> bytes:
    return _int(1) + b"".join(_int(d) for d in dims)


def write_dlib_net(schema: list[LayerSpec], arrays: dict[str, np.ndarray], mean: tuple[float, float, float],
                   size: int) -> bytes:
    """Serialise a network the way dlib's add_layer / add_loss_layer do (old-style layer versions)."""

    def details(spec: LayerSpec) -> bytes:
        if spec.kind == "con":
            f, b = arrays[f"{spec.name}.filters"], arrays[f"{spec.name}.biases"]
            n, kh, kw, s, _ = spec.args
            pad = 0 if s != 1 else kh // 2
            return (_str("con_4") + _tensor(np.concatenate([f.ravel(), b.ravel()])) + _int(n) + _int(kh)
                    + _int(kw) + _int(s) + _int(s) + _int(pad) + _int(pad) + _alias(f.shape)
                    + _alias((1, n, 1, 1)) + _float(1.0) + _float(1.0) + _float(1.0) + _float(0.0))
        if spec.kind == "affine":
            g, b = arrays[f"{spec.name}.gamma"], arrays[f"{spec.name}.beta"]
            return (_str("affine_") + _tensor(np.concatenate([g, b])) + _alias((1, g.size, 1, 1))
                    + _alias((1, g.size, 1, 1)) + _int(0))
        if spec.kind == "relu":
            return _str("relu_")
        if spec.kind in ("max_pool", "avg_pool"):
            nr, nc, sy, sx = spec.args
            pad = 0 if sy != 1 else nr // 2
            return _str(f"{spec.kind}_2") + b"".join(_int(v) for v in (nr, nc, sy, sx, pad, pad))
        if spec.kind == "add_prev":
            return _str("add_prev_")
        if spec.kind == "fc":
            w = arrays["fc.weights"]
            return (_str("fc_2") + _int(w.shape[1]) + _int(w.shape[0]) + _tensor(w) + _alias((w.shape[0], w.shape[1], 1, 1))
                    + _alias((0, 0, 0, 0)) + _int(1) + _float(1.0) + _float(1.0) + _float(1.0) + _float(0.0))
        raise AssertionError(spec.kind)

    state = b"0" + b"1" + b"0" + _tensor(np.zeros(0)) + _tensor(np.zeros(0))

    def layer(i: int) -> bytes:
        spec = schema[i]
        if spec.kind in ("tag", "skip"):
            return _int(1) + layer(i + 1)
        if i == len(schema) - 1:
            inp = _str("input_rgb_image_sized") + b"".join(_float(m) for m in mean) + _int(size) + _int(size)
            return _int(2) + inp + details(spec) + state + _tensor(np.zeros(0))
        return _int(2) + layer(i + 1) + details(spec) + state + _tensor(np.zeros(0))

    return _int(1) + _str("loss_metric_2") + _float(0.04) + _float(0.6) + layer(0)


# -- brute-force numpy forward pass with dlib's layer semantics --------------------------------
def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    c, kh, kw = w.shape[1:]
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((w.shape[0], oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, i, j] = np.tensordot(w, patch, axes=([1, 2, 3], [0, 1, 2])) + b
    return out


def _pool(x: np.ndarray, k: int, s: int, fn) -> np.ndarray:  # noqa: ANN001
    oh, ow = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    return np.stack([[[fn(x[c, i * s:i * s + k, j * s:j * s + k]) for j in range(ow)] for i in range(oh)]
                     for c in range(x.shape[0])])


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    shape = tuple(max(p, q) for p, q in zip(a.shape, b.shape))
    out = np.zeros(shape)
    out[:a.shape[0], :a.shape[1], :a.shape[2]] += a
    out[:b.shape[0], :b.shape[1], :b.shape[2]] += b
    return out


def reference_forward(arrays: dict[str, np.ndarray], blocks: list[tuple[int, bool]], img: np.ndarray,
                      mean: tuple[float, float, float]) -> np.ndarray:
    x = (img.astype(np.float64).transpose(2, 0, 1) - np.array(mean)[:, None, None]) / 256.0

    def aff(t: np.ndarray, name: str) -> np.ndarray:
        return t * arrays[f"{name}.gamma"][:, None, None] + arrays[f"{name}.beta"][:, None, None]

    x = _conv(x, arrays["stem.conv.filters"], arrays["stem.conv.biases"], 2, 0)
    x = _pool(np.maximum(aff(x, "stem.affine"), 0), 3, 2, np.max)
    for i, (_n, down) in enumerate(blocks):
        p = f"blocks.{i}"
        y = _conv(x, arrays[f"{p}.conv1.filters"], arrays[f"{p}.conv1.biases"], 2 if down else 1, 0 if down else 1)
        y = np.maximum(aff(y, f"{p}.affine1"), 0)
        y = aff(_conv(y, arrays[f"{p}.conv2.filters"], arrays[f"{p}.conv2.biases"], 1, 1), f"{p}.affine2")
        skip = _pool(x, 2, 2, np.mean) if down else x
        x = np.maximum(_add(skip, y), 0)
    return x.mean(axis=(1, 2)) @ arrays["fc.weights"]


TINY_BLOCKS = [(4, False), (6, True), (6, False), (8, True), (8, True)]


@pytest.fixture(scope="module")
def tiny() -> tuple[bytes, dict[str, np.ndarray], tuple[float, float, float]]:
    rng = np.random.default_rng(0)
    schema = face_resnet_schema(tuple(TINY_BLOCKS), stem=4, dim=5)
    arrays: dict[str, np.ndarray] = {}

    def conv(name: str, n: int, cin: int, k: int) -> None:
        arrays[f"{name}.filters"] = rng.normal(0, 0.3, (n, cin, k, k)).astype(np.float32)
        arrays[f"{name}.biases"] = rng.normal(0, 0.1, n).astype(np.float32)

    def aff(name: str, n: int) -> None:
        arrays[f"{name}.gamma"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        arrays[f"{name}.beta"] = rng.normal(0, 0.1, n).astype(np.float32)

    conv("stem.conv", 4, 3, 7)
    aff("stem.affine", 4)
    cin = 4
    for i, (n, _down) in enumerate(TINY_BLOCKS):
        conv(f"blocks.{i}.conv1", n, cin, 3)
        aff(f"blocks.{i}.affine1", n)
        conv(f"blocks.{i}.conv2", n, n, 3)
        aff(f"blocks.{i}.affine2", n)
        cin = max(cin, n)
    arrays["fc.weights"] = rng.normal(0, 0.3, (cin, 5)).astype(np.float32)
    mean = (122.5, 117.25, 104.0)
    return write_dlib_net(schema, arrays, mean, 150), arrays, mean


def test_reader_round_trips_a_written_network(tiny) -> None:  # noqa: ANN001
    data, arrays, mean = tiny
    net = read_face_resnet(data, "tiny.dat", face_resnet_schema(tuple(TINY_BLOCKS), stem=4, dim=5))
    assert net.n_bytes == len(data) and net.input_size == 150
    assert net.input_mean == pytest.approx(mean)
    assert net.loss["margin"] == pytest.approx(0.04) and net.loss["distance_threshold"] == pytest.approx(0.6)
    assert set(net.arrays) == set(arrays)
    for k, v in arrays.items():
        assert np.array_equal(net.arrays[k], v), k


def test_reader_rejects_truncated_padded_and_foreign_bytes(tiny) -> None:  # noqa: ANN001
    data = tiny[0]
    schema = face_resnet_schema(tuple(TINY_BLOCKS), stem=4, dim=5)
    with pytest.raises(CheckpointError, match="truncated"):
        read_face_resnet(data[:-3], "t.dat", schema)
    with pytest.raises(CheckpointError, match="unread bytes"):
        read_face_resnet(data + b"\x00", "t.dat", schema)
    with pytest.raises(CheckpointError, match="t.dat"):
        read_face_resnet(b"\x89PNG\r\n\x1a\n" + data, "t.dat", schema)
    with pytest.raises(CheckpointError, match="expected"):  # the real topology does not fit this file
        read_face_resnet(data, "t.dat")


def test_torch_module_matches_numpy_reference(tiny) -> None:  # noqa: ANN001
    import torch

    from facepipe.embed.dlib_resnet import DlibFaceResNet, fuse_affines, state_dict_from_dlib

    data, arrays, mean = tiny
    dnet = read_face_resnet(data, "tiny.dat", face_resnet_schema(tuple(TINY_BLOCKS), stem=4, dim=5))
    net = DlibFaceResNet(TINY_BLOCKS, stem=4, dim=5).eval()
    net.load_state_dict(state_dict_from_dlib(dnet), strict=True)
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # the module is size-agnostic
    ref = reference_forward(arrays, TINY_BLOCKS, img, mean)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() - torch.tensor(mean).view(1, 3, 1, 1)) / 256
    with torch.no_grad():
        out = net.forward_unnormalised(x)[0].double().numpy()
        fused = fuse_affines(net).forward_unnormalised(x)[0].double().numpy()
    assert np.allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert np.allclose(fused, ref, rtol=1e-4, atol=1e-5)


# -- the real model ---------------------------------------------------------------------------
def _fixture() -> tuple[np.ndarray, np.ndarray]:
    import cv2

    strip = cv2.cvtColor(cv2.imread(str(FIXTURE / "chips.png")), cv2.COLOR_BGR2RGB)
    chips = strip.reshape(-1, 150, 150, 3)
    desc = np.array(json.loads((FIXTURE / "descriptors.json").read_text())["descriptors"], np.float32)
    assert len(chips) == len(desc) >= 5
    return np.ascontiguousarray(chips), desc


@pytest.fixture(scope="module")
def port_ck() -> dict:
    from facepipe.embed.port import port_checkpoint

    return port_checkpoint()


@pytest.fixture(scope="module")
def port_emb():  # noqa: ANN201
    from facepipe.embed import load_embedder

    return load_embedder("dlib-port", device="cpu", batch_size=4)


@needs_models
def test_real_file_is_consumed_to_the_last_byte() -> None:
    from facepipe.embed.dlib_format import read_face_resnet_file
    from facepipe.embed.port import dlib_model_file

    path = dlib_model_file()
    net = read_face_resnet_file(path)
    assert net.n_bytes == path.stat().st_size
    assert net.input_size == 150 and len(net.arrays) == 117
    assert sum(a.size for a in net.arrays.values()) == 5_614_592
    assert net.arrays["fc.weights"].shape == (256, 128)
    assert net.loss["distance_threshold"] == pytest.approx(0.6)
    data = path.read_bytes()
    with pytest.raises(CheckpointError, match="truncated"):
        read_face_resnet(data[: len(data) // 2], path)
    with pytest.raises(CheckpointError, match="unread"):
        read_face_resnet(data + b"\x01\x01", path)


@needs_models
def test_port_reproduces_dlibs_committed_descriptors(port_ck: dict, port_emb) -> None:  # noqa: ANN001
    """Runs wherever face_recognition_models is installed (CI has the [peers] extra)."""
    import torch

    from facepipe.embed.dlib_resnet import build_dlib_resnet

    chips, desc = _fixture()
    ck = port_ck
    net = build_dlib_resnet(ck["arch"]).eval()
    net.load_state_dict({k: v.float() for k, v in ck["state_dict"].items()})
    mean = torch.tensor(ck["preprocess"]["pixel_mean"]).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = net.forward_unnormalised((torch.from_numpy(chips).permute(0, 3, 1, 2).float() - mean) / 256).numpy()
    assert np.abs(raw - desc).max() < 1e-5
    # and through the public embedder (fused affines, batching, L2 normalisation)
    emb = port_emb
    out = emb.embed(chips)
    ref = desc / np.linalg.norm(desc, axis=1, keepdims=True)
    assert np.abs(out - ref).max() < 1e-5
    assert emb.registry_name == "dlib-port" and emb.embedder_id.startswith("dlib-port@") and emb.alignment == "dlib-chip-5pt" and emb.crop_size == 150
    assert "public domain" in emb.provenance["weights"]


@needs_models
def test_converted_checkpoint_file_loads_like_the_registered_port(tmp_path: Path, port_ck: dict,
                                                                  port_emb) -> None:  # noqa: ANN001
    from facepipe.embed import load_embedder
    from facepipe.embed.network import load_checkpoint, save_checkpoint

    chips, _ = _fixture()
    ck = dict(port_ck)
    ck["calibration"] = {"impostor_quantiles": [0.1, 0.2]}
    ck["future_key"] = {"kept": True}
    path = save_checkpoint(ck, tmp_path / "port.pt")
    assert load_checkpoint(path)["provenance"]["source_sha256"].startswith("55533b28")
    a = load_embedder(str(path), device="cpu")
    b = port_emb
    assert a.embedder_id == b.embedder_id
    assert np.allclose(a.embed(chips), b.embed(chips), atol=1e-6)
    assert a.calibration == {"impostor_quantiles": [0.1, 0.2]} and b.calibration is None
    assert a.checkpoint_extra == {"future_key": {"kept": True}}


@needs_dlib
def test_port_equals_live_dlib_on_fixture_chips(port_emb) -> None:  # noqa: ANN001
    from facepipe.embed.dlib_peer import DlibEmbedder

    chips, desc = _fixture()
    dl = DlibEmbedder(device="cpu")
    live = np.array(dl._fr.compute_face_descriptor(list(chips)), np.float32)
    assert np.abs(live - desc).max() < 1e-5  # the committed fixture is what dlib computes
    assert np.abs(port_emb.embed(chips) - dl.embed(chips)).max() < 1e-5


@needs_dlib
@pytest.mark.data
def test_port_equals_live_dlib_on_lfw_chips(shared_data: Path, port_emb) -> None:  # noqa: ANN001
    from facepipe.datasets import list_identities
    from facepipe.detect.mtcnn import MTCNNDetector
    from facepipe.embed.dlib_peer import DlibEmbedder
    from facepipe.io import load_image

    people = list_identities(shared_data / "identities" / "lfw_devtrain")
    paths = [p for name in sorted(people)[:60:10] for p in people[name][:1]]
    det, dl = MTCNNDetector(device="cpu"), DlibEmbedder(device="cpu")
    chips = []
    for p in paths:
        img = load_image(p)
        faces = det.detect(img)
        if faces:
            chips.append(dl.align(img, faces[0]))
    assert len(chips) >= 4
    chips = np.stack(chips)
    assert np.abs(port_emb.embed(chips) - dl.embed(chips)).max() < 1e-5
