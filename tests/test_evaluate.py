"""The detection evaluation harness against hand-computed and brute-force references."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facepipe.evaluate import (
    average_precision, box_iou_matrix, load_annotations, precision_recall, summarize, DetectorRun,
)
from facepipe.types import Box, Detection

REPO = Path(__file__).resolve().parent.parent


def det(x: float, y: float, w: float, h: float, s: float) -> Detection:
    return Detection(Box(x, y, w, h), s, "t")


def test_iou_matrix_matches_pairwise_reference() -> None:
    rng = np.random.default_rng(1)
    a = np.column_stack([rng.uniform(0, 50, 20), rng.uniform(0, 50, 20), rng.uniform(1, 30, 20), rng.uniform(1, 30, 20)])
    b = np.column_stack([rng.uniform(0, 50, 15), rng.uniform(0, 50, 15), rng.uniform(1, 30, 15), rng.uniform(1, 30, 15)])
    m = box_iou_matrix(a, b)
    ref = np.array([[Box(*r).iou(Box(*c)) for c in b] for r in a])
    np.testing.assert_allclose(m, ref, atol=1e-12)


def test_perfect_detector_has_ap_one() -> None:
    gt = [[Box(0, 0, 10, 10), Box(20, 20, 10, 10)], [Box(5, 5, 8, 8)]]
    dets = [[det(0, 0, 10, 10, 0.9), det(20, 20, 10, 10, 0.8)], [det(5, 5, 8, 8, 0.7)]]
    r = precision_recall(dets, gt, 0.5)
    assert r.ap == pytest.approx(1.0) and r.recall == 1.0 and r.fp == 0


def test_hand_computed_ap_and_duplicates() -> None:
    # 2 GT. Ranked: TP (0.9), FP duplicate of the same face (0.8), TP (0.7).
    # precision: 1, 1/2, 2/3; recall: .5, .5, 1 -> envelope: 1 on [0,.5], 2/3 on (.5,1]
    gt = [[Box(0, 0, 10, 10), Box(50, 50, 10, 10)]]
    dets = [[det(0, 0, 10, 10, 0.9), det(1, 1, 10, 10, 0.8), det(50, 50, 10, 10, 0.7)]]
    r = precision_recall(dets, gt, 0.5)
    assert r.ap == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))
    assert (r.tp, r.fp) == (2, 1)
    assert r.fp_per_image == 1.0


def test_iou_threshold_changes_matching() -> None:
    gt = [[Box(0, 0, 10, 10)]]
    dets = [[det(3, 0, 10, 10, 0.9)]]  # IoU = 70/130 = 0.538
    assert precision_recall(dets, gt, 0.5).tp == 1
    assert precision_recall(dets, gt, 0.6).tp == 0


def test_average_precision_envelope() -> None:
    assert average_precision(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(0.75)
    assert average_precision(np.array([]), np.array([])) == 0.0


def test_summary_reports_both_ious() -> None:
    gt = [[Box(0, 0, 10, 10)]]
    s = summarize(DetectorRun("x", [[det(0, 0, 10, 10, 1.0)]], [3.0]), gt)
    assert s["iou0.5"]["ap"] == 1.0 and s["iou0.3"]["ap"] == 1.0 and s["median_ms_per_image"] == 3.0


def test_bad_annotation_file(tmp_path: Path) -> None:
    from facepipe.errors import InputError

    (tmp_path / "annotations.json").write_text(json.dumps({"images": []}))
    with pytest.raises(InputError, match="not a facepipe-detection-v1"):
        load_annotations(tmp_path)
    with pytest.raises(InputError, match="not found"):
        load_annotations(tmp_path / "nope")


@pytest.mark.data
def test_shared_sets_load(shared_data: Path) -> None:
    for name, n_img, n_faces in [("caltech_webfaces_dev", 260, 583), ("dlib_pascal_faces", 9, 43)]:
        gt = load_annotations(shared_data / "detection" / name)
        assert len(gt) == n_img and sum(len(g.boxes) for g in gt) == n_faces
        assert all(g.path.is_file() for g in gt)


@pytest.mark.data
def test_eval_script_runs_haar_on_shared_set(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval_detector.py"), "--detector", "haar",
         "--set", str(shared_data / "detection" / "dlib_pascal_faces"), "--out", str(out)],
        check=True, capture_output=True, text=True,
    )
    res = json.loads((out / "results.json").read_text())
    d = res["sets"]["dlib_pascal_faces"]["detectors"][0]
    # Haar finds most of these frontal faces; a broken matcher or detector would not.
    assert d["iou0.3"]["ap"] > 0.7 and d["iou0.3"]["recall"] > 0.7
    assert d["iou0.5"]["ap"] <= d["iou0.3"]["ap"] + 1e-9
    assert (out / "pr_dlib_pascal_faces.png").stat().st_size > 10_000
