"""Tracker, matching and identity voting, checked against brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from facepipe.errors import ShapeError
from facepipe.track import Observation, Track, Tracker, assign, iou_matrix, vote_identity
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


# -- second mutation round: motion, lifetime, appearance and the vote at their boundaries ----------


def test_iou_matrix_matches_box_iou_on_subpixel_and_degenerate_boxes() -> None:
    """Sub-pixel boxes (union under one pixel), zero-size and negative-size boxes: the
    matrix still agrees with :meth:`Box.iou` and never returns NaN."""
    rng = np.random.default_rng(11)
    boxes = [Box(*rng.uniform(0, 2, 2), *rng.uniform(0.05, 0.9, 2)) for _ in range(6)]
    boxes += [Box(0.5, 0.5, 0.0, 0.0), Box(1.5, 0.5, 0.0, 0.0), Box(0.3, 0.2, -0.5, 0.6),
              Box(0.2, 0.3, 0.7, -0.4), Box(0.4, 0.4, 0.5, 0.5), Box(0.4, 0.4, 0.5, 0.5)]
    m = iou_matrix(boxes, boxes)
    ref = np.array([[x.iou(y) for y in boxes] for x in boxes])
    assert not np.isnan(m).any()
    np.testing.assert_allclose(m, ref, atol=1e-12)
    assert m[-1, -2] == pytest.approx(1.0)                 # two identical 0.5-px boxes
    assert m[6, 7] == 0.0 and m[6, 6] == 0.0               # points: no area, no overlap


def test_assign_maximises_affinity_not_the_number_of_pairs() -> None:
    """One strong pair beats two weak ones: leaving a row (or a column) unmatched is free."""
    aff = np.array([[1.0, 0.1], [0.1, 0.0]])
    valid = np.array([[True, True], [True, False]])
    assert assign(aff, valid) == [(0, 0)]
    assert assign(aff.T.copy(), valid.T.copy()) == [(0, 0)]
    with pytest.raises(ShapeError, match=r"\(2, 2\).*\(2, 3\)"):
        assign(aff, np.ones((2, 3), dtype=bool))


def test_predict_extrapolates_position_and_size() -> None:
    box = Box(100.0, 100.0, 40.0, 30.0)
    tr = Track(track_id=1, box=box, last_time=1.0, first_time=0.0, first_frame=0, last_frame=25,
               velocity=(10.0, -6.0, 4.0, -2.0))
    assert tr.predict(1.5) == Box(105.0, 97.0, 42.0, 29.0)
    assert tr.predict(0.5) == box                              # never backwards in time
    shrinking = Track(track_id=2, box=box, last_time=0.0, first_time=0.0, first_frame=0, last_frame=0,
                      velocity=(0.0, 0.0, -100.0, -100.0))
    p = shrinking.predict(2.0)
    assert (p.w, p.h) == (1.0, 1.0)                            # a box never shrinks below one pixel


def test_velocity_follows_position_and_size_and_is_smoothed() -> None:
    """The first step sets the velocity, later steps average it with the new one (½/½), in
    pixels per second whatever the frame gap; a face moving down-right and growing is
    predicted there."""
    tr = Tracker(iou_min=0.1)
    for f, (x, y, s) in enumerate([(100, 100, 40), (110, 104, 44), (130, 112, 52)]):
        tr.update(f, f * 0.5, [Observation(Detection(Box(x, y, s, s), 0.9, "test"))])
    (t,) = tr.tracks
    # steps: (20, 8, 8, 8) then (40, 16, 16, 16) px/s -> smoothed (30, 12, 12, 12)
    assert t.velocity == pytest.approx((30.0, 12.0, 12.0, 12.0))
    assert t.predict(1.5) == Box(145.0, 118.0, 58.0, 58.0)
    one = Tracker()
    one.update(0, 0.0, [_obs(100, 100)])
    one.update(1, 0.25, [_obs(105, 98)])
    assert one.tracks[0].velocity == pytest.approx((20.0, -8.0, 0.0, 0.0))   # first step: not halved


def test_repeated_timestamp_does_not_break_the_track() -> None:
    """Two analysed frames at the same time (broken timestamps): same track, no division by zero."""
    tr = Tracker()
    (a,) = tr.update(0, 1.0, [_obs(100, 100)])
    (b,) = tr.update(1, 1.0, [_obs(102, 100)])
    assert a == b and tr.tracks[0].velocity == (0.0, 0.0, 0.0, 0.0) and tr.tracks[0].box.x == 102


def test_default_tracker_lifetime_and_reach() -> None:
    """Defaults: a track ends after 1 s unseen, and without embeddings a face continues a track
    only within one box size of the prediction."""
    tr = Tracker()
    (a,) = tr.update(0, 0.0, [_obs(100, 100)])
    assert tr.update(1, 1.0, [_obs(100, 100)]) == [a]           # unseen exactly max_gap_s: continues
    assert tr.update(2, 2.5, [_obs(100, 100)]) != [a]           # unseen 1.5 s: a new track
    tr = Tracker()
    (a,) = tr.update(0, 0.0, [_obs(100, 100)])
    assert tr.update(1, 0.04, [_obs(130, 100)]) == [a]          # 0.75 box sizes, IoU 0.14: continues
    tr = Tracker()
    (a,) = tr.update(0, 0.0, [_obs(100, 100)])
    assert tr.update(1, 0.04, [_obs(160, 100)]) != [a]          # 1.5 box sizes away: a new track
    tr = Tracker()
    (a,) = tr.update(0, 0.0, [_obs(100, 100)])
    assert tr.update(1, 0.04, [_obs(300, 100)]) != [a]          # far away: a new track


@pytest.mark.parametrize("w, h, dx, dy", [(80, 20, 60, 0), (20, 80, 0, 60)])
def test_reach_is_measured_in_the_longer_side(w: float, h: float, dx: float, dy: float) -> None:
    """An elongated box moving 0.75 of its longer side along it (IoU 0.14) continues its track."""
    tr = Tracker()
    (a,) = tr.update(0, 0.0, [Observation(Detection(Box(100, 100, w, h), 1.0, "test"))])
    assert tr.update(1, 0.04, [Observation(Detection(Box(100 + dx, 100 + dy, w, h), 1.0, "test"))]) == [a]


def test_size_change_limit_for_weak_position_evidence() -> None:
    """Without overlap evidence, a box at the predicted centre continues the track up to twice
    (or half) the size, not beyond."""
    for side, same in ((80.0, True), (100.0, False), (20.0, True), (16.0, False)):
        tr = Tracker(iou_min=0.9)
        (a,) = tr.update(0, 0.0, [_obs(100, 100)])                # 40 px, centre (120, 120)
        (b,) = tr.update(1, 0.04, [_obs(120 - side / 2, 120 - side / 2, s=side)])
        assert (a == b) == same, side


def _at_cosine(c: float) -> np.ndarray:
    """A 2-d unit vector whose dot product with (1, 0) is exactly ``c``."""
    return np.array([c, np.sqrt(1.0 - c * c)])


E0 = np.array([1.0, 0.0])


def test_appearance_thresholds_are_inclusive() -> None:
    """Overlap at exactly iou_min with a cosine at exactly sim_veto links; a nearby,
    non-overlapping face links at exactly sim_min."""
    # 30-px boxes 10 px apart: IoU exactly 0.5
    tr = Tracker(iou_min=0.5, sim_min=0.5)
    (a,) = tr.update(0, 0.0, [_obs(100, 100, s=30, emb=E0)])
    assert tr.update(1, 0.04, [_obs(110, 100, s=30, emb=_at_cosine(0.25))]) == [a]
    tr = Tracker(iou_min=0.5, sim_min=0.5)
    (a,) = tr.update(0, 0.0, [_obs(100, 100, s=30, emb=E0)])
    assert tr.update(1, 0.04, [_obs(110, 100, s=30, emb=_at_cosine(0.24))]) != [a]
    tr = Tracker(sim_min=0.5)
    (a,) = tr.update(0, 0.0, [_obs(100, 100, emb=E0)])
    assert tr.update(1, 0.04, [_obs(150, 100, emb=_at_cosine(0.5))]) == [a]     # no overlap, same face


@pytest.mark.parametrize("max_jump, dist, same", [(1.0, 80.0, True), (1.0, 100.0, False), (2.0, 150.0, True),
                                                  (2.0, 170.0, False)])
def test_look_alikes_link_within_twice_the_reach(max_jump: float, dist: float, same: bool) -> None:
    """With embeddings, a face that looks the same continues its track up to 2·max_jump box
    sizes from the prediction (inclusive), and not beyond."""
    tr = Tracker(max_jump=max_jump, sim_min=0.5)
    (a,) = tr.update(0, 0.0, [_obs(100, 100, emb=E0)])
    (b,) = tr.update(1, 0.04, [_obs(100 + dist, 100, emb=E0)])
    assert (a == b) == same


def test_embedded_tracks_continue_on_frames_without_embeddings() -> None:
    """Faces are not embedded on every frame (too small, or already covered by their track):
    an embedded track continues on position alone, and a track born unembedded takes its
    first embedding later (as its reference and as the first one stitching compares)."""
    e = _unit(np.random.default_rng(8).normal(size=16)).astype(np.float64)
    tr = Tracker()
    (a,) = tr.update(0, 0.0, [_obs(100, 100, emb=e)])
    assert tr.update(1, 0.04, [_obs(102, 100)]) == [a]
    assert tr.update(2, 0.08, [_obs(104, 100, emb=e)]) == [a]
    assert tr.tracks[0].embedded == 2 and tr.tracks[0].hits == 3
    tr = Tracker()
    (b,) = tr.update(0, 0.0, [_obs(100, 100)])
    assert tr.tracks[0].embedding is None and tr.tracks[0].first_embedding is None
    assert tr.update(1, 0.04, [_obs(102, 100, emb=e)]) == [b]
    (t,) = tr.tracks
    np.testing.assert_allclose(t.embedding, e)
    np.testing.assert_allclose(t.first_embedding, e)
    assert tr.update(2, 0.08, [_obs(104, 100, emb=e)]) == [b]


def test_track_embedding_is_a_normalised_moving_average() -> None:
    rng = np.random.default_rng(9)
    a, b, c = (_unit(rng.normal(size=16)).astype(np.float64) for _ in range(3))
    tr = Tracker(sim_min=-1.0, sim_veto=-1.0)            # accept any face: this test is about the average
    for f, e in enumerate((a, b, c)):
        tr.update(f, f * 0.04, [_obs(100, 100, emb=e)])
    (t,) = tr.tracks
    m = 0.7 * a + 0.3 * b
    m /= np.linalg.norm(m)
    m = 0.7 * m + 0.3 * c
    np.testing.assert_allclose(t.embedding, m / np.linalg.norm(m), atol=1e-12)
    np.testing.assert_allclose(t.first_embedding, a)


def test_a_new_track_records_where_and_when_it_started() -> None:
    e = _unit(np.random.default_rng(10).normal(size=16))
    tr = Tracker()
    tr.update(7, 2.5, [Observation(Detection(Box(10, 20, 40, 40), 0.8, "test"), e, "ada", None)])
    (t,) = tr.tracks
    assert (t.first_time, t.last_time, t.first_frame, t.last_frame) == (2.5, 2.5, 7, 7)
    assert t.first_box == Box(10, 20, 40, 40) and t.box == Box(10, 20, 40, 40)
    np.testing.assert_allclose(t.first_embedding, e)
    assert t.det_scores == [0.8] and t.embedded == 1
    assert t.votes == [("ada", 0.0)]                     # a name without a score votes with weight 0
    tr.update(8, 2.54, [Observation(Detection(Box(11, 20, 40, 40), 0.6, "test"), e, "ada", 0.7)])
    (t,) = tr.tracks
    assert (t.first_time, t.last_time, t.first_frame, t.last_frame) == (2.5, 2.54, 7, 8)
    assert t.first_box == Box(10, 20, 40, 40) and t.det_scores == [0.8, 0.6]
    assert t.votes == [("ada", 0.0), ("ada", 0.7)]


def test_tracker_options_are_validated() -> None:
    for w in (0.0, 1.0):
        Tracker(iou_weight=w)
    Tracker(max_gap_s=0.0)
    for w in (-0.01, 1.01):
        with pytest.raises(ValueError, match="iou_weight"):
            Tracker(iou_weight=w)
    with pytest.raises(ValueError, match="max_gap_s"):
        Tracker(max_gap_s=-0.1)


def _reference_affinity(tr: Tracker, preds: list[Box], tracks: list[Track],
                        obs: list[Observation]) -> tuple[np.ndarray, np.ndarray]:
    """Tracker's pair rule written out pair by pair, from its docstring."""
    aff = np.zeros((len(preds), len(obs)))
    valid = np.zeros((len(preds), len(obs)), dtype=bool)
    for i, (p, t) in enumerate(zip(preds, tracks)):
        for j, o in enumerate(obs):
            b = o.detection.box
            iou = p.iou(b)
            (px, py), (bx, by) = p.center, b.center
            dist = float(np.hypot(px - bx, py - by))
            ps, ds = max(p.w, p.h, 1.0), max(b.w, b.h, 1.0)
            close = min(max(1.0 - dist / (tr.max_jump * max(ps, ds)), 0.0), 1.0)
            pos = max(iou, 0.5 * close)
            if t.embedding is not None and o.embedding is not None:
                sim = float(np.dot(t.embedding, o.embedding))
                valid[i, j] = (iou >= tr.iou_min and sim >= tr.sim_veto) or (
                    dist <= 2 * tr.max_jump * max(ps, ds) and sim >= tr.sim_min)
                aff[i, j] = tr.iou_weight * pos + (1 - tr.iou_weight) * min(max(sim, 0.0), 1.0)
            else:
                valid[i, j] = iou >= tr.iou_min or (close > 0 and max(ps / ds, ds / ps) <= 2.0)
                aff[i, j] = pos
    return aff, valid


@pytest.mark.parametrize("seed", range(12))
def test_affinity_matches_the_pairwise_rule(seed: int) -> None:
    """The vectorised affinity/validity against the rule evaluated pair by pair, on random
    boxes (some with, some without embeddings) and random tracker settings."""
    rng = np.random.default_rng(100 + seed)
    tr = Tracker(iou_min=float(rng.uniform(0.1, 0.5)), sim_min=float(rng.uniform(0.2, 0.6)),
                 iou_weight=float(rng.uniform(0.2, 0.8)), max_jump=float(rng.choice([0.5, 1.0, 2.0])))
    dim = 4
    people = [_unit(rng.normal(size=dim)).astype(np.float64) for _ in range(3)]

    def emb() -> np.ndarray | None:
        if rng.uniform() < 0.25:
            return None
        return _unit(people[rng.integers(3)] + 0.5 * rng.normal(size=dim)).astype(np.float64)

    def box() -> Box:
        return Box(*rng.uniform(0, 200, 2), *rng.uniform(20, 60, 2))

    tracks = [Track(track_id=i, box=box(), last_time=0.0, first_time=0.0, first_frame=0, last_frame=0,
                    embedding=emb()) for i in range(5)]
    obs = [Observation(Detection(box(), 1.0, "test"), emb()) for _ in range(6)]
    preds = [t.predict(0.04) for t in tracks]
    aff, valid = tr._affinity(preds, tracks, obs)
    ref_aff, ref_valid = _reference_affinity(tr, preds, tracks, obs)
    np.testing.assert_array_equal(valid, ref_valid)
    np.testing.assert_allclose(aff[valid].astype(np.float64), ref_aff[valid], atol=1e-9)
    assert valid.any() and not valid.all()


def test_appearance_decides_between_equally_placed_tracks() -> None:
    """Two tracks equally placed for a face: the one that looks like it gets it."""
    rng = np.random.default_rng(12)
    ea, eb = (_unit(rng.normal(size=16)).astype(np.float64) for _ in range(2))
    for order in ((ea, eb), (eb, ea)):
        tr = Tracker(sim_min=0.3, sim_veto=-1.0)
        ids = tr.update(0, 0.0, [_obs(100, 90, emb=order[0]), _obs(100, 110, emb=order[1])])
        (got,) = tr.update(1, 0.04, [_obs(100, 100, emb=ea)])
        assert got == ids[list(map(id, order)).index(id(ea))]


def test_covered_by_tracks_late_in_a_video_and_at_the_boundaries() -> None:
    from facepipe.track import covered_by_tracks

    e = _unit(np.random.default_rng(13).normal(size=16))
    tr = Tracker(max_gap_s=1.0)
    for f in range(3):
        tr.update(250 + f, 10.0 + f * 0.5, [_obs(100, 100, s=30, emb=e)])    # last seen at t = 11
    box = Box(100, 100, 30, 30)
    assert covered_by_tracks(tr, 11.5, [box]) == [True]                       # 12 s into the video
    assert covered_by_tracks(tr, 12.0, [box]) == [True]                       # unseen exactly max_gap_s
    assert covered_by_tracks(tr, 12.01, [box]) == [False]
    assert covered_by_tracks(tr, 11.0, [Box(110, 100, 30, 30)]) == [True]    # IoU exactly 0.5


def test_vote_ties_go_to_more_frames_then_to_unknown() -> None:
    votes = [("ada", 0.5), ("bob", 1.0), ("ada", 0.5)]             # equal weights, ada in more frames
    for k in range(3):
        assert vote_identity(votes[k:] + votes[:k], 0.5).name == "ada"
    for vs in ([("ada", 0.5), ("unknown", 0.1)], [("unknown", 0.1), ("ada", 0.5)]):
        assert vote_identity(vs, 0.5).name == "unknown"           # one frame each, equal weight
