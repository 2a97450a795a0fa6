"""Boosting of decision stumps into one cascade stage (gentle, real or discrete AdaBoost).

Feature selection is vectorised over every sample and every candidate feature at
once. At the start of a stage each candidate feature's values are quantised into
``bins`` quantile bins (edges are float32 midpoints between sorted sample values,
so an edge is a threshold OpenCV applies exactly as here), and the stage keeps a
sparse ``(features·bins) × samples`` indicator matrix. Every boosting round is then
one sparse product with the ``(samples × 2)`` matrix of positive/negative weights,
giving per-feature weight histograms; cumulative sums over the bins score every
possible stump of every feature, and the best one wins. Its leaves are computed
from the exact feature values. After each round the stage threshold is moved so
that ``min_hit_rate`` of the stage's positives pass, and the stage is complete
when at most ``max_false_alarm`` of its negatives do (or at ``max_weak`` stumps).
With *calibration* positives (held out from boosting) the threshold is set on
them instead: stumps fit their own training positives, so a threshold set there
keeps fewer than ``min_hit_rate`` of unseen ones (a 24×24 face cascade trained at
0.998 per stage kept 0.89 of held-out faces after 18 stages, ≈ 0.994 per stage).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from facepipe.vj.features import HaarFeatures, values_from_flat
from facepipe.vj.model import THRESHOLD_EPS, Stage, Stump

log = logging.getLogger(__name__)

BOOST_TYPES = ("gentle", "real", "discrete")


@dataclass
class StageSettings:
    """What one stage must achieve and how hard it may try."""

    min_hit_rate: float = 0.995
    max_false_alarm: float = 0.5
    max_weak: int = 100
    boost: str = "gentle"
    bins: int = 64


@dataclass
class StageReport:
    """Training-set figures of a finished stage."""

    n_weak: int
    hit_rate: float
    false_alarm: float
    n_pos: int
    n_neg: int
    n_features: int
    seconds: float
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (hit rate, false alarm) per stump
    train_hit_rate: float | None = None  # the boosting positives' hit rate when hit_rate is the calibration set's
    n_calibration: int = 0


def accept_threshold(thr: float) -> np.float64:
    """The value a stage sum must reach for OpenCV: ``float(thr) − 1e-5`` (float arithmetic)."""
    return np.float64(np.float32(thr) - THRESHOLD_EPS)


def stage_threshold(pos_sums: np.ndarray, min_hit_rate: float) -> float:
    """The largest float32 threshold that keeps at least ``min_hit_rate`` of positives (OpenCV's rule)."""
    s = np.sort(pos_sums)
    m = int((1.0 - min_hit_rate) * len(s))
    thr = np.float32(s[m])
    need = len(s) - m
    # float32 rounding must not lose the positives the threshold was chosen to keep
    while (pos_sums >= accept_threshold(thr)).sum() < need:
        thr = np.nextafter(thr, np.float32(-np.inf))
    return float(thr)


def quantile_bins(values: np.ndarray, bins: int, rng: np.random.Generator, sample: int = 2048
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature float32 edges ``(F, bins-1)`` and bin codes ``(F, N)`` uint8 of ``values (N, F)``.

    ``code = #edges ≤ value``, so ``value < edges[k]`` exactly when ``code ≤ k``.
    """
    n, f = values.shape
    sub = values if n <= sample else values[rng.choice(n, sample, replace=False)]
    s = np.sort(sub, axis=0).astype(np.float64)
    q = np.clip(np.round(np.arange(1, bins) * len(s) / bins).astype(np.int64), 1, len(s) - 1)
    edges = ((s[q - 1] + s[q]) / 2.0).astype(np.float32).T  # (F, bins-1)
    edges = np.maximum.accumulate(edges, axis=1)
    vt = np.ascontiguousarray(values.T)  # one contiguous row per feature
    codes = np.empty((f, n), np.uint8)
    for j in range(f):
        codes[j] = np.searchsorted(edges[j], vt[j], side="right")
    return np.ascontiguousarray(edges), codes


def indicator_matrix(codes: np.ndarray, bins: int):  # -> scipy.sparse.csr_matrix
    """Sparse ``(F·bins, N)`` 0/1 matrix: row ``f·bins + b`` marks the samples in bin b of feature f."""
    import scipy.sparse as sp

    f, n = codes.shape
    order = np.argsort(codes, axis=1, kind="stable").astype(np.int32)  # radix sort on uint8
    counts = np.zeros((f, bins), np.int64)
    for j in range(f):
        counts[j] = np.bincount(codes[j], minlength=bins)
    indptr = np.concatenate([[0], np.cumsum(counts.ravel())])
    return sp.csr_matrix((np.ones(f * n, np.float32), order.ravel(), indptr), shape=(f * bins, n))


def _split_scores(h: np.ndarray, boost: str) -> np.ndarray:
    """Score (higher is better) of every split ``left = bins ≤ k`` from histograms ``(F, B, 2)``."""
    cum = np.cumsum(h, axis=1)[:, :-1]  # (F, B-1, 2): left sums for k = 0..B-2
    tot = h.sum(axis=1)[:, None, :]
    lp, ln = cum[..., 0], cum[..., 1]
    rp, rn = tot[..., 0] - lp, tot[..., 1] - ln
    with np.errstate(divide="ignore", invalid="ignore"):
        if boost == "gentle":  # maximise Σ_side (Σwy)² / Σw  ⇔ minimise weighted squared error
            sl, wl = lp - ln, lp + ln
            sr, wr = rp - rn, rp + rn
            score = np.where(wl > 0, sl * sl / wl, 0.0) + np.where(wr > 0, sr * sr / wr, 0.0)
        elif boost == "real":  # minimise Z = 2 Σ_side sqrt(W+ W-)
            score = -(np.sqrt(np.maximum(lp * ln, 0)) + np.sqrt(np.maximum(rp * rn, 0)))
        else:  # discrete: minimise the weighted error of the better polarity
            score = -np.minimum(ln + rp, lp + rn)
    return np.nan_to_num(score, nan=-np.inf)


def _leaves(left: np.ndarray, y: np.ndarray, w: np.ndarray, boost: str) -> tuple[float, float]:
    """Leaf values of a stump given which samples go left."""
    pos = y > 0
    out = []
    for side in (left, ~left):
        wp = float(w[side & pos].sum())
        wn = float(w[side & ~pos].sum())
        if boost == "gentle":
            out.append((wp - wn) / (wp + wn) if wp + wn > 0 else 0.0)
        elif boost == "real":
            eps = 1.0 / (2.0 * len(w))
            out.append(0.5 * np.log((wp + eps) / (wn + eps)))
        else:
            out.append(wp - wn)  # sign only; scaled by alpha below
    if boost == "discrete":
        sgn = np.sign(out)
        sgn[sgn == 0] = 1.0
        pred_pos = np.where(left, sgn[0], sgn[1]) > 0
        err = float(w[pred_pos != pos].sum()) / float(w.sum())
        err = min(max(err, 1e-10), 1 - 1e-10)
        alpha = 0.5 * np.log((1 - err) / err)
        out = [float(sgn[0] * alpha), float(sgn[1] * alpha)]
    return float(np.float32(out[0])), float(np.float32(out[1]))


def _stump_output(values: np.ndarray, threshold: float, left: float, right: float) -> np.ndarray:
    """A stump's leaf value per sample, as OpenCV computes it (``value < threshold`` goes left, float32 leaves)."""
    return np.where(values < np.float32(threshold), np.float32(left), np.float32(right)).astype(np.float64)


def train_stage(flat: np.ndarray, vnf: np.ndarray, y: np.ndarray, features: HaarFeatures, ids: np.ndarray,
                settings: StageSettings, rng: np.random.Generator,
                on_round: Callable[[int, float, float], None] | None = None,
                calibration: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Stage, StageReport]:
    """Boost stumps over features ``ids`` until the stage meets its targets.

    ``flat`` are the samples' flattened float64 integral images ``(N, (H+1)(W+1))``,
    ``vnf`` their float32 normalisation, ``y`` labels ±1. Stumps refer to feature
    indices of ``features`` (the global set), not to positions in ``ids``.
    ``calibration`` = ``(flat, vnf)`` of held-out positives: the stage threshold keeps
    ``min_hit_rate`` of them (and the reported hit rate is theirs) instead of the
    training positives'.
    """
    if settings.boost not in BOOST_TYPES:
        raise ValueError(f"unknown boost type {settings.boost!r}; valid: {', '.join(BOOST_TYPES)}")
    t0 = time.perf_counter()
    y = np.where(np.asarray(y) > 0, 1.0, -1.0)
    pos = y > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a stage needs positive and negative samples")
    ids = np.asarray(ids, dtype=np.int64)
    bins = settings.bins
    # quantise feature values chunk by chunk (bounded memory), then one sparse indicator matrix
    edges = np.empty((len(ids), bins - 1), np.float32)
    codes = np.empty((len(ids), len(y)), np.uint8)
    chunk = max(1, min(len(ids), int(2.5e7 // max(len(y), 1))))
    flat_t = np.ascontiguousarray(flat.T)
    for c0 in range(0, len(ids), chunk):
        vals = values_from_flat(features, flat_t, vnf, ids[c0:c0 + chunk], transposed=True)
        edges[c0:c0 + chunk], codes[c0:c0 + chunk] = quantile_bins(vals, bins, rng)
        del vals
    ind = indicator_matrix(codes, bins)
    del codes
    log.debug("stage matrix: %d features x %d samples in %.1fs", len(ids), len(y), time.perf_counter() - t0)

    cal_t = cal_vnf = None
    cal_sums = np.zeros(0, np.float64)
    if calibration is not None:
        cal_flat, cal_vnf = calibration
        if len(cal_flat) == 0:
            raise ValueError("calibration positives are empty")
        cal_t = np.ascontiguousarray(np.asarray(cal_flat, np.float64).T)
        cal_sums = np.zeros(len(cal_flat), np.float64)
    w = np.where(pos, 0.5 / n_pos, 0.5 / n_neg)
    sums = np.zeros(len(y), np.float64)
    stumps: list[Stump] = []
    rounds: list[tuple[float, float]] = []
    thr = 0.0
    hit = fa = 1.0
    while len(stumps) < settings.max_weak:
        wm = np.zeros((len(y), 2), np.float32)
        wm[pos, 0] = w[pos]
        wm[~pos, 1] = w[~pos]
        h = np.asarray(ind @ wm, dtype=np.float64).reshape(len(ids), bins, 2)
        score = _split_scores(h, settings.boost)
        fj, k = np.unravel_index(int(np.argmax(score)), score.shape)
        fid = int(ids[fj])
        threshold = float(edges[fj, k])
        val = values_from_flat(features, flat_t, vnf, np.array([fid]), transposed=True)[:, 0]
        left = val < np.float32(threshold)
        lv, rv = _leaves(left, y, w, settings.boost)
        out = _stump_output(val, threshold, lv, rv)
        stumps.append(Stump(fid, threshold, lv, rv))
        sums += out
        w = w * np.exp(-y * out)
        w /= w.sum()
        if cal_t is not None:
            cval = values_from_flat(features, cal_t, cal_vnf, np.array([fid]), transposed=True)[:, 0]
            cal_sums += _stump_output(cval, threshold, lv, rv)
            thr = stage_threshold(cal_sums, settings.min_hit_rate)
        else:
            thr = stage_threshold(sums[pos], settings.min_hit_rate)
        acc = sums >= accept_threshold(thr)
        hit = float(acc[pos].mean()) if cal_t is None else float((cal_sums >= accept_threshold(thr)).mean())
        fa = float(acc[~pos].mean())
        rounds.append((hit, fa))
        if on_round is not None:
            on_round(len(stumps), hit, fa)
        log.debug("  stump %d: feature %d thr %.5g leaves %.3f/%.3f -> hit %.4f fa %.4f",
                  len(stumps), fid, threshold, lv, rv, hit, fa)
        if fa <= settings.max_false_alarm:
            break
    report = StageReport(len(stumps), hit, fa, n_pos, n_neg, len(ids), time.perf_counter() - t0, rounds)
    if cal_t is not None:
        report.train_hit_rate = float((sums[pos] >= accept_threshold(thr)).mean())
        report.n_calibration = len(cal_sums)
    return Stage(stumps, thr), report
