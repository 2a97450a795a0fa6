"""Video outputs (issue 11 item 6): one "no name" convention, det_score on 0..1, NAME.tracks.csv
without the video's extension, and fewer broken tracks (re-identification by embedding)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import cli
from facepipe.track import Observation, Track, Tracker, merge_tracks, stitch_tracks
from facepipe.types import Box, Detection
from test_video import clip_frames, write_clip


def _track(tid: int, t0: float, t1: float, emb: np.ndarray | None, box0: Box, box1: Box,
           votes: list[tuple[str, float]] | None = None, hits: int = 5) -> Track:
    return Track(track_id=tid, box=box1, last_time=t1, first_time=t0, first_frame=int(t0 * 10),
                 last_frame=int(t1 * 10), embedding=emb, hits=hits, embedded=hits if emb is not None else 0,
                 votes=list(votes or []), det_scores=[0.9] * hits, first_box=box0, first_embedding=emb)


def _unit(seed: int, dim: int = 16) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim)
    return v / np.linalg.norm(v)


B = Box(100, 100, 50, 50)
FAR = Box(600, 100, 50, 50)


def test_stitch_joins_a_lost_and_found_face() -> None:
    e = _unit(0)
    a, b = _track(1, 0.0, 2.0, e, B, B), _track(2, 3.0, 5.0, e, B, B)
    assert stitch_tracks([a, b], sim_min=0.5) == {1: 1, 2: 1}
    (m,) = merge_tracks([a, b], {1: 1, 2: 1})
    assert (m.track_id, m.first_time, m.last_time, m.hits) == (1, 0.0, 5.0, 10)


@pytest.mark.parametrize("case", ["different_face", "too_late", "overlap", "far_in_same_shot", "two_names",
                                  "no_embedding"])
def test_stitch_refuses(case: str) -> None:
    e = _unit(0)
    a = _track(1, 0.0, 2.0, e, B, B, votes=[("ada", 0.9)] * 3)
    b = {
        "different_face": _track(2, 3.0, 5.0, _unit(1), B, B),
        "too_late": _track(2, 8.0, 9.0, e, B, B),
        "overlap": _track(2, 1.5, 5.0, e, B, B),
        "far_in_same_shot": _track(2, 3.0, 5.0, e, FAR, FAR),
        "two_names": _track(2, 3.0, 5.0, e, B, B, votes=[("bob", 0.9)] * 3),
        "no_embedding": _track(2, 3.0, 5.0, None, B, B),
    }[case]
    assert stitch_tracks([a, b], sim_min=0.5, max_gap_s=5.0) == {1: 1, 2: 2}


def test_stitch_across_a_cut_only_when_asked() -> None:
    e = _unit(0)
    a, b = _track(1, 0.0, 2.0, e, B, B), _track(2, 3.0, 5.0, e, FAR, FAR)
    assert stitch_tracks([a, b], 0.5, cut_times=[2.5]) == {1: 1, 2: 2}
    assert stitch_tracks([a, b], 0.5, cut_times=[2.5], across_cuts=True) == {1: 1, 2: 1}


def test_stitch_chains_and_prefers_the_most_similar() -> None:
    e, f = _unit(0), _unit(0) * 0.9 + _unit(5) * 0.1
    f /= np.linalg.norm(f)
    a = _track(1, 0.0, 1.0, e, B, B)
    b = _track(2, 2.0, 3.0, e, B, B)       # identical to a: wins over c
    c = _track(3, 2.5, 3.5, f, B, B)       # overlaps b: cannot join the same chain
    d = _track(4, 4.0, 5.0, e, B, B)
    mapping = stitch_tracks([a, b, c, d], 0.5)
    assert mapping[2] == 1 and mapping[4] == 1 and mapping[3] == 3


def test_brute_force_stitch_matches_greedy_on_random_tracks() -> None:
    """On random track sets, every chain is time-disjoint and every link satisfies the rule."""
    rng = np.random.default_rng(3)
    people = [_unit(s) for s in range(3)]
    for _ in range(50):
        tracks, t = [], 0.0
        for tid in range(1, 8):
            p = int(rng.integers(0, 3))
            t0 = float(rng.uniform(0, 20))
            tracks.append(_track(tid, t0, t0 + float(rng.uniform(0.2, 3)), people[p], B, B))
        mapping = stitch_tracks(tracks, 0.99, max_gap_s=5.0)
        chains: dict[int, list[Track]] = {}
        for tr in tracks:
            chains.setdefault(mapping[tr.track_id], []).append(tr)
        for members in chains.values():
            members.sort(key=lambda x: x.first_time)
            for x, y in zip(members, members[1:]):
                assert y.first_time > x.last_time and y.first_time - x.last_time <= 5.0
                assert np.allclose(x.embedding, y.first_embedding)  # same person only
        del t


def test_video_reidentifies_a_face_that_disappears(tmp_path: Path, astronaut: np.ndarray) -> None:
    """A face hidden for 10 frames (0.4 s at 25 fps, longer than --max-gap 0.2) comes back as the
    same track with re-identification, as a second track without it."""
    frames = clip_frames(astronaut, 24, step=2)
    blank = frames[0].copy()
    blank[60:180, :] = blank[60:180, :1].mean(axis=1, keepdims=True).astype(np.uint8)
    for k in range(8, 18):
        frames[k] = blank.copy()
    clip = write_clip(tmp_path / "hide.mp4", frames)
    common = ["video", str(clip), "--detector", "haar", "--min-detect-size", "40", "--embedder", "untrained",
              "--device", "cpu", "--no-annotate", "--max-gap", "0.2", "--shot-cut", "0"]
    r = CliRunner().invoke(cli, common + ["--out", str(tmp_path / "a"), "--reid-gap", "0"])
    assert r.exit_code == 0, r.output
    without = json.loads((tmp_path / "a" / "hide.tracks.json").read_text())["tracks"]
    r = CliRunner().invoke(cli, common + ["--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    with_reid = json.loads((tmp_path / "b" / "hide.tracks.json").read_text())["tracks"]
    assert len(without) == 2 and len(with_reid) == 1
    assert with_reid[0]["frames"] == sum(t["frames"] for t in without)
    recs = [json.loads(x) for x in (tmp_path / "b" / "hide.frames.jsonl").read_text().splitlines()]
    assert {f["track"] for rec in recs for f in rec["faces"]} == {1}


def test_short_spurious_tracks_are_dropped(tmp_path: Path, astronaut: np.ndarray) -> None:
    from facepipe.detect import create_detector
    from facepipe.video import FrameAnalyzer, output_paths, process_video

    frames = clip_frames(astronaut, 10, step=2)
    for k in range(2, 10):  # the face is seen in 2 frames only
        frames[k] = frames[k].copy()
        frames[k][60:180, :] = 128
    clip = write_clip(tmp_path / "brief.mp4", frames)
    analyzer = FrameAnalyzer(create_detector("haar", min_size=40))
    keep = process_video(clip, output_paths(tmp_path / "o1", "brief.mp4"), analyzer, annotate=False)
    drop = process_video(clip, output_paths(tmp_path / "o2", "brief.mp4"), analyzer, annotate=False,
                         min_track_frames=3)
    assert len(keep.tracks) >= 1 and drop.tracks == []
    summary = json.loads((tmp_path / "o2" / "brief.tracks.json").read_text())
    assert summary["dropped_short_tracks"] == len(keep.tracks)
    recs = [json.loads(x) for x in (tmp_path / "o2" / "brief.frames.jsonl").read_text().splitlines()]
    assert all(rec["faces"] == [] for rec in recs)


def test_no_name_convention_and_output_names(tmp_path: Path, astronaut: np.ndarray) -> None:
    """With a gallery every track has an identity (a person or unknown, never empty); a track
    whose faces are all too small to embed is unknown with confidence 0."""
    from facepipe.embed import load_embedder
    from facepipe.gallery import Gallery

    emb = load_embedder("untrained", device="cpu")
    with Gallery.edit(tmp_path / "g", embedder_id=emb.embedder_id, dim=emb.dim) as g:
        g.add(_unit(7, emb.dim)[None].astype(np.float32), ["someone"])
    clip = write_clip(tmp_path / "clip.mp4", clip_frames(astronaut, 6))
    r = CliRunner().invoke(cli, ["video", str(clip), "--out", str(tmp_path / "o"), "-g", str(tmp_path / "g"),
                                 "--detector", "haar", "--min-detect-size", "40", "--min-embed-size", "500",
                                 "--device", "cpu", "--no-annotate"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "o"
    assert sorted(p.name for p in out.iterdir()) == ["clip.done.json", "clip.frames.jsonl", "clip.tracks.csv",
                                                      "clip.tracks.json"]
    rows = list(csv.DictReader((out / "clip.tracks.csv").open()))
    assert rows and all(row["identity"] == "unknown" for row in rows)
    assert all(float(row["confidence"]) == 0.0 and row["identified_frames"] == "0" for row in rows)
    assert all(0.0 <= float(row["mean_det_score"] or 0) <= 1.0 for row in rows) or all(
        row["mean_det_response"] for row in rows)


def test_tracker_unchanged_for_a_steady_face() -> None:
    """Stitching only joins tracks the tracker ended; a steady face stays one track."""
    tr = Tracker(max_gap_s=0.5)
    e = _unit(1)
    for k in range(10):
        tr.update(k, k * 0.04, [Observation(Detection(Box(100 + k, 100, 50, 50), 0.9, "mtcnn"), e)])
    assert len(tr.tracks) == 1 and stitch_tracks(tr.tracks, 0.5) == {1: 1}


def test_suppress_duplicates_drops_nested_boxes_of_one_face() -> None:
    from facepipe.track import suppress_duplicates

    def o(x: float, y: float, w: float, s: float) -> Observation:
        return Observation(Detection(Box(x, y, w, w), s, "haar"))

    face, nested, neighbour, overlapping = o(100, 100, 80, 5.0), o(110, 110, 60, 3.0), o(200, 100, 80, 4.0), \
        o(150, 100, 80, 2.0)
    kept = suppress_duplicates([nested, face, neighbour, overlapping])
    # the nested box goes; a neighbour and a half-overlapping face (another person) stay, order kept
    assert kept == [face, neighbour, overlapping]
    # the higher score wins whichever box is larger
    assert suppress_duplicates([o(100, 100, 80, 1.0), o(110, 110, 60, 9.0)])[0].detection.score == 9.0
