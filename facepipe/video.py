"""Batch video processing: decoding, batched face analysis, tracking and outputs.

Decoding (OpenCV's FFmpeg backend) runs in a reader thread that fills a bounded
queue with batches of frames, so the detector and embedder never wait for the
decoder (OpenCV and PyTorch release the GIL while they work). Timestamps come
from each frame's presentation time (``CAP_PROP_POS_MSEC``), so variable frame
rate videos keep correct times; rotation metadata (phone videos) is applied by
OpenCV's auto-orientation and reported in :class:`VideoInfo`.

Per video, :func:`process_video` writes next to each other in the output folder
(``NAME`` is the input's file name, e.g. ``clip.mp4``)::

    NAME.frames.jsonl     one record per frame: index, time, faces with box, score, track, name
    NAME.tracks.csv       one row per track: first/last time, frame count, identity, confidence
    NAME.tracks.json      the same as JSON, plus the video's metadata
    NAME.annotated.mp4    boxes, names and track ids drawn (unless annotate=False)
    NAME.done.json        completion marker, written last

Every file is written under a hidden temporary name and renamed when the whole
video has been processed; the completion marker is removed before and written
after the renames, so an interrupted run never leaves outputs that look
complete, and ``resume`` skips exactly the videos whose marker is present.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from facepipe.errors import DeviceUnavailableError, NoInputsError, OutputError, VideoReadError
from facepipe.io import InputFile, check_input_file, iter_inputs
from facepipe.track import Observation, Tracker, covered_by_tracks, vote_identity
from facepipe.types import Box, Detection

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm"})

#: Version of the output layout recorded in the completion marker.
OUTPUT_VERSION = 1

#: A video whose decoder stops before this share of the frames its container
#: declares is reported as truncated (containers' counts can be estimates).
TRUNCATION_TOLERANCE = 0.05


def iter_videos(args: Sequence[str | os.PathLike[str]]) -> Iterator[InputFile | NoInputsError]:
    """Expand files, directories (walked) and globs into video files (mp4, avi, mkv, mov, webm)."""
    return iter_inputs(args, VIDEO_EXTENSIONS)


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video.

    ``width``/``height`` are of the frames as delivered (after rotation);
    ``fps`` is the average rate (0 if unknown; with a variable frame rate use
    each frame's timestamp instead); ``frame_count`` is the container's count
    or estimate (0 if unknown); ``rotation`` the metadata angle in degrees that
    has been applied.
    """

    path: str
    width: int
    height: int
    fps: float
    frame_count: int
    rotation: int
    codec: str

    @property
    def duration_s(self) -> float:
        """Approximate duration from frame count and average rate (0 if unknown)."""
        return self.frame_count / self.fps if self.fps > 0 else 0.0


def _open_capture(path: str | os.PathLike[str]) -> tuple[Any, VideoInfo]:
    """Open a video with auto-orientation; raise :class:`VideoReadError` if it cannot be opened."""
    import cv2

    p = check_input_file(path, VideoReadError, "a video")
    if not os.access(p, os.R_OK):
        raise VideoReadError(p, "permission denied")
    cap = cv2.VideoCapture(str(p), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise VideoReadError(p, "cannot open video (corrupt, truncated or unsupported format)")
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC) or 0)
    codec = "".join(chr((fourcc >> (8 * i)) & 0xFF) for i in range(4)).strip("\x00 ") if fourcc else ""
    info = VideoInfo(
        path=str(p),
        width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0),
        height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0),
        fps=float(cap.get(cv2.CAP_PROP_FPS) or 0.0),
        frame_count=max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)),
        rotation=int(round(cap.get(cv2.CAP_PROP_ORIENTATION_META) or 0)) % 360,
        codec=codec,
    )
    return cap, info


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Open a video, read its metadata and close it (raises :class:`VideoReadError`)."""
    cap, info = _open_capture(path)
    cap.release()
    return info


@dataclass
class Frame:
    """One video frame: ``index`` (0-based decode order), ``time`` in seconds from the
    stream start, and the RGB ``uint8`` image, or ``None`` for a frame skipped by
    the stride (its timestamp is still known)."""

    index: int
    time: float
    image: np.ndarray | None


_END = object()


class VideoReader:
    """Decode a video in a background thread into batches of frames.

    Iterating yields lists of :class:`Frame` in order. Every frame appears;
    only every ``stride``-th frame is decoded to an image (the others are
    grabbed for their timestamp only), and a batch holds up to ``batch_size``
    decoded frames plus the skipped ones between them. At most
    ``queue_batches`` batches wait in memory. After the last batch, a video
    whose decoder stopped well short of the container's frame count raises
    :class:`VideoReadError` (truncated or corrupt). ``decode_seconds`` is the
    reader thread's busy time.

    Use as a context manager (or call :meth:`close`) so the thread stops when
    the consumer stops early.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 16,
        stride: int = 1,
        queue_batches: int = 4,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.path = Path(path)
        self.batch_size = int(batch_size)
        self.stride = int(stride)
        self._cap, self.info = _open_capture(path)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, int(queue_batches)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames_read = 0
        self.frames_decoded = 0
        self.decode_seconds = 0.0

    # -- thread side
    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        import cv2

        cap = self._cap
        batch: list[Frame] = []
        decoded_in_batch = 0
        fps = self.info.fps
        prev_t = -1.0
        try:
            index = 0
            while not self._stop.is_set():
                t0 = time.perf_counter()
                if not cap.grab():
                    self.decode_seconds += time.perf_counter() - t0
                    break
                t = float(cap.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0
                if not np.isfinite(t) or (index > 0 and t <= prev_t):
                    # No usable timestamp: step by the average rate from the last one.
                    t = prev_t + (1.0 / fps if fps > 0 else 0.0) if index > 0 else 0.0
                prev_t = t
                image = None
                if index % self.stride == 0:
                    ok, bgr = cap.retrieve()
                    if not ok or bgr is None:
                        self.decode_seconds += time.perf_counter() - t0
                        break
                    if bgr.ndim == 2:
                        image = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
                    else:
                        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                    self.frames_decoded += 1
                    decoded_in_batch += 1
                self.decode_seconds += time.perf_counter() - t0
                batch.append(Frame(index, t, image))
                index += 1
                self.frames_read = index
                if decoded_in_batch >= self.batch_size:
                    if not self._put(batch):
                        return
                    batch, decoded_in_batch = [], 0
            if batch and not self._put(batch):
                return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)

    # -- consumer side
    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[list[Frame]]:
        if self._thread is not None:
            raise RuntimeError("a VideoReader can be iterated only once")
        self._thread = threading.Thread(target=self._run, name=f"facepipe-decode:{self.path.name}",
                                        daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    if isinstance(item, VideoReadError):
                        raise item
                    raise VideoReadError(self.path, f"decoding failed ({item})") from item
                yield item
        finally:
            self.close()
        self._check_complete()

    def _check_complete(self) -> None:
        n, expected = self.frames_read, self.info.frame_count
        if n == 0:
            raise VideoReadError(self.path, "no frame could be decoded (corrupt or truncated video)")
        if expected > 0 and n < expected * (1.0 - TRUNCATION_TOLERANCE) and expected - n > 1:
            raise VideoReadError(
                self.path, f"truncated or corrupt: decoded {n} of {expected} frames"
            )

    def close(self) -> None:
        """Stop the reader thread and release the decoder."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            # Drain so a blocked put() sees the stop flag.
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=5.0)
        if self._cap is not None and (self._thread is None or not self._thread.is_alive()):
            self._cap.release()
            self._cap = None


def read_frames(path: str | os.PathLike[str], stride: int = 1) -> Iterator[Frame]:
    """All frames of a video in order (decoded every ``stride``-th); a convenience over :class:`VideoReader`."""
    with VideoReader(path, batch_size=8, stride=stride) as reader:
        for batch in reader:
            yield from batch


# --------------------------------------------------------------------------- analysis


def identify_embeddings(gallery: Any, embeddings: np.ndarray) -> list[tuple[str, float]]:
    """The gallery's open-set decision ``(name or "unknown", score)`` for each embedding."""
    out = []
    for d in gallery.identify(embeddings):
        score = float(d.score)
        out.append((d.name, score if np.isfinite(score) else 0.0))
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
        from facenet_pytorch.models.mtcnn import ONet

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
    ) -> None:
        if gallery is not None and embedder is None:
            raise ValueError("a gallery needs an embedder")
        if landmarks not in ("onet", "mtcnn", "box"):
            raise ValueError(f"landmarks must be 'onet', 'mtcnn' or 'box', got {landmarks!r}")
        self.detector = detector
        self.embedder = embedder
        self.gallery = gallery
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
            decisions = identify_embeddings(self.gallery, emb)
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
        return d


# --------------------------------------------------------------------------- shot changes


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


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class VideoOutputs:
    """Where one video's results go (see the module docstring)."""

    frames: Path
    tracks_csv: Path
    tracks_json: Path
    annotated: Path
    marker: Path

    def partial(self, p: Path) -> Path:
        """The hidden temporary name a file is written under before its rename."""
        if p.suffix == ".mp4":  # the muxer is chosen from the extension
            return p.with_name(f".{p.stem}.partial.mp4")
        return p.with_name(f".{p.name}.partial")

    def files(self, annotate: bool) -> list[Path]:
        """The result files (without the marker)."""
        out = [self.frames, self.tracks_csv, self.tracks_json]
        return out + [self.annotated] if annotate else out


def output_paths(out_dir: str | os.PathLike[str], relative: str | os.PathLike[str]) -> VideoOutputs:
    """Output files for a video: ``out_dir/<relative path>.<kind>``, mirroring input folders."""
    rel = Path(relative)
    base = Path(out_dir) / rel.parent
    name = rel.name
    return VideoOutputs(
        frames=base / f"{name}.frames.jsonl",
        tracks_csv=base / f"{name}.tracks.csv",
        tracks_json=base / f"{name}.tracks.json",
        annotated=base / f"{name}.annotated.mp4",
        marker=base / f"{name}.done.json",
    )


def _source_fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_complete(outputs: VideoOutputs, source: str | os.PathLike[str], settings: dict[str, Any]) -> bool:
    """Whether a finished run with the same settings and source file left all outputs."""
    try:
        marker = json.loads(outputs.marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("version") != OUTPUT_VERSION:
        return False
    try:
        if marker.get("source") != _source_fingerprint(Path(source)):
            return False
    except OSError:
        return False
    if marker.get("settings") != json.loads(json.dumps(settings)):
        return False
    return all((outputs.marker.parent / f).is_file() for f in marker.get("files", []))


@dataclass
class TrackSummary:
    """One row of the per-track summary."""

    track: int
    first_frame: int
    last_frame: int
    first_time: float
    last_time: float
    frames: int
    identity: str | None
    confidence: float | None
    mean_score: float | None
    mean_det_score: float


@dataclass
class VideoResult:
    """What processing one video produced, with per-stage timings (seconds)."""

    path: str
    info: VideoInfo
    frames: int
    analysed_frames: int
    faces: int
    tracks: list[TrackSummary]
    timings: dict[str, float]
    wall_seconds: float
    analysis_seconds: float
    outputs: VideoOutputs | None = None
    skipped: bool = False

    @property
    def fps(self) -> float:
        """Frames per second through the analysis pass (decode to tracks)."""
        return self.frames / self.analysis_seconds if self.analysis_seconds > 0 else 0.0


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def _face_record(track: int, box: Box, score: float | None, o: Observation | None,
                 interpolated: bool) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "track": track,
        "x": round(box.x, 1), "y": round(box.y, 1), "w": round(box.w, 1), "h": round(box.h, 1),
        "score": _r(score),
    }
    if o is not None and o.name is not None:
        rec["frame_name"] = o.name
        rec["frame_score"] = _r(o.score)
    if interpolated:
        rec["interpolated"] = True
    return rec


def _lerp_box(a: dict[str, Any], b: dict[str, Any], f: float) -> Box:
    return Box(*(a[k] + (b[k] - a[k]) * f for k in ("x", "y", "w", "h")))


def _carry(pending: list[dict[str, Any]], prev: dict[str, Any] | None, nxt: dict[str, Any] | None) -> None:
    """Fill skipped frames' faces: tracks seen in both neighbouring analysed frames are
    interpolated in time; after the last analysed frame the boxes are held."""
    if prev is None:
        return
    prev_faces = {f["track"]: f for f in prev["faces"]}
    if nxt is None:
        for rec in pending:
            rec["faces"] = [_face_record(t, Box(f["x"], f["y"], f["w"], f["h"]), None, None, True)
                            for t, f in prev_faces.items()]
        return
    next_faces = {f["track"]: f for f in nxt["faces"]}
    span = nxt["time"] - prev["time"]
    for rec in pending:
        frac = (rec["time"] - prev["time"]) / span if span > 0 else 0.0
        frac = min(max(frac, 0.0), 1.0)
        rec["faces"] = [
            _face_record(t, _lerp_box(prev_faces[t], next_faces[t], frac), None, None, True)
            for t in prev_faces if t in next_faces
        ]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not remove %s: %s", p, exc)


ProgressFn = Callable[[str, int, int], None]


def process_video(
    path: str | os.PathLike[str],
    outputs: VideoOutputs,
    analyzer: FrameAnalyzer,
    *,
    stride: int = 1,
    batch_size: int = 16,
    annotate: bool = True,
    tracker: Tracker | None = None,
    unknown_weight: float = 0.5,
    embed_every: int = 1,
    shot_cut: float | None = SHOT_CUT_DISTANCE,
    settings: dict[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
) -> VideoResult:
    """Analyse one video and write its outputs atomically (see the module docstring).

    ``embed_every`` > 1: a face that clearly continues a track with at least three
    embedded frames is embedded (and identified) only on every ``embed_every``-th
    analysed frame; new, ambiguous or uncertain faces are embedded on every one.
    ``shot_cut``: when the colour signature of consecutive analysed frames differs
    by more than this (:func:`shot_distance`), every track ends there (a camera
    cut; the frame record gets ``"cut": true``); ``None`` disables it.

    ``on_progress(phase, frames_done, total)`` is called as frames go by, with
    ``phase`` ``"analyse"`` then ``"annotate"``. Raises :class:`VideoReadError`
    for a video that cannot be opened, decodes no frame or is truncated (no
    output is left behind) and :class:`OutputError` when results cannot be
    written.
    """
    src = Path(path)
    tracker = tracker or Tracker()
    t_start = time.perf_counter()
    timings: dict[str, float] = {s: 0.0 for s in STAGES}
    det0 = dict(analyzer.timings)
    faces0 = analyzer.faces
    files = outputs.files(annotate)
    tmp = {p: outputs.partial(p) for p in files}
    raw = outputs.partial(outputs.frames).with_name(f".{outputs.frames.name}.raw.partial")
    try:
        outputs.marker.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(outputs.marker.parent, f"cannot create directory ({exc.strerror or exc})") from exc
    # A stale marker must not vouch for files this run is about to replace.
    _remove([outputs.marker])
    cleanup = list(tmp.values()) + [raw]
    try:
        with VideoReader(src, batch_size=batch_size, stride=stride) as reader:
            info = reader.info
            total = info.frame_count
            analysed = 0
            prev_rec: dict[str, Any] | None = None
            prev_sig: np.ndarray | None = None
            cuts = 0
            pending: list[dict[str, Any]] = []
            try:
                raw_f = raw.open("w")
            except OSError as exc:
                raise OutputError(raw, f"cannot write ({exc.strerror or exc})") from exc
            with raw_f:
                def flush(recs: list[dict[str, Any]]) -> None:
                    for rec in recs:
                        raw_f.write(json.dumps(rec, separators=(",", ":")) + "\n")

                for batch in reader:
                    shown = [f for f in batch if f.image is not None]
                    images = [f.image for f in shown]
                    dets = analyzer.detect(images)  # type: ignore[arg-type]
                    t0 = time.perf_counter()
                    cut_at: set[int] = set()
                    if shot_cut is not None:
                        for f in shown:
                            sig = frame_signature(f.image)  # type: ignore[arg-type]
                            if prev_sig is not None and shot_distance(prev_sig, sig) > shot_cut:
                                cut_at.add(f.index)
                            prev_sig = sig
                    want = None
                    if embed_every > 1 and analyzer.pipeline is not None:
                        # After a cut in this batch no face continues an earlier track.
                        first_cut = min(cut_at) if cut_at else None
                        want = [
                            [not c or (analysed + k) % embed_every == 0
                             or (first_cut is not None and f.index >= first_cut)
                             for c in covered_by_tracks(tracker, f.time, [d.box for d in ds])]
                            for k, (f, ds) in enumerate(zip(shown, dets))
                        ]
                    timings["track"] += time.perf_counter() - t0
                    observations = iter(analyzer.observe(images, dets, want))  # type: ignore[arg-type]
                    t0 = time.perf_counter()
                    for fr in batch:
                        rec: dict[str, Any] = {"frame": fr.index, "time": round(fr.time, 4),
                                               "analysed": fr.image is not None, "faces": []}
                        if fr.image is None:
                            pending.append(rec)
                            continue
                        obs = next(observations)
                        if fr.index in cut_at:
                            tracker.cut()
                            rec["cut"] = True
                            cuts += 1
                        ids = tracker.update(fr.index, fr.time, obs)
                        rec["faces"] = [_face_record(i, o.detection.box, o.detection.score, o, False)
                                        for i, o in zip(ids, obs)]
                        _carry(pending, prev_rec, rec)
                        flush(pending)
                        flush([rec])
                        pending, prev_rec = [], rec
                        analysed += 1
                    timings["track"] += time.perf_counter() - t0
                    if on_progress is not None:
                        on_progress("analyse", batch[-1].index + 1, max(total, batch[-1].index + 1))
                _carry(pending, prev_rec, None)
                flush(pending)
            n_frames = reader.frames_read
            timings["decode"] = reader.decode_seconds
        analysis_seconds = time.perf_counter() - t_start
        for s in ("detect", "align", "embed", "search"):
            timings[s] = analyzer.timings[s] - det0.get(s, 0.0)

        # Identities: one vote per track, then the final per-frame records.
        t0 = time.perf_counter()
        summaries: list[TrackSummary] = []
        votes: dict[int, Any] = {}
        for tr in tracker.tracks:
            v = vote_identity(tr.votes, unknown_weight) if tr.votes else None
            votes[tr.track_id] = v
            summaries.append(TrackSummary(
                track=tr.track_id, first_frame=tr.first_frame, last_frame=tr.last_frame,
                first_time=round(tr.first_time, 4), last_time=round(tr.last_time, 4), frames=tr.hits,
                identity=v.name if v else None, confidence=_r(v.confidence) if v else None,
                mean_score=_r(v.mean_score) if v else None,
                mean_det_score=round(float(np.mean(tr.det_scores)), 4) if tr.det_scores else 0.0,
            ))
        with raw.open() as fin, tmp[outputs.frames].open("w") as fout:
            for line in fin:
                rec = json.loads(line)
                for face in rec["faces"]:
                    v = votes.get(face["track"])
                    face["name"] = v.name if v else None
                    face["identity_confidence"] = _r(v.confidence) if v else None
                fout.write(json.dumps(rec, separators=(",", ":")) + "\n")
        _remove([raw])
        header = list(TrackSummary.__dataclass_fields__)
        with tmp[outputs.tracks_csv].open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            for s in summaries:
                w.writerow(["" if getattr(s, k) is None else getattr(s, k) for k in header])
        _write_json(tmp[outputs.tracks_json], {
            "video": str(src), "info": asdict(info), "frames": n_frames, "analysed_frames": analysed,
            "stride": stride, "shot_cuts": cuts, "tracks": [asdict(s) for s in summaries],
        })
        timings["write"] = time.perf_counter() - t0

        if annotate:
            t0 = time.perf_counter()
            _annotate(src, tmp[outputs.frames], tmp[outputs.annotated], info, batch_size, n_frames,
                      on_progress)
            timings["annotate"] = time.perf_counter() - t0

        # Publish: results first, the completion marker last.
        for final, part in tmp.items():
            os.replace(part, final)
        result = VideoResult(
            path=str(src), info=info, frames=n_frames, analysed_frames=analysed,
            faces=analyzer.faces - faces0, tracks=summaries, timings=timings,
            wall_seconds=time.perf_counter() - t_start, analysis_seconds=analysis_seconds,
            outputs=outputs,
        )
        marker = {
            "version": OUTPUT_VERSION,
            "video": str(src),
            "source": _source_fingerprint(src),
            "settings": settings if settings is not None else {},
            "files": [p.name for p in files],
            "frames": n_frames,
            "analysed_frames": analysed,
            "faces": result.faces,
            "tracks": len(summaries),
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "wall_seconds": round(result.wall_seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        mtmp = outputs.partial(outputs.marker)
        _write_json(mtmp, marker)
        os.replace(mtmp, outputs.marker)
        return result
    except OSError as exc:
        raise OutputError(outputs.marker.parent, f"cannot write results ({exc.strerror or exc})") from exc
    finally:
        _remove([p for p in cleanup if p.exists()])


def _label(face: dict[str, Any]) -> str:
    name = face.get("name")
    return f"#{face['track']} {name}" if name else f"#{face['track']}"


def _annotate(src: Path, frames_jsonl: Path, out: Path, info: VideoInfo, batch_size: int,
              n_frames: int, on_progress: ProgressFn | None) -> None:
    """Second pass: re-decode the video and draw the final per-frame records on it."""
    import cv2

    from facepipe.draw import color_for, draw_detections

    writer = None
    try:
        with VideoReader(src, batch_size=batch_size, stride=1) as reader, frames_jsonl.open() as recs:
            fps = info.fps if info.fps > 0 else 25.0
            for batch in reader:
                for fr in batch:
                    line = recs.readline()
                    faces = json.loads(line)["faces"] if line else []
                    if fr.image is None:  # stride 1 decodes every frame
                        continue
                    if writer is None:
                        h, w = fr.image.shape[:2]
                        writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                        if not writer.isOpened():
                            raise OutputError(out, "cannot open an MP4 writer (mp4v)")
                    dets = [Detection(Box(f["x"], f["y"], f["w"], f["h"]), f["score"] or 0.0, "track")
                            for f in faces]
                    img = draw_detections(fr.image, dets, labels=[_label(f) for f in faces],
                                          colors=[color_for(f["track"]) for f in faces])
                    writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                if on_progress is not None:
                    on_progress("annotate", batch[-1].index + 1, max(n_frames, batch[-1].index + 1))
    finally:
        if writer is not None:
            writer.release()


# --------------------------------------------------------------------------- factory


def build_analyzer(
    detector: str = "haar",
    embedder: str | None = None,
    gallery: str | os.PathLike[str] | None = None,
    device: str = "auto",
    detector_options: dict[str, Any] | None = None,
    min_face: int = 32,
    landmarks: str = "onet",
) -> FrameAnalyzer:
    """Build the detector, embedder and gallery a video run asks for.

    With a ``gallery`` and no ``embedder`` the default embedder is used; the
    gallery refuses vectors from an embedder other than the one it was built
    with. ``device`` goes to the CNN stages (the Haar detector is CPU-only).
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
    return FrameAnalyzer(det, emb, gal, min_face=min_face, landmarks=landmarks, device=device)
