"""The embedder interface: aligned face crops in, L2-normalised vectors out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from facepipe.types import Box, Detection


class Embedder(ABC):
    """Maps aligned RGB ``uint8`` crops ``(N, S, S, 3)`` to float32 ``(N, dim)`` unit vectors.

    :attr:`embedder_id` names the model *and* its weights (e.g. ``name@sha256-prefix``)
    so a gallery can refuse vectors from a different embedder.
    """

    name: str = "embedder"
    dim: int = 0
    crop_size: int = 112
    #: Alignment geometry of the crops it expects (:data:`facepipe.align.GEOMETRIES`).
    alignment: str = "arcface-5pt-similarity"
    #: Side faces are warped to before an area resize to ``crop_size`` (``None``: warp to
    #: ``crop_size`` directly). Students trained on downscaled teacher chips use it.
    align_size: int | None = None
    #: Stable name :func:`facepipe.embed.load_embedder` rebuilds it from (``None``: a file path only).
    registry_name: str | None = None
    #: Open-set statistics shipped with the model (``None`` when uncalibrated).
    calibration: dict | None = None

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
        from facepipe.errors import ShapeError

        lm = detection.landmarks_array()
        if lm is None:
            raise ShapeError("detection has no landmarks; cannot align")
        return self.align_landmarks(image, lm)

    def align_landmarks(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """Warp ``image`` so five landmarks (facepipe/MTCNN order) land on this embedder's template."""
        from facepipe.align import align_to

        crop = align_to(image, landmarks, self.alignment, self.align_size or self.crop_size)
        return self._to_crop_size(crop)

    def _to_crop_size(self, crop: np.ndarray) -> np.ndarray:
        if crop.shape[0] == self.crop_size:
            return crop
        import cv2

        return cv2.resize(crop, (self.crop_size, self.crop_size), interpolation=cv2.INTER_AREA)

    def box_crop(self, image: np.ndarray, box: "Box") -> np.ndarray:
        """Landmark-free fallback crop in this embedder's geometry (:func:`facepipe.align.box_crop`)."""
        from facepipe.align import box_crop

        return self._to_crop_size(box_crop(image, box, self.align_size or self.crop_size, self.alignment))
