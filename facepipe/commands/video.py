"""``facepipe video``: detect, track and identify faces in video files."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from facepipe import defaults
from facepipe.commands._common import (
    BatchTally, FiniteFloat, detector_option, device_option, embedder_option, fail, gallery_option,
    engine_options, make_engine, min_detect_size_option, min_embed_size_option, report, setup_logging,
    verbosity_options,
)
from facepipe.errors import FacepipeError, NoInputsError


def _bar(total: int | None, desc: str, unit: str, position: int, quiet: bool, leave: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, position=position, leave=leave, file=sys.stderr,
                disable=True if quiet else None, dynamic_ncols=True)


def _unique_relative(item: Any, used: set[Path]) -> Path:
    """The input's path under --out. Outputs are named by the file name without its extension,
    so two inputs that would share an output name (a/clip.mp4 and b/clip.mp4 given as files,
    or clip.mp4 and clip.avi side by side) get their parent folders' names prefixed, then
    the extension, then a counter added."""
    rel = Path(item.relative)
    candidates = [rel]
    parents = Path(os.path.abspath(item.path)).parent.parts[1:]
    for k in range(1, len(parents) + 1):
        candidates.append(Path(*parents[-k:]) / rel)
    if rel.suffix:
        candidates.append(rel.with_name(f"{rel.stem}_{rel.suffix.lstrip('.')}{rel.suffix}"))
    for c in candidates:
        if c.with_suffix("") not in used:
            used.add(c.with_suffix(""))
            return c
    n = 2
    while (c := rel.with_name(f"{rel.stem}_{n}{rel.suffix}")).with_suffix("") in used:
        n += 1
    used.add(c.with_suffix(""))
    return c


def _tracker(analyzer: Any, max_gap: float) -> dict[str, Any]:
    """Keyword arguments of :class:`~facepipe.track.Tracker` (each video gets its own): the
    same-person similarity is the gallery's calibrated threshold (embedders differ: dlib's
    vectors of two different people often have cosine 0.85)."""
    if analyzer.gallery is not None:
        return {"max_gap_s": max_gap, "sim_min": float(analyzer.gallery.threshold)}
    return {"max_gap_s": max_gap}


def defaults_segment_seconds(engine: Any) -> float:
    """Segments by default only where they can run in parallel: engines with several workers."""
    from facepipe.video.segments import SEGMENT_SECONDS

    return SEGMENT_SECONDS if int(engine.describe().get("workers", 1)) > 1 else 0.0


def _quiet_decoder_logs(verbose: int) -> None:
    """Keep FFmpeg's and OpenCV's own warnings (e.g. "moov atom not found") off stderr: a
    bad file is reported once, as facepipe's one-line error. ``-vv`` shows them."""
    if verbose >= 2:
        return
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


@click.command("video")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (input folders are mirrored inside it).")
@gallery_option(required=False, help_text="Identify faces against this gallery directory "
                                           "(else detection and tracking only).")
@detector_option
@embedder_option(gallery_aware=True)
@min_detect_size_option
@click.option("--det-threshold", type=FiniteFloat(0.0, 1.0), default=None,
              help="Face probability a CNN detection needs (cnn, haar+cnn) [detector's default].")
@min_embed_size_option
@click.option("--tolerance", type=FiniteFloat(0.0, 2.0), default=None, metavar="DIST",
              help="-g: name a face when its distance (1 − cosine similarity) is at most this "
                   "[default: the gallery's calibrated tolerance].")
@click.option("--min-margin", type=FiniteFloat(0.0, 2.0), default=defaults.MIN_MARGIN, show_default=True,
              metavar="M", help="-g: per frame, call a near-tie between two people (lead below M) unknown.")
@click.option("--landmarks", type=click.Choice(["onet", "mtcnn", "box"]), default="onet", show_default=True,
              help="Landmarks for detectors without them: onet (MTCNN's last stage on each box, batched), "
              "mtcnn (full MTCNN per face region, as identify does; slower), box (no alignment).")
@click.option("--stride", type=click.IntRange(min=1), default=1, show_default=True,
              help="Analyse every Nth frame; tracks are interpolated in between.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Frames per detection/embedding batch.")
@click.option("--embed-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Embed a face that clearly continues an identified track only every Nth analysed "
              "frame (new or ambiguous faces: every frame). Saves most embedding work on long tracks.")
@device_option
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="CPU threads for PyTorch and OpenCV (0: their defaults). On a machine busy with "
              "other work, 1 is often fastest.")
@click.option("--annotate/--no-annotate", default=True, show_default=True,
              help="Write NAME.annotated.mp4 with boxes, names and track ids.")
@click.option("--resume", is_flag=True, help="Skip videos already finished with the same settings.")
@click.option("--shot-cut", type=FiniteFloat(0.0, 1.0), default=0.3, show_default=True,
              help="End all tracks where consecutive analysed frames' colour histograms differ by "
              "more than this (Bhattacharyya distance; a camera cut). 0 disables.")
@click.option("--max-gap", type=FiniteFloat(min=0.0), default=1.0, show_default=True,
              help="Seconds a track survives without being seen.")
@click.option("--reid-gap", type=FiniteFloat(min=0.0), default=defaults.VIDEO_REID_GAP, show_default=True,
              metavar="SECONDS", help="Join a track to one that ended at most this long before when their faces "
                                      "match (embeddings; same place within a shot): one track per person "
                                      "instead of one per unbroken run of detections. 0 disables it.")
@click.option("--min-track-frames", type=click.IntRange(min=1), default=defaults.VIDEO_MIN_TRACK_FRAMES,
              show_default=True, help="Drop tracks seen in fewer analysed frames (spurious detections).")
@click.option("--segment-seconds", type=FiniteFloat(min=0.0), default=None,
              help="Analyse a video longer than 1.5x this many seconds in time segments, as parallel items "
              "joined into the same outputs as one pass (tracks continue across segments). "
              "0: never. [600 when the engine has more than one worker, else 0]")
@click.option("--segment-overlap", type=FiniteFloat(min=0.0), default=5.0, show_default=True,
              help="Seconds each segment decodes before its start to bring its tracker up to date "
              "(must exceed --max-gap; with the automatic --segment-seconds, raised to --max-gap + 1).")
@engine_options
@verbosity_options
def video(
    inputs: tuple[str, ...],
    out_dir: Path,
    gallery_dir: Path | None,
    detector_name: str | None,
    embedder_name: str | None,
    min_detect_size: int | None,
    det_threshold: float | None,
    min_embed_size: int,
    tolerance: float | None,
    min_margin: float,
    landmarks: str,
    stride: int,
    batch_size: int,
    embed_every: int,
    device: str | None,
    threads: int,
    annotate: bool,
    resume: bool,
    shot_cut: float,
    max_gap: float,
    reid_gap: float,
    min_track_frames: int,
    segment_seconds: float | None,
    segment_overlap: float,
    engine_name: str,
    ray_address: str | None,
    ray_workers: int,
    workers: int,
    quiet: bool,
    verbose: int,
) -> None:
    """Detect, track and (with --gallery) identify faces in videos.

    INPUT is a video file, a directory (searched recursively for mp4, avi, mkv,
    mov, webm) or a glob. For each video NAME.mp4, the output directory gets
    NAME.frames.jsonl (one record per frame), NAME.tracks.csv and
    NAME.tracks.json (one row per track: first/last time, frames, identity,
    confidence; docs/schema/video-*.json), NAME.annotated.mp4 and, last, the
    completion marker NAME.done.json. With -g every track gets one identity, a
    person or `unknown` (confidence: the share of its frames' similarity-weighted
    votes; 0 when no frame could be identified). det_score is the detector's
    face probability (0-1); Haar reports its cascade response as det_response.
    Files that cannot be decoded are reported and skipped; the exit code is 1
    if any input failed.

    Speed on a CPU: detection dominates. --detector cnn ran 4-14x MTCNN's
    frames/s on 720p and 1080p clips (one thread), and --stride 2 about
    doubles that again (docs/video.md).
    """
    from facepipe.engine import WorkerFactory
    from facepipe.engine.work import SegmentJob, VideoJob, map_videos
    from facepipe.io import ensure_output_dir
    from facepipe.video import build_analyzer, is_complete, iter_videos, output_paths

    if segment_seconds and segment_overlap <= max_gap:
        raise click.UsageError(f"--segment-overlap ({segment_overlap:g}) must exceed --max-gap ({max_gap:g}): a "
                               "track alive where a segment starts must have been seen in its warm-up")
    if segment_seconds and segment_overlap > segment_seconds:
        raise click.UsageError(f"--segment-overlap ({segment_overlap:g}) must not exceed --segment-seconds "
                               f"({segment_seconds:g})")
    setup_logging(quiet, verbose)
    _quiet_decoder_logs(verbose)
    if threads:
        import cv2
        import torch

        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
    detector_name = detector_name or defaults.DETECTOR
    device = device or defaults.DEVICE
    options: dict[str, Any] = {}
    if min_detect_size is not None:
        options["min_size"] = min_detect_size
    if det_threshold is not None:
        if detector_name not in ("cnn", "cnn-pyramid", "haar+cnn"):
            raise click.UsageError(f"--det-threshold applies to the cnn, cnn-pyramid and haar+cnn detectors, "
                                   f"not {detector_name!r}")
        options["threshold"] = det_threshold
    if gallery_dir is None and (tolerance is not None or min_margin):
        raise click.UsageError("--tolerance and --min-margin need -g/--gallery")
    try:
        out_dir = ensure_output_dir(out_dir)
        if gallery_dir is not None and embedder_name is None:
            from facepipe.builders import gallery_embedder
            from facepipe.gallery import Gallery

            embedder_name = gallery_embedder(Gallery.open(gallery_dir, verify=False))
        factory = WorkerFactory(build_analyzer, detector_name, embedder_name, gallery_dir, device, options,
                                min_embed_size, landmarks,
                                threshold=None if tolerance is None else 1.0 - tolerance, min_margin=min_margin)
        analyzer = factory()
    except FacepipeError as exc:
        raise fail(exc) from exc
    except (ValueError, TypeError) as exc:
        raise fail(f"detector {detector_name!r}: {exc}") from exc

    tally = BatchTally()
    found = list(iter_videos(inputs))
    for bad in found:
        if isinstance(bad, NoInputsError):
            tally.fail(str(bad))
    files = [f for f in found if not isinstance(f, NoInputsError)]
    # an unknown frame votes like a match exactly at the threshold in force
    threshold = float(analyzer.threshold) if analyzer.threshold is not None else defaults.THRESHOLD
    settings = {**analyzer.describe(), "stride": stride, "annotate": annotate, "max_gap": max_gap,
                "embed_every": embed_every, "shot_cut": shot_cut, "reid_gap": reid_gap,
                "min_track_frames": min_track_frames}
    skipped = frames_total = 0
    t0 = time.perf_counter()
    jobs = []
    used: set[Path] = set()
    for item in files:
        outputs = output_paths(out_dir, _unique_relative(item, used))
        if resume and is_complete(outputs, item.path, settings):
            skipped += 1
            report(f"{item.path}: already done, skipped (--resume)", quiet)
            continue
        jobs.append(VideoJob(item.path, outputs, _tracker(analyzer, max_gap), dict(
            stride=stride, batch_size=batch_size, annotate=annotate, unknown_weight=threshold,
            embed_every=embed_every, shot_cut=shot_cut or None, settings=settings, reid_gap=reid_gap,
            min_track_frames=min_track_frames)))
    overall = _bar(len(files), "videos", "file", 0, quiet or len(files) < 2, True)
    overall.update(skipped)
    bars: dict[str, Any] = {}

    def item_progress(_i: int, job: Any) -> Any:
        def on_progress(phase: str, done: int, total: int) -> None:
            bar = bars.get(phase)
            if bar is None:
                for b in bars.values():
                    b.close()
                bar = bars[phase] = _bar(total, f"{job.path.name} [{phase}]", "frame", 1, quiet, False)
            if total > (bar.total or 0):
                bar.total = total
            bar.update(done - bar.n)
        return on_progress

    segments_bar: list[Any] = []

    def on_piece(outcome: Any) -> None:
        for b in bars.values():
            b.close()
        bars.clear()
        if isinstance(outcome.item, SegmentJob):
            if not segments_bar:
                segments_bar.append(_bar(None, "segments", "seg", 1, quiet, False))
            segments_bar[0].update(1)

    def on_done(_outcome: Any) -> None:
        overall.update(1)

    engine = make_engine(engine_name, ray_address, ray_workers, device, verbose, workers)
    if segment_seconds is None:
        segment_seconds = defaults_segment_seconds(engine)
        segment_overlap = max(segment_overlap, max_gap + 1.0)
    try:
        for outcome in map_videos(engine, factory, jobs, segment_seconds=segment_seconds,
                                  overlap_seconds=segment_overlap, on_done=on_done, on_piece=on_piece,
                                  item_progress=item_progress):
            if not outcome.ok:
                tally.fail(str(outcome.error))
                continue
            result, outputs = outcome.value, outcome.item.outputs
            tally.ok += 1
            tally.items += len(result.tracks)
            frames_total += result.frames
            named = sorted({t.identity for t in result.tracks if t.identity and t.identity != "unknown"})
            report(
                f"{outcome.item.path}: {result.frames} frames ({result.analysed_frames} analysed), "
                f"{result.faces} faces, {len(result.tracks)} tracks"
                + (f", identities: {', '.join(named)}" if named else "")
                + f", {result.fps:.1f} frames/s -> {os.fspath(outputs.tracks_csv.parent)}",
                quiet,
            )
    finally:
        for b in segments_bar:
            b.close()
        overall.close()
        engine.close()
    elapsed = time.perf_counter() - t0
    if len(files) > 1 or tally.failed or skipped:
        report(
            f"facepipe: {tally.ok} video(s) processed ({frames_total} frames), {skipped} skipped, "
            f"{tally.failed} failed, {elapsed:.1f}s",
            quiet,
        )
    raise tally.done(quiet)
