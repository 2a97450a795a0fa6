"""Loading an embedder checkpoint: every malformed field is refused with one error that
names the file and the problem, and everything a valid checkpoint carries reaches the
embedder (its weights above all).

Added from the mutation run (``scripts/mutation_test.py --target checkpoint``); the
round trip and the corrupt-file cases are in test_embedder.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from facepipe.embed.network import (
    FORMAT, FORMAT_VERSION, NetworkEmbedder, build_network, default_preprocess, load_checkpoint, make_checkpoint,
)
from facepipe.errors import CheckpointError

ARCH = {"backbone": "mobilenet_v2", "dim": 32, "dropout": 0.0, "init_seed": 5}


@pytest.fixture(scope="module")
def good() -> dict[str, Any]:
    torch.manual_seed(0)
    net = build_network(ARCH, pretrained=False)
    return make_checkpoint(net, name="val-net", version="v7", arch=ARCH,
                           preprocess=default_preprocess(112, flip_tta=False), training={"loss": "test"})


def _save(tmp_path: Path, ck: Any, name: str = "ck.pt") -> Path:
    p = tmp_path / name
    torch.save(ck, p)
    return p


def _tiny(good: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The checkpoint with a one-entry state dict (validation does not look inside it) and changes;
    a change to ``None`` removes the key."""
    ck = {**good, "state_dict": {"w": torch.zeros(1)}}
    for k, v in changes.items():
        if v is None:
            ck.pop(k, None)
        else:
            ck[k] = v
    return ck


def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert info.value.path == str(path)
    return info.value.problem


@pytest.mark.parametrize("key", ["format", "format_version", "arch", "preprocess", "state_dict", "name"])
def test_a_missing_field_is_named(good: dict[str, Any], tmp_path: Path, key: str) -> None:
    p = _save(tmp_path, _tiny(good, **{key: None}))
    assert _error(p) == f"not a facepipe embedder checkpoint (missing {key!r})"


@pytest.mark.parametrize("key, value, got, want", [
    ("format", 3, "int", "str"), ("format_version", "2", "str", "int"), ("arch", ["mobilenet_v2"], "list", "dict"),
    ("preprocess", "112", "str", "dict"), ("state_dict", [1], "list", "dict"), ("name", 7, "int", "str"),
])
def test_a_field_of_the_wrong_type_is_named(good: dict[str, Any], tmp_path: Path, key: str, value: Any,
                                            got: str, want: str) -> None:
    p = _save(tmp_path, _tiny(good, **{key: value}))
    assert _error(p) == f"field {key!r} has type {got}, expected {want}"


def test_format_and_version(good: dict[str, Any], tmp_path: Path) -> None:
    assert _error(_save(tmp_path, [good["name"]])) == "not a facepipe embedder checkpoint (a list)"
    assert _error(_save(tmp_path, _tiny(good, format="facepipe-detector"))) == \
        f"checkpoint format is 'facepipe-detector', expected {FORMAT!r}"
    assert _error(_save(tmp_path, _tiny(good, format_version=FORMAT_VERSION + 1))) == \
        (f"checkpoint format version {FORMAT_VERSION + 1} is newer than this facepipe supports "
         f"({FORMAT_VERSION}); upgrade facepipe")
    for older in range(1, FORMAT_VERSION + 1):          # older and current versions load
        assert load_checkpoint(_save(tmp_path, _tiny(good, format_version=older)))["format_version"] == older


@pytest.mark.parametrize("change, problem", [
    ({"arch": {**ARCH, "backbone": "vgg"}}, "unknown backbone 'vgg'; valid: mobilenet_v2, dlib_resnet"),
    ({"arch": {"dim": 32}}, "unknown backbone None; valid: mobilenet_v2, dlib_resnet"),
    ({"preprocess": {"mean": [0.5] * 3, "std": [0.5] * 3}}, "preprocess record lacks 'crop_size'"),
    ({"preprocess": {"crop_size": 112, "std": [0.5] * 3}}, "preprocess record lacks 'mean'"),
    ({"preprocess": {"crop_size": 112, "mean": [0.5] * 3}}, "preprocess record lacks 'std'"),
    ({"preprocess": {"crop_size": 112, "mean": [0.5] * 2, "std": [0.5] * 3}},
     "preprocess 'mean' must list 3 channel values"),
    ({"preprocess": {"crop_size": 112, "mean": "abc", "std": [0.5] * 3}},
     "preprocess 'mean' must list 3 channel values"),
    ({"preprocess": {"crop_size": 150, "pixel_mean": [120.0] * 4}},
     "preprocess 'pixel_mean' must list 3 channel values"),
    ({"preprocess": {"crop_size": 112, "mean": [0.5] * 3, "std": [0.5] * 3, "alignment": "eyes-only"}},
     "unsupported alignment 'eyes-only'; valid: arcface-5pt-similarity, dlib-chip-5pt"),
    ({"calibration": [0.5]}, "field 'calibration' must be a dict"),
])
def test_malformed_records_are_refused(good: dict[str, Any], tmp_path: Path, change: dict[str, Any],
                                       problem: str) -> None:
    assert _error(_save(tmp_path, _tiny(good, **change))) == problem


@pytest.mark.parametrize("change", [
    {"preprocess": {"crop_size": 150, "pixel_mean": (120.0, 110.0, 100.0)}},           # dlib style, no std
    {"preprocess": {"crop_size": 112, "mean": (0.5,) * 3, "std": (0.5,) * 3, "alignment": "dlib-chip-5pt"}},
    {"calibration": None}, {"calibration": {"threshold": 0.4}}, {"calibration": None, "extra_key": 1},
])
def test_well_formed_variants_load(good: dict[str, Any], tmp_path: Path, change: dict[str, Any]) -> None:
    ck = _tiny(good, **change)
    if change.get("calibration", 0) is None:
        ck["calibration"] = None
    loaded = load_checkpoint(_save(tmp_path, ck))
    assert loaded["name"] == "val-net" and loaded["preprocess"] == ck["preprocess"]


def test_the_embedder_carries_the_checkpoint_weights_and_records(good: dict[str, Any], tmp_path: Path) -> None:
    """The network runs the stored weights (a different seed would give other vectors), and
    name, version, preprocessing, training record, provenance, calibration and unknown keys
    reach the embedder; half-precision weights load as float32."""
    ck = {**good, "registry_name": "val", "provenance": {"source": "test"}, "calibration": {"threshold": 0.41},
          "notes": "kept as is"}
    ck["state_dict"] = {k: (v.half() if v.is_floating_point() else v) for k, v in good["state_dict"].items()}
    p = _save(tmp_path, ck)
    emb = NetworkEmbedder.from_checkpoint(p, device="cpu")
    assert (emb.name, emb.version, emb.registry_name, emb.source) == ("val-net", "v7", "val", str(p))
    assert emb.provenance == {"source": "test"} and emb.calibration == {"threshold": 0.41}
    assert emb.training == {"loss": "test"} and emb.checkpoint_extra == {"notes": "kept as is"}
    assert emb.crop_size == 112 and emb.dim == 32
    assert NetworkEmbedder.from_checkpoint(p).device.type in ("cpu", "cuda")     # the default device: auto
    # options reach the embedder; a checkpoint without a version says "0"
    opt = NetworkEmbedder.from_checkpoint(p, device="cpu", flip_tta=True, batch_size=3)
    assert opt.flip_tta and opt.batch_size == 3 and opt.embedder_id == emb.embedder_id + "+flip"
    unversioned = NetworkEmbedder.from_checkpoint(_save(tmp_path, {k: v for k, v in ck.items() if k != "version"},
                                                        "nover.pt"), device="cpu")
    assert unversioned.version == "0"
    own = emb.net.state_dict()
    for k, v in good["state_dict"].items():
        if v.is_floating_point():
            assert own[k].dtype == torch.float32
            torch.testing.assert_close(own[k], v.half().float(), atol=0, rtol=0)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    torch.manual_seed(1)
    other = NetworkEmbedder(build_network({**ARCH, "init_seed": 6}), name="x", arch=ARCH,
                            preprocess=good["preprocess"], device="cpu")
    assert not np.allclose(emb.embed(crops), other.embed(crops), atol=1e-3)


def test_weights_that_do_not_fit_are_refused_with_counts(good: dict[str, Any], tmp_path: Path) -> None:
    sd = dict(good["state_dict"])
    first = next(k for k, v in sd.items() if v.ndim == 4)
    cases = {
        "missing": {k: v for k, v in sd.items() if k != first},
        "unexpected": {**sd, "extra.weight": torch.zeros(3)},
        "reshaped": {**sd, first: torch.zeros(1, *sd[first].shape[1:])},
    }
    for kind, state in cases.items():
        p = _save(tmp_path, {**good, "state_dict": state}, f"{kind}.pt")
        with pytest.raises(CheckpointError) as info:
            NetworkEmbedder.from_checkpoint(p, device="cpu")
        assert info.value.path == str(p)
        problem = info.value.problem
        assert problem.startswith("weights do not match the architecture (missing ")
        if kind == "unexpected":
            assert "missing 0: [], unexpected 1: ['extra.weight']" in problem
        elif kind == "missing":
            assert f"missing 1: [{first!r}], unexpected 0: []" in problem
        else:   # a stored tensor of another shape counts as missing, once
            assert f"missing 1: [{first!r}], unexpected 0: []" in problem
    p = _save(tmp_path, {**good, "arch": {**ARCH, "dim": "wide"}}, "arch.pt")
    with pytest.raises(CheckpointError) as info:
        NetworkEmbedder.from_checkpoint(p, device="cpu")
    assert info.value.problem.startswith("bad architecture record (") and info.value.path == str(p)


# -- the CNN detector's checkpoint ------------------------------------------------------------------


@pytest.fixture(scope="module")
def det_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from facepipe.detect.fpn import DetectorConfig, FaceFPN, save_detector

    torch.manual_seed(0)
    net = FaceFPN(DetectorConfig(), pretrained=False)
    return save_detector(tmp_path_factory.mktemp("det") / "det.pt", net, net.config, 0.5)


def _det_error(path: Path) -> str:
    from facepipe.detect.fpn import load_detector

    with pytest.raises(CheckpointError) as info:
        load_detector(path)
    assert info.value.path == str(path)
    return info.value.problem


def test_detector_checkpoint_loads_what_was_saved(det_path: Path) -> None:
    import hashlib

    from facepipe.detect.fpn import DetectorConfig, load_detector

    ck = load_detector(det_path)
    assert ck.config == DetectorConfig() and isinstance(ck.config.anchors[0][0], float)
    assert ck.threshold == 0.5 and ck.calibration == {} and ck.meta == {}
    assert ck.path == str(det_path) and ck.sha256 == hashlib.sha256(det_path.read_bytes()).hexdigest()
    assert not ck.net.training
    assert all(v.dtype == torch.float32 for v in ck.net.state_dict().values() if v.is_floating_point())


def test_detector_checkpoint_without_the_optional_records_loads(det_path: Path, tmp_path: Path) -> None:
    """``calibration`` and ``meta`` are optional (a hand-made or older checkpoint may lack them)."""
    from facepipe.detect.fpn import load_detector

    doc = torch.load(det_path, map_location="cpu", weights_only=True)
    bare = {k: v for k, v in doc.items() if k not in ("calibration", "meta")}
    ck = load_detector(_save(tmp_path, bare, "bare.pt"))
    assert ck.calibration == {} and ck.meta == {} and ck.threshold == 0.5


def test_detector_checkpoint_threshold_must_be_a_probability(det_path: Path, tmp_path: Path) -> None:
    from facepipe.detect.fpn import load_detector

    doc = torch.load(det_path, map_location="cpu", weights_only=True)
    for t in (0.0, 1.0):
        assert load_detector(_save(tmp_path, {**doc, "threshold": t}, f"t{t}.pt")).threshold == t
    for t in (-0.01, 1.01):
        assert _det_error(_save(tmp_path, {**doc, "threshold": t}, f"t{t}.pt")) == \
            f"threshold {t} is not a probability"


def test_detector_checkpoint_errors_say_what_is_wrong(det_path: Path, tmp_path: Path) -> None:
    from facepipe.detect.fpn import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, resolve_detector_weights

    doc = torch.load(det_path, map_location="cpu", weights_only=True)
    assert _det_error(tmp_path / "absent.pt") == "checkpoint file not found"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert _det_error(garbage).startswith("cannot read checkpoint (")
    foreign = f"not a facepipe face-detector checkpoint (expected format {CHECKPOINT_FORMAT!r})"
    assert _det_error(_save(tmp_path, [1, 2], "list.pt")) == foreign
    assert _det_error(_save(tmp_path, {**doc, "format": "facepipe-embedder"}, "fmt.pt")) == foreign
    assert _det_error(_save(tmp_path, {**doc, "version": CHECKPOINT_VERSION + 1}, "ver.pt")) == \
        (f"checkpoint version {CHECKPOINT_VERSION + 1} not supported "
         f"(this facepipe reads version {CHECKPOINT_VERSION})")
    no_version = {k: v for k, v in doc.items() if k != "version"}
    assert _det_error(_save(tmp_path, no_version, "nover.pt")) == \
        f"checkpoint version None not supported (this facepipe reads version {CHECKPOINT_VERSION})"
    for bad in ({k: v for k, v in doc.items() if k != "config"},
                {**doc, "config": {**doc["config"], "width": 32}},
                {**doc, "state_dict": {k: v for i, (k, v) in enumerate(doc["state_dict"].items()) if i}},
                {k: v for k, v in doc.items() if k != "threshold"}):
        assert _det_error(_save(tmp_path, bad, "bad.pt")).startswith(
            "checkpoint does not match the detector architecture (")
    assert resolve_detector_weights("default").is_file()
    assert resolve_detector_weights(None) == resolve_detector_weights("default")
    assert resolve_detector_weights("~/x.pt") == Path.home() / "x.pt"


class _RunsCode:
    """A pickle that, when loaded without ``weights_only``, creates a directory (as a hostile
    checkpoint would run any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.mkdir, (self.marker,))


def test_loading_a_checkpoint_never_runs_code_from_it(good: dict[str, Any], det_path: Path, tmp_path: Path) -> None:
    """Checkpoints are read with ``weights_only``: a file carrying code is refused as unreadable
    (naming the unpickler's error), and the code does not run."""
    from facepipe.detect.fpn import load_detector

    doc = torch.load(det_path, map_location="cpu", weights_only=True)
    for kind, ck, load in (("embedder", _tiny(good), load_checkpoint), ("detector", doc, load_detector)):
        marker = tmp_path / f"ran-{kind}"
        p = tmp_path / f"hostile-{kind}.pt"
        torch.save({**ck, "payload": _RunsCode(marker)}, p)
        with pytest.raises(CheckpointError) as info:
            load(p)
        assert not marker.exists(), f"loading the {kind} checkpoint ran code from it"
        assert "UnpicklingError" in info.value.problem and info.value.path == str(p)
