"""Tracker, matching and identity voting, checked against brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from facepipe.track import Observation, Tracker, assign, iou_matrix, vote_identity
from facepipe.types import Box, Detection


def _obs(x: float, y: float, s: float = 40.0, emb: np.ndarray | None = None,
         name: str | None = None, score: float | None = None) -> Observation:
    return Observation(Detection(Box(x, y, s, s), 1.0, "test"), emb, name, score)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_iou_matrix_matches_box_iou() -> None:
    rng = np.random.default_rng(0)
    a = [Box(*rng.uniform(0, 50, 2), *rng.uniform(1, 40, 2)) for _ in range(7)]
    b = [Box(*rng.uniform(0, 50, 2), *rng.uniform(1, 40, 2)) for _ in range(5)]
    m = iou_matrix(a, b)
    ref = np.array([[x.iou(y) for y in b] for x in a])
    assert m.shape == (7, 5)
    np.testing.assert_allclose(m, ref, atol=1e-12)
    assert iou_matrix([], b).shape == (0, 5)


def _brute_assign(aff: np.ndarray, valid: np.ndarray) -> float:
    """Best total affinity over every partial one-to-one matching of valid pairs."""
    r, c = aff.shape
    best = 0.0
    cols = list(range(c))
    for k in range(0, min(r, c) + 1):
        for rows in itertools.combinations(range(r), k):
            for perm in itertools.permutations(cols, k):
                if all(valid[i, j] for i, j in zip(rows, perm)):
                    best = max(best, sum(aff[i, j] for i, j in zip(rows, perm)))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_assign_is_optimal_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    r, c = rng.integers(1, 5), rng.integers(1, 5)
    aff = rng.uniform(0, 1, (r, c))
    valid = rng.uniform(0, 1, (r, c)) < 0.6
    pairs = assign(aff, valid)
    assert len({p[0] for p in pairs}) == len(pairs) and len({p[1] for p in pairs}) == len(pairs)
    assert all(valid[i, j] for i, j in pairs)
    total = sum(aff[i, j] for i, j in pairs)
    assert total == pytest.approx(_brute_assign(aff, valid), abs=1e-9)


def test_two_faces_keep_their_tracks_across_stride_gaps() -> None:
    # Two faces moving 12 px per frame in opposite directions, seen every 3rd frame
    # (36 px between analysed frames, so raw IoU between looks is small).
    tr = Tracker(iou_min=0.3, max_gap_s=1.0)
    fps = 30.0
    seen: list[list[int]] = []
    for k, f in enumerate(range(0, 45, 3)):
        obs = [_obs(10 + 12 * f, 50), _obs(600 - 12 * f, 200)]
        ids = tr.update(f, f / fps, obs)
        seen.append(ids)
    assert all(ids == seen[0] for ids in seen)
    assert len(tr.tracks) == 2
    t1 = tr.tracks[0]
    assert t1.first_frame == 0 and t1.last_frame == 42 and t1.hits == 15


def test_motion_prediction_carries_tracks_across_missed_detections() -> None:
    """Faces lost for a few frames reappear far from where they were last seen.

    Two 40-px faces move 12 px per frame in opposite directions; the detector misses
    them for several frames at a time, so on their return they are 60-84 px (1.5-2.1
    box sizes) from their last box: no overlap and beyond ``max_jump``, so only the
    constant-velocity prediction (which puts them back within a pixel) keeps each
    on its own track. Without prediction every return starts new tracks.
    """
    tr = Tracker(iou_min=0.3, max_gap_s=1.0, max_jump=1.0)
    fps = 30.0
    frames = [0, 1, 2, 3, 8, 9, 15, 16, 23, 24]   # gaps of 5, 6 and 7 frames
    ids_a, ids_b = set(), set()
    for f in frames:
        a, b = tr.update(f, f / fps, [_obs(10 + 12 * f, 50), _obs(600 - 12 * f, 200)])
        ids_a.add(a)
        ids_b.add(b)
    assert len(ids_a) == 1 and len(ids_b) == 1 and ids_a != ids_b
    assert len(tr.tracks) == 2 and all(t.hits == len(frames) for t in tr.tracks)
    # the prediction itself: where the first face is expected 5 frames after its last look
    (ta,) = [t for t in tr.tracks if t.track_id in ids_a]
    p = ta.predict(29 / fps)
    assert p.x == pytest.approx(10 + 12 * 29, abs=1.0) and p.y == pytest.approx(50, abs=1.0)
    assert (p.w, p.h) == pytest.approx((40.0, 40.0), abs=0.5)


def test_crossing_faces_do_not_swap_with_embeddings() -> None:
    rng = np.random.default_rng(1)
    ea, eb = _unit(rng.normal(size=64)), _unit(rng.normal(size=64))
    tr = Tracker()
    ids_a, ids_b = set(), set()
    for f in range(0, 20):
        xa, xb = 100 + 10 * f, 290 - 10 * f   # they overlap around f = 9..10
        obs = [_obs(xa, 100, emb=ea), _obs(xb, 104, emb=eb)]
        # present them in a varying order so list position carries no information
        if f % 2:
            obs = obs[::-1]
            ib, ia = tr.update(f, f / 25, obs)
        else:
            ia, ib = tr.update(f, f / 25, obs)
        ids_a.add(ia)
        ids_b.add(ib)
    assert len(ids_a) == 1 and len(ids_b) == 1 and ids_a != ids_b


def test_appearance_rejoins_a_face_that_jumped() -> None:
    """A face whose box jumps (no overlap) stays on its track when it looks the same."""
    rng = np.random.default_rng(2)
    e = _unit(rng.normal(size=32))
    tr = Tracker()
    a = tr.update(0, 0.0, [_obs(100, 100, emb=e)])
    b = tr.update(1, 0.04, [_obs(150, 100, emb=e)])   # IoU 0.11 < iou_min, but same face
    assert a == b
    other = _unit(rng.normal(size=32))
    c = tr.update(2, 0.08, [_obs(220, 100, emb=other)])   # a different face that far away: new track
    assert c != b


def test_track_ends_after_max_gap() -> None:
    tr = Tracker(max_gap_s=0.5)
    (a,) = tr.update(0, 0.0, [_obs(100, 100)])
    (b,) = tr.update(10, 0.4, [_obs(100, 100)])
    (c,) = tr.update(30, 1.2, [_obs(100, 100)])   # unseen for 0.8 s: a new track
    assert a == b and c != a
    assert [t.track_id for t in tr.tracks] == [a, c]
    assert tr.tracks[0].last_frame == 10


def test_vote_identity_weighted_majority() -> None:
    # 3 weak frames for bob, 2 strong frames for alice: weights 3*0.55 = 1.65 vs 2*0.9 = 1.8
    v = vote_identity([("bob", 0.55)] * 3 + [("alice", 0.9)] * 2, unknown_weight=0.5)
    assert v.name == "alice" and v.frames == 5
    assert v.confidence == pytest.approx(1.8 / 3.45)
    assert v.mean_score == pytest.approx(0.9)
    # unknown frames count as much as a match at the threshold
    v = vote_identity([("unknown", 0.2)] * 4 + [("alice", 0.6)] * 2, unknown_weight=0.5)
    assert v.name == "unknown" and v.confidence == pytest.approx(2.0 / 3.2)
    assert vote_identity([], 0.5).name is None


def test_tracker_collects_votes_per_track() -> None:
    tr = Tracker()
    names = ["carol", "carol", "unknown", "carol", "dave", "carol"]
    for f, n in enumerate(names):
        tr.update(f, f / 25, [_obs(100 + f, 100, name=n, score=0.7 if n != "unknown" else 0.3)])
    (track,) = tr.tracks
    assert [n for n, _ in track.votes] == names
    assert vote_identity(track.votes, 0.5).name == "carol"


# -- behaviour the mutation run (scripts/mutation_test.py --target tracker) found untested ----------


def test_track_ids_start_at_one_and_count_up() -> None:
    tr = Tracker()
    assert tr.update(0, 0.0, [_obs(10, 10), _obs(300, 10)]) == [1, 2]
    assert tr.update(1, 0.04, [_obs(11, 10), _obs(301, 10), _obs(150, 200)]) == [1, 2, 3]


def test_overlapping_faces_are_linked_unless_they_clearly_differ() -> None:
    """Same place, next frame: linked while cosine >= sim_min / 2, a new track below that."""
    rng = np.random.default_rng(5)
    a = _unit(rng.normal(size=64))
    ortho = _unit(rng.normal(size=64) - (rng.normal(size=64) @ a) * a)
    ortho = _unit(ortho - (ortho @ a) * a)

    def at_cosine(c: float) -> np.ndarray:
        return _unit(c * a + np.sqrt(1 - c * c) * ortho)

    for cos, same in ((0.3, True), (0.2, False)):          # sim_min 0.5: the veto is at 0.25
        tr = Tracker(sim_min=0.5)
        (first,) = tr.update(0, 0.0, [_obs(100, 100, emb=a)])
        (second,) = tr.update(1, 0.04, [_obs(101, 100, emb=at_cosine(cos))])
        assert (first == second) == same, cos
    tr = Tracker(sim_min=0.5, sim_veto=0.1)                  # an explicit veto replaces sim_min / 2
    (first,) = tr.update(0, 0.0, [_obs(100, 100, emb=a)])
    assert tr.update(1, 0.04, [_obs(101, 100, emb=at_cosine(0.2))]) == [first]


def test_cut_ends_every_live_track() -> None:
    tr = Tracker()
    ids = tr.update(0, 0.0, [_obs(100, 100), _obs(300, 100)])
    tr.cut()
    assert tr.active == [] and [t.track_id for t in tr.tracks] == ids
    again = tr.update(1, 0.04, [_obs(100, 100), _obs(300, 100)])   # same places: new tracks after a cut
    assert not set(again) & set(ids) and len(tr.tracks) == 4


def test_covered_by_tracks_needs_an_identified_unambiguous_live_track() -> None:
    from facepipe.track import covered_by_tracks

    rng = np.random.default_rng(6)
    e = _unit(rng.normal(size=32))
    tr = Tracker()
    box = Box(100, 100, 40, 40)
    assert covered_by_tracks(tr, 0.0, [box]) == [False]               # no tracks at all
    for f in range(2):
        tr.update(f, f / 25, [_obs(100, 100, emb=e)])
    assert covered_by_tracks(tr, 2 / 25, [box]) == [False]            # 2 embedded frames: not yet
    tr.update(2, 2 / 25, [_obs(100, 100, emb=e)])
    assert covered_by_tracks(tr, 3 / 25, [box, Box(300, 300, 40, 40)]) == [True, False]
    assert covered_by_tracks(tr, 3 / 25, []) == []
    assert covered_by_tracks(tr, 3 / 25, [box], min_embedded=4) == [False]
    assert covered_by_tracks(tr, 3 / 25, [Box(112, 100, 40, 40)]) == [True]    # IoU 0.54 >= 0.5
    assert covered_by_tracks(tr, 3 / 25, [Box(116, 100, 40, 40)]) == [False]   # IoU 0.43
    assert covered_by_tracks(tr, 2 / 25 + tr.max_gap_s + 0.01, [box]) == [False]   # the track went stale
    # two live tracks claiming the same face: embed it to tell them apart
    e2 = _unit(rng.normal(size=32))
    for f in range(3, 6):
        tr.update(f, f / 25, [_obs(100, 100, emb=e), _obs(104, 100, emb=e2)])
    assert len(tr.active) == 2
    assert covered_by_tracks(tr, 6 / 25, [box]) == [False]


def test_vote_without_votes_is_empty() -> None:
    v = vote_identity([], 0.5)
    assert v.name is None and v.confidence == 0.0 and v.mean_score is None and v.frames == 0
