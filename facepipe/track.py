"""Multi-face tracking across video frames and one identity per track.

:class:`Tracker` links the faces of successive *analysed* frames into tracks.
Each live track predicts where its face is now (constant velocity, in pixels per
second, so a ``--stride`` gap or a variable frame rate is handled by the time
step, not by a frame count); a detection and a track may be matched when their
boxes overlap (IoU with the prediction) or, when both have embeddings, when the
faces look alike and are not far apart. Pairs are assigned by the Hungarian
algorithm (:func:`assign`) on an affinity that mixes position and cosine similarity; unmatched
detections start new tracks and tracks not seen for ``max_gap_s`` seconds end.

:func:`vote_identity` gives a track one name from its per-frame gallery
decisions (a score-weighted majority, ``unknown`` included), so a label does
not flicker from frame to frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from facepipe.boxes import suppress_contained
from facepipe.errors import ShapeError
from facepipe.types import Box, Detection

UNKNOWN = "unknown"


def iou_matrix(a: Sequence[Box], b: Sequence[Box]) -> np.ndarray:
    """Pairwise IoU of two box lists, float64 ``(len(a), len(b))``."""
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    A = np.array([bx.xyxy() for bx in a], dtype=np.float64)
    B = np.array([bx.xyxy() for bx in b], dtype=np.float64)
    ix = np.clip(np.minimum(A[:, None, 2], B[None, :, 2]) - np.maximum(A[:, None, 0], B[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(A[:, None, 3], B[None, :, 3]) - np.maximum(A[:, None, 1], B[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = np.clip(A[:, 2] - A[:, 0], 0, None) * np.clip(A[:, 3] - A[:, 1], 0, None)
    area_b = np.clip(B[:, 2] - B[:, 0], 0, None) * np.clip(B[:, 3] - B[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return out


def assign(affinity: np.ndarray, valid: np.ndarray) -> list[tuple[int, int]]:
    """Maximum-affinity one-to-one matching among ``valid`` pairs (Hungarian algorithm).

    Returns ``(row, col)`` pairs, each row and column at most once, only pairs with
    ``valid[row, col]`` true, maximising the summed affinity of the chosen pairs.
    """
    from scipy.optimize import linear_sum_assignment

    if affinity.shape != valid.shape:
        raise ShapeError(f"affinity {affinity.shape} and valid {valid.shape} differ in shape")
    if affinity.size == 0 or not valid.any():
        return []
    # Square (r+c) problem: each row may instead take its own "unmatched" column and
    # each column its own "unmatched" row at cost 0, so leaving a pair out is always
    # allowed and the optimum maximises total affinity (not the number of pairs).
    # Forbidden entries cost more than any gain the matching could make.
    r, c = affinity.shape
    big = float(np.abs(affinity[valid]).sum() + 1.0) * 4.0
    cost = np.full((r + c, c + r), big)
    cost[:r, :c] = np.where(valid, -affinity, big)
    cost[:r, c:][np.diag_indices(r)] = 0.0
    cost[r:, :c][np.diag_indices(c)] = 0.0
    cost[r:, c:] = 0.0
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if i < r and j < c and valid[i, j]]


@dataclass
class Observation:
    """One face in one analysed frame, as the tracker and the outputs see it.

    ``name``/``score`` are the frame's own gallery decision (``None`` without a
    gallery); ``embedding`` is a unit vector or ``None`` (detection only).
    """

    detection: Detection
    embedding: np.ndarray | None = None
    name: str | None = None
    score: float | None = None


@dataclass
class Track:
    """A face followed across frames; ``votes`` holds its per-frame decisions."""

    track_id: int
    box: Box
    last_time: float
    first_time: float
    first_frame: int
    last_frame: int
    velocity: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    embedding: np.ndarray | None = None
    hits: int = 1
    embedded: int = 0
    votes: list[tuple[str, float]] = field(default_factory=list)
    det_scores: list[float] = field(default_factory=list)
    first_box: Box | None = None
    first_embedding: np.ndarray | None = None

    def predict(self, t: float) -> Box:
        """Where this track's box is expected at time ``t`` (constant velocity)."""
        dt = max(0.0, t - self.last_time)
        vx, vy, vw, vh = self.velocity
        w = max(1.0, self.box.w + vw * dt)
        h = max(1.0, self.box.h + vh * dt)
        return Box(self.box.x + vx * dt, self.box.y + vy * dt, w, h)


class Tracker:
    """IoU + embedding-similarity tracker over the analysed frames of one video.

    A detection may continue a track when its box overlaps the track's predicted
    box (IoU at least ``iou_min``: strong position evidence) or its centre lies
    within ``max_jump`` box sizes of the predicted centre with a similar size
    (weak position evidence: fast faces, long stride gaps). When both sides have
    embeddings, weak position evidence must be confirmed by appearance (cosine at
    least ``sim_min``), a look-alike within twice that distance also matches, and
    even overlapping boxes are refused when the faces look clearly different
    (cosine below ``sim_veto``, default ``sim_min / 2``), so people crossing keep
    their tracks and a track does not jump to a nearby stranger when its face is
    lost. ``sim_min`` is the embedder's same-person similarity: with a gallery,
    use its calibrated threshold. The affinity maximised by the assignment is the
    position score (IoU, or half the closeness) mixed with the similarity by
    ``iou_weight``. ``max_gap_s``: how long a track survives unseen; ``ema``: how
    fast a track's reference embedding follows new frames.
    """

    def __init__(
        self,
        iou_min: float = 0.2,
        sim_min: float = 0.5,
        sim_veto: float | None = None,
        iou_weight: float = 0.5,
        max_gap_s: float = 1.0,
        max_jump: float = 1.0,
        ema: float = 0.3,
    ) -> None:
        if not 0.0 <= iou_weight <= 1.0:
            raise ValueError(f"iou_weight must be in [0, 1], got {iou_weight}")
        if max_gap_s < 0:
            raise ValueError(f"max_gap_s must be >= 0, got {max_gap_s}")
        self.iou_min = float(iou_min)
        self.sim_min = float(sim_min)
        self.sim_veto = float(sim_veto) if sim_veto is not None else self.sim_min / 2.0
        self.iou_weight = float(iou_weight)
        self.max_gap_s = float(max_gap_s)
        self.max_jump = float(max_jump)
        self.ema = float(ema)
        self.active: list[Track] = []
        self.finished: list[Track] = []
        self._next_id = 1

    @property
    def tracks(self) -> list[Track]:
        """Every track so far (ended and live), by id."""
        return sorted(self.finished + self.active, key=lambda t: t.track_id)

    def _affinity(self, preds: list[Box], tracks: list[Track],
                  obs: Sequence[Observation]) -> tuple[np.ndarray, np.ndarray]:
        boxes = [o.detection.box for o in obs]
        iou = iou_matrix(preds, boxes)
        pc = np.array([p.center for p in preds], dtype=np.float64)
        dc = np.array([b.center for b in boxes], dtype=np.float64)
        dist = np.linalg.norm(pc[:, None, :] - dc[None, :, :], axis=2)
        psize = np.array([max(p.w, p.h, 1.0) for p in preds], dtype=np.float64)[:, None]
        dsize = np.array([max(b.w, b.h, 1.0) for b in boxes], dtype=np.float64)[None, :]
        ratio = np.maximum(psize / dsize, dsize / psize)
        # Closeness 1 at the predicted centre, 0 at ``max_jump`` box sizes away: catches
        # fast faces (or long stride gaps) whose boxes no longer overlap the prediction.
        closeness = np.clip(1.0 - dist / (self.max_jump * np.maximum(psize, dsize)), 0.0, 1.0)
        strong = iou >= self.iou_min
        valid = strong | ((closeness > 0) & (ratio <= 2.0))
        pos = np.maximum(iou, 0.5 * closeness)
        aff = pos.copy()
        have_emb = [t.embedding is not None for t in tracks]
        obs_emb = [o.embedding is not None for o in obs]
        if any(have_emb) and any(obs_emb):
            dim = next(o.embedding for o in obs if o.embedding is not None).shape[0]
            T = np.zeros((len(tracks), dim), dtype=np.float64)
            D = np.zeros((len(obs), dim), dtype=np.float64)
            for i, t in enumerate(tracks):
                if t.embedding is not None:
                    T[i] = t.embedding
            for j, o in enumerate(obs):
                if o.embedding is not None:
                    D[j] = o.embedding
            sim = T @ D.T
            both = np.outer(have_emb, obs_emb)
            # With embeddings on both sides: overlap counts unless the faces clearly differ;
            # anything weaker (a nearby box, or a look-alike up to twice as far) needs the
            # faces to look like the same person.
            near = dist <= 2.0 * self.max_jump * np.maximum(psize, dsize)
            with_emb = (strong & (sim >= self.sim_veto)) | (near & (sim >= self.sim_min))
            valid = np.where(both, with_emb, valid)
            aff = np.where(both, self.iou_weight * pos + (1 - self.iou_weight) * np.clip(sim, 0, 1), pos)
        return aff, valid

    def cut(self) -> None:
        """End every live track (a shot change: nobody continues across a camera cut)."""
        self.finished.extend(self.active)
        self.active = []

    def update(self, frame_index: int, t: float, observations: Sequence[Observation]) -> list[int]:
        """Match one analysed frame's faces to tracks; returns a track id per observation."""
        # End tracks unseen for too long (before matching, so they cannot be revived).
        still: list[Track] = []
        for tr in self.active:
            (still if t - tr.last_time <= self.max_gap_s else self.finished).append(tr)
        self.active = still
        preds = [tr.predict(t) for tr in self.active]
        ids = [0] * len(observations)
        matched_obs: set[int] = set()
        if self.active and observations:
            aff, valid = self._affinity(preds, self.active, observations)
            for r, c in assign(aff, valid):
                self._extend(self.active[r], frame_index, t, observations[c])
                ids[c] = self.active[r].track_id
                matched_obs.add(c)
        for j, o in enumerate(observations):
            if j in matched_obs:
                continue
            tr = Track(
                track_id=self._next_id, box=o.detection.box, last_time=t, first_time=t,
                first_frame=frame_index, last_frame=frame_index,
                embedding=None if o.embedding is None else np.asarray(o.embedding, dtype=np.float64),
                first_box=o.detection.box,
                first_embedding=None if o.embedding is None else np.asarray(o.embedding, dtype=np.float64),
            )
            self._record(tr, o)
            self._next_id += 1
            self.active.append(tr)
            ids[j] = tr.track_id
        return ids

    def _extend(self, tr: Track, frame_index: int, t: float, o: Observation) -> None:
        dt = t - tr.last_time
        nb = o.detection.box
        if dt > 0:
            new_v = ((nb.x - tr.box.x) / dt, (nb.y - tr.box.y) / dt,
                     (nb.w - tr.box.w) / dt, (nb.h - tr.box.h) / dt)
            # Smooth velocity: detections jitter by a few pixels.
            a = 0.5 if tr.hits > 1 else 1.0
            tr.velocity = tuple(a * n + (1 - a) * v for n, v in zip(new_v, tr.velocity))  # type: ignore[assignment]
        tr.box = nb
        tr.last_time = t
        tr.last_frame = frame_index
        tr.hits += 1
        if o.embedding is not None:
            e = np.asarray(o.embedding, dtype=np.float64)
            if tr.first_embedding is None:
                tr.first_embedding = e
            if tr.embedding is None:
                tr.embedding = e
            else:
                m = (1 - self.ema) * tr.embedding + self.ema * e
                n = np.linalg.norm(m)
                tr.embedding = m / n if n > 0 else e
        self._record(tr, o)

    @staticmethod
    def _record(tr: Track, o: Observation) -> None:
        tr.det_scores.append(float(o.detection.score))
        if o.embedding is not None:
            tr.embedded += 1
        if o.name is not None:
            tr.votes.append((o.name, float(o.score) if o.score is not None else 0.0))


def suppress_duplicates(observations: Sequence[Observation], containment: float = 0.6) -> list[Observation]:
    """One frame's faces without duplicate boxes of one face: of two boxes one of which lies at
    least ``containment`` inside the other (intersection over the smaller box's area), the
    lower-scoring one is dropped (:func:`facepipe.boxes.suppress_contained`; Haar keeps nested
    boxes of one face at neighbouring scales; a second face cannot lie inside a face). Order is kept."""
    obs = list(observations)
    if not obs:
        return []
    xyxy = np.array([o.detection.box.xyxy() for o in obs], np.float64)
    scores = np.array([float(o.detection.score) for o in obs], np.float64)
    keep = set(suppress_contained(xyxy, scores, containment).tolist())
    return [o for i, o in enumerate(obs) if i in keep]


def _majority_name(tr: Track) -> str | None:
    names = [n for n, _ in tr.votes if n != UNKNOWN]
    if not names or len(names) * 2 < len(tr.votes):
        return None
    return max(set(names), key=names.count)


def stitch_tracks(tracks: Sequence[Track], sim_min: float, max_gap_s: float = 5.0,
                  cut_times: Sequence[float] = (), max_jump: float = 3.0,
                  across_cuts: bool = False) -> dict[int, int]:
    """Re-identification after tracking: which tracks are continuations of an earlier one.

    A track B continues an earlier track A when B starts after A ended, at most
    ``max_gap_s`` later; both have embeddings and A's latest embedding and B's first
    are alike (cosine at least ``sim_min``); they are in one shot (no time in
    ``cut_times`` between them; ``across_cuts`` allows joining across a cut on the faces
    alone, which an embedder weaker than the gallery's decision needs does badly: on the
    shared Hamilton clip it joined audience members to the singer) and B starts within
    ``max_jump`` face sizes of where A was last seen; and their frames do not name two
    different people. Pairs are joined greedily, most
    similar first, each track continuing and continued at most once (so chains form:
    a face lost twice is joined twice). Returns ``{track_id: id of its chain's first
    track}`` for every track (unchanged ids map to themselves).
    """
    by_id = {t.track_id: t for t in tracks}
    cuts = sorted(float(c) for c in cut_times)
    pairs: list[tuple[float, int, int]] = []
    for a in tracks:
        if a.embedding is None:
            continue
        for b in tracks:
            if b is a or b.first_embedding is None:
                continue
            gap = b.first_time - a.last_time
            if gap <= 0 or gap > max_gap_s:
                continue
            sim = float(np.dot(a.embedding, b.first_embedding)
                        / max(np.linalg.norm(a.embedding) * np.linalg.norm(b.first_embedding), 1e-12))
            if sim < sim_min:
                continue
            same_shot = not any(a.last_time < c <= b.first_time for c in cuts)
            if not same_shot and not across_cuts:
                continue
            if same_shot and b.first_box is not None:
                (ax, ay), (bx, by) = a.box.center, b.first_box.center
                size = max(a.box.w, a.box.h, b.first_box.w, b.first_box.h, 1.0)
                if np.hypot(ax - bx, ay - by) > max_jump * size:
                    continue
            na, nb = _majority_name(a), _majority_name(b)
            if na is not None and nb is not None and na != nb:
                continue
            pairs.append((sim, a.track_id, b.track_id))
    nxt: dict[int, int] = {}
    prv: dict[int, int] = {}
    for _sim, a_id, b_id in sorted(pairs, key=lambda p: -p[0]):
        if a_id in nxt or b_id in prv:
            continue
        # B must not overlap in time any track already in A's chain (it starts after A,
        # and A's chain only has earlier tracks), nor may the chain loop.
        root = a_id
        while root in prv:
            root = prv[root]
        if root == b_id:
            continue
        nxt[a_id], prv[b_id] = b_id, a_id
    out: dict[int, int] = {}
    for tid in by_id:
        root = tid
        while root in prv:
            root = prv[root]
        out[tid] = root
    return out


def merge_tracks(tracks: Sequence[Track], mapping: dict[int, int]) -> list[Track]:
    """Tracks joined as ``mapping`` (from :func:`stitch_tracks`) says: one per chain, with the
    chain's first id, its first and last times, and all frames' votes and scores."""
    chains: dict[int, list[Track]] = {}
    for t in sorted(tracks, key=lambda t: t.first_time):
        chains.setdefault(mapping.get(t.track_id, t.track_id), []).append(t)
    out = []
    for root, parts in chains.items():
        first, last = parts[0], parts[-1]
        out.append(Track(
            track_id=root, box=last.box, last_time=last.last_time, first_time=first.first_time,
            first_frame=first.first_frame, last_frame=last.last_frame, velocity=last.velocity,
            embedding=last.embedding, hits=sum(p.hits for p in parts), embedded=sum(p.embedded for p in parts),
            votes=[v for p in parts for v in p.votes], det_scores=[d for p in parts for d in p.det_scores],
            first_box=first.first_box, first_embedding=first.first_embedding,
        ))
    return sorted(out, key=lambda t: t.track_id)


def covered_by_tracks(tracker: Tracker, t: float, boxes: Sequence[Box], min_embedded: int = 3,
                      iou_min: float = 0.5) -> list[bool]:
    """For each box, whether it clearly continues a live track that already has at least
    ``min_embedded`` embedded frames (IoU with the track's predicted box at time ``t``).

    Such faces need not be embedded on every frame: their track's identity is
    already well supported and their position alone keeps them on it.
    """
    live = [tr for tr in tracker.active if tr.embedded >= min_embedded and t - tr.last_time <= tracker.max_gap_s]
    if not live or not boxes:
        return [False] * len(boxes)
    iou = iou_matrix(list(boxes), [tr.predict(t) for tr in live])
    best = iou.max(axis=1)
    # exactly one track claims the face (two overlapping tracks: embed to tell them apart)
    claims = (iou >= iou_min).sum(axis=1)
    return [bool(b >= iou_min and c == 1) for b, c in zip(best, claims)]


@dataclass(frozen=True)
class Vote:
    """A track's identity: ``name`` (``unknown`` or ``None`` without votes), ``confidence``
    (the winner's share of the vote weight, 0..1) and ``mean_score`` (mean gallery
    similarity over the frames that voted for the winner)."""

    name: str | None
    confidence: float
    mean_score: float | None
    frames: int


def vote_identity(votes: Sequence[tuple[str, float]], unknown_weight: float) -> Vote:
    """Score-weighted majority over a track's per-frame decisions.

    A frame that matched a gallery identity votes for it with its similarity
    score as weight; an ``unknown`` frame votes for ``unknown`` with weight
    ``unknown_weight`` (use the gallery's threshold: an unknown frame counts as
    much as a match just at the threshold). Ties go to the name seen in more
    frames, then to ``unknown``.
    """
    if not votes:
        return Vote(None, 0.0, None, 0)
    weights: dict[str, float] = {}
    counts: dict[str, int] = {}
    scores: dict[str, list[float]] = {}
    for name, score in votes:
        w = float(unknown_weight) if name == UNKNOWN else max(float(score), 1e-6)
        weights[name] = weights.get(name, 0.0) + max(w, 1e-6)
        counts[name] = counts.get(name, 0) + 1
        scores.setdefault(name, []).append(float(score))
    best = max(weights, key=lambda n: (weights[n], counts[n], n == UNKNOWN))
    total = sum(weights.values())
    return Vote(best, weights[best] / total, float(np.mean(scores[best])), len(votes))
