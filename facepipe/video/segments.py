"""Long videos in time segments: analysed in parallel, joined into the outputs of one pass.

A video longer than a segment length ``L`` is cut into segments of ``L`` seconds
(:func:`plan_segments`). Segment ``k`` owns the frames ``[start_k, start_k+1)``; its
worker decodes from ``overlap`` seconds earlier (the *warm-up*), so that when its own
range begins, its tracker has seen the faces that are on screen and holds the same
live tracks a single pass would hold there (a track unseen for ``max_gap`` seconds
ends, so an overlap longer than ``max_gap`` leaves no live track unseen). Warm-up
frames produce no records; they are only used to join the segments:

* **track ids**: the warm-up frames of segment ``k+1`` are frames segment ``k``
  analysed as its own. A track of ``k+1`` that is alive at the boundary continues the
  track of ``k`` that holds the same face (same box) in the last warm-up frame where
  the ``k+1`` track was seen; pairs are one-to-one (Hungarian, on the number of shared
  warm-up frames). Tracks of ``k+1`` with no such partner start new tracks. A shot cut
  ends every track in both segments alike (the cut is detected from the same frames),
  so no track is joined across a cut.
* **records and tracks**: each frame's record comes from the segment that owns it;
  ids are renumbered in the order a single pass creates them (by first frame, then
  position in that frame); each joined track's statistics (frames, detection scores,
  the per-frame identity votes) are the concatenation of its parts' in the segments'
  own ranges, so the identity is voted over all of its frames; interpolation of
  frames skipped by ``--stride`` runs over the joined records.
* **outputs** are then written by the same function as a single pass
  (:func:`facepipe.video.process.publish_outputs`).

Segment boundaries are multiples of ``stride * batch_size`` frames, so every segment
analyses the same frames in the same batches as a single pass. Decoding starts with a
seek (:class:`~facepipe.video.reading.VideoReader` checks each frame's timestamp
against its index and falls back to decoding from the start when they disagree);
:func:`redo_without_seeking` names the segments whose seek cannot be trusted because
an earlier part of the video has irregular timestamps (a dropped frame shifts every
later index), and the join re-checks that neighbouring segments agree on the overlap
frames' timestamps and faces.

What can differ from a single pass: a tracker's velocity and reference embedding are
running averages, so at a boundary the warmed-up tracker's are within a small
fraction of the single pass's (halved per analysed frame for the velocity, ``1 -
ema`` for the embedding), not bit-equal. Only a face whose match is decided within
that margin of a threshold (IoU, cosine) can be matched differently; ``--embed-every``
> 1 adds which frames are embedded to that, as it depends on the tracker. The tests
compare segmented and single-pass outputs byte for byte.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facepipe.errors import VideoReadError
from facepipe.track import Observation, Track, Tracker, assign, iou_matrix
from facepipe.types import Box
from facepipe.video.analysis import SHOT_CUT_DISTANCE, STAGES, FrameAnalyzer
from facepipe.video.outputs import ProgressFn, VideoOutputs
from facepipe.video.process import (
    Tracked, VideoResult, _carry, open_raw, output_files, publish_outputs, track_frames, write_record,
)
from facepipe.video.reading import SeekMismatch, VideoInfo, VideoReader, check_frame_count

#: Default segment length (seconds) for engines with more than one worker: a video shorter
#: than 1.5 segments stays one task.
SEGMENT_SECONDS = 600.0
#: Default warm-up before each segment (seconds); must exceed the tracker's ``max_gap``.
OVERLAP_SECONDS = 5.0


@dataclass(frozen=True)
class Segment:
    """One time segment of a video: it owns frames ``[start, stop)`` (``stop`` ``None``:
    to the end) and decodes from ``warm`` (the warm-up); ``seek``: start decoding with a
    seek (else decode from frame 0 and skip)."""

    index: int
    count: int
    warm: int
    start: int
    stop: int | None
    seek: bool = True

    def without_seeking(self) -> "Segment":
        """The same segment, decoded from the start of the video."""
        return Segment(self.index, self.count, self.warm, self.start, self.stop, False)


def plan_segments(frame_count: int, fps: float, segment_seconds: float, overlap_seconds: float,
                  align: int = 1) -> list[Segment]:
    """The segments of a video of ``frame_count`` frames at ``fps``: boundaries every
    ``segment_seconds`` (rounded to a multiple of ``align`` frames), each segment warmed
    up over ``overlap_seconds`` before it (rounded up to ``align``); a last piece shorter
    than half a segment joins the one before. One segment (the whole video) when it is
    not longer than that, when ``segment_seconds`` is 0 or the length is unknown."""
    whole = [Segment(0, 1, 0, 0, None)]
    if segment_seconds <= 0 or frame_count <= 0 or fps <= 0:
        return whole
    align = max(1, int(align))
    length = max(align, int(round(segment_seconds * fps / align)) * align)
    overlap = int(math.ceil(max(0.0, overlap_seconds) * fps / align)) * align
    if overlap > length:
        raise ValueError(f"the overlap ({overlap_seconds:g} s) must not exceed the segment length "
                         f"({segment_seconds:g} s)")
    starts = list(range(0, frame_count, length))
    if len(starts) > 1 and frame_count - starts[-1] < length / 2:
        starts.pop()
    n = len(starts)
    if n == 1:
        return whole
    return [Segment(k, n, max(0, s - overlap), s, starts[k + 1] if k + 1 < n else None)
            for k, s in enumerate(starts)]


@dataclass
class SegmentResult:
    """What analysing one segment gives the join: the records of its own frames (tracker
    ids of this segment; skipped frames without faces), the analysed warm-up records
    (to match tracks at the boundary), each track's part in the own range, the exact
    times of its shot cuts, where decoding ended, how it decoded, and what the outputs
    need to know of the analysis (detector name, whether a gallery named faces, the
    tracker's same-person similarity)."""

    segment: Segment
    info: VideoInfo
    records: list[dict[str, Any]]
    warm: list[dict[str, Any]]
    parts: dict[int, Track]
    cut_times: list[float]
    frames_end: int
    reached_stop: bool
    irregular_at: int | None
    seeked: bool
    faces: int
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    detector: str = ""
    identifying: bool = False
    sim_min: float = 0.5


class _PartTracker(Tracker):
    """A tracker that also keeps, for every track, its part from frame ``own_start`` on:
    the frames, detection scores, embeddings counted and votes of the segment's own
    range, first frame and box there (:meth:`parts`)."""

    def __init__(self, own_start: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.own_start = int(own_start)
        self._parts: dict[int, Track] = {}

    def update(self, frame_index: int, t: float, observations: Sequence[Observation]) -> list[int]:
        """As :meth:`Tracker.update`, recording the own-range part of each track it touches."""
        ids = super().update(frame_index, t, observations)
        if frame_index >= self.own_start:
            for tid, o in zip(ids, observations):
                part = self._parts.get(tid)
                if part is None:
                    # A part starts as a new track would (every first_* field set by the tracker).
                    solo = Tracker()
                    solo.update(frame_index, t, [o])
                    part = solo.active[0]
                    part.track_id = tid
                    self._parts[tid] = part
                else:
                    self._extend(part, frame_index, t, o)
        return ids

    def parts(self) -> dict[int, Track]:
        """Each own-range part, with its track's final motion and appearance state (box,
        velocity, reference embedding) from the whole segment."""
        live = {tr.track_id: tr for tr in self.tracks}
        for tid, part in self._parts.items():
            tr = live[tid]
            part.box, part.velocity, part.embedding = tr.box, tr.velocity, tr.embedding
        return self._parts


def analyse_segment(
    path: str | os.PathLike[str],
    analyzer: FrameAnalyzer,
    segment: Segment,
    tracker: dict[str, Any] | None = None,
    *,
    stride: int = 1,
    batch_size: int = 16,
    embed_every: int = 1,
    shot_cut: float | None = SHOT_CUT_DISTANCE,
    on_progress: ProgressFn | None = None,
) -> SegmentResult:
    """Analyse one segment of a video (warm-up included) as :func:`~facepipe.video.process_video`
    would analyse those frames; ``tracker``: :class:`~facepipe.track.Tracker` keyword
    arguments. A seek that cannot be trusted is redone by decoding from the start.
    Raises :class:`~facepipe.errors.VideoReadError` for a video that cannot be opened."""
    try:
        return _analyse(Path(path), analyzer, segment, tracker or {}, segment.seek, stride=stride,
                        batch_size=batch_size, embed_every=embed_every, shot_cut=shot_cut,
                        on_progress=on_progress)
    except SeekMismatch:
        return _analyse(Path(path), analyzer, segment, tracker or {}, False, stride=stride,
                        batch_size=batch_size, embed_every=embed_every, shot_cut=shot_cut,
                        on_progress=on_progress)


def _analyse(path: Path, analyzer: FrameAnalyzer, seg: Segment, tracker_kw: dict[str, Any], seek: bool, *,
             stride: int, batch_size: int, embed_every: int, shot_cut: float | None,
             on_progress: ProgressFn | None) -> SegmentResult:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    det0 = dict(analyzer.timings)
    tracker = _PartTracker(seg.start, **tracker_kw)
    records: list[dict[str, Any]] = []
    warm: list[dict[str, Any]] = []
    cut_times: list[float] = []
    faces = 0
    with VideoReader(path, batch_size=batch_size, stride=stride, start=seg.warm, stop=seg.stop,
                     seek=seek) as reader:
        # Analysed frames before the warm-up: its place in the --embed-every rhythm.
        before = -(-seg.warm // stride)
        for fr, rec, detected in track_frames(reader, analyzer, tracker, embed_every=embed_every,
                                              shot_cut=shot_cut, analysed_before=before, timings=timings,
                                              on_progress=on_progress):
            if fr.index < seg.start:
                if rec["analysed"]:
                    warm.append(rec)
                continue
            records.append(rec)
            if rec.get("cut"):
                cut_times.append(fr.time)
            faces += detected
        timings["decode"] = reader.decode_seconds
    for s in ("detect", "align", "embed", "search"):
        timings[s] = analyzer.timings[s] - det0.get(s, 0.0)
    return SegmentResult(
        segment=seg, info=reader.info, records=records, warm=warm, parts=tracker.parts(), cut_times=cut_times,
        frames_end=reader.frames_read, reached_stop=reader.reached_stop, irregular_at=reader.irregular_at,
        seeked=reader.seek, faces=faces, seconds=time.perf_counter() - t_start, timings=timings,
        detector=str(getattr(analyzer.detector, "name", "")), identifying=analyzer.gallery is not None,
        sim_min=tracker.sim_min)


# --------------------------------------------------------------------------- joining


class SegmentMismatch(VideoReadError):
    """Two neighbouring segments disagree on the frames they share (their decoding differed)."""


def _used(results: Sequence[SegmentResult]) -> list[SegmentResult]:
    """The segments in order, up to the first that ended before its range did (the video
    ends there, as a single pass would stop there)."""
    out: list[SegmentResult] = []
    for r in sorted(results, key=lambda r: r.segment.index):
        out.append(r)
        if r.segment.stop is not None and not r.reached_stop:
            break
    return out


def redo_without_seeking(results: Sequence[SegmentResult]) -> list[Segment]:
    """The segments to decode again from the start of the video: those that seeked although
    an earlier segment found irregular timestamps (a dropped frame or a variable frame
    rate makes a seek land on another frame than the one a single pass numbers so), and
    those that disagree with the segment before them on the frames they share."""
    redo: list[Segment] = []
    irregular = False
    prev: SegmentResult | None = None
    for r in _used(results):
        if r.seeked and (irregular or (prev is not None and _overlap_problem(prev, r))):
            redo.append(r.segment.without_seeking())
        irregular = irregular or r.irregular_at is not None
        prev = r
    return redo


def _overlap_problem(prev: SegmentResult, nxt: SegmentResult) -> str | None:
    """Why ``prev``'s own records and ``nxt``'s warm-up disagree on which frames they share (None:
    same frame indices and timestamps). Their faces may differ (a detector that is not
    bit-reproducible across machines); the link is made on box overlap."""
    lo, hi = nxt.segment.warm, nxt.segment.start
    mine = [r for r in prev.records if r["analysed"] and lo <= r["frame"] < hi]
    if len(mine) != len(nxt.warm):
        return f"{len(mine)} vs {len(nxt.warm)} analysed frames in [{lo}, {hi})"
    for a, b in zip(mine, nxt.warm):
        if a["frame"] != b["frame"] or a["time"] != b["time"]:
            return f"frame {a['frame']} at {a['time']} s vs frame {b['frame']} at {b['time']} s"
    return None


def _box(face: dict[str, Any]) -> Box:
    return Box(face["x"], face["y"], face["w"], face["h"])


def _links(prev: SegmentResult, nxt: SegmentResult) -> dict[int, int]:
    """``{track of nxt: track of prev it continues}`` (see the module docstring)."""
    lo, hi = nxt.segment.warm, nxt.segment.start
    own = {r["frame"]: r for r in prev.records if r["analysed"] and lo <= r["frame"] < hi}
    shared: dict[tuple[int, int], int] = {}
    last: dict[int, int | None] = {}          # nxt track -> prev track sharing its latest warm-up face
    for w in nxt.warm:
        p = own[w["frame"]]
        a_faces, b_faces = p["faces"], w["faces"]
        pair: dict[int, int] = {}
        if a_faces and b_faces:
            iou = iou_matrix([_box(f) for f in a_faces], [_box(f) for f in b_faces])
            for i, j in assign(iou, iou >= 0.5):
                pair[j] = a_faces[i]["track"]
                key = (a_faces[i]["track"], b_faces[j]["track"])
                shared[key] = shared.get(key, 0) + 1
        for j, f in enumerate(b_faces):
            last[f["track"]] = pair.get(j)
    cand = sorted({(a, b) for b, a in last.items() if a is not None and b in nxt.parts})
    if not cand:
        return {}
    rows = sorted({a for a, _ in cand})
    cols = sorted({b for _, b in cand})
    aff = np.zeros((len(rows), len(cols)))
    valid = np.zeros_like(aff, dtype=bool)
    for a, b in cand:
        i, j = rows.index(a), cols.index(b)
        aff[i, j], valid[i, j] = shared.get((a, b), 0), True
    return {cols[j]: rows[i] for i, j in assign(aff, valid)}


def _join_parts(parts: Sequence[Track], track_id: int) -> Track:
    """One track from its parts in successive segments: first_* fields from the first part,
    motion and appearance from the last, frames, scores and votes of all of them."""
    first, last = parts[0], parts[-1]
    out = copy.copy(last)
    for f in fields(Track):
        if f.name.startswith("first_"):
            setattr(out, f.name, getattr(first, f.name))
    out.track_id = track_id
    out.hits = sum(p.hits for p in parts)
    out.embedded = sum(p.embedded for p in parts)
    out.votes = [v for p in parts for v in p.votes]
    out.det_scores = [d for p in parts for d in p.det_scores]
    return out


@dataclass
class Stitched:
    """A video joined from its segments: the records in frame order (final ids, skipped
    frames interpolated) and the tracking summary :func:`publish_outputs` needs."""

    records: list[dict[str, Any]]
    tracked: Tracked
    timings: dict[str, float]


def stitch_segments(path: str | os.PathLike[str], results: Sequence[SegmentResult]) -> Stitched:
    """Join a video's segment results (see the module docstring). Raises
    :class:`~facepipe.errors.VideoReadError` for a truncated video (as a single pass
    would) and :class:`SegmentMismatch` when neighbours disagree on shared frames."""
    used = _used(results)
    if [r.segment.index for r in used] != list(range(len(used))):
        raise ValueError(f"segments missing: got {[r.segment.index for r in used]}")
    info, detector = used[0].info, used[0].detector
    n_frames = used[-1].frames_end
    check_frame_count(Path(path), n_frames, info.frame_count)
    # Chains of parts across boundaries.
    chain_of: dict[tuple[int, int], int] = {}
    chains: list[list[tuple[int, int]]] = []
    for k, r in enumerate(used):
        links: dict[int, int] = {}
        if k > 0:
            problem = _overlap_problem(used[k - 1], r)
            if problem is not None:
                raise SegmentMismatch(Path(path), f"segments {k - 1} and {k} decode the frames they share "
                                                  f"differently ({problem})")
            links = _links(used[k - 1], r)
        for tid in sorted(r.parts):
            if tid in links:
                c = chain_of[(k - 1, links[tid])]
                chains[c].append((k, tid))
            else:
                c = len(chains)
                chains.append([(k, tid)])
            chain_of[(k, tid)] = c
    # Ids in the order a single pass creates tracks: first frame, then place in that frame.
    by_frame = [{x["frame"]: x for x in r.records} for r in used]
    order: list[tuple[int, int, int]] = []
    for c, parts in enumerate(chains):
        k, tid = parts[0]
        part = used[k].parts[tid]
        rec = by_frame[k][part.first_frame]
        place = next(j for j, f in enumerate(rec["faces"]) if f["track"] == tid)
        order.append((part.first_frame, place, c))
    final = {c: i for i, (_, _, c) in enumerate(sorted(order), 1)}
    tracks = [_join_parts([used[k].parts[t] for k, t in chains[c]], final[c]) for c in range(len(chains))]
    tracks.sort(key=lambda t: t.track_id)
    # Records with final ids; skipped frames interpolated over the joined sequence.
    records: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    prev: dict[str, Any] | None = None
    analysed = 0
    for k, r in enumerate(used):
        for rec in r.records:
            rec = dict(rec)
            if not rec["analysed"]:
                pending.append(rec)
                continue
            rec["faces"] = [{**f, "track": final[chain_of[(k, f["track"])]]} for f in rec["faces"]]
            _carry(pending, prev, rec, detector)
            records.extend(pending)
            records.append(rec)
            pending, prev = [], rec
            analysed += 1
    _carry(pending, prev, None, detector)
    records.extend(pending)
    if len(records) != n_frames or any(rec["frame"] != i for i, rec in enumerate(records)):
        raise SegmentMismatch(Path(path), f"segments do not cover frames 0..{n_frames - 1} exactly once")
    timings: dict[str, float] = {s: 0.0 for s in STAGES}
    for r in results:
        for s, v in r.timings.items():
            timings[s] = timings.get(s, 0.0) + v
    tracked = Tracked(info, n_frames, analysed, sum(r.faces for r in used),
                      sum(len(r.cut_times) for r in used), tracks, [t for r in used for t in r.cut_times],
                      used[0].sim_min)
    return Stitched(records, tracked, timings)


def finish_segments(
    path: str | os.PathLike[str],
    outputs: VideoOutputs,
    results: Sequence[SegmentResult],
    *,
    stride: int = 1,
    batch_size: int = 16,
    annotate: bool = True,
    unknown_weight: float = 0.5,
    settings: dict[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    analysis_seconds: float = 0.0,
    reid_gap: float = 0.0,
    min_track_frames: int = 1,
) -> VideoResult:
    """Join a video's segments (:func:`stitch_segments`) and write its outputs atomically,
    exactly as :func:`~facepipe.video.process_video` writes them (the keyword arguments
    are its). ``analysis_seconds``: the time the segments took (for the reported rate)."""
    src = Path(path)
    t_start = time.perf_counter()
    stitched = stitch_segments(src, results)
    with output_files(outputs, annotate) as (tmp, raw):
        with open_raw(raw) as f:
            for rec in stitched.records:
                write_record(f, rec)
        return publish_outputs(src, outputs, stitched.tracked, tmp, raw, stride=stride, batch_size=batch_size,
                               annotate=annotate, unknown_weight=unknown_weight, settings=settings,
                               timings=stitched.timings, t_start=t_start - analysis_seconds,
                               analysis_seconds=analysis_seconds, on_progress=on_progress,
                               detector=results[0].detector, identifying=results[0].identifying,
                               reid_gap=reid_gap, min_track_frames=min_track_frames)
