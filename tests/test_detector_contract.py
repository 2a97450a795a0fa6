"""What every registered detector promises, checked on a real photo.

Parametrised over :func:`facepipe.detect.available_detectors`, so a detector added to
the registry is covered without touching this file. The astronaut photo has one
face: a detector must report it once (no duplicate boxes left over by missing or
weakened non-maximum suppression), best first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from facepipe.detect import available_detectors, create_detector
from facepipe.types import Detection

#: Centre of Eileen Collins' face in skimage's astronaut photo (between the eyes and the mouth).
FACE_CENTRE = (222.0, 115.0)
#: Two boxes overlapping more than this on one face are duplicates, whatever the detector.
DUPLICATE_IOU = 0.5

_cache: dict[str, Any] = {}


def _detector(name: str) -> Any:
    """The detector with its defaults, on the CPU when it takes a device."""
    if name not in _cache:
        try:
            try:
                _cache[name] = create_detector(name, device="cpu")
            except TypeError:  # detectors without a device option (Haar) refuse it
                _cache[name] = create_detector(name)
        except ImportError as exc:  # an optional peer package (the [peers] extra) is absent
            pytest.skip(f"detector {name!r} needs {exc.name or exc}: install the [peers] extra")
    return _cache[name]


def _faces(name: str, astronaut: np.ndarray) -> list[Detection]:
    key = f"{name}/faces"
    if key not in _cache:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)  # the machine is shared: OpenMP barriers make 2 threads slower
        try:
            _cache[key] = _detector(name).detect(astronaut)
        finally:
            torch.set_num_threads(before)
    return _cache[key]


def _iou(a: Detection, b: Detection) -> float:
    return float(a.box.iou(b.box))


def _nms_threshold(name: str) -> float:
    """The detector's own NMS IoU when it states one (``describe()['nms_iou']``), else 0.5."""
    stated = _detector(name).describe().get("nms_iou")
    return min(float(stated), DUPLICATE_IOU) if stated is not None else DUPLICATE_IOU


@pytest.mark.parametrize("name", available_detectors())
def test_no_two_boxes_overlap_beyond_the_nms_threshold(name: str, astronaut: np.ndarray) -> None:
    faces = _faces(name, astronaut)
    limit = _nms_threshold(name)
    pairs = [(i, j, _iou(faces[i], faces[j])) for i in range(len(faces)) for j in range(i + 1, len(faces))]
    dup = [(i, j, round(v, 3)) for i, j, v in pairs if v > limit + 1e-6]
    assert not dup, f"{name}: {len(faces)} boxes, duplicates (i, j, IoU > {limit}): {dup[:5]}"


@pytest.mark.parametrize("name", available_detectors())
def test_the_one_face_is_reported_once_best_first(name: str, astronaut: np.ndarray) -> None:
    faces = _faces(name, astronaut)
    cx, cy = FACE_CENTRE
    on_face = [f for f in faces if f.box.x <= cx <= f.box.x2 and f.box.y <= cy <= f.box.y2]
    assert len(on_face) == 1, f"{name}: {len(on_face)} boxes on the face, {len(faces)} in all"
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True), f"{name}: not best first: {scores}"
    assert all(f.detector for f in faces)
