"""The per-video processing loop: decode, analyse, track, vote identities, write outputs."""

from __future__ import annotations

import csv
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import numpy as np

from facepipe.errors import OutputError
from facepipe.track import (
    UNKNOWN, Observation, Track, Tracker, Vote, covered_by_tracks, merge_tracks, stitch_tracks, suppress_duplicates,
    vote_identity,
)
from facepipe.types import RESPONSE_SCORE_DETECTORS, Box, score_fields
from facepipe.video.analysis import SHOT_CUT_DISTANCE, STAGES, FrameAnalyzer, frame_signature, shot_distance
from facepipe.video.outputs import (
    OUTPUT_VERSION, ProgressFn, TrackSummary, VideoOutputs, _annotate, _r, _remove, _source_fingerprint,
    _write_json,
)
from facepipe.video.reading import Frame, VideoInfo, VideoReader


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


def _face_record(track: int, box: Box, score: float | None, o: Observation | None,
                 interpolated: bool, detector: str = "") -> dict[str, Any]:
    """One face of a frame record: its track and box, ``det_score`` (a probability, or null
    with ``det_response`` for Haar; see :func:`facepipe.types.score_fields`) and, when the
    face was identified in this frame, that frame's own decision (``frame_name``,
    ``frame_similarity``, ``frame_distance``)."""
    rec: dict[str, Any] = {
        "track": track,
        "x": round(box.x, 1), "y": round(box.y, 1), "w": round(box.w, 1), "h": round(box.h, 1),
        **score_fields(detector, _r(score)),
    }
    if o is not None and o.name is not None:
        rec["frame_name"] = o.name
        rec["frame_similarity"] = _r(o.score)
        rec["frame_distance"] = None if o.score is None else _r(1.0 - float(o.score))
    if interpolated:
        rec["interpolated"] = True
    return rec


def _lerp_box(a: dict[str, Any], b: dict[str, Any], f: float) -> Box:
    return Box(*(a[k] + (b[k] - a[k]) * f for k in ("x", "y", "w", "h")))


def _carry(pending: list[dict[str, Any]], prev: dict[str, Any] | None, nxt: dict[str, Any] | None,
           detector: str = "") -> None:
    """Fill skipped frames' faces: tracks seen in both neighbouring analysed frames are
    interpolated in time; after the last analysed frame the boxes are held."""
    if prev is None:
        return
    prev_faces = {f["track"]: f for f in prev["faces"]}
    if nxt is None:
        for rec in pending:
            rec["faces"] = [_face_record(t, Box(f["x"], f["y"], f["w"], f["h"]), None, None, True, detector)
                            for t, f in prev_faces.items()]
        return
    next_faces = {f["track"]: f for f in nxt["faces"]}
    span = nxt["time"] - prev["time"]
    for rec in pending:
        frac = (rec["time"] - prev["time"]) / span if span > 0 else 0.0
        frac = min(max(frac, 0.0), 1.0)
        rec["faces"] = [
            _face_record(t, _lerp_box(prev_faces[t], next_faces[t], frac), None, None, True, detector)
            for t in prev_faces if t in next_faces
        ]


def finish_tracks(tracker: Tracker | Sequence[Track], cut_times: Sequence[float], reid_gap: float = 0.0,
                  min_track_frames: int = 1, sim_min: float | None = None,
                  ) -> tuple[list[Track], dict[int, int], dict[int, int], int]:
    """The tracks a video reports, after tracking: re-identified (``reid_gap`` > 0, see
    :func:`facepipe.track.stitch_tracks`), without those seen in fewer than
    ``min_track_frames`` analysed frames, renumbered 1, 2, ... by first appearance.

    Returns ``(tracks, chain, final_id, dropped)``: ``chain`` maps each tracker id to its
    chain's first id, ``final_id`` maps a chain's first id to the reported id (absent:
    dropped), ``dropped`` counts the dropped tracks. ``tracker`` may be the tracks themselves
    (a video joined from segments), with the tracker's ``sim_min``.
    """
    if isinstance(tracker, Tracker):
        tracks, sim = tracker.tracks, tracker.sim_min
    else:
        tracks, sim = list(tracker), float(sim_min if sim_min is not None else Tracker().sim_min)
    chain = {t.track_id: t.track_id for t in tracks}
    if reid_gap > 0:
        chain = stitch_tracks(tracks, sim, reid_gap, cut_times)
        tracks = merge_tracks(tracks, chain)
    kept = sorted((t for t in tracks if t.hits >= min_track_frames), key=lambda t: (t.first_time, t.track_id))
    final_id = {t.track_id: k for k, t in enumerate(kept, 1)}
    for k, t in enumerate(kept, 1):
        t.track_id = k
    return kept, chain, final_id, len(tracks) - len(kept)


@dataclass
class Tracked:
    """A video after tracking, before its outputs are written (:func:`publish_outputs`): the
    container's ``info``, frames read and analysed, faces detected, shot cuts (their
    times), every track the tracker made (ids as the tracker gave them) and the
    tracker's same-person similarity (for re-identification)."""

    info: VideoInfo
    frames: int
    analysed: int
    faces: int
    cuts: int
    tracks: list[Track]
    cut_times: list[float] = field(default_factory=list)
    sim_min: float = 0.5


def track_frames(
    reader: VideoReader,
    analyzer: FrameAnalyzer,
    tracker: Tracker,
    *,
    embed_every: int = 1,
    shot_cut: float | None = SHOT_CUT_DISTANCE,
    analysed_before: int = 0,
    timings: dict[str, float] | None = None,
    on_progress: ProgressFn | None = None,
) -> Iterator[tuple[Frame, dict[str, Any], int]]:
    """Detect, embed and track the frames ``reader`` gives: ``(frame, record, detected)`` for
    every frame in order. An analysed frame's record has its faces with the tracker's ids
    (names and interpolation come later; nested duplicate boxes suppressed), ``detected``
    the detector's boxes before that (the count completion markers report); a frame
    skipped by the stride has ``"analysed": false``, no faces yet and 0 detected. ``analysed_before``: analysed frames of the
    video before the reader's first frame (a segment's place in the ``embed_every``
    rhythm). ``timings["track"]`` accumulates the tracking time. See :func:`process_video`."""
    det_name = str(getattr(analyzer.detector, "name", ""))
    total = reader.info.frame_count
    analysed = analysed_before
    prev_sig: np.ndarray | None = None
    t_track = 0.0
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
        t_track += time.perf_counter() - t0
        observations = iter(analyzer.observe(images, dets, want))  # type: ignore[arg-type]
        for fr in batch:
            rec: dict[str, Any] = {"frame": fr.index, "time": round(fr.time, 4),
                                   "analysed": fr.image is not None, "faces": []}
            detected = 0
            if fr.image is not None:
                t0 = time.perf_counter()
                found = next(observations)
                detected = len(found)
                obs = suppress_duplicates(found)
                if fr.index in cut_at:
                    tracker.cut()
                    rec["cut"] = True
                ids = tracker.update(fr.index, fr.time, obs)
                rec["faces"] = [_face_record(i, o.detection.box, o.detection.score, o, False, det_name)
                                for i, o in zip(ids, obs)]
                analysed += 1
                t_track += time.perf_counter() - t0
            yield fr, rec, detected
        if on_progress is not None:
            on_progress("analyse", batch[-1].index + 1, max(total, batch[-1].index + 1))
    if timings is not None:
        timings["track"] = timings.get("track", 0.0) + t_track


@contextmanager
def output_files(outputs: VideoOutputs, annotate: bool) -> Iterator[tuple[dict[Path, Path], Path]]:
    """The temporary names a video's outputs are written under, and the raw per-frame
    records file: the output directory is created, a stale completion marker removed
    first (it must not vouch for files this run replaces), the temporary files removed
    on the way out (published or not), and failed writes raised as :class:`OutputError`."""
    files = outputs.files(annotate)
    tmp = {p: outputs.partial(p) for p in files}
    raw = outputs.partial(outputs.frames).with_name(f".{outputs.frames.name}.raw.partial")
    try:
        outputs.marker.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(outputs.marker.parent, f"cannot create directory ({exc.strerror or exc})") from exc
    _remove([outputs.marker])
    cleanup = list(tmp.values()) + [raw]
    try:
        yield tmp, raw
    except OSError as exc:
        raise OutputError(outputs.marker.parent, f"cannot write results ({exc.strerror or exc})") from exc
    finally:
        _remove([p for p in cleanup if p.exists()])


def open_raw(raw: Path) -> IO[str]:
    """The raw records file, open for writing (:class:`OutputError` when it cannot be)."""
    try:
        return raw.open("w")
    except OSError as exc:
        raise OutputError(raw, f"cannot write ({exc.strerror or exc})") from exc


def write_record(f: IO[str], rec: dict[str, Any]) -> None:
    """One frame record as a JSON line."""
    f.write(json.dumps(rec, separators=(",", ":")) + "\n")


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
    reid_gap: float = 0.0,
    min_track_frames: int = 1,
) -> VideoResult:
    """Analyse one video and write its outputs atomically (see the module docstring).

    ``embed_every`` > 1: a face that clearly continues a track with at least three
    embedded frames is embedded (and identified) only on every ``embed_every``-th
    analysed frame; new, ambiguous or uncertain faces are embedded on every one.
    ``shot_cut``: when the colour signature of consecutive analysed frames differs
    by more than this (:func:`shot_distance`), every track ends there (a camera
    cut; the frame record gets ``"cut": true``); ``None`` disables it.

    ``reid_gap`` > 0: after tracking, a track that starts at most this many seconds after
    another ended and shows the same face (embeddings; same place within a shot) is
    joined to it (:func:`facepipe.track.stitch_tracks`): one track per person instead of
    one per unbroken run of detections. ``min_track_frames``: tracks seen in fewer
    analysed frames are dropped from the outputs as spurious detections. Track ids
    are renumbered 1, 2, ... in order of appearance.

    ``on_progress(phase, frames_done, total)`` is called as frames go by, with
    ``phase`` ``"analyse"`` then ``"annotate"``. Raises :class:`VideoReadError`
    for a video that cannot be opened, decodes no frame or is truncated (no
    output is left behind) and :class:`OutputError` when results cannot be
    written.
    """
    src = Path(path)
    tracker = tracker or Tracker()
    det_name = str(getattr(analyzer.detector, "name", ""))
    t_start = time.perf_counter()
    timings: dict[str, float] = {s: 0.0 for s in STAGES}
    det0 = dict(analyzer.timings)
    faces0 = analyzer.faces
    with output_files(outputs, annotate) as (tmp, raw):
        with VideoReader(src, batch_size=batch_size, stride=stride) as reader:
            analysed = cuts = 0
            cut_times: list[float] = []
            prev_rec: dict[str, Any] | None = None
            pending: list[dict[str, Any]] = []
            with open_raw(raw) as raw_f:
                for fr, rec, _ in track_frames(reader, analyzer, tracker, embed_every=embed_every,
                                               shot_cut=shot_cut, timings=timings, on_progress=on_progress):
                    if not rec["analysed"]:
                        pending.append(rec)
                        continue
                    if rec.get("cut"):
                        cuts += 1
                        cut_times.append(fr.time)
                    _carry(pending, prev_rec, rec, det_name)
                    for r in pending + [rec]:
                        write_record(raw_f, r)
                    pending, prev_rec = [], rec
                    analysed += 1
                _carry(pending, prev_rec, None, det_name)
                for r in pending:
                    write_record(raw_f, r)
            timings["decode"] = reader.decode_seconds
            tracked = Tracked(reader.info, reader.frames_read, analysed, analyzer.faces - faces0, cuts,
                              tracker.tracks, cut_times, tracker.sim_min)
        analysis_seconds = time.perf_counter() - t_start
        for s in ("detect", "align", "embed", "search"):
            timings[s] = analyzer.timings[s] - det0.get(s, 0.0)
        return publish_outputs(src, outputs, tracked, tmp, raw, stride=stride, batch_size=batch_size,
                               annotate=annotate, unknown_weight=unknown_weight, settings=settings,
                               timings=timings, t_start=t_start, analysis_seconds=analysis_seconds,
                               on_progress=on_progress, detector=det_name,
                               identifying=analyzer.gallery is not None, reid_gap=reid_gap,
                               min_track_frames=min_track_frames)


def publish_outputs(
    src: Path,
    outputs: VideoOutputs,
    tracked: Tracked,
    tmp: dict[Path, Path],
    raw: Path,
    *,
    stride: int,
    batch_size: int,
    annotate: bool,
    unknown_weight: float,
    settings: dict[str, Any] | None,
    timings: dict[str, float],
    t_start: float,
    analysis_seconds: float,
    on_progress: ProgressFn | None = None,
    detector: str = "",
    identifying: bool = False,
    reid_gap: float = 0.0,
    min_track_frames: int = 1,
) -> VideoResult:
    """Write a tracked video's outputs under their temporary names (``tmp``, from
    :func:`output_files`), from the raw records in ``raw`` (tracker ids, every frame in
    order, interpolation done): one identity vote per track, names on every frame, the
    tracks CSV/JSON, the annotated video; then rename them and write the completion
    marker last. ``detector``: the detector's name (its score's meaning); ``identifying``:
    a gallery was searched; ``reid_gap``/``min_track_frames`` as in
    :func:`process_video`. Shared by :func:`process_video` and the stitching of a video's time
    segments (:mod:`facepipe.video.segments`), so both write the same files."""
    info, n_frames, analysed = tracked.info, tracked.frames, tracked.analysed
    files = outputs.files(annotate)

    # Identities: one vote per track, then the final per-frame records.
    t0 = time.perf_counter()
    summaries: list[TrackSummary] = []
    votes: dict[int, Any] = {}
    kept, chain, final_id, dropped = finish_tracks(tracked.tracks, tracked.cut_times, reid_gap,
                                                   min_track_frames, tracked.sim_min)
    for tr in kept:
        # One "no name" convention: with a gallery every track has an identity, a person or
        # "unknown"; a track none of whose frames could be identified (faces too small, no
        # landmarks) is "unknown" with confidence 0 and identified_frames 0.
        v = vote_identity(tr.votes, unknown_weight) if tr.votes else None
        if v is None and identifying:
            v = Vote(UNKNOWN, 0.0, None, 0)
        votes[tr.track_id] = v
        mean_det = float(np.mean(tr.det_scores)) if tr.det_scores else None
        response = detector in RESPONSE_SCORE_DETECTORS
        summaries.append(TrackSummary(
            track=tr.track_id, first_frame=tr.first_frame, last_frame=tr.last_frame,
            first_time=round(tr.first_time, 4), last_time=round(tr.last_time, 4), frames=tr.hits,
            identity=v.name if v else None, confidence=_r(v.confidence) if v else None,
            identified_frames=v.frames if v else 0,
            similarity=_r(v.mean_score) if v else None,
            distance=_r(1.0 - v.mean_score) if v and v.mean_score is not None else None,
            mean_det_score=None if response else _r(mean_det),
            mean_det_response=_r(mean_det) if response else None,
        ))
    with raw.open() as fin, tmp[outputs.frames].open("w") as fout:
        for line in fin:
            rec = json.loads(line)
            faces = []
            for face in rec["faces"]:
                tid = final_id.get(chain.get(face["track"], face["track"]))
                if tid is None:
                    continue  # a spurious short track
                face["track"] = tid
                v = votes.get(tid)
                face["name"] = v.name if v else None
                face["identity_confidence"] = _r(v.confidence) if v else None
                faces.append(face)
            rec["faces"] = faces
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
        "stride": stride, "shot_cuts": tracked.cuts, "dropped_short_tracks": dropped,
        "tracks": [asdict(s) for s in summaries],
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
        faces=tracked.faces, tracks=summaries, timings=timings,
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
