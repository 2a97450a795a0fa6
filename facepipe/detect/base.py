"""The detector interface every face detector implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from facepipe.errors import ShapeError
from facepipe.types import Detection


def check_image(image: np.ndarray, where: str = "image") -> np.ndarray:
    """Validate an RGB ``uint8`` ``(H, W, 3)`` array, raising :class:`ShapeError` otherwise."""
    if not isinstance(image, np.ndarray):
        raise ShapeError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ShapeError(f"{where}: expected dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ShapeError(f"{where}: expected shape (H, W, 3), got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ShapeError(f"{where}: empty image of shape {image.shape}")
    return image


class Detector(ABC):
    """Finds faces in RGB ``uint8`` images.

    Subclasses set :attr:`name` and implement :meth:`detect`; detectors that can
    batch (CNNs on a GPU) override :meth:`detect_batch`.
    """

    name: str = "detector"

    @abstractmethod
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in one image, highest score first; an empty list when there are none."""

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Faces in each of several images (default: one at a time)."""
        return [self.detect(im) for im in images]

    def describe(self) -> dict[str, object]:
        """Settings that identify this detector's behaviour (for reports and manifests)."""
        return {"name": self.name}
