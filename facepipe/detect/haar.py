"""Viola–Jones face detection with OpenCV Haar cascades.

Scores come from ``detectMultiScale3(..., outputRejectLevels=True)``: the summed
stage response of the cascade's last stage for each grouped box, so boxes can be
ranked on a precision–recall curve rather than only accepted or rejected.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from facepipe.detect.base import Detector, check_image
from facepipe.errors import CheckpointError, UnknownModelError
from facepipe.types import Box, Detection

#: Short names for the cascades users ask for most, mapped to OpenCV file names.
CASCADE_NAMES: dict[str, str] = {
    "default": "haarcascade_frontalface_default.xml",
    "alt": "haarcascade_frontalface_alt.xml",
    "alt2": "haarcascade_frontalface_alt2.xml",
    "alt_tree": "haarcascade_frontalface_alt_tree.xml",
    "profile": "haarcascade_profileface.xml",
    "eye": "haarcascade_eye.xml",
}



def cascade_search_dirs() -> list[Path]:
    """Where cascade files are looked up: facepipe's own copies, then OpenCV's."""
    import importlib.resources

    dirs = [Path(str(importlib.resources.files("facepipe.cascades")))]
    try:
        import cv2

        data = getattr(cv2, "data", None)
        if data is not None and getattr(data, "haarcascades", None):
            dirs.append(Path(data.haarcascades))
    except ImportError:  # pragma: no cover - cv2 is a hard dependency
        pass
    return dirs


def resolve_cascade(spec: str) -> Path:
    """Turn a cascade name (``default``, ``alt``, …, or an OpenCV file name) or a path into a file."""
    candidate = Path(os.path.expanduser(spec))
    if candidate.suffix.lower() == ".xml" and (candidate.exists() or os.sep in spec):
        if not candidate.is_file():
            raise CheckpointError(candidate, "cascade file not found")
        return candidate
    filename = CASCADE_NAMES.get(spec, spec if spec.endswith(".xml") else f"haarcascade_{spec}.xml")
    for d in cascade_search_dirs():
        f = d / filename
        if f.is_file():
            return f
    raise UnknownModelError("cascade", spec, sorted(CASCADE_NAMES))


class HaarDetector(Detector):
    """OpenCV's Viola–Jones cascade detector.

    Parameters mirror ``cv2.CascadeClassifier.detectMultiScale``: ``scale_factor`` is
    the pyramid step, ``min_neighbors`` how many overlapping raw hits a face needs,
    ``min_size`` the smallest face side in pixels (``max_size`` the largest, 0 = none);
    ``equalize`` histogram-equalises the grey image first (off by default: it lowered AP
    on caltech_webfaces_dev, see docs/benchmarks.md).
    """

    def __init__(
        self,
        cascade: str = "default",
        scale_factor: float = 1.1,
        min_neighbors: int = 3,
        min_size: int = 24,
        max_size: int = 0,
        equalize: bool = False,
    ) -> None:
        import cv2

        if scale_factor <= 1.0:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
        if min_neighbors < 0:
            raise ValueError(f"min_neighbors must be >= 0, got {min_neighbors}")
        if min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        self.cascade_path = resolve_cascade(cascade)
        self._cascade = cv2.CascadeClassifier()
        try:
            loaded = self._cascade.load(str(self.cascade_path))
        except cv2.error as exc:
            raise CheckpointError(self.cascade_path, "not a valid OpenCV cascade XML file") from exc
        if not loaded or self._cascade.empty():
            raise CheckpointError(self.cascade_path, "not a valid OpenCV cascade XML file")
        self.cascade = cascade
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.equalize = bool(equalize)
        self.name = "haar"

    def describe(self) -> dict[str, object]:
        """Cascade file and detectMultiScale settings."""
        return {
            "name": self.name,
            "cascade": self.cascade_path.name,
            "scale_factor": self.scale_factor,
            "min_neighbors": self.min_neighbors,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "equalize": self.equalize,
        }

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in one RGB image, highest score first."""
        import cv2

        check_image(image)
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if self.equalize:
            grey = cv2.equalizeHist(grey)
        max_size = (self.max_size, self.max_size) if self.max_size else (0, 0)
        rects, _levels, weights = self._cascade.detectMultiScale3(
            grey,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
            maxSize=max_size,
            outputRejectLevels=True,
        )
        if len(rects) == 0:
            return []
        weights = np.asarray(weights, dtype=np.float64).reshape(-1)
        dets = [
            Detection(Box(float(x), float(y), float(w), float(h)), float(s), self.name)
            for (x, y, w, h), s in zip(np.asarray(rects).reshape(-1, 4), weights)
        ]
        dets.sort(key=lambda d: d.score, reverse=True)
        return dets
