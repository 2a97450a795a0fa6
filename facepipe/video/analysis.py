"""Per-frame analysis: batched detection, landmarks, alignment, embedding, open-set
identification, and shot-change signatures; :func:`build_analyzer` builds it from names."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

import numpy as np

from facepipe.errors import DeviceUnavailableError
from facepipe.track import Observation
from facepipe.types import Box, Detection

log = logging.getLogger(__name__)


def identify_embeddings(gallery: Any, embeddings: np.ndarray, threshold: float | None = None,
                        min_margin: float = 0.0) -> list[tuple[str, float]]:
    """The open-set decision ``(name or "unknown", best similarity)`` for each embedding, by
    :func:`facepipe.scores.decide` (the gallery's threshold unless ``threshold``; with
    ``min_margin`` > 0 near-ties between two people are unknown), as ``identify`` decides."""
    from facepipe.scores import decide

    t = float(gallery.threshold) if threshold is None else float(threshold)
    out = []
    for cands in gallery.rank(embeddings, top_k=2):
        v = decide(cands, t, min_margin)
        out.append((v.name, v.similarity if v.similarity is not None and np.isfinite(v.similarity) else 0.0))
    return out


def gallery_description(gallery: Any) -> dict[str, Any]:
    """What identifies a gallery's answers: directory, generation, embedder and threshold."""
    return {
        "directory": str(getattr(gallery, "directory", "")),
        "generation": int(getattr(gallery, "generation", 0)),
        "embedder": str(getattr(gallery, "embedder_id", "")),
        "threshold": float(gallery.threshold),
    }


#: Stages whose time :class:`FrameAnalyzer` measures, in pipeline order.
STAGES = ("decode", "detect", "align", "embed", "search", "track", "write", "annotate")


class OnetLandmarker:
    """Five landmarks for detector boxes from MTCNN's last stage (O-Net) alone, in one batch.

    Detectors without landmarks (Haar, the CNN detector) need them for alignment.
    Running the whole MTCNN cascade on each face's neighbourhood (what
    :meth:`facepipe.pipeline.FacePipeline.find_landmarks` does for single images)
    costs a P-Net image pyramid per face; for video, every face of a batch goes
    through O-Net at once instead: the box is made square, cropped (zero padded)
    to 48x48 as MTCNN does, O-Net's box regression moves it onto MTCNN's own
    framing (``passes`` times), and the last pass's landmarks are returned. A box
    whose O-Net face probability is below ``threshold`` gets ``None`` (no landmarks:
    the face is tracked but not embedded, as in the pipeline).
    """

    def __init__(self, device: str = "auto", threshold: float = 0.5, passes: int = 2) -> None:
        from facepipe.fastimport import mtcnn_module

        ONet = mtcnn_module().ONet  # noqa: N806 (facenet-pytorch's class, without all of torchvision)

        from facepipe.device import resolve_device

        self.device = resolve_device(device)
        self.net = ONet(pretrained=True).to(self.device).eval()   # weights ship inside facenet-pytorch
        self.threshold = float(threshold)
        self.passes = max(1, int(passes))

    @staticmethod
    def _square(b: np.ndarray) -> np.ndarray:
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        side = np.maximum(w, h)
        x1 = b[:, 0] + w / 2 - side / 2
        y1 = b[:, 1] + h / 2 - side / 2
        return np.stack([x1, y1, x1 + side, y1 + side], axis=1)

    @staticmethod
    def _crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
        import cv2

        x1, y1, x2, y2 = (int(round(v)) for v in box)
        side = max(x2 - x1, 1)
        h, w = image.shape[:2]
        patch = np.zeros((side, side, 3), np.uint8)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x1 + side, w), min(y1 + side, h)
        if sx2 > sx1 and sy2 > sy1:
            patch[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = image[sy1:sy2, sx1:sx2]
        return cv2.resize(patch, (48, 48), interpolation=cv2.INTER_AREA)

    def __call__(self, images: Sequence[np.ndarray],
                 boxes: Sequence[Sequence[Box]]) -> list[list[tuple[tuple[float, float], ...] | None]]:
        """Landmarks (or ``None``) for every box of every image, in order."""
        import torch

        owner = [(i, j) for i, bs in enumerate(boxes) for j in range(len(bs))]
        out: list[list[Any]] = [[None] * len(bs) for bs in boxes]
        if not owner:
            return out
        cur = self._square(np.array([boxes[i][j].xyxy() for i, j in owner], dtype=np.float64))
        for p in range(self.passes):
            crops = np.stack([self._crop(images[i], cur[k]) for k, (i, j) in enumerate(owner)])
            x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float()
            with torch.inference_mode():
                reg, pts, prob = self.net((x - 127.5) * 0.0078125)
            reg, pts = reg.float().cpu().numpy(), pts.float().cpu().numpy()
            score = prob[:, 1].float().cpu().numpy()
            side = (cur[:, 2] - cur[:, 0])[:, None]
            if p == self.passes - 1:
                xs = cur[:, [0]] + side * pts[:, :5]
                ys = cur[:, [1]] + side * pts[:, 5:]
                for k, (i, j) in enumerate(owner):
                    if score[k] >= self.threshold:
                        out[i][j] = tuple((float(a), float(b)) for a, b in zip(xs[k], ys[k]))
                break
            cur = self._square(cur + reg * np.repeat(side, 4, axis=1))
        return out


class FrameAnalyzer:
    """Detect, align, embed and identify the faces of a batch of frames.

    ``detector`` is any :class:`~facepipe.detect.Detector`; on a GPU its
    ``detect_batch`` gets the whole batch, so a CNN detector runs one forward pass
    for many frames (on the CPU one frame per call, which is faster there). With an ``embedder``, faces are aligned exactly as ``enroll`` and
    ``identify`` align them (:meth:`facepipe.pipeline.FacePipeline.prepare`:
    landmarks from the detector, or from MTCNN on the face region for Haar
    boxes; faces below ``min_face`` pixels or without landmarks stay
    detections without an embedding), and all faces of the batch are embedded
    in one call. With a ``gallery`` (needs an embedder) each embedded face gets
    the gallery's open-set decision. ``timings`` accumulates seconds per stage.

    ``landmarks`` says where the landmarks of detectors that give none come from:
    ``"onet"`` (default) batches every face of the batch through MTCNN's O-Net
    (:class:`OnetLandmarker`; mean landmark difference from ``"mtcnn"`` 4 % of the
    eye distance on LFW, about 10x cheaper per face), ``"mtcnn"`` runs the full
    MTCNN cascade per face region exactly as ``identify`` does, ``"box"`` uses a
    plain box crop.
    """

    def __init__(
        self,
        detector: Any,
        embedder: Any | None = None,
        gallery: Any | None = None,
        min_face: int = 32,
        landmarks: str = "onet",
        device: str = "auto",
        threshold: float | None = None,
        min_margin: float = 0.0,
    ) -> None:
        if gallery is not None and embedder is None:
            raise ValueError("a gallery needs an embedder")
        if landmarks not in ("onet", "mtcnn", "box"):
            raise ValueError(f"landmarks must be 'onet', 'mtcnn' or 'box', got {landmarks!r}")
        self.detector = detector
        self.embedder = embedder
        self.gallery = gallery
        #: the similarity threshold and minimum margin of the open-set decision
        self.threshold = None if gallery is None else (
            float(gallery.threshold) if threshold is None else float(threshold))
        self.min_margin = float(min_margin)
        self.pipeline = None
        self.landmarks = landmarks
        self._landmarker: OnetLandmarker | None = None
        self._device = device
        if embedder is not None:
            from facepipe.embed.base import Embedder
            from facepipe.pipeline import FacePipeline

            self.pipeline = FacePipeline(detector, embedder, min_face=min_face,
                                         landmarks="box" if landmarks == "box" else "mtcnn", device=device)
            # Embedders with their own alignment (dlib's) need only the box.
            self._own_align = getattr(type(embedder), "align", Embedder.align) is not Embedder.align
        self.timings: dict[str, float] = {s: 0.0 for s in ("detect", "align", "embed", "search")}
        self.faces = 0
        self.embedded = 0

    def _detect_chunk(self) -> int:
        """Frames per detector call: the whole batch on a GPU; one on the CPU, where a
        CNN's activations for many full frames overflow the caches (measured: a batch of
        16 1080p frames took 2x longer per frame than one at a time)."""
        dev = getattr(self.detector, "device", None)
        return 1 << 30 if getattr(dev, "type", "cpu") == "cuda" else 1

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections per image (batched detector calls on a GPU)."""
        if not images:
            return []
        t0 = time.perf_counter()
        chunk = self._detect_chunk()
        imgs = list(images)
        dets = [d for i in range(0, len(imgs), chunk) for d in self.detector.detect_batch(imgs[i:i + chunk])]
        self.timings["detect"] += time.perf_counter() - t0
        self.faces += sum(len(d) for d in dets)
        return dets

    def analyze(self, images: Sequence[np.ndarray]) -> list[list[Observation]]:
        """One list of :class:`~facepipe.track.Observation` per image, in order."""
        return self.observe(images, self.detect(images))

    def observe(self, images: Sequence[np.ndarray], dets: Sequence[Sequence[Detection]],
                want: Sequence[Sequence[bool]] | None = None) -> list[list[Observation]]:
        """Align, embed (one batch) and identify detections; ``want[i][j]`` False leaves
        face ``j`` of image ``i`` without an embedding (it is tracked by position only)."""
        result = [[Observation(d) for d in ds] for ds in dets]
        if self.pipeline is None or not any(dets):
            return result
        t1 = time.perf_counter()
        todo = [[(want is None or want[i][j]) and o.detection.box.w >= self.pipeline.min_face
                 and o.detection.box.h >= self.pipeline.min_face for j, o in enumerate(obs)]
                for i, obs in enumerate(result)]
        if self.landmarks == "onet" and not self._own_align:
            need = [[o.detection.box if (todo[i][j] and o.detection.landmarks is None) else None
                     for j, o in enumerate(obs)] for i, obs in enumerate(result)]
            if any(b is not None for bs in need for b in bs):
                if self._landmarker is None:
                    self._landmarker = OnetLandmarker(self._device)
                boxes = [[b for b in bs if b is not None] for bs in need]
                found = self._landmarker(images, boxes)
                for i, bs in enumerate(need):
                    it = iter(found[i])
                    for j, b in enumerate(bs):
                        if b is None:
                            continue
                        lm = next(it)
                        o = result[i][j]
                        if lm is None:
                            todo[i][j] = False      # O-Net sees no face here: track it, no name
                        else:
                            o.detection = Detection(o.detection.box, o.detection.score,
                                                    o.detection.detector, lm)
        crops: list[np.ndarray] = []
        owners: list[Observation] = []
        for i, (image, obs) in enumerate(zip(images, result)):
            for j, o in enumerate(obs):
                if not todo[i][j]:
                    continue
                prepared, _skipped = self.pipeline.prepare(image, [o.detection])
                if prepared:
                    o.detection = prepared[0].detection   # same box, landmarks filled in
                    crops.append(prepared[0].crop)
                    owners.append(o)
        t2 = time.perf_counter()
        self.timings["align"] += t2 - t1
        if not crops:
            return result
        emb = np.asarray(self.embedder.embed(np.stack(crops)), dtype=np.float32)
        t3 = time.perf_counter()
        self.timings["embed"] += t3 - t2
        self.embedded += len(crops)
        decisions: list[tuple[str, float]] | None = None
        if self.gallery is not None:
            decisions = identify_embeddings(self.gallery, emb, self.threshold, self.min_margin)
        self.timings["search"] += time.perf_counter() - t3
        for k, o in enumerate(owners):
            o.embedding = emb[k]
            if decisions is not None:
                o.name, o.score = decisions[k]
        return result

    def describe(self) -> dict[str, Any]:
        """Settings identifying this analysis (recorded in completion markers for --resume)."""
        d: dict[str, Any] = {"detector": self.detector.describe()}
        if self.pipeline is not None:
            d["embedder"] = self.embedder.embedder_id
            d["min_face"] = self.pipeline.min_face
            d["landmarks"] = self.landmarks
        if self.gallery is not None:
            d["gallery"] = gallery_description(self.gallery)
            d["threshold"] = self.threshold
            d["min_margin"] = self.min_margin
        return d

def frame_signature(image: np.ndarray) -> np.ndarray:
    """A hue/saturation histogram of a thumbnail (L1-normalised), for shot-change detection."""
    import cv2

    small = cv2.resize(image, (64, 36), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    h = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
    return cv2.normalize(h, None, 1.0, 0.0, cv2.NORM_L1)


def shot_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Bhattacharyya distance between two frame signatures (0 same, 1 disjoint colours)."""
    import cv2

    return float(cv2.compareHist(a, b, cv2.HISTCMP_BHATTACHARYYA))


#: Signature distance above which consecutive analysed frames are a camera cut. On the
#: shared clips, cuts measure 0.41-0.57 and frames within a shot at most 0.16.
SHOT_CUT_DISTANCE = 0.3

def build_analyzer(
    detector: str = "haar",
    embedder: str | None = None,
    gallery: str | os.PathLike[str] | None = None,
    device: str = "auto",
    detector_options: dict[str, Any] | None = None,
    min_face: int = 32,
    landmarks: str = "onet",
    threshold: float | None = None,
    min_margin: float = 0.0,
) -> FrameAnalyzer:
    """Build the detector, embedder and gallery a video run asks for.

    With a ``gallery`` and no ``embedder`` the default embedder is used; the
    gallery refuses vectors from an embedder other than the one it was built
    with. ``threshold`` (similarity) and ``min_margin`` override the gallery's
    decision rule (see :func:`identify_embeddings`). ``device`` goes to the CNN stages (the Haar detector is CPU-only).
    Raises the library's typed errors (unknown names, missing checkpoints,
    unavailable device, bad gallery).
    """
    from facepipe.detect import create_detector
    from facepipe.device import validate_device_spec

    validate_device_spec(device)
    if device.strip().lower().startswith("cuda"):
        from facepipe.device import resolve_device

        resolve_device(device)   # asking for a GPU that is not there is an error, even for Haar
    opts = dict(detector_options or {})
    if detector != "haar":
        opts.setdefault("device", device)
    det = create_detector(detector, **opts)
    emb = None
    gal = None
    if gallery is not None and embedder is None:
        embedder = "default"
    if embedder is not None:
        from facepipe.embed import load_embedder

        emb = load_embedder(embedder, device=device)
    if gallery is not None:
        from facepipe.gallery import Gallery

        gal = Gallery.open(gallery, embedder_id=emb.embedder_id if emb is not None else None)
        try:
            gal.to_device(device)
        except DeviceUnavailableError as exc:
            # faiss-cpu has no GPU search; searching a gallery on the CPU is exact and cheap
            # next to the CNN stages, so a CUDA run keeps going with CPU search.
            if not device.strip().lower().startswith("cuda"):
                raise
            log.info("gallery search stays on the CPU: %s", exc)
    return FrameAnalyzer(det, emb, gal, min_face=min_face, landmarks=landmarks, device=device,
                         threshold=threshold, min_margin=min_margin)
