"""Viola–Jones detector on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facepipe.detect import available_detectors, create_detector
from facepipe.detect.base import check_image
from facepipe.detect.haar import HaarDetector, resolve_cascade
from facepipe.errors import CheckpointError, ShapeError, UnknownModelError
from facepipe.types import Box

# The astronaut's face, from facenet-pytorch's MTCNN on the same photo (tight face box).
ASTRONAUT_FACE = Box(181.0, 62.0, 87.0, 110.0)


def test_finds_the_astronaut_face(astronaut: np.ndarray) -> None:
    faces = create_detector("haar").detect(astronaut)
    assert len(faces) >= 1
    best = faces[0]
    assert best.detector == "haar"
    assert best.box.iou(ASTRONAUT_FACE) > 0.5
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


@pytest.mark.parametrize("name", ["default", "alt", "alt2"])
def test_named_cascades_find_the_face(astronaut: np.ndarray, name: str) -> None:
    faces = HaarDetector(cascade=name).detect(astronaut)
    assert any(f.box.iou(ASTRONAUT_FACE) > 0.4 for f in faces)


def test_lower_min_neighbors_never_loses_boxes(astronaut: np.ndarray) -> None:
    strict = HaarDetector(min_neighbors=5).detect(astronaut)
    loose = HaarDetector(min_neighbors=1).detect(astronaut)
    assert len(loose) >= len(strict)


def test_grey_content_and_blank_image(astronaut: np.ndarray) -> None:
    grey = np.repeat(astronaut.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    assert any(f.box.iou(ASTRONAUT_FACE) > 0.5 for f in HaarDetector().detect(grey))
    assert HaarDetector().detect(np.full((200, 300, 3), 127, np.uint8)) == []


def test_image_smaller_than_min_size() -> None:
    assert HaarDetector(min_size=24).detect(np.zeros((10, 10, 3), np.uint8)) == []


def test_cascade_resolution_and_errors(tmp_path: Path) -> None:
    assert resolve_cascade("default").name == "haarcascade_frontalface_default.xml"
    assert resolve_cascade("profile").is_file()
    # facepipe's own copy is preferred over OpenCV's
    assert resolve_cascade("default").parent.name == "cascades"
    with pytest.raises(UnknownModelError, match="valid: alt"):
        resolve_cascade("no_such_cascade")
    bad = tmp_path / "bad.xml"
    bad.write_text("<opencv_storage><nonsense/></opencv_storage>")
    with pytest.raises(CheckpointError, match="bad.xml"):
        HaarDetector(cascade=str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        HaarDetector(cascade=str(tmp_path / "missing.xml"))
    explicit = HaarDetector(cascade=str(resolve_cascade("alt")))
    assert explicit.cascade_path.name == "haarcascade_frontalface_alt.xml"


def test_registry_and_input_checks() -> None:
    assert {"haar", "mtcnn"} <= set(available_detectors())
    with pytest.raises(UnknownModelError, match="valid:"):
        create_detector("nope")
    with pytest.raises(ShapeError, match="uint8"):
        check_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ShapeError, match=r"\(H, W, 3\)"):
        check_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        HaarDetector(scale_factor=1.0)
