"""The per-video processing loop: decode, analyse, track, vote identities, write outputs."""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.errors import OutputError
from facepipe.track import Observation, Tracker, covered_by_tracks, vote_identity
from facepipe.types import Box
from facepipe.video.analysis import SHOT_CUT_DISTANCE, STAGES, FrameAnalyzer, frame_signature, shot_distance
from facepipe.video.outputs import (
    OUTPUT_VERSION, ProgressFn, TrackSummary, VideoOutputs, _annotate, _r, _remove, _source_fingerprint,
    _write_json,
)
from facepipe.video.reading import VideoInfo, VideoReader


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
