"""The embedder interface: aligned face crops in, L2-normalised vectors out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from facepipe.types import Detection


class Embedder(ABC):
    """Maps aligned RGB ``uint8`` crops ``(N, S, S, 3)`` to float32 ``(N, dim)`` unit vectors.

    :attr:`embedder_id` names the model *and* its weights (e.g. ``name@sha256-prefix``)
    so a gallery can refuse vectors from a different embedder.
    """

    name: str = "embedder"
    dim: int = 0
    crop_size: int = 112

    @property
    @abstractmethod
    def embedder_id(self) -> str:
        """Model name plus a hash of its weights."""

    @abstractmethod
    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embed a batch of aligned crops; returns float32 ``(N, dim)`` with unit rows."""

    def align(self, image: np.ndarray, detection: "Detection") -> np.ndarray:
        """The crop this embedder expects for one detected face (default: 5-landmark similarity warp).

        Embedders with their own alignment (dlib's) override this. The detection
        must carry landmarks; :class:`facepipe.pipeline.FacePipeline` supplies them.
        """
        from facepipe.align import align_face
        from facepipe.errors import ShapeError

        lm = detection.landmarks_array()
        if lm is None:
            raise ShapeError("detection has no landmarks; cannot align")
        return align_face(image, lm, self.crop_size)
