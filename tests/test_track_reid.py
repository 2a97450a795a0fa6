"""Re-identification of broken tracks (stitch_tracks, merge_tracks) and duplicate-box
suppression, at the boundaries a video user meets: a face that reappears on the first
frame of a new shot, two faces in one frame, names that disagree, chains of three
tracks, two nested Haar boxes on each of two faces.

Added from the mutation run (``scripts/mutation_test.py --target tracker``); the basic
cases are in test_video_outputs.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.track import Observation, Track, merge_tracks, stitch_tracks, suppress_duplicates
from facepipe.types import Box, Detection


def _unit(seed: int, dim: int = 16) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim)
    return v / np.linalg.norm(v)


E = _unit(0)
B = Box(100, 100, 50, 50)


def _track(tid: int, t0: float, t1: float, emb: np.ndarray | None = E, box0: Box = B, box1: Box = B,
           votes: list[tuple[str, float]] | None = None, hits: int = 5, first_emb: np.ndarray | None = None,
           frame0: int | None = None, frame1: int | None = None) -> Track:
    return Track(track_id=tid, box=box1, last_time=t1, first_time=t0,
                 first_frame=int(t0 * 10) if frame0 is None else frame0,
                 last_frame=int(t1 * 10) if frame1 is None else frame1, embedding=emb, hits=hits,
                 embedded=hits if emb is not None else 0, votes=list(votes or []), det_scores=[0.9] * hits,
                 first_box=box0, first_embedding=emb if first_emb is None else first_emb)


def _joined(a: Track, b: Track, **kw: object) -> bool:
    return stitch_tracks([a, b], **{"sim_min": 0.5, **kw})[b.track_id] == a.track_id   # type: ignore[arg-type]


# -- when a later track continues an earlier one -------------------------------------------------


def test_a_track_starting_on_the_frame_another_ends_is_another_face() -> None:
    """Gap 0: both were seen in one frame, so they are two faces; any gap up to max_gap_s joins."""
    assert not _joined(_track(1, 0.0, 2.0), _track(2, 2.0, 4.0))
    assert _joined(_track(1, 0.0, 2.0), _track(2, 2.04, 4.0))
    assert _joined(_track(1, 0.0, 2.0), _track(2, 4.0, 6.0), max_gap_s=2.0)      # exactly max_gap_s
    assert not _joined(_track(1, 0.0, 2.0), _track(2, 4.5, 6.0), max_gap_s=2.0)
    assert _joined(_track(1, 0.0, 2.0), _track(2, 7.0, 9.0))                     # default: 5 s
    assert not _joined(_track(1, 0.0, 2.0), _track(2, 7.5, 9.0))


def test_a_face_back_on_the_first_frame_of_a_new_shot_is_not_joined() -> None:
    """A cut at B's first frame puts B in the new shot (refused); a cut at A's last frame
    puts A in the new shot already (same shot: joined)."""
    a, b = _track(1, 0.0, 2.0), _track(2, 3.0, 5.0)
    assert not _joined(a, b, cut_times=[3.0])
    assert _joined(a, b, cut_times=[2.0])
    assert not _joined(a, b, cut_times=[2.5])
    assert _joined(a, b, cut_times=[1.0, 6.0])


def test_reach_is_three_face_sizes_by_default_measured_in_the_longest_side() -> None:
    """Within one shot B must start within max_jump (3) sizes of where A was last seen
    (inclusive); the size is the longest side of either box."""
    a = _track(1, 0.0, 2.0)
    assert _joined(a, _track(2, 3.0, 5.0, box0=Box(250, 100, 50, 50)))            # 150 px = 3 sizes
    assert not _joined(a, _track(2, 3.0, 5.0, box0=Box(275, 100, 50, 50)))        # 3.5 sizes
    assert _joined(a, _track(2, 3.0, 5.0, box0=Box(200, 100, 50, 50)))            # 2 sizes


@pytest.mark.parametrize("long_side", ["a.w", "a.h", "b.w", "b.h"])
def test_reach_uses_whichever_side_is_longest(long_side: str) -> None:
    """One side of the two boxes is 100 px, the others 20: a start 250 px away (2.5 sizes) joins."""
    aw, ah, bw, bh = (100.0 if long_side == s else 20.0 for s in ("a.w", "a.h", "b.w", "b.h"))
    a = _track(1, 0.0, 2.0, box1=Box(100 - aw / 2, 100 - ah / 2, aw, ah))
    b = _track(2, 3.0, 5.0, box0=Box(350 - bw / 2, 100 - bh / 2, bw, bh))
    assert _joined(a, b)


def test_similarity_is_the_cosine_of_the_embeddings() -> None:
    """Embeddings of any length compare by angle."""
    assert _joined(_track(1, 0.0, 2.0, emb=2.0 * E), _track(2, 3.0, 5.0, emb=0.5 * E), sim_min=0.9)
    assert _joined(_track(1, 0.0, 2.0, emb=0.5 * E), _track(2, 3.0, 5.0, emb=0.5 * E), sim_min=0.9)


@pytest.mark.parametrize("va, vb, joined", [
    ([("ada", 0.9)] * 3, [("ada", 0.8)] * 3, True),                                  # same name
    ([("ada", 0.9)] * 3, [("bob", 0.8)] * 3, False),                                 # two names
    ([("ada", 0.9)] * 3, [], True),                                                  # B unnamed
    ([], [("ada", 0.9)] * 3, True),                                                  # A unnamed
    ([("ada", 0.9)] * 2 + [("unknown", 0.1)] * 3, [("bob", 0.8)] * 3, True),         # A mostly unknown
    ([("ada", 0.9), ("unknown", 0.1)], [("bob", 0.8)], False),                       # half named is named
    ([("ada", 0.9)] * 3 + [("zed", 0.9)], [("ada", 0.8)], True),                     # A's majority is ada
])
def test_names_that_disagree_keep_tracks_apart(va: list, vb: list, joined: bool) -> None:
    assert _joined(_track(1, 0.0, 2.0, votes=va), _track(2, 3.0, 5.0, votes=vb)) == joined


def test_one_refused_candidate_does_not_hide_the_next() -> None:
    """Every pair is considered whatever the list order: a track without an embedding, a
    dissimilar face, one across a cut, one too far, one with another name, listed before
    the track that does continue A."""
    a = _track(1, 0.0, 2.0, votes=[("ada", 0.9)] * 3)
    blockers = [
        _track(2, 0.0, 1.0, emb=None),                                   # no embedding (as A: skipped)
        _track(3, 3.0, 3.2, emb=_unit(1)),                               # another face
        _track(4, 7.0, 7.2),                                             # after the cut at 6 s
        _track(5, 3.0, 3.2, box0=Box(600, 100, 50, 50)),                 # too far
        _track(6, 3.0, 3.2, votes=[("bob", 0.9)] * 3),                   # another name
    ]
    good = _track(7, 3.1, 5.0)             # starts while the blockers are seen: none of them continues
    mapping = stitch_tracks(blockers + [a, good], sim_min=0.5, cut_times=[6.0])
    assert mapping[7] == 1
    assert [mapping[t.track_id] for t in blockers] == [2, 3, 4, 5, 6]


# -- merged tracks --------------------------------------------------------------------------------


def test_merged_chain_takes_its_start_from_the_first_part_and_its_end_from_the_last() -> None:
    e1, e3 = _unit(1), _unit(3)
    a = _track(1, 0.0, 1.0, emb=e1, box0=Box(10, 10, 40, 40), box1=Box(20, 10, 40, 40), hits=3,
               votes=[("ada", 0.9)], frame0=0, frame1=25)
    b = _track(4, 2.0, 3.0, emb=_unit(2), hits=2, votes=[("unknown", 0.2)], frame0=50, frame1=75)
    c = _track(9, 4.0, 5.0, emb=e3, box0=Box(90, 10, 40, 40), box1=Box(99, 11, 41, 42), hits=4,
               votes=[("ada", 0.8), ("ada", 0.7)], frame0=100, frame1=125, first_emb=_unit(5))
    c.velocity = (3.0, 1.0, 0.5, 0.5)
    c.embedded = 1
    c.det_scores = [0.5, 0.6, 0.7, 0.8]
    other = _track(2, 0.5, 1.5, emb=_unit(7), hits=1, frame0=12, frame1=37)
    merged = merge_tracks([c, other, b, a], {1: 1, 4: 1, 9: 1, 2: 2})
    assert [t.track_id for t in merged] == [1, 2]
    m = merged[0]
    assert (m.first_time, m.last_time, m.first_frame, m.last_frame) == (0.0, 5.0, 0, 125)
    assert m.first_box == Box(10, 10, 40, 40) and m.box == Box(99, 11, 41, 42)
    np.testing.assert_array_equal(m.first_embedding, e1)
    np.testing.assert_array_equal(m.embedding, e3)
    assert m.velocity == (3.0, 1.0, 0.5, 0.5)
    assert m.hits == 9 and m.embedded == 3 + 2 + 1
    assert m.votes == [("ada", 0.9), ("unknown", 0.2), ("ada", 0.8), ("ada", 0.7)]
    assert m.det_scores == [0.9] * 3 + [0.9] * 2 + [0.5, 0.6, 0.7, 0.8]


def test_merge_keeps_tracks_the_mapping_does_not_name() -> None:
    a, b = _track(1, 0.0, 1.0), _track(2, 2.0, 3.0)
    assert [(t.track_id, t.hits) for t in merge_tracks([b, a], {})] == [(1, 5), (2, 5)]


# -- duplicate boxes of one face ------------------------------------------------------------------


def _o(x: float, y: float, w: float, s: float, h: float | None = None) -> Observation:
    return Observation(Detection(Box(x, y, w, w if h is None else h), s, "haar"))


@pytest.mark.parametrize("scores", [(5.0, 4.0, 3.0, 2.0), (5.0, 3.0, 4.0, 2.0)])
def test_every_face_loses_its_nested_duplicate(scores: tuple[float, ...]) -> None:
    """Two faces, each with a nested box at a neighbouring Haar scale, in two score orders."""
    fa, na, fb, nb = (_o(100, 100, 80, scores[0]), _o(110, 110, 60, scores[1]),
                      _o(300, 100, 80, scores[2]), _o(310, 110, 60, scores[3]))
    assert suppress_duplicates([na, fa, nb, fb]) == [fa, fb]
    assert suppress_duplicates([nb, fb, na, fa]) == [fb, fa]


def test_containment_threshold_is_inclusive_and_degenerate_boxes_are_kept() -> None:
    face = _o(100, 100, 50, 5.0)
    edge = _o(144, 100, 10, 1.0)            # 10x10 box, 6x10 of it inside the face: exactly 0.6
    assert suppress_duplicates([face, edge]) == [face]
    assert suppress_duplicates([face, _o(145, 100, 10, 1.0)]) == [face, _o(145, 100, 10, 1.0)]   # 0.5
    flat = _o(120, 120, 10, 1.0, h=0.0)     # a zero-area box (a detector's degenerate output)
    assert suppress_duplicates([face, flat]) == [face, flat]
