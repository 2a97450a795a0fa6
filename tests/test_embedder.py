"""The embedding network, its self-describing checkpoint and the embedder registry."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facepipe.embed import DEFAULT_CHECKPOINT, available_embedders, load_embedder
from facepipe.embed.network import (
    NetworkEmbedder, build_network, default_preprocess, load_checkpoint, make_checkpoint,
    save_checkpoint,
)
from facepipe.errors import CheckpointError, ShapeError, UnknownModelError

ARCH = {"backbone": "mobilenet_v2", "dim": 64, "dropout": 0.2, "init_seed": 3}


@pytest.fixture(scope="module")
def crops(astronaut: np.ndarray) -> np.ndarray:
    """Six real 112x112 crops cut from the astronaut photo (aligned-crop sized)."""
    import cv2

    boxes = [(150, 30, 150), (100, 0, 250), (0, 0, 512), (200, 60, 90), (300, 300, 200), (50, 250, 180)]
    return np.stack([cv2.resize(astronaut[y:y + s, x:x + s], (112, 112)) for x, y, s in boxes])


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = build_network(ARCH, pretrained=False)
    ck = make_checkpoint(net, name="test-net", version="t1", arch=ARCH,
                         preprocess=default_preprocess(112, flip_tta=False),
                         training={"loss": "none", "images": 0})
    return save_checkpoint(ck, tmp_path_factory.mktemp("ck") / "net.pt")


def test_embeddings_are_unit_rows_and_batch_independent(ckpt_path: Path, crops: np.ndarray) -> None:
    emb = NetworkEmbedder.from_checkpoint(ckpt_path, device="cpu", batch_size=4)
    out = emb.embed(crops)
    assert out.shape == (6, 64) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([emb.embed(crops[i:i + 1]) for i in range(len(crops))])
    assert np.allclose(out, one_by_one, atol=1e-4)
    assert emb.embed(crops[:0]).shape == (0, 64)


def test_flip_tta_is_mirror_invariant(ckpt_path: Path, crops: np.ndarray) -> None:
    emb = NetworkEmbedder.from_checkpoint(ckpt_path, device="cpu", flip_tta=True)
    a = emb.embed(crops)
    b = emb.embed(np.ascontiguousarray(crops[:, :, ::-1]))
    assert np.allclose(a, b, atol=1e-4)
    assert emb.embedder_id.endswith("+flip")


def test_checkpoint_round_trip_keeps_id_and_vectors(ckpt_path: Path, crops: np.ndarray,
                                                    tmp_path: Path) -> None:
    a = NetworkEmbedder.from_checkpoint(ckpt_path, device="cpu")
    ck = load_checkpoint(ckpt_path)
    assert ck["preprocess"]["crop_size"] == 112 and ck["arch"]["dim"] == 64
    again = save_checkpoint(ck, tmp_path / "copy.pt")
    b = NetworkEmbedder.from_checkpoint(again, device="cpu")
    assert a.embedder_id == b.embedder_id and a.embedder_id.startswith("test-net@")
    assert np.allclose(a.embed(crops), b.embed(crops), atol=1e-6)
    assert load_embedder(str(again), device="cpu").embedder_id == a.embedder_id


def test_crop_shape_is_checked(ckpt_path: Path) -> None:
    emb = NetworkEmbedder.from_checkpoint(ckpt_path, device="cpu")
    with pytest.raises(ShapeError, match="112"):
        emb.embed(np.zeros((2, 96, 96, 3), np.uint8))
    with pytest.raises(ShapeError, match="uint8"):
        emb.embed(np.zeros((2, 112, 112, 3), np.float32))


def test_corrupt_and_mismatched_checkpoints_name_the_file(ckpt_path: Path, tmp_path: Path) -> None:
    import torch

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt_path.read_bytes()[:5000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    not_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_dict)
    ck = load_checkpoint(ckpt_path)
    wrong_format = tmp_path / "wrong_format.pt"
    torch.save({**ck, "format": "something-else"}, wrong_format)
    wrong_dim = tmp_path / "wrong_dim.pt"
    torch.save({**ck, "arch": {**ck["arch"], "dim": 128}}, wrong_dim)
    wrong_backbone = tmp_path / "wrong_backbone.pt"
    torch.save({**ck, "arch": {**ck["arch"], "backbone": "resnet9000"}}, wrong_backbone)
    newer = tmp_path / "newer.pt"
    torch.save({**ck, "format_version": 99}, newer)
    for bad, msg in [(truncated, "corrupt"), (garbage, "corrupt"), (not_dict, "not a facepipe"),
                     (wrong_format, "format"), (wrong_dim, "do not match"),
                     (wrong_backbone, "backbone"), (newer, "newer"),
                     (tmp_path / "missing.pt", "no such")]:
        with pytest.raises(CheckpointError, match=msg) as info:
            NetworkEmbedder.from_checkpoint(bad, device="cpu")
        assert str(bad) in str(info.value)


def test_registry_names_and_errors() -> None:
    assert {"default", "untrained", "dlib"} <= set(available_embedders())
    with pytest.raises(UnknownModelError, match="default"):
        load_embedder("no-such-embedder")


def test_shipped_default_checkpoint_is_self_describing(crops: np.ndarray) -> None:
    assert DEFAULT_CHECKPOINT.is_file(), "the package must ship its default embedder"
    assert DEFAULT_CHECKPOINT.stat().st_size < 15 * 2**20
    ck = load_checkpoint(DEFAULT_CHECKPOINT)
    for key in ("loss", "data"):
        assert key in ck["training"]
    emb = load_embedder("default", device="cpu")
    s = emb.crop_size  # 150 for the dlib-family default, 112 for MobileNetV2
    out = emb.embed(np.stack([cv2.resize(c, (s, s), interpolation=cv2.INTER_LINEAR) for c in crops[:3]]))
    assert out.shape == (3, emb.dim) and 128 <= emb.dim <= 512
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_untrained_floor_is_seeded(crops: np.ndarray) -> None:
    a = load_embedder("untrained", device="cpu").embed(crops[:2])
    b = load_embedder("untrained", device="cpu").embed(crops[:2])
    assert np.allclose(a, b, atol=1e-6)


def test_dlib_peer_when_installed(astronaut: np.ndarray) -> None:
    pytest.importorskip("dlib")
    from facepipe.detect.mtcnn import MTCNNDetector

    emb = load_embedder("dlib", device="cpu")
    det = MTCNNDetector(device="cpu").detect(astronaut)[0]
    chip = emb.align(astronaut, det)
    assert chip.shape == (150, 150, 3)
    v = emb.embed(np.stack([chip, chip]))
    assert v.shape == (2, 128) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.allclose(v[0], v[1])


# -- validation protocol ---------------------------------------------------------------------

def test_people_split_and_pairs_are_people_disjoint() -> None:
    from facepipe.train.embedder_data import make_pairs, people_split

    rng = np.random.default_rng(0)
    labels = np.array([f"p{k}" for k in range(300) for _ in range(rng.integers(1, 6))])
    train, val = people_split(labels, 0.2, seed=0)
    assert train and val and not (train & val) and train | val == set(labels)
    assert 0.1 < len(val) / 300 < 0.3
    # adding people does not move anyone: the split is a per-name hash
    _, val2 = people_split(np.concatenate([labels, ["zz_new"] * 3]), 0.2, seed=0)
    assert val <= val2
    pairs = make_pairs(labels, val, folds=10, per_fold=50, seed=0)
    assert set(labels[pairs.i]) | set(labels[pairs.j]) <= val
    assert np.all((labels[pairs.i] == labels[pairs.j]) == pairs.same)
    assert np.all(pairs.i != pairs.j)
    fold_people = [set(labels[pairs.i[pairs.fold == f]]) | set(labels[pairs.j[pairs.fold == f]])
                   for f in np.unique(pairs.fold)]
    for a in range(len(fold_people)):
        for b in range(a + 1, len(fold_people)):
            assert not (fold_people[a] & fold_people[b])


def test_verification_metrics_match_brute_force() -> None:
    from facepipe.train.embedder_data import Pairs, verification_metrics

    rng = np.random.default_rng(1)
    n = 400
    same = rng.random(n) < 0.5
    base = rng.normal(size=(n, 16))
    other = np.where(same[:, None], base + rng.normal(scale=1.2, size=(n, 16)), rng.normal(size=(n, 16)))
    emb = np.concatenate([base, other]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pairs = Pairs(np.arange(n), np.arange(n) + n, same, np.arange(n) % 10)
    m = verification_metrics(emb, pairs)
    s = np.sum(emb[:n] * emb[n:], axis=1)
    # AUC: probability a matched pair outscores a mismatched one
    auc = np.mean(s[same][:, None] > s[~same][None, :]) + 0.5 * np.mean(s[same][:, None] == s[~same][None, :])
    assert abs(m["auc"] - auc) < 1e-9
    # 10-fold accuracy: best threshold on 9 folds by exhaustive search, applied to the 10th
    accs = []
    for f in range(10):
        tr, te = pairs.fold != f, pairs.fold == f
        cands = np.concatenate([[-2.0], np.sort(s[tr]) + 1e-9])
        best = max(cands, key=lambda t: np.mean((s[tr] >= t) == same[tr]))
        best_acc = np.mean((s[tr] >= best) == same[tr])
        accs.append((best_acc, np.mean((s[te] >= best) == same[te])))
    assert abs(m["accuracy"] - np.mean([a for _, a in accs])) < 0.02
    # TAR at FAR: accept scores above the (k+1)-th highest impostor score, k = floor(FAR * impostors)
    neg = np.sort(s[~same])[::-1]
    k = int(np.floor(1e-2 * len(neg)))
    tar = np.mean(s[same] > neg[k])
    assert abs(m["tar@far=0.01"] - tar) < 1e-9


def test_registry_names_and_checkpoint_lookup() -> None:
    from facepipe.embed import DEFAULT_NAME, SHIPPED, checkpoint_dict

    names = available_embedders()
    for n in ("default", "dlib-port", "untrained", "dlib", *SHIPPED):
        assert n in names
    assert DEFAULT_NAME in SHIPPED
    emb = load_embedder("default", device="cpu")
    assert emb.registry_name == DEFAULT_NAME  # a gallery manifest can name it
    assert checkpoint_dict("default")["name"] == emb.name
    with pytest.raises(UnknownModelError):
        checkpoint_dict("untrained")


def test_unknown_keys_and_calibration_survive_loading(ckpt_path: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(ckpt_path)
    assert NetworkEmbedder.from_checkpoint(ckpt_path, device="cpu").calibration is None
    ck["calibration"] = {"fmr": {"0.001": 0.62}}
    ck["something_new"] = [1, 2, 3]
    p = save_checkpoint(ck, tmp_path / "cal.pt")
    emb = NetworkEmbedder.from_checkpoint(p, device="cpu")
    assert emb.calibration == {"fmr": {"0.001": 0.62}}
    assert emb.checkpoint_extra == {"something_new": [1, 2, 3]}
    assert emb.describe()["calibrated"] is True
    ck["calibration"] = "not a dict"
    bad = save_checkpoint(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="calibration"):
        load_checkpoint(bad)
