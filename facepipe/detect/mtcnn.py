"""MTCNN (facenet-pytorch) as a reference CNN detector that also predicts 5 landmarks.

facenet-pytorch ships its P/R/O-Net weights inside the PyPI package, so this works
offline. Landmarks are in facepipe's order: left eye, right eye, nose, left and
right mouth corners (image left/right).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from facepipe.detect.base import Detector, check_image
from facepipe.types import Box, Detection


class MTCNNDetector(Detector):
    """facenet-pytorch's MTCNN wrapped in the :class:`Detector` interface.

    ``min_size`` is MTCNN's ``min_face_size``; ``thresholds`` its three stage
    thresholds; ``device`` any string :func:`facepipe.device.resolve_device` accepts.
    """

    def __init__(
        self,
        min_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        device: str = "auto",
    ) -> None:
        from facepipe.device import resolve_device
        from facepipe.fastimport import mtcnn_class

        MTCNN = mtcnn_class()  # noqa: N806 (facenet-pytorch's class, without all of torchvision)

        self.device = resolve_device(device)
        self.min_size = int(min_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self._mtcnn = MTCNN(
            keep_all=True, min_face_size=self.min_size, thresholds=list(self.thresholds),
            device=self.device, post_process=False, select_largest=False,
        )
        self.name = "mtcnn"

    def describe(self) -> dict[str, object]:
        """MTCNN settings."""
        return {"name": self.name, "min_size": self.min_size, "thresholds": list(self.thresholds)}

    @staticmethod
    def _to_detections(boxes: np.ndarray | None, probs: np.ndarray | None,
                       points: np.ndarray | None, name: str) -> list[Detection]:
        if boxes is None or len(boxes) == 0:
            return []
        out = []
        for b, p, lm in zip(boxes, probs, points):
            landmarks = tuple((float(x), float(y)) for x, y in np.asarray(lm).reshape(5, 2))
            out.append(Detection(Box.from_xyxy(*map(float, b)), float(p), name, landmarks))
        out.sort(key=lambda d: d.score, reverse=True)
        return out

    def _too_small(self, image: np.ndarray) -> bool:
        # MTCNN's image pyramid starts at min_size: an image whose shorter side is below
        # it has no pyramid level at all (facenet-pytorch then fails on an empty
        # torch.cat), and it cannot hold a face of the minimum size anyway
        return min(image.shape[0], image.shape[1]) < self.min_size

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces with landmarks in one RGB image, highest score first."""
        import torch

        check_image(image)
        if self._too_small(image):
            return []
        with torch.inference_mode():
            boxes, probs, points = self._mtcnn.detect(image, landmarks=True)
        return self._to_detections(boxes, probs, points, self.name)

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Batched detection when all images share one size, else one at a time."""
        import torch

        if len(images) > 1 and len({im.shape for im in images}) == 1 and not self._too_small(images[0]):
            for im in images:
                check_image(im)
            with torch.inference_mode():
                boxes, probs, points = self._mtcnn.detect(np.stack(images), landmarks=True)
            return [self._to_detections(b, p, l, self.name) for b, p, l in zip(boxes, probs, points)]
        return [self.detect(im) for im in images]
