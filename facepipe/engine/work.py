"""The work of one item, as every engine runs it: thin calls into the library.

* :func:`run_video_job` -- one video through :func:`facepipe.video.process_video`
  (its outputs written atomically next to each other, completion marker last);
* :func:`analyze_images` -- a shard of images loaded, detected, aligned and
  embedded in one batch by :meth:`facepipe.pipeline.FacePipeline.process_batch`;
  only boxes, embeddings and skip reasons come back (no crops), so results are
  small to send from a worker to the driver.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from facepipe.errors import FacepipeError


@dataclass
class VideoJob:
    """One video: its input, its outputs, the tracker's settings and
    :func:`~facepipe.video.process_video`'s other keyword arguments."""

    path: Path
    outputs: Any                      # facepipe.video.VideoOutputs
    tracker: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def run_video_job(analyzer: Any, job: VideoJob, progress: Callable[[str, int, int], None] | None = None) -> Any:
    """Process one video with ``analyzer`` (a :class:`~facepipe.video.FrameAnalyzer`);
    returns its :class:`~facepipe.video.VideoResult`, raises the library's typed errors."""
    from facepipe.track import Tracker
    from facepipe.video import process_video

    return process_video(job.path, job.outputs, analyzer, tracker=Tracker(**job.tracker),
                         on_progress=progress, **job.options)


@dataclass(frozen=True, eq=False)
class FaceResult:
    """An embedded face without its crop: detection (box, score, landmarks), embedding, alignment."""

    detection: Any
    embedding: np.ndarray
    alignment: str


@dataclass(eq=False)
class ImageAnalysis:
    """One image's faces, or the one-line ``error`` (and bare ``problem``) why it failed."""

    path: Path
    width: int = 0
    height: int = 0
    faces: tuple[FaceResult, ...] = ()
    skipped: tuple[Any, ...] = ()     # facepipe.pipeline.SkippedFace
    error: str | None = None
    problem: str | None = None

    @property
    def embeddings(self) -> np.ndarray:
        """All embeddings as float32 ``(N, dim)`` (``(0, 0)`` when there are none)."""
        if not self.faces:
            return np.zeros((0, 0), np.float32)
        return np.stack([f.embedding for f in self.faces])


def analyze_images(pipe: Any, paths: Sequence[str | os.PathLike[str]],
                   progress: Callable[[str, int, int], None] | None = None) -> list[ImageAnalysis]:
    """Load the images of a shard and embed all their faces in one batch (``pipe`` is a
    :class:`~facepipe.pipeline.FacePipeline`); a file that cannot be read gets its error."""
    from facepipe.io import load_image

    out: list[ImageAnalysis] = []
    loaded: list[tuple[ImageAnalysis, np.ndarray]] = []
    for p in paths:
        rec = ImageAnalysis(Path(p))
        try:
            image = load_image(p)
        except FacepipeError as exc:
            rec.error, rec.problem = str(exc), getattr(exc, "problem", str(exc))
        else:
            rec.height, rec.width = int(image.shape[0]), int(image.shape[1])
            loaded.append((rec, image))
        out.append(rec)
    if loaded:
        try:
            results = pipe.process_batch([im for _, im in loaded])
        except FacepipeError as exc:
            for rec, _ in loaded:
                rec.error, rec.problem = f"{rec.path}: {exc}", str(exc)
        else:
            for (rec, _), res in zip(loaded, results):
                rec.faces = tuple(FaceResult(f.detection, np.asarray(f.embedding, np.float32), f.alignment)
                                  for f in res.faces)
                rec.skipped = tuple(res.skipped)
    return out


def shard_results(outcome: Any) -> list[ImageAnalysis]:
    """The per-image results of a shard's outcome; a shard that failed as a whole (its
    worker died on every retry) gives each of its images that error."""
    if outcome.ok:
        return list(outcome.value)
    return [ImageAnalysis(Path(p), error=f"{p}: {outcome.error}", problem=str(outcome.error))
            for p in outcome.item]

#: Images per task for the commands without a batch-size option (identify, enroll).
IMAGE_SHARD = 16


def map_images(engine: Any, factory: Any, paths: Sequence[str | os.PathLike[str]], shard_size: int = IMAGE_SHARD,
               on_images: Callable[[int], None] | None = None) -> Iterator[ImageAnalysis]:
    """Every image's :class:`ImageAnalysis`, in input order, computed by ``engine`` in shards of
    ``shard_size`` (``factory`` builds the :class:`~facepipe.pipeline.FacePipeline`);
    ``on_images(n)`` is called as each shard of ``n`` images finishes anywhere."""
    from facepipe.engine.base import shards

    done = None if on_images is None else (lambda o: on_images(len(o.item)))
    for outcome in engine.map(factory, analyze_images, shards([os.fspath(p) for p in paths], shard_size),
                              ordered=True, on_done=done):
        yield from shard_results(outcome)


def largest_face_embedding(result: ImageAnalysis) -> np.ndarray:
    """The unit embedding of the largest face of an enrolment photo's analysis; raises
    :class:`~facepipe.errors.ImageReadError` naming the file when it failed or has no usable face."""
    from facepipe.errors import ImageReadError

    if result.error is not None:
        raise ImageReadError(result.path, result.problem or result.error)
    if not result.faces:
        if result.skipped:
            why = "; ".join(sorted({s.detail for s in result.skipped}))
            raise ImageReadError(result.path, f"no usable face ({why})")
        raise ImageReadError(result.path, "no face found")
    best = max(result.faces, key=lambda f: f.detection.box.area)
    return np.asarray(best.embedding, dtype=np.float32)


@dataclass(eq=False)
class ImageDetections:
    """One image's detections (``detect``), or why it failed."""

    path: Path
    width: int = 0
    height: int = 0
    faces: tuple[Any, ...] = ()       # facepipe.types.Detection
    error: str | None = None
    problem: str | None = None


def detect_image(detector: Any, path: str | os.PathLike[str],
                 progress: Callable[[str, int, int], None] | None = None) -> ImageDetections:
    """Load one image and run ``detector`` on it; a file that cannot be read gets its error."""
    from facepipe.io import load_image

    rec = ImageDetections(Path(path))
    try:
        image = load_image(path)
        rec.height, rec.width = int(image.shape[0]), int(image.shape[1])
        rec.faces = tuple(detector.detect(image))
    except FacepipeError as exc:
        rec.error, rec.problem = str(exc), getattr(exc, "problem", str(exc))
    return rec
