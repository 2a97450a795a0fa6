"""The work of one item, as every engine runs it: thin calls into the library.

* :func:`run_video_job` -- one video through :func:`facepipe.video.process_video`
  (its outputs written atomically next to each other, completion marker last);
* :func:`run_video_piece` -- the same, or one time segment of a long video
  (:func:`facepipe.video.segments.analyse_segment`), or the join of a video's segments
  and its outputs (:func:`facepipe.video.segments.finish_segments`); :func:`map_videos`
  plans the pieces of a job's videos and runs them on an engine;
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
    #: ``(segment_seconds, overlap_seconds)``: a worker that finds the video longer than
    #: 1.5 segments returns its :class:`Split` instead of processing it (see :func:`map_videos`).
    segments: tuple[float, float] | None = None


def run_video_job(analyzer: Any, job: VideoJob, progress: Callable[[str, int, int], None] | None = None) -> Any:
    """Process one video with ``analyzer`` (a :class:`~facepipe.video.FrameAnalyzer`);
    returns its :class:`~facepipe.video.VideoResult`, raises the library's typed errors."""
    from facepipe.track import Tracker
    from facepipe.video import process_video

    return process_video(job.path, job.outputs, analyzer, tracker=Tracker(**job.tracker),
                         on_progress=progress, **job.options)


#: Keyword arguments of process_video that analysing a segment uses, and those its join uses.
_ANALYSE_OPTIONS = ("stride", "batch_size", "embed_every", "shot_cut")
_PUBLISH_OPTIONS = ("stride", "batch_size", "annotate", "unknown_weight", "settings", "reid_gap",
                    "min_track_frames")


@dataclass
class SegmentJob:
    """One time segment of a video job (see :mod:`facepipe.video.segments`)."""

    job: VideoJob
    segment: Any                      # facepipe.video.segments.Segment

    @property
    def path(self) -> Path:
        """The video's path (for progress and error lines)."""
        return self.job.path


@dataclass
class JoinJob:
    """A video's segment results, to join and write as the video's outputs."""

    job: VideoJob
    results: list[Any]                # facepipe.video.segments.SegmentResult, in segment order
    analysis_seconds: float = 0.0

    @property
    def path(self) -> Path:
        """The video's path (for progress and error lines)."""
        return self.job.path


@dataclass
class Split:
    """A video job's answer when the video is long enough for segments: their plan."""

    segments: list[Any]               # facepipe.video.segments.Segment


def _split(job: VideoJob) -> Split | None:
    """The segments of a long video (``None``: process it whole; a video that cannot be
    opened is left to :func:`run_video_job`, which reports it as locally)."""
    from facepipe.video import probe_video
    from facepipe.video.segments import plan_segments

    if job.segments is None or job.segments[0] <= 0:
        return None
    try:
        info = probe_video(job.path)
    except FacepipeError:
        return None
    align = int(job.options.get("stride", 1)) * int(job.options.get("batch_size", 16))
    plan = plan_segments(info.frame_count, info.fps, job.segments[0], job.segments[1], align)
    return Split(plan) if len(plan) > 1 else None


def run_video_piece(analyzer: Any, piece: VideoJob | SegmentJob | JoinJob,
                    progress: Callable[[str, int, int], None] | None = None) -> Any:
    """A whole video (:func:`run_video_job`) or its :class:`Split` into segments, one
    segment's :class:`~facepipe.video.segments.SegmentResult`, or a joined video's
    :class:`~facepipe.video.VideoResult`."""
    from facepipe.video.segments import analyse_segment, finish_segments

    if isinstance(piece, VideoJob):
        return _split(piece) or run_video_job(analyzer, piece, progress)
    opts = piece.job.options
    if isinstance(piece, SegmentJob):
        return analyse_segment(piece.job.path, analyzer, piece.segment, piece.job.tracker, on_progress=progress,
                               **{k: opts[k] for k in _ANALYSE_OPTIONS if k in opts})
    return finish_segments(piece.job.path, piece.job.outputs, piece.results, on_progress=progress,
                           analysis_seconds=piece.analysis_seconds,
                           **{k: opts[k] for k in _PUBLISH_OPTIONS if k in opts})


class _VideoPlan:
    """Which pieces each video job is made of, and what to run when a piece finishes.
    Pieces are known by their index in the engine's job (items the engine appends from
    :meth:`then` get the next indices, in order)."""

    def __init__(self, jobs: Sequence[VideoJob], segment_seconds: float, overlap_seconds: float) -> None:
        from dataclasses import replace

        segments = (float(segment_seconds), float(overlap_seconds)) if segment_seconds > 0 else None
        self.jobs = [replace(job, segments=segments) for job in jobs]
        self.items: list[Any] = list(self.jobs)
        self.job_of: list[int] = list(range(len(self.jobs)))     # piece index -> job index
        self.results: dict[int, dict[int, Any]] = {}
        self.count: dict[int, int] = {}
        self.failed: set[int] = set()

    def _add(self, piece: Any, j: int) -> Any:
        self.job_of.append(j)
        self.items.append(piece)
        return piece

    def then(self, outcome: Any) -> list[Any]:
        """Pieces made possible by a finished one: the segments of a video found long, the
        join of a video whose segments are all in, or segments to decode again without
        seeking."""
        from facepipe.video.outputs import _remove
        from facepipe.video.segments import redo_without_seeking

        piece = self.items[outcome.index]
        j = self.job_of[outcome.index]
        if isinstance(piece, VideoJob) and outcome.ok and isinstance(outcome.value, Split):
            _remove([piece.outputs.marker])         # as process_video does before it starts
            self.count[j] = len(outcome.value.segments)
            self.results[j] = {}
            return [self._add(SegmentJob(piece, seg), j) for seg in outcome.value.segments]
        if not isinstance(piece, SegmentJob) or j in self.failed:
            return []
        if not outcome.ok:
            self.failed.add(j)
            return []
        got = self.results[j]
        got[piece.segment.index] = outcome.value
        if len(got) < self.count[j] or any(v is None for v in got.values()):
            return []
        results = [got[k] for k in sorted(got)]
        redo = redo_without_seeking(results)
        if redo:
            for seg in redo:
                got[seg.index] = None               # being computed again
            return [self._add(SegmentJob(self.jobs[j], seg), j) for seg in redo]
        seconds = sum(r.seconds for r in results)
        return [self._add(JoinJob(self.jobs[j], results, seconds), j)]

    def video_outcome(self, outcome: Any, reported: set[int]) -> Any:
        """The outcome of a video job when ``outcome`` finishes it (else ``None``); a video's
        failure is reported once (``reported``: the videos already reported)."""
        from facepipe.engine.base import Outcome

        j = self.job_of[outcome.index]
        piece = self.items[outcome.index]
        if j in reported or (outcome.ok and (isinstance(piece, SegmentJob) or isinstance(outcome.value, Split))):
            return None
        reported.add(j)
        return Outcome(j, self.jobs[j], value=outcome.value, error=outcome.error)


def map_videos(engine: Any, factory: Any, jobs: Sequence[VideoJob], *, segment_seconds: float = 0.0,
               overlap_seconds: float = 5.0, on_done: Callable[[Any], None] | None = None,
               on_piece: Callable[[Any], None] | None = None,
               item_progress: Callable[[int, Any], Any] | None = None,
               work: Callable[..., Any] | None = None) -> Iterator[Any]:
    """One :class:`~facepipe.engine.base.Outcome` per video job (its ``index`` in ``jobs``,
    ``value`` a :class:`~facepipe.video.VideoResult`), as videos finish on ``engine``.

    A video longer than 1.5 ``segment_seconds`` (0: none) is analysed in time segments
    with ``overlap_seconds`` of warm-up each, as separate items spread over the workers,
    then joined and written by one more item (:mod:`facepipe.video.segments`); its
    outputs are the single pass's. The worker that gets a video finds its length (the
    driver opens no video), and answers a long one with its :class:`Split`. ``on_piece(outcome)`` is called for every finished item (a
    whole video, a segment, a join), ``on_done(outcome)`` for every finished video.
    A video fails with the first error of any of its pieces. ``work``: the function run
    for each piece (:func:`run_video_piece`; tests wrap it)."""
    plan = _VideoPlan(jobs, segment_seconds, overlap_seconds)
    reported: set[int] = set()
    for outcome in engine.map(factory, work or run_video_piece, plan.items, on_done=on_piece,
                              item_progress=item_progress, then=plan.then):
        video = plan.video_outcome(outcome, reported)
        if video is not None:
            if on_done is not None:
                on_done(video)
            yield video


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
