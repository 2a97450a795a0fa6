"""Frozen value types passed between pipeline stages.

Coordinates are pixels in the image the detection was made on, with ``(x, y)`` the
top-left corner (0-based, float). Landmarks, when present, are five ``(x, y)``
points in the order left eye, right eye, nose, left mouth corner, right mouth
corner (the image's left/right, as MTCNN and ArcFace use them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


#: Detectors whose score is not a probability: Haar's is the cascade's last-stage response
#: (OpenCV's ``detectMultiScale3`` level weight, roughly 0.5-6). Their score is reported as
#: ``det_response`` and ``det_score`` is null, so ``det_score`` is always a face
#: probability in 0..1 (MTCNN, the CNN detector, Haar+CNN) wherever it appears.
RESPONSE_SCORE_DETECTORS = frozenset({"haar"})


def score_fields(detector: str, score: float | None) -> dict[str, float | None]:
    """``{"det_score": p}`` for probabilistic detectors, ``{"det_score": None, "det_response": r}``
    for those in :data:`RESPONSE_SCORE_DETECTORS`."""
    value = None if score is None else round(float(score), 5)
    if detector in RESPONSE_SCORE_DETECTORS:
        return {"det_score": None, "det_response": value}
    return {"det_score": value}


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``(x, y, w, h)`` in pixels."""

    x: float
    y: float
    w: float
    h: float

    @property
    def x2(self) -> float:
        """Right edge (exclusive)."""
        return self.x + self.w

    @property
    def y2(self) -> float:
        """Bottom edge (exclusive)."""
        return self.y + self.h

    @property
    def area(self) -> float:
        """Area in square pixels (0 for degenerate boxes)."""
        return max(self.w, 0.0) * max(self.h, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        """Centre point ``(cx, cy)``."""
        return (self.x + self.w / 2.0, self.y + self.h / 2.0)

    @classmethod
    def from_xyxy(cls, x1: float, y1: float, x2: float, y2: float) -> "Box":
        """Build a box from corner coordinates."""
        return cls(float(x1), float(y1), float(x2) - float(x1), float(y2) - float(y1))

    def xyxy(self) -> tuple[float, float, float, float]:
        """Corners ``(x1, y1, x2, y2)``."""
        return (self.x, self.y, self.x2, self.y2)

    def iou(self, other: "Box") -> float:
        """Intersection over union with another box."""
        ix = max(0.0, min(self.x2, other.x2) - max(self.x, other.x))
        iy = max(0.0, min(self.y2, other.y2) - max(self.y, other.y))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def clip(self, width: int, height: int) -> "Box":
        """This box clipped to an image of the given size."""
        x1 = min(max(self.x, 0.0), float(width))
        y1 = min(max(self.y, 0.0), float(height))
        x2 = min(max(self.x2, 0.0), float(width))
        y2 = min(max(self.y2, 0.0), float(height))
        return Box.from_xyxy(x1, y1, x2, y2)

    def scaled(self, factor: float) -> "Box":
        """This box scaled about its centre by ``factor``."""
        cx, cy = self.center
        w, h = self.w * factor, self.h * factor
        return Box(cx - w / 2.0, cy - h / 2.0, w, h)

    def trbl(self) -> tuple[int, int, int, int]:
        """``(top, right, bottom, left)`` as integers, face_recognition's convention."""
        return (
            int(round(self.y)),
            int(round(self.x2)),
            int(round(self.y2)),
            int(round(self.x)),
        )


@dataclass(frozen=True)
class Detection:
    """One face found by a detector.

    ``score`` is the detector's own confidence (higher is more face-like); its scale
    differs between detectors, so compare scores only within one detector.
    """

    box: Box
    score: float
    detector: str
    landmarks: tuple[tuple[float, float], ...] | None = None

    def landmarks_array(self) -> np.ndarray | None:
        """Landmarks as a float32 ``(5, 2)`` array, or ``None``."""
        if self.landmarks is None:
            return None
        return np.asarray(self.landmarks, dtype=np.float32)

    def clipped(self, width: int, height: int) -> "Detection":
        """This detection with its box clipped to a ``width`` × ``height`` image."""
        return Detection(self.box.clip(width, height), self.score, self.detector, self.landmarks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary: x, y, w, h, det_score[, det_response], detector[, landmarks].

        The detector's confidence is ``det_score`` (never plain ``score``), so it cannot be
        confused with an identity's similarity or distance in the same record; it is a
        probability in 0..1, or null with the raw ``det_response`` for detectors whose score
        is not one (:data:`RESPONSE_SCORE_DETECTORS`).
        """
        d: dict[str, Any] = {
            "x": round(self.box.x, 2),
            "y": round(self.box.y, 2),
            "w": round(self.box.w, 2),
            "h": round(self.box.h, 2),
            **score_fields(self.detector, self.score),
            "detector": self.detector,
        }
        if self.landmarks is not None:
            d["landmarks"] = [[round(x, 2), round(y, 2)] for x, y in self.landmarks]
        return d


@dataclass(frozen=True)
class Match:
    """A gallery identity proposed for a face, with its score: the cosine similarity minus
    the enrolled vector's cohort ``penalty`` (0 unless the gallery's impostor model has a
    cohort; see :mod:`facepipe.gallery.cohort`)."""

    name: str
    score: float
    penalty: float = 0.0


@dataclass(frozen=True)
class FaceResult:
    """A detected face and, after identification, its decision.

    ``name`` is ``None`` before identification and ``"unknown"`` when the best
    match falls below the gallery's threshold.
    """

    detection: Detection
    name: str | None = None
    score: float | None = None
    candidates: tuple[Match, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ImageResult:
    """Everything found in one image file."""

    path: str
    width: int
    height: int
    faces: tuple[FaceResult, ...]
