"""Compose detection, alignment and embedding for images and batches of frames.

:class:`FacePipeline` is what ``enroll``, ``identify``, ``embed`` and the video
command share, so every embedding goes through the same alignment::

    from facepipe.detect import create_detector
    from facepipe.embed import load_embedder
    from facepipe.pipeline import FacePipeline

    pipe = FacePipeline(create_detector("mtcnn"), load_embedder("default"))
    result = pipe.process(image)          # PipelineResult: .faces and .skipped
    for face in result.faces:
        face.detection.box, face.embedding  # float32 (dim,), unit norm
    results = pipe.process_batch(frames)  # one embedder batch across all frames

Faces that cannot be embedded well are *reported*, never silently embedded: each
goes to ``result.skipped`` with a :class:`SkipReason`:

* ``too_small``: the box's shorter side is below ``min_face`` pixels;
* ``no_landmarks``: the detector gave no landmarks and MTCNN, run on the face
  region, found none either (see below);
* ``not_largest``: ``largest_only=True`` and a larger face is in the image.

Detectors without landmarks (Haar): with ``landmarks="mtcnn"`` (default) the
pipeline runs MTCNN on the face's neighbourhood (the box enlarged 1.6×, rescaled so
the face is ~80 px) and takes the landmarks of the MTCNN face overlapping the box
best (IoU ≥ 0.3); the box stays the original detector's. With ``landmarks="box"``
it uses :func:`facepipe.align.box_crop` instead (centred square crop, no rotation
correction; ``EmbeddedFace.alignment == "box"``), which is faster but less accurate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Sequence

import numpy as np

from facepipe.detect.base import check_image
from facepipe.errors import ShapeError
from facepipe.types import Box, Detection

if TYPE_CHECKING:
    from facepipe.detect.base import Detector
    from facepipe.embed.base import Embedder

log = logging.getLogger(__name__)


class SkipReason(str, Enum):
    """Why a detected face was not embedded."""

    TOO_SMALL = "too_small"
    NO_LANDMARKS = "no_landmarks"
    NOT_LARGEST = "not_largest"


@dataclass(frozen=True, eq=False)
class EmbeddedFace:
    """A detected face, its aligned crop and its embedding.

    ``alignment`` is ``"landmarks"`` (the detector's own), ``"mtcnn-landmarks"``
    (landmarks found by MTCNN in the face region) or ``"box"`` (no landmarks).
    """

    detection: Detection
    crop: np.ndarray
    embedding: np.ndarray
    alignment: str


@dataclass(frozen=True)
class SkippedFace:
    """A detected face that was reported instead of embedded."""

    detection: Detection
    reason: SkipReason
    detail: str


@dataclass(frozen=True, eq=False)
class PipelineResult:
    """Embedded and skipped faces of one image (both in detection order)."""

    faces: tuple[EmbeddedFace, ...]
    skipped: tuple[SkippedFace, ...]

    @property
    def embeddings(self) -> np.ndarray:
        """All embeddings as float32 ``(N, dim)`` (``(0, 0)`` when there are none)."""
        if not self.faces:
            return np.zeros((0, 0), np.float32)
        return np.stack([f.embedding for f in self.faces])


@dataclass(frozen=True, eq=False)
class PreparedFace:
    """A face that passed the checks and is aligned, waiting to be embedded.

    ``detection`` carries the landmarks used (filled in by MTCNN for detectors
    without them); ``alignment`` is as in :class:`EmbeddedFace`.
    """

    detection: Detection
    crop: np.ndarray
    alignment: str


_Prepared = PreparedFace


class FacePipeline:
    """Detector → (landmarks) → alignment → embedder, for single images and batches.

    ``min_face``: faces whose box is smaller (shorter side, pixels) are skipped as
    ``too_small``. ``largest_only``: embed only the largest face per image.
    ``landmarks``: ``"mtcnn"`` or ``"box"``, what to do for detections without
    landmarks (module docstring). ``device`` is used for the MTCNN landmark step.
    """

    def __init__(self, detector: "Detector", embedder: "Embedder", min_face: int = 32,
                 largest_only: bool = False, landmarks: str = "mtcnn", device: str = "auto") -> None:
        if landmarks not in ("mtcnn", "box"):
            raise ValueError(f"landmarks must be 'mtcnn' or 'box', got {landmarks!r}")
        if int(min_face) < 1:
            raise ValueError(f"min_face must be >= 1, got {min_face}")
        self.detector = detector
        self.embedder = embedder
        self.min_face = int(min_face)
        self.largest_only = bool(largest_only)
        self.landmarks = landmarks
        self.device = device
        self._refiner: "Detector | None" = None
        from facepipe.embed.base import Embedder

        # Embedders with their own landmark step (the dlib peer runs dlib's shape predictor)
        # override Embedder.align and get only the box; every other embedder aligns the
        # detector's landmarks to its own template (Embedder.align_landmarks).
        self._own_align = getattr(type(embedder), "align", Embedder.align) is not Embedder.align

    # -- landmarks for detectors that give none -------------------------------------------
    def _landmark_detector(self) -> "Detector":
        if self._refiner is None:
            from facepipe.detect.mtcnn import MTCNNDetector

            self._refiner = MTCNNDetector(min_size=20, device=self.device)
        return self._refiner

    def find_landmarks(self, image: np.ndarray, box: Box) -> tuple[tuple[float, float], ...] | None:
        """Five landmarks for the face in ``box`` from MTCNN run on its neighbourhood, or ``None``."""
        import cv2

        h, w = image.shape[:2]
        region = box.scaled(1.6).clip(w, h)
        x1, y1 = int(np.floor(region.x)), int(np.floor(region.y))
        x2, y2 = int(np.ceil(region.x2)), int(np.ceil(region.y2))
        if x2 - x1 < 4 or y2 - y1 < 4:
            return None
        patch = image[y1:y2, x1:x2]
        scale = 80.0 / max(min(box.w, box.h), 1.0)
        if scale < 1.0:  # only shrink; MTCNN handles faces >= 20 px
            patch = cv2.resize(patch, (max(1, round(patch.shape[1] * scale)),
                                       max(1, round(patch.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        else:
            scale = 1.0
        found = self._landmark_detector().detect(np.ascontiguousarray(patch))
        best, best_iou = None, 0.3
        for d in found:
            if d.landmarks is None:
                continue
            b = Box(d.box.x / scale + x1, d.box.y / scale + y1, d.box.w / scale, d.box.h / scale)
            iou = b.iou(box)
            if iou >= best_iou:
                best, best_iou = d, iou
        if best is None:
            return None
        return tuple((x / scale + x1, y / scale + y1) for x, y in best.landmarks)

    # -- per image ---------------------------------------------------------------------------
    def prepare(self, image: np.ndarray, detections: Sequence[Detection]) \
            -> tuple[list[PreparedFace], list[SkippedFace]]:
        """Filter and align one image's detections (no embedding yet): (prepared, skipped).

        Callers that batch across images (video) collect ``p.crop`` of many images and
        call ``embedder.embed`` once; :meth:`process_batch` does exactly that.
        """
        check_image(image)
        dets = list(detections)
        skipped: list[SkippedFace] = []
        if self.largest_only and len(dets) > 1:
            keep = max(range(len(dets)), key=lambda i: dets[i].box.area)
            for i, d in enumerate(dets):
                if i != keep:
                    skipped.append(SkippedFace(d, SkipReason.NOT_LARGEST, "a larger face is in the image"))
            dets = [dets[keep]]
        prepared: list[PreparedFace] = []
        for d in dets:
            side = min(d.box.w, d.box.h)
            if side < self.min_face:
                skipped.append(SkippedFace(d, SkipReason.TOO_SMALL,
                                           f"face is {side:.0f} px, below the minimum of {self.min_face} px"))
                continue
            if self._own_align:
                # An embedder with its own alignment (dlib's) needs only the box.
                prepared.append(PreparedFace(d, self.embedder.align(image, d), "embedder"))
                continue
            alignment = "landmarks"
            if d.landmarks is None:
                if self.landmarks == "box":
                    prepared.append(PreparedFace(d, self.embedder.box_crop(image, d.box), "box"))
                    continue
                lm = self.find_landmarks(image, d.box)
                if lm is None:
                    skipped.append(SkippedFace(d, SkipReason.NO_LANDMARKS,
                                               "no facial landmarks found in the face region"))
                    continue
                d = Detection(d.box, d.score, d.detector, lm)
                alignment = "mtcnn-landmarks"
            prepared.append(PreparedFace(d, self.embedder.align_landmarks(image, d.landmarks_array()),
                                         alignment))
        return prepared, skipped

    def _finish(self, prepared: list[list[PreparedFace]], skipped: list[list[SkippedFace]]) \
            -> list[PipelineResult]:
        crops = [p.crop for ps in prepared for p in ps]
        if crops:
            vecs = self.embedder.embed(np.stack(crops))
        else:
            vecs = np.zeros((0, self.embedder.dim), np.float32)
        out, k = [], 0
        for ps, sk in zip(prepared, skipped):
            faces = []
            for p in ps:
                faces.append(EmbeddedFace(p.detection, p.crop, vecs[k], p.alignment))
                k += 1
            for s in sk:
                log.debug("skipped face at %s: %s", s.detection.box, s.detail)
            out.append(PipelineResult(tuple(faces), tuple(sk)))
        return out

    def process(self, image: np.ndarray, detections: Sequence[Detection] | None = None) -> PipelineResult:
        """Detect (unless ``detections`` are given), align and embed the faces of one RGB image."""
        return self.process_batch([image], None if detections is None else [detections])[0]

    def process_batch(self, images: Sequence[np.ndarray],
                      detections: Sequence[Sequence[Detection]] | None = None) -> list[PipelineResult]:
        """Like :meth:`process` for many images (video frames): one embedder call for all their faces."""
        images = list(images)
        for i, im in enumerate(images):
            check_image(im, f"images[{i}]")
        if detections is None:
            detections = self.detector.detect_batch(images) if images else []
        elif len(detections) != len(images):
            raise ShapeError(f"detections: {len(detections)} lists for {len(images)} images")
        prepared, skipped = [], []
        for im, dets in zip(images, detections):
            p, s = self.prepare(im, dets)
            prepared.append(p)
            skipped.append(s)
        return self._finish(prepared, skipped)

    def faces(self, image: np.ndarray) -> list[EmbeddedFace]:
        """Only the embedded faces of one image (skipped ones are logged at debug level)."""
        return list(self.process(image).faces)

    def faces_batch(self, images: Sequence[np.ndarray]) -> list[list[EmbeddedFace]]:
        """Embedded faces of each image, embedded in one batch across all images."""
        return [list(r.faces) for r in self.process_batch(images)]
