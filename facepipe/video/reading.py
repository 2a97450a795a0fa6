"""Reading videos: finding them, probing their metadata, and decoding frames in a thread.

Decoding (OpenCV's FFmpeg backend) runs in a reader thread that fills a bounded
queue with batches of frames, so the detector and embedder never wait for the
decoder (OpenCV and PyTorch release the GIL while they work). Timestamps come
from each frame's presentation time (``CAP_PROP_POS_MSEC``), so variable frame
rate videos keep correct times; rotation metadata (phone videos) is applied by
OpenCV's auto-orientation and reported in :class:`VideoInfo`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from facepipe.errors import NoInputsError, VideoReadError
from facepipe.io import InputFile, check_input_file, iter_inputs

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm"})

#: A video whose decoder stops before this share of the frames its container
#: declares is reported as truncated (containers' counts can be estimates).
TRUNCATION_TOLERANCE = 0.05


def iter_videos(args: Sequence[str | os.PathLike[str]]) -> Iterator[InputFile | NoInputsError]:
    """Expand files, directories (walked) and globs into video files (mp4, avi, mkv, mov, webm)."""
    return iter_inputs(args, VIDEO_EXTENSIONS)

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


def still_image_format(path: str | os.PathLike[str]) -> str | None:
    """The format name (``JPEG``, ``PNG``, ...) when ``path`` holds one still image, else ``None``.

    Reads only the header. FFmpeg opens a still image as a one-frame "video", so a
    photo renamed ``.mp4`` would otherwise be processed without a word; animations
    (GIF, WebP or APNG with several frames) and MPEG streams count as video.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                fmt, frames = im.format, int(getattr(im, "n_frames", 1) or 1)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError,
            EOFError):
        return None
    if not fmt or fmt == "MPEG" or frames > 1:
        return None
    return str(fmt)


def _open_capture(path: str | os.PathLike[str]) -> tuple[Any, VideoInfo]:
    """Open a video with auto-orientation; raise :class:`VideoReadError` if it cannot be opened."""
    import cv2

    p = check_input_file(path, VideoReadError, "a video")
    if not os.access(p, os.R_OK):
        raise VideoReadError(p, "permission denied")
    still = still_image_format(p)
    if still is not None:
        raise VideoReadError(p, f"is a still {still} image, not a video (use facepipe detect or identify "
                                "for photos)")
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


class SeekMismatch(VideoReadError):
    """Decoding from a seek did not land on the frames a sequential decode numbers so (the
    video's timestamps are irregular there, or it ended early after the seek): decode
    from the start instead (``seek=False``)."""


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

    A time segment of the video (:mod:`facepipe.video.segments`): ``start``/``stop``
    give the frame range ``[start, stop)`` (``stop=None``: to the end); frames keep
    their indices in the whole video, and the stride counts from frame 0, so a
    segment's frames are numbered, timed and strided as in a whole-video read. With
    ``seek`` the decoder jumps to ``start`` (OpenCV seeks to the keyframe before it
    and decodes forward) and every frame's timestamp is checked against its index
    (``round((t - t0) * fps) == index``, ``t0`` the first frame's time, and each step
    from the frame before within half a frame period of ``1 / fps``): when one
    does not fit, or the video ends before ``stop``, :class:`SeekMismatch` is raised
    and the caller decodes from the start instead (``seek=False``: frames before
    ``start`` are grabbed, not converted). ``irregular_at`` is the first frame whose
    timestamp did not fit (``None``: all did), ``reached_stop`` whether decoding got
    to ``stop``. The truncation check runs for whole-video reads only.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 16,
        stride: int = 1,
        queue_batches: int = 4,
        start: int = 0,
        stop: int | None = None,
        seek: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"bad frame range [{start}, {stop})")
        self.path = Path(path)
        self.batch_size = int(batch_size)
        self.stride = int(stride)
        self.start = int(start)
        self.stop = None if stop is None else int(stop)
        self.seek = bool(seek) and self.start > 0
        self._cap, self.info = _open_capture(path)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, int(queue_batches)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames_read = 0
        self.frames_decoded = 0
        self.decode_seconds = 0.0
        self.irregular_at: int | None = None
        self.reached_stop = False

    # -- thread side
    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _seek(self, cap: Any) -> float:
        """Jump to ``start``; returns frame 0's time (the origin of the timestamp check)."""
        import cv2

        t0 = time.perf_counter()
        if not cap.grab():
            raise SeekMismatch(self.path, "no frame before seeking")
        first = float(cap.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0
        ok = cap.set(cv2.CAP_PROP_POS_FRAMES, self.start)
        self.decode_seconds += time.perf_counter() - t0
        if not ok or not np.isfinite(first) or self.info.fps <= 0:
            raise SeekMismatch(self.path, f"cannot seek to frame {self.start}")
        return first

    def _run(self) -> None:
        import cv2

        cap = self._cap
        batch: list[Frame] = []
        decoded_in_batch = 0
        fps = self.info.fps
        prev_t = -1.0
        try:
            index = 0
            origin: float | None = None
            if self.seek:
                origin = self._seek(cap)
                index = self.start
            while not self._stop.is_set():
                if self.stop is not None and index >= self.stop:
                    self.reached_stop = True
                    break
                t0 = time.perf_counter()
                if not cap.grab():
                    self.decode_seconds += time.perf_counter() - t0
                    break
                t = float(cap.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0
                if self.seek and index == self.start:
                    if not np.isfinite(t):
                        raise SeekMismatch(self.path, f"no timestamp after seeking to frame {self.start}")
                    prev_t = t - 1.0 / fps          # the frame before is not decoded
                if not np.isfinite(t) or (index > 0 and t <= prev_t):
                    # No usable timestamp: step by the average rate from the last one.
                    t = prev_t + (1.0 / fps if fps > 0 else 0.0) if index > 0 else 0.0
                if origin is None:
                    origin = t
                if self.irregular_at is None and (
                        fps <= 0 or round((t - origin) * fps) != index
                        or (prev_t >= 0 and abs((t - prev_t) * fps - 1.0) > 0.5)):
                    self.irregular_at = index
                    if self.seek:
                        raise SeekMismatch(self.path, f"frame {index} after seeking to {self.start} has time "
                                                      f"{t:.4f} s (expected {origin + index / fps:.4f} s)")
                prev_t = t
                if index < self.start:                  # decoding from the start up to the segment
                    self.decode_seconds += time.perf_counter() - t0
                    index += 1
                    continue
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
            if self.seek and not self.reached_stop and self.stop is not None and not self._stop.is_set():
                raise SeekMismatch(self.path, f"ended at frame {index} after seeking to {self.start} "
                                              f"(segment to {self.stop})")
            if self.seek and index == self.start and not self._stop.is_set():
                raise SeekMismatch(self.path, f"no frame after seeking to {self.start}")
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
        if self.start > 0 or self.stop is not None:
            return      # a segment: the caller checks the whole video
        check_frame_count(self.path, self.frames_read, self.info.frame_count)

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


def check_frame_count(path: Path, n: int, expected: int) -> None:
    """:class:`VideoReadError` when a video decoded to ``n`` frames is empty or stopped well
    short of the ``expected`` frames its container declares (truncated or corrupt)."""
    if n == 0:
        raise VideoReadError(path, "no frame could be decoded (corrupt or truncated video)")
    if expected > 0 and n < expected * (1.0 - TRUNCATION_TOLERANCE) and expected - n > 1:
        raise VideoReadError(path, f"truncated or corrupt: decoded {n} of {expected} frames")


def read_frames(path: str | os.PathLike[str], stride: int = 1) -> Iterator[Frame]:
    """All frames of a video in order (decoded every ``stride``-th); a convenience over :class:`VideoReader`."""
    with VideoReader(path, batch_size=8, stride=stride) as reader:
        for batch in reader:
            yield from batch
