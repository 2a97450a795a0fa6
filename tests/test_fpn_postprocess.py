"""Post-processing of the single-pass CNN detector (``--detector cnn``) on real photos.

What a user of ``facepipe detect --detector cnn`` relies on after the network has run:
box and landmark decoding, the score threshold, non-maximum suppression at the stated
IoU, ``min_size``, ``max_faces``, the order of the results, down-scaling large images
(``max_pixels``) with boxes reported in the original pixels, and the 4×-shrunk pass
that finds faces larger than the training canvases. ``scripts/mutation_test.py
--target detector-post`` runs these against mutants of that code.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from facepipe.detect.fpn import FPNDetector, decode, suppress_contained
from facepipe.types import Box

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The astronaut's head box (x, y, w, h) from MTCNN's landmarks (``hays_boxes``; see test_fpn_detector).
HEAD = Box(162.4, 60.5, 125.3, 116.5)


@pytest.fixture(scope="module")
def shipped() -> FPNDetector:
    return FPNDetector(device="cpu")


def _side(b: Box) -> float:
    return math.sqrt(max(b.w, 0.0) * max(b.h, 0.0))


def test_decode_matches_the_closed_form_and_clamps_the_size() -> None:
    """Centre = anchor + offset·size, side = size·exp(t) with t clamped to ±4, landmarks =
    anchor + offset·size, for hand-written raw outputs."""
    anchors = torch.tensor([[50.0, 60.0, 32.0], [200.0, 100.0, 128.0], [10.0, 20.0, 16.0], [200.0, 100.0, 128.0]])
    raw = torch.zeros(4, 15)
    raw[0, 1:5] = torch.tensor([0.5, -0.25, math.log(2.0), math.log(0.5)])
    raw[1, 1:5] = torch.tensor([0.0, 0.0, 9.0, -9.0])            # beyond the clamp
    raw[3, 1:5] = torch.tensor([0.0, 0.0, -9.0, 9.0])            # beyond it the other way
    raw[2, 5:] = torch.arange(10, dtype=torch.float32) / 10 - 0.5
    boxes, lm = decode(raw, anchors)
    cx, cy, w, h = 50 + 16, 60 - 8, 64, 16
    torch.testing.assert_close(boxes[0], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    w, h = 128 * math.exp(4.0), 128 * math.exp(-4.0)
    torch.testing.assert_close(boxes[1], torch.tensor([200 - w / 2, 100 - h / 2, 200 + w / 2, 100 + h / 2]))
    torch.testing.assert_close(boxes[3], torch.tensor([200 - h / 2, 100 - w / 2, 200 + h / 2, 100 + w / 2]))
    torch.testing.assert_close(boxes[2], torch.tensor([2.0, 12.0, 18.0, 28.0]))
    off = (np.arange(10) / 10 - 0.5).reshape(5, 2)
    torch.testing.assert_close(lm[2], torch.from_numpy(np.array([10.0, 20.0]) + off * 16).float())
    torch.testing.assert_close(lm[0], anchors[0, :2].expand(5, 2))
    assert boxes.shape == (4, 4) and lm.shape == (4, 5, 2)


def test_threshold_nms_and_order_on_the_astronaut(astronaut: np.ndarray) -> None:
    """Below the operating point more boxes come back; every score is at least the
    threshold asked for, results are best first, no two kept boxes overlap beyond
    ``nms_iou``, and without suppression the one face carries many overlapping boxes."""
    low = FPNDetector(device="cpu", threshold=0.1)
    faces = low.detect(astronaut)
    scores = [f.score for f in faces]
    assert len(faces) > 3 and min(scores) >= 0.1 and scores == sorted(scores, reverse=True)
    for i, a in enumerate(faces):
        for b in faces[i + 1:]:
            assert a.box.iou(b.box) <= low.nms_iou + 1e-6
    dup = FPNDetector(device="cpu", threshold=0.5, nms_iou=1.0, contain=1.0).detect(astronaut)
    on_face = [f for f in dup if f.box.iou(HEAD) >= 0.5]
    assert len(on_face) >= 5                                     # NMS has work to do here ...
    kept = FPNDetector(device="cpu", threshold=0.5).detect(astronaut)
    assert len([f for f in kept if f.box.iou(HEAD) >= 0.5]) == 1   # ... and leaves one box on the face
    assert kept[0].score == pytest.approx(dup[0].score)         # the best box is the one kept
    # a per-call threshold (raw) gives the same boxes as a detector built with it
    b, s, lm = FPNDetector(device="cpu").raw([astronaut], threshold=0.1)[0]
    assert np.allclose(s, scores, atol=1e-6) and len(b) == len(faces)
    assert b.dtype == s.dtype == lm.dtype == np.float32


def _contained_reference(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Greedy 'Min' NMS written out pair by pair."""
    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda k: (-scores[k], k)):
        a = boxes[i]
        ok = True
        for j in kept:
            b = boxes[j]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
            if iw * ih / small >= thr:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


def test_suppress_contained_matches_the_pairwise_reference() -> None:
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 40))
        xy = rng.uniform(0, 200, (n, 2))
        wh = np.exp(rng.uniform(np.log(5), np.log(120), (n, 2)))
        boxes = np.concatenate([xy, xy + wh], 1)
        scores = rng.random(n).round(2)  # ties too: the earlier index wins, as a stable sort
        for thr in (0.5, 0.7):
            assert suppress_contained(boxes, scores, thr).tolist() == _contained_reference(boxes, scores, thr)
        assert sorted(suppress_contained(boxes, scores, 1.0).tolist()) == list(range(n))  # off
    # a head box nested in a larger one (IoU 0.3) goes; one beside it stays
    big, inner, beside = [0, 0, 100, 100], [20, 20, 75, 75], [90, 0, 190, 100]
    kept = suppress_contained(np.array([big, inner, beside], float), np.array([0.9, 0.6, 0.8]), 0.7)
    assert kept.tolist() == [0, 2]
    with pytest.raises(ValueError):
        FPNDetector(device="cpu", contain=0.0)


def test_a_large_face_gets_one_box_not_a_nested_second(astronaut: np.ndarray) -> None:
    """The astronaut's head tripled (a 360-px head) beside a grey margin: plain NMS keeps a
    smaller box inside the head box (their IoU is under 0.4); the containment rule removes it."""
    portrait = cv2.resize(astronaut[30:210, 130:310], None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)
    canvas = np.full((portrait.shape[0], portrait.shape[1] + 600, 3), 128, np.uint8)
    canvas[:, 600:] = portrait
    head = Box((HEAD.x - 130) * 3 + 600, (HEAD.y - 30) * 3, HEAD.w * 3, HEAD.h * 3)
    plain = FPNDetector(device="cpu", contain=1.0).detect(canvas)
    def inside(b: Box) -> float:  # share of b inside the head box
        iw = max(0.0, min(b.x2, head.x2) - max(b.x, head.x))
        ih = max(0.0, min(b.y2, head.y2) - max(b.y, head.y))
        return iw * ih / (b.w * b.h)

    nested = [f for f in plain if f.box.iou(head) < 0.6 and inside(f.box) >= 0.7]
    assert nested, plain  # the failure this rule is for (shipped checkpoint of 2026-11-30)
    (face,) = FPNDetector(device="cpu").detect(canvas)
    assert face.box.iou(head) >= 0.6 and face.score == pytest.approx(plain[0].score)


def test_a_single_candidate_box_is_returned(astronaut: np.ndarray) -> None:
    """A threshold between the two best candidates' scores leaves one box in the whole
    image, before suppression: it comes back."""
    every = FPNDetector(device="cpu", threshold=0.5, nms_iou=1.0, contain=1.0).detect(astronaut)
    s0, s1 = every[0].score, every[1].score
    assert s0 > s1
    (only,) = FPNDetector(device="cpu", threshold=(s0 + s1) / 2).detect(astronaut)
    assert only.score == pytest.approx(s0) and only.box.iou(every[0].box) > 0.999


def test_max_faces_keeps_the_best(astronaut: np.ndarray) -> None:
    every = FPNDetector(device="cpu", threshold=0.05).detect(astronaut)
    three = FPNDetector(device="cpu", threshold=0.05, max_faces=3).detect(astronaut)
    assert len(every) > 3 and [f.score for f in three] == [f.score for f in every[:3]]


def test_min_size_drops_smaller_heads_and_keeps_the_face(astronaut: np.ndarray) -> None:
    every = FPNDetector(device="cpu", threshold=0.05).detect(astronaut)
    small = [f for f in every if _side(f.box) < 40]
    assert small, "the photo has small low-score boxes to drop"
    for min_size in (12.0, 40.0, 100.0):
        det = FPNDetector(device="cpu", threshold=0.05, min_size=min_size)
        faces = det.detect(astronaut)
        assert all(_side(f.box) >= min_size for f in faces), min_size
        assert any(f.box.iou(HEAD) >= 0.5 for f in faces), min_size
    assert FPNDetector(device="cpu", min_size=200.0).detect(astronaut) == []   # a 120-px head


def test_input_scale_follows_min_size_and_max_pixels(shipped: FPNDetector) -> None:
    assert shipped.input_scale(512, 512) == 1.0
    assert FPNDetector(device="cpu", min_size=16.0).input_scale(512, 512) == 1.0
    assert FPNDetector(device="cpu", min_size=40.0).input_scale(512, 512) == pytest.approx(0.4)
    mp = FPNDetector(device="cpu", max_pixels=512 * 512)
    assert mp.input_scale(512, 512) == 1.0
    assert mp.input_scale(1024, 1024) == pytest.approx(0.5)
    both = FPNDetector(device="cpu", min_size=20.0, max_pixels=100 * 100)
    assert both.input_scale(400, 400) == pytest.approx(0.25)    # max_pixels wins over min_size's 0.8
    # max_pixels is checked after min_size's shrink: 1500² px shrunk by 0.5 fit in 1e6 px
    fits = FPNDetector(device="cpu", min_size=32.0, max_pixels=1e6)
    assert fits.input_scale(1500, 1500) == pytest.approx(0.5)
    assert FPNDetector(device="cpu", max_pixels=1e6).input_scale(1500, 1500) == pytest.approx(1000 / 1500)


def test_downscaled_images_report_boxes_in_original_pixels(astronaut: np.ndarray) -> None:
    """A 2× enlarged photo, scaled back down by max_pixels (or min_size) inside the detector:
    the face box and landmarks come back in the enlarged photo's pixels."""
    big = cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    head2 = Box(HEAD.x * 2, HEAD.y * 2, HEAD.w * 2, HEAD.h * 2)
    for det in (FPNDetector(device="cpu", max_pixels=512 * 512), FPNDetector(device="cpu", min_size=40.0)):
        faces = [f for f in det.detect(big) if f.box.iou(head2) >= 0.3]
        assert len(faces) == 1
        f = faces[0]
        assert f.box.iou(head2) >= 0.6
        lm = f.landmarks_array()
        assert ((lm[:, 0] > f.box.x) & (lm[:, 0] < f.box.x2) & (lm[:, 1] > f.box.y) & (lm[:, 1] < f.box.y2)).all()


def test_the_shrunk_pass_finds_a_face_larger_than_the_training_canvases(astronaut: np.ndarray) -> None:
    """A portrait whose head is ~380 px (the astronaut's face cropped and enlarged 3×) is
    found only by the 4×-shrunk pass (``large_faces``), once, where the head is."""
    crop = astronaut[30:210, 130:310]
    portrait = cv2.resize(crop, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)
    head = Box((HEAD.x - 130) * 3, (HEAD.y - 30) * 3, HEAD.w * 3, HEAD.h * 3)
    faces = FPNDetector(device="cpu").detect(portrait)
    assert len(faces) == 1 and faces[0].box.iou(head) >= 0.6
    assert _side(faces[0].box) >= FPNDetector.COARSE_MIN_SIDE
    assert FPNDetector(device="cpu", large_faces=False).detect(portrait) == []


def test_the_shrunk_pass_measures_box_sides_in_both_axes(astronaut: np.ndarray) -> None:
    """The same large head far from the top-left corner (the portrait padded on the left,
    then on the top): the shrunk pass's size floor uses each box's own width and height,
    so the head is still found wherever it sits."""
    crop = astronaut[30:210, 130:310]
    portrait = cv2.resize(crop, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)
    ph, pw = portrait.shape[:2]
    for dy, dx in ((0, 600), (600, 0)):
        canvas = np.full((ph + dy, pw + dx, 3), 128, np.uint8)
        canvas[dy:, dx:] = portrait
        head = Box((HEAD.x - 130) * 3 + dx, (HEAD.y - 30) * 3 + dy, HEAD.w * 3, HEAD.h * 3)
        faces = FPNDetector(device="cpu").detect(canvas)
        assert len(faces) == 1 and faces[0].box.iou(head) >= 0.6, (dy, dx, faces)


def test_non_square_images_keep_rows_and_columns_apart(astronaut: np.ndarray) -> None:
    """On a wide (400 × 452) and a tall (512 × 300) crop the face comes back where it is
    (the tall crop also keeps the detector's one stray box, 15 px on the suit's round
    metal valve: any box beyond that is a head box out of place)."""
    for y0, y1, x0, x1 in ((0, 400, 60, 512), (0, 512, 100, 400)):
        img = np.ascontiguousarray(astronaut[y0:y1, x0:x1])
        ref = Box(HEAD.x - x0, HEAD.y - y0, HEAD.w, HEAD.h)
        faces = [f for f in FPNDetector(device="cpu").detect(img) if _side(f.box) >= 30]
        assert len(faces) == 1 and faces[0].box.iou(ref) >= 0.6, (img.shape, faces)


def test_the_shrunk_pass_adds_no_box_below_its_size_floor(astronaut: np.ndarray) -> None:
    """On the astronaut (a 120-px head) the 4×-shrunk pass has candidates, all smaller than
    ``COARSE_MIN_SIDE``: with or without ``large_faces`` the same boxes come back (no NMS,
    a low threshold, so every candidate would show)."""
    def boxes(large: bool) -> set[tuple[float, ...]]:
        det = FPNDetector(device="cpu", threshold=0.2, nms_iou=1.0, contain=1.0, max_faces=100_000, large_faces=large)
        b, _, _ = det.raw([astronaut])[0]
        return {tuple(np.round(x, 3)) for x in b}

    without = boxes(False)
    assert len(without) > 10 and boxes(True) == without


def test_no_face_gives_empty_float32_arrays() -> None:
    b, s, lm = FPNDetector(device="cpu").raw([np.full((96, 128, 3), 128, np.uint8)])[0]
    assert (b.shape, s.shape, lm.shape) == ((0, 4), (0,), (0, 5, 2))
    assert b.dtype == s.dtype == lm.dtype == np.float32
