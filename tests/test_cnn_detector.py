"""The CNN face classifier/detector: checkpoints, convolutional scoring, detection, training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from facepipe.detect.cnn import (
    SHIPPED_WEIGHTS, ClassifierConfig, CNNDetector, FaceClassifierNet, HaarCNNDetector, decode_map,
    load_checkpoint, pyramid_scales, resolve_weights, save_checkpoint,
)
from facepipe.errors import CheckpointError, ShapeError
from facepipe.types import Box

#: Eileen Collins' head box in skimage's astronaut photo (Hays' rule from MTCNN landmarks).
ASTRONAUT_HEAD = Box(162.4, 60.5, 125.3, 116.5)



def test_shipped_weights_are_installed() -> None:
    for name in ("finetune", "transfer"):
        assert resolve_weights(name).is_file(), f"shipped {name} weights missing from facepipe/weights"


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint with ImageNet trunk and a random head (no training needed)."""
    torch.manual_seed(0)
    net = FaceClassifierNet(ClassifierConfig(), pretrained=True)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "clf.pt", net, ClassifierConfig(), 0.6,
                           {"regime": "test"})


def test_checkpoint_roundtrip_is_self_describing(ckpt_path: Path) -> None:
    ck = load_checkpoint(ckpt_path)
    assert ck.config == ClassifierConfig()
    assert ck.threshold == pytest.approx(0.6)
    assert ck.meta["regime"] == "test"
    raw = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert raw["preprocessing"]["input_size"] == 48 and raw["version"] == 1
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values() if v.is_floating_point())
    # fp16 storage: the loaded net equals the original net with weights rounded to fp16
    torch.manual_seed(0)
    ref = FaceClassifierNet(ClassifierConfig(), pretrained=True)
    ref.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                         for k, v in ref.state_dict().items()})
    x = torch.randn(2, 3, 48, 48)
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ck.net(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "foreign", "mismatch", "missing", "version"])
def test_bad_checkpoints_raise_checkpoint_error_naming_the_file(kind: str, ckpt_path: Path,
                                                                 tmp_path: Path) -> None:
    p = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        p.write_bytes(b"this is not a checkpoint" * 10)
    elif kind == "truncated":
        p.write_bytes(ckpt_path.read_bytes()[:5000])
    elif kind == "foreign":
        torch.save({"state_dict": {}}, p)
    elif kind == "mismatch":
        doc = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        doc["config"]["hidden"] = 32
        torch.save(doc, p)
    elif kind == "version":
        doc = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        doc["version"] = 99
        torch.save(doc, p)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    assert str(p) in str(ei.value)


def test_convolutional_scoring_equals_sliding_window_over_features(ckpt_path: Path) -> None:
    net = load_checkpoint(ckpt_path).net
    x = torch.randn(1, 3, 72, 96)
    with torch.no_grad():
        y = net(x)
        feats = net.trunk(x)
        k = net.config.head_kernel
        assert y.shape[-2:] == (feats.shape[-2] - k + 1, feats.shape[-1] - k + 1)
        for i, j in [(0, 0), (1, 3), (y.shape[2] - 1, y.shape[3] - 1)]:
            brute = net.head(feats[:, :, i:i + k, j:j + k])  # one window, head applied alone
            torch.testing.assert_close(brute[0, :, 0, 0], y[0, :, i, j], atol=1e-5, rtol=1e-5)


def test_batchnorm_fusion_keeps_outputs(ckpt_path: Path) -> None:
    import copy

    from facepipe.detect.cnn import fuse_batchnorm

    net = load_checkpoint(ckpt_path).net
    with torch.no_grad():  # make BatchNorm non-trivial so the fold is really exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fused = fuse_batchnorm(copy.deepcopy(net))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 56, 72)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), atol=1e-4, rtol=1e-4)


def test_decode_map_places_windows_and_offsets() -> None:
    out = torch.full((1, 5, 3, 4), -10.0)
    out[0, :, 2, 1] = torch.tensor([5.0, 0.25, -0.5, math.log(2.0), 0.0])
    n, boxes, scores = decode_map(out, scale=2.0, window=32, stride=8, pad=8, threshold=0.5)
    assert n.tolist() == [0] and scores[0] == pytest.approx(1 / (1 + math.exp(-5)))
    # window (i=2, j=1) at x = 8 - 8 = 0, y = 16 - 8 = 8, side 32, centre (16, 24)
    cx, cy, w, h = 16 + 0.25 * 32, 24 - 0.5 * 32, 64.0, 32.0
    expect = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) / 2.0
    torch.testing.assert_close(boxes[0], expect)


def test_pyramid_scales_cover_the_requested_face_sizes() -> None:
    s = pyramid_scales(480, 640, window=32, min_size=24, max_size=None, step=math.sqrt(2))
    assert s[0] == pytest.approx(32 / 24)
    assert all(b / a == pytest.approx(1 / math.sqrt(2)) for a, b in zip(s, s[1:]))
    assert min(480, 640) * s[-1] >= 32 and min(480, 640) * s[-1] / math.sqrt(2) < 32
    assert pyramid_scales(10, 10, 32, 24, None, 1.4) == []
    capped = pyramid_scales(4000, 4000, 32, 24, None, 1.4, max_pixels=1e6)
    assert 4000 * 4000 * capped[0] ** 2 <= 1e6 * 1.0001


def test_detector_handles_any_size_and_batches_like_single(ckpt_path: Path) -> None:
    det = CNNDetector(ckpt_path, threshold=0.0, device="cpu")
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (5, 300, 3), (300, 20, 3), (37, 41, 3)]:
        out = det.detect(rng.integers(0, 255, shape, dtype=np.uint8))
        assert isinstance(out, list)
    a = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    c = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    batch = det.detect_batch([a, b, c])
    for im, got in zip([a, b, c], batch):
        single = det.detect(im)
        assert len(single) == len(got)
        for s, g in zip(single, got):
            assert s.box.xyxy() == pytest.approx(g.box.xyxy(), abs=1e-3)
            assert s.score == pytest.approx(g.score, abs=1e-5)
    with pytest.raises(ShapeError):
        det.detect(np.zeros((10, 10), np.uint8))


def test_sampler_labels_match_brute_force_iou() -> None:
    from skimage import data

    from facepipe.train.classifier_data import DataSplit, SourceImage, WindowSampler, _square

    img = data.astronaut()
    face = np.array([[ASTRONAUT_HEAD.x, ASTRONAUT_HEAD.y, ASTRONAUT_HEAD.w, ASTRONAUT_HEAD.h]])
    sp = DataSplit(faces=[SourceImage(img, face)], scenes=[SourceImage(data.coffee(), np.zeros((0, 4)))])
    s = WindowSampler(sp, seed=3, augment=False)
    for _ in range(40):
        src, cx, cy, side = s._positive() if s.rng.random() < 0.5 else s._near_face()
        crop, boxes = s._warp(src, cx, cy, side)
        lab, tgt, msk = s._labels(boxes)
        sq = _square(boxes)[0]
        for i in range(3):
            for j in range(3):
                wx, wy = 8 * j, 8 * i
                ix = max(0.0, min(wx + 32, sq[0] + sq[2]) - max(wx, sq[0]))
                iy = max(0.0, min(wy + 32, sq[1] + sq[3]) - max(wy, sq[1]))
                iou = ix * iy / (32 * 32 + sq[2] * sq[3] - ix * iy)
                want = 1.0 if iou >= 0.5 else (0.0 if iou < 0.3 else -1.0)
                assert lab[i, j] == want
                if msk[i, j]:
                    assert tgt[i, j, 2] == pytest.approx(math.log(boxes[0, 2] / 32), abs=1e-5)


def test_transfer_training_freezes_trunk_and_finetune_moves_it() -> None:
    from skimage import data

    from facepipe.train.classifier import TrainSettings, train_steps
    from facepipe.train.classifier_data import DataSplit, SourceImage, WindowSampler

    img = data.astronaut()
    face = np.array([[ASTRONAUT_HEAD.x, ASTRONAUT_HEAD.y, ASTRONAUT_HEAD.w, ASTRONAUT_HEAD.h]])
    sp = DataSplit(faces=[SourceImage(img, face)], scenes=[SourceImage(data.coffee(), np.zeros((0, 4)))])
    settings = TrainSettings(batch_size=16, device="cpu")
    torch.manual_seed(0)
    net = FaceClassifierNet(ClassifierConfig(), pretrained=True)
    trunk0 = {k: v.clone() for k, v in net.trunk.state_dict().items()}
    head0 = [p.detach().clone() for p in net.head.parameters()]
    loss = train_steps(net, WindowSampler(sp, seed=0), "transfer", 2, 1e-3, settings, torch.device("cpu"))
    assert math.isfinite(loss)
    for k, v in net.trunk.state_dict().items():  # weights and BatchNorm statistics untouched
        assert torch.equal(v, trunk0[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(head0, net.head.parameters()))
    train_steps(net, WindowSampler(sp, seed=1), "finetune", 1, 1e-3, settings, torch.device("cpu"))
    assert any(not torch.equal(v, trunk0[k]) for k, v in net.trunk.state_dict().items())


def test_roc_auc_matches_pairwise_definition() -> None:
    from facepipe.train.classifier import classification_metrics, roc_auc

    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # ties included
    labels = (rng.random(60) < 0.4).astype(int)
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(scores, labels) == pytest.approx(brute)
    m = classification_metrics(scores, labels, threshold=0.5)
    pred = scores >= 0.5
    assert m["precision"] == pytest.approx((pred & (labels == 1)).sum() / pred.sum())
    assert m["recall"] == pytest.approx((pred & (labels == 1)).sum() / (labels == 1).sum())


@pytest.mark.parametrize("name", sorted(SHIPPED_WEIGHTS))
def test_shipped_weights_find_the_astronaut_and_describe_themselves(name: str, astronaut: np.ndarray) -> None:
    det = CNNDetector(name, device="cpu")
    assert det.describe()["regime"] == name
    assert det.ckpt.meta["data"]["train"]["caltech_crops"] > 1000
    faces = det.detect(astronaut)
    assert faces and faces[0].box.iou(ASTRONAUT_HEAD) >= 0.5
    assert faces[0].score > 0.95
    assert sum(f.box.iou(ASTRONAUT_HEAD) < 0.3 for f in faces) <= 3  # at the calibrated threshold


def test_haar_cnn_verifies_the_astronaut(astronaut: np.ndarray) -> None:
    faces = HaarCNNDetector(device="cpu").detect(astronaut)
    assert len(faces) == 1 and faces[0].box.iou(ASTRONAUT_HEAD) >= 0.5


def test_detect_cli_with_cnn(astronaut_path: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from facepipe.cli import cli

    res = CliRunner().invoke(cli, ["detect", "--detector", "cnn-pyramid", "--device", "cpu", str(astronaut_path)])
    assert res.exit_code == 0, res.output
    rows = [r.split(",") for r in res.output.strip().splitlines()]
    assert rows and rows[0][0] == str(astronaut_path)
    top, right, bottom, left = map(int, rows[0][1:5])
    assert Box.from_xyxy(left, top, right, bottom).iou(ASTRONAUT_HEAD) >= 0.5


def test_eval_set_duplicates_flags_crops_cut_from_benchmark_faces(tmp_path: Path, astronaut: np.ndarray) -> None:
    import json

    import cv2
    from PIL import Image

    from facepipe.train.classifier_data import eval_set_duplicates

    (tmp_path / "images").mkdir()
    Image.fromarray(astronaut).save(tmp_path / "images" / "a.png")
    b = ASTRONAUT_HEAD
    (tmp_path / "annotations.json").write_text(json.dumps({
        "format": "facepipe-detection-v1",
        "images": [{"file": "images/a.png", "width": 512, "height": 512, "boxes": [[b.x, b.y, b.w, b.h]]}]}))
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    same = cv2.resize(grey[int(b.y):int(b.y2), int(b.x):int(b.x2)], (36, 36), interpolation=cv2.INTER_AREA)
    other = cv2.resize(grey[300:420, 20:140], (36, 36), interpolation=cv2.INTER_AREA)
    flags = eval_set_duplicates(np.stack([same, other]), tmp_path / "annotations.json")
    assert flags.tolist() == [True, False]


def test_detection_threshold_calibration_respects_the_fp_budget(astronaut: np.ndarray, ckpt_path: Path) -> None:
    from skimage import data

    from facepipe.train.classifier import calibrate_detection_threshold
    from facepipe.train.classifier_data import DataSplit, SourceImage

    face = np.array([[ASTRONAUT_HEAD.x, ASTRONAUT_HEAD.y, ASTRONAUT_HEAD.w, ASTRONAUT_HEAD.h]])
    val = DataSplit(faces=[SourceImage(astronaut, face)],
                    scenes=[SourceImage(data.coffee()[::2, ::2].copy(), np.zeros((0, 4)))])
    budget = 0.5   # one false positive over the two images
    cal = calibrate_detection_threshold(ckpt_path, val, max_fp_per_image=budget)
    # 0.999 is the cap the search stops at when no threshold meets the budget: not a success
    assert cal["val_images"] == 2 and 0.3 <= cal["threshold"] < 0.999, cal
    assert cal["fp_per_image"] <= budget, cal
    det = CNNDetector(ckpt_path, threshold=cal["threshold"], device="cpu")
    fps = sum(sum(f.box.iou(ASTRONAUT_HEAD) < 0.3 for f in det.detect(img))
              for img in (astronaut, val.scenes[0].image))
    assert fps <= 1, (fps, cal)


def test_detect_cli_any_colour_mode_and_size(tmp_path: Path, astronaut: np.ndarray) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from facepipe.cli import cli

    Image.fromarray(astronaut).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(astronaut).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(astronaut[:1, :1]).save(tmp_path / "tiny.png")
    Image.fromarray(astronaut).convert("P").save(tmp_path / "palette.png")
    res = CliRunner().invoke(cli, ["detect", "--detector", "cnn-pyramid", "--device", "cpu", "-q", str(tmp_path)])
    assert res.exit_code == 0, res.output
    found = {Path(r.split(",")[0]).name for r in res.output.strip().splitlines()}
    assert {"grey.png", "rgba.png", "palette.png"} <= found and "tiny.png" not in found
