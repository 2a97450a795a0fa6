"""Open-set thresholds that work out of the box: impostor statistics shipped with an embedder.

Every shipped embedder carries, in its checkpoint, an **impostor model**: how similar
the embeddings of two photos of *different* people are, measured on development people
it was not trained on. From it a new gallery derives its threshold for a target
false-positive identification rate (FPIR, the share of people who are *not* enrolled
that the gallery would nevertheless name), without any calibration data from the user.

The arithmetic. A stranger's probe is compared with the gallery's ``N`` enrolled
vectors (``max`` aggregation) or ``N`` people (``mean`` aggregation) and is named when
the best score reaches the threshold ``t``. If one comparison passes ``t`` with
probability ``FMR(t)`` (the false-match rate of a single impostor pair) and the
comparisons were independent,

    FPIR(t) = 1 − (1 − FMR(t))^N,  so the per-comparison rate to aim for is
    FMR = 1 − (1 − FPIR)^(1/N)

and ``t`` is the impostor-score quantile at that FMR. A gallery in ``auto`` mode
re-derives ``t`` on every change, so the threshold rises as people are enrolled (more
people, more chances of a false match). Comparisons are not quite independent: a
stranger who scores high against one enrolled face tends to score high against others
(embeddings that share a common direction), so ``N`` comparisons are worth ``N^a``
independent ones, with ``a <= 1`` fitted on simulated galleries of the development
people (:func:`fit_comparisons_exponent`) and stored with the model. The benchmark
(``scripts/bench_openset_defaults.py``, ``docs/gallery.md``) measures how close the FPIR
obtained is to the target.

The impostor model stores empirical thresholds at a grid of FMRs from 0.5 down to
1e-6 where the development pairs resolve them (at least :data:`MIN_TAIL_PAIRS`
impostor pairs above the threshold) and a generalised Pareto fit to the upper tail
for smaller rates (extrapolation), together with the people, photos and pairs it
came from and the id of the embedder whose embeddings it describes; and, since 2026-11-30,
those development people as the **cohort** of :mod:`facepipe.gallery.cohort` (a higher
bar for enrolled faces in crowded parts of face space; the model's FPIR is then an upper
bound).
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from facepipe.gallery.cohort import Cohort, build_cohort

#: Format tag of the impostor model record stored in checkpoints and manifests.
RECORD_FORMAT = "facepipe-impostor-model/1"
#: False-match rates at which the model stores thresholds.
FMR_GRID: tuple[float, ...] = (0.5, 0.2, 0.1, 0.05, 0.02, 1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4,
                               5e-5, 2e-5, 1e-5, 5e-6, 2e-6, 1e-6)
#: An FMR is read from the empirical pairs only when at least this many impostor
#: pairs lie above its threshold; rarer rates come from the tail fit.
MIN_TAIL_PAIRS = 50
#: The tail fit uses the pairs above the empirical quantile at this FMR (or the
#: top ``TAIL_MIN_EXCEEDANCES`` pairs when there are too few pairs for it).
TAIL_FMR = 1e-3
TAIL_MIN_EXCEEDANCES = 300


def per_comparison_fmr(fpir: float, n_comparisons: float) -> float:
    """The single-comparison false-match rate that gives ``fpir`` over ``n_comparisons``.

    ``1 − (1 − fpir)^(1/n)``, computed without cancellation for tiny rates.
    """
    if not 0.0 < fpir < 1.0:
        raise ValueError(f"target FPIR must be in (0, 1), got {fpir!r}")
    n = max(float(n_comparisons), 1.0)
    return float(-math.expm1(math.log1p(-fpir) / n))


def fpir_from_fmr(fmr: float, n_comparisons: float) -> float:
    """The FPIR of ``n_comparisons`` independent comparisons at false-match rate ``fmr``."""
    n = max(float(n_comparisons), 1.0)
    return float(-math.expm1(n * math.log1p(-min(max(fmr, 0.0), 1.0 - 1e-16))))


@dataclass(frozen=True)
class ImpostorModel:
    """Impostor (different-people) score statistics of one embedder; see the module docstring."""

    embedder_id: str
    fmr: tuple[float, ...]
    thresholds: tuple[float, ...]
    empirical: tuple[bool, ...]
    tail: dict[str, float]
    n_people: int
    n_images: int
    n_pairs: int
    data: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    exponents: tuple[tuple[float, float], ...] = ((0.1, 1.0), (0.01, 1.0))
    exponent_fit: dict[str, Any] = field(default_factory=dict)
    cohort: Cohort | None = field(default=None, compare=False, repr=False)

    # -------------------------------------------------------------- record (checkpoint / manifest)

    def to_dict(self) -> dict[str, Any]:
        """The JSON/torch-safe record (plain floats, ints, strings, lists)."""
        return {
            "format": RECORD_FORMAT, "embedder_id": self.embedder_id,
            "score": "cosine similarity of the unit embeddings of two photos of different people",
            "fmr": [float(f) for f in self.fmr],
            "thresholds": [round(float(t), 6) for t in self.thresholds],
            "empirical": [bool(e) for e in self.empirical],
            "tail": {k: float(v) for k, v in self.tail.items()},
            "n_people": int(self.n_people), "n_images": int(self.n_images), "n_pairs": int(self.n_pairs),
            "comparisons_exponent": {f"{f:g}": float(a) for f, a in self.exponents},
            "exponent_fit": dict(self.exponent_fit),
            "data": dict(self.data), "created_at": self.created_at,
            **({} if self.cohort is None else {"cohort": self.cohort.to_dict()}),
        }

    @classmethod
    def from_dict(cls, rec: Any) -> "ImpostorModel":
        """Parse and validate a record; raises ``ValueError`` saying what is wrong."""
        if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
            got = rec.get("format") if isinstance(rec, dict) else type(rec).__name__
            raise ValueError(f"not a {RECORD_FORMAT} record (format {got!r})")
        try:
            fmr = tuple(float(x) for x in rec["fmr"])
            thr = tuple(float(x) for x in rec["thresholds"])
            emp = tuple(bool(x) for x in rec["empirical"])
            tail = {k: float(rec["tail"][k]) for k in ("u", "p_u", "xi", "sigma")}
            model = cls(str(rec["embedder_id"]), fmr, thr, emp, tail, int(rec["n_people"]),
                        int(rec["n_images"]), int(rec["n_pairs"]), dict(rec.get("data", {})),
                        str(rec.get("created_at", "")),
                        tuple(sorted(((float(f), float(a)) for f, a in
                                      rec.get("comparisons_exponent", {"0.1": 1.0}).items()), reverse=True)),
                        dict(rec.get("exponent_fit", {})),
                        None if rec.get("cohort") is None else Cohort.from_dict(rec["cohort"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"impostor model record is missing or has a bad field ({exc})") from exc
        if not (len(fmr) == len(thr) == len(emp)) or len(fmr) < 2:
            raise ValueError("impostor model record: fmr, thresholds and empirical differ in length")
        if any(b >= a for a, b in zip(fmr, fmr[1:])) or any(b < a for a, b in zip(thr, thr[1:])):
            raise ValueError("impostor model record: rates must decrease and thresholds must not")
        if not all(math.isfinite(x) for x in thr + tuple(tail.values())) or tail["sigma"] <= 0:
            raise ValueError("impostor model record: non-finite threshold or bad tail fit")
        if not model.exponents or not all(0.0 < a <= 1.0 and 0.0 < f < 1.0 for f, a in model.exponents):
            raise ValueError(f"impostor model record: comparisons exponents {model.exponents} outside (0, 1]")
        return model

    # -------------------------------------------------------------- thresholds

    def _tail_threshold(self, fmr: float) -> float:
        u, p_u, xi, sigma = (self.tail[k] for k in ("u", "p_u", "xi", "sigma"))
        r = fmr / p_u
        if abs(xi) < 1e-9:
            return u - sigma * math.log(r)
        return u + sigma / xi * (r ** (-xi) - 1.0)

    def _tail_fmr(self, t: float) -> float:
        u, p_u, xi, sigma = (self.tail[k] for k in ("u", "p_u", "xi", "sigma"))
        z = (t - u) / sigma
        if abs(xi) < 1e-9:
            return p_u * math.exp(-z)
        base = 1.0 + xi * z
        if base <= 0.0:
            return 0.0  # beyond the fitted (bounded) tail's end point
        return p_u * base ** (-1.0 / xi)

    def threshold_at_fmr(self, fmr: float) -> float:
        """The similarity threshold at which one impostor comparison passes with rate ``fmr``.

        Interpolated (linearly in log FMR) between the stored points where the
        development pairs resolve them, the tail fit beyond; clamped to at most 1.
        """
        if not 0.0 < fmr < 1.0:
            raise ValueError(f"false-match rate must be in (0, 1), got {fmr!r}")
        emp = [(f, t) for f, t, e in zip(self.fmr, self.thresholds, self.empirical) if e]
        if emp and fmr >= emp[-1][0]:
            if fmr >= emp[0][0]:
                return emp[0][1]
            for (f0, t0), (f1, t1) in zip(emp, emp[1:]):
                if f1 <= fmr <= f0:
                    w = (math.log(f0) - math.log(fmr)) / (math.log(f0) - math.log(f1))
                    return t0 + w * (t1 - t0)
        t = self._tail_threshold(fmr)
        if emp:
            t = max(t, emp[-1][1])
        return min(t, 1.0)

    def fmr_at(self, threshold: float) -> float:
        """The false-match rate of one impostor comparison at ``threshold`` (model estimate)."""
        emp = [(f, t) for f, t, e in zip(self.fmr, self.thresholds, self.empirical) if e]
        if emp and threshold <= emp[-1][1]:
            if threshold <= emp[0][1]:
                return emp[0][0]
            for (f0, t0), (f1, t1) in zip(emp, emp[1:]):
                if t0 <= threshold <= t1:
                    w = 0.0 if t1 == t0 else (threshold - t0) / (t1 - t0)
                    return float(math.exp(math.log(f0) + w * (math.log(f1) - math.log(f0))))
        return float(self._tail_fmr(threshold))

    def fmr_at_many(self, thresholds: np.ndarray) -> np.ndarray:
        """:meth:`fmr_at` for an array of thresholds (vectorised)."""
        t = np.asarray(thresholds, dtype=np.float64)
        emp_f = np.asarray([f for f, e in zip(self.fmr, self.empirical) if e])
        emp_t = np.asarray([t_ for t_, e in zip(self.thresholds, self.empirical) if e])
        u, p_u, xi, sigma = (self.tail[k] for k in ("u", "p_u", "xi", "sigma"))
        z = (t - u) / sigma
        if abs(xi) < 1e-9:
            tail = p_u * np.exp(-z)
        else:
            base = 1.0 + xi * z
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                tail = np.where(base > 0, p_u * np.abs(base) ** (-1.0 / xi), 0.0)
        if emp_t.size == 0:
            return np.minimum(tail, 1.0)
        # np.interp needs increasing x: thresholds rise as rates fall
        inside = np.exp(np.interp(t, emp_t, np.log(emp_f)))
        return np.where(t <= emp_t[-1], inside, np.minimum(tail, emp_f[-1]))

    def exponent(self, fpir: float) -> float:
        """The comparisons exponent ``a`` at a target FPIR: fitted on the development people
        at FPIR 10% and 1%, interpolated in log FPIR between them, the nearer one outside."""
        pts = sorted(self.exponents)  # ascending FPIR
        if fpir <= pts[0][0]:
            return pts[0][1]
        if fpir >= pts[-1][0]:
            return pts[-1][1]
        for (f0, a0), (f1, a1) in zip(pts, pts[1:]):
            if f0 <= fpir <= f1:
                w = (math.log(fpir) - math.log(f0)) / (math.log(f1) - math.log(f0))
                return a0 + w * (a1 - a0)
        return pts[-1][1]

    def effective_comparisons(self, n_comparisons: int, fpir: float) -> float:
        """``N^a``: how many independent chances ``N`` correlated comparisons are worth at
        ``fpir`` (``a`` from :meth:`exponent`; 1 = independent)."""
        return float(max(int(n_comparisons), 1) ** self.exponent(fpir))

    def threshold_for_fpir(self, fpir: float, n_comparisons: int) -> float:
        """The threshold giving ``fpir`` for a probe compared with ``n_comparisons`` entries."""
        return self.threshold_at_fmr(per_comparison_fmr(fpir, self.effective_comparisons(n_comparisons, fpir)))

    def expected_fpir(self, threshold: float, n_comparisons: int) -> float:
        """The FPIR the model predicts at ``threshold`` for ``n_comparisons`` entries."""
        fmr = self.fmr_at(threshold)
        # the exponent depends on the FPIR being predicted: iterate to a fixed point
        fpir = fpir_from_fmr(fmr, max(int(n_comparisons), 1))
        for _ in range(20):
            fpir = fpir_from_fmr(fmr, self.effective_comparisons(n_comparisons, min(max(fpir, 1e-9), 0.5)))
        return fpir


def estimate_shift(model: ImpostorModel, best_scores: np.ndarray, n_comparisons: np.ndarray,
                   grid: np.ndarray | None = None) -> tuple[float, float]:
    """How much higher impostor scores run in the user's data than in the model's.

    ``best_scores[i]`` is the best score of an impostor probe compared with entries worth
    ``n_comparisons[i]`` independent comparisons (:meth:`ImpostorModel.effective_comparisons`).
    Under the model shifted by ``d`` its distribution is ``F(s) = (1 − FMR(s − d))^N``; returns the maximum-likelihood ``d`` on a grid and the
    log-likelihood gain over ``d = 0`` (twice it is the likelihood-ratio statistic).
    """
    s = np.asarray(best_scores, dtype=np.float64)
    n = np.asarray(n_comparisons, dtype=np.float64)
    if s.size == 0:
        return 0.0, 0.0
    grid = np.linspace(-0.3, 0.3, 121) if grid is None else np.asarray(grid, dtype=np.float64)
    eps = 2e-3

    def loglik(d: float) -> float:
        hi = np.clip(model.fmr_at_many(s + eps - d), 0.0, 1.0 - 1e-12)
        lo = np.clip(model.fmr_at_many(s - eps - d), 0.0, 1.0 - 1e-12)
        dens = (np.exp(n * np.log1p(-hi)) - np.exp(n * np.log1p(-lo))) / (2 * eps)
        return float(np.log(np.maximum(dens, 1e-300)).sum())

    ll = np.asarray([loglik(d) for d in grid])
    best = int(np.argmax(ll))
    return float(grid[best]), float(ll[best] - loglik(0.0))


def comparisons(aggregation: str, n_vectors: int, n_people: int) -> int:
    """How many chances a stranger has to be falsely matched: the vectors a ``max``
    gallery compares a probe with one by one, or the people a ``mean`` gallery scores."""
    return max(1, int(n_vectors if aggregation == "max" else n_people))


# ------------------------------------------------------------------ building a model


def impostor_scores(vectors: np.ndarray, labels: Sequence[str], block: int = 2048) -> np.ndarray:
    """Cosine similarities of every pair of unit vectors whose labels differ (float32)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    lab = np.asarray(labels)
    if x.ndim != 2 or len(lab) != len(x):
        raise ValueError(f"vectors {x.shape} and {len(lab)} labels do not match")
    _, code = np.unique(lab, return_inverse=True)
    out = []
    for i in range(0, len(x), block):
        s = x[i:i + block] @ x.T
        rows = np.arange(i, min(i + block, len(x)))
        keep = (np.arange(len(x))[None, :] > rows[:, None]) & (code[rows][:, None] != code[None, :])
        out.append(s[keep])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _fit_tail(exceed: np.ndarray) -> tuple[float, float]:
    """Generalised Pareto ``(xi, sigma)`` for exceedances over a threshold (MLE, bounded xi)."""
    exceed = np.asarray(exceed, dtype=np.float64)
    mean = float(exceed.mean())
    try:
        from scipy.stats import genpareto

        xi, _, sigma = genpareto.fit(exceed, floc=0.0)
        xi, sigma = float(xi), float(sigma)
        if not (math.isfinite(xi) and math.isfinite(sigma) and sigma > 0 and -0.5 <= xi <= 0.5):
            raise ValueError("fit outside the plausible range")
    except (ImportError, ValueError, RuntimeError, FloatingPointError):
        xi, sigma = 0.0, mean  # exponential tail
    return xi, sigma


def fit_impostor_model(scores: np.ndarray, embedder_id: str, n_people: int, n_images: int,
                       data: dict[str, Any] | None = None) -> ImpostorModel:
    """An :class:`ImpostorModel` from impostor pair scores (see :func:`impostor_scores`)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]  # descending
    n = s.size
    if n < 2 * TAIL_MIN_EXCEEDANCES:
        raise ValueError(f"{n} impostor pairs are too few for an impostor model "
                         f"(need at least {2 * TAIL_MIN_EXCEEDANCES})")
    if not np.isfinite(s).all():
        raise ValueError("impostor scores contain NaN or infinite values")
    k_tail = max(TAIL_MIN_EXCEEDANCES, int(round(TAIL_FMR * n)))
    u = float(s[k_tail])
    exceed = s[:k_tail] - u
    xi, sigma = _fit_tail(exceed[exceed > 0] if (exceed > 0).sum() >= 10 else exceed + 1e-9)
    p_u = k_tail / n
    tail = {"u": u, "p_u": p_u, "xi": xi, "sigma": sigma, "n_exceed": float(k_tail)}
    fmrs, thrs, emp = [], [], []
    probe = ImpostorModel(embedder_id, (1.0, 0.5), (0.0, 0.0), (False, False), tail, n_people, n_images, n)
    for f in FMR_GRID:
        allowed = int(math.floor(f * n + 1e-9))
        if allowed >= MIN_TAIL_PAIRS:
            # lowest threshold passing at most `allowed` pairs: just above the (allowed+1)-th highest
            t = float(np.nextafter(np.float32(s[allowed]), np.float32(np.inf)))
            fmrs.append(f)
            thrs.append(t)
            emp.append(True)
        else:
            fmrs.append(f)
            thrs.append(probe._tail_threshold(f))
            emp.append(False)
    for i in range(1, len(thrs)):  # the tail continues the empirical part monotonically
        thrs[i] = max(thrs[i], thrs[i - 1])
    return ImpostorModel(
        embedder_id, tuple(fmrs), tuple(min(t, 1.0) for t in thrs), tuple(emp), tail,
        int(n_people), int(n_images), int(n), dict(data or {}),
        _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat())


#: Gallery sizes simulated to fit the comparisons exponent, and repetitions of each.
EXPONENT_SIZES = (3, 10, 30, 100, 300)
EXPONENT_REPS = 20
EXPONENT_FPIRS = (0.1, 0.01)


def fit_comparisons_exponent(model: ImpostorModel, vectors: np.ndarray, labels: Sequence[str],
                             seed: int = 0) -> tuple[tuple[tuple[float, float], ...], dict[str, Any]]:
    """Fit ``a`` in "N comparisons are worth ``N^a`` independent ones" on development people.

    Galleries of N people (one random photo each) are probed with every photo of the
    other people; at FPIR 10% and at 1% the empirical threshold's per-comparison FMR
    gives the effective number ``N_eff = log(1 − FPIR) / log(1 − FMR)``, and ``a`` (one
    per FPIR) is the least-squares slope of ``log N_eff`` on ``log N`` (clipped to
    [0.5, 1]). Embeddings that share a common direction make a stranger's scores against
    one gallery correlated, so their ``a`` is below 1.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    lab = np.asarray(labels)
    people, code = np.unique(lab, return_inverse=True)
    members = [np.flatnonzero(code == i) for i in range(len(people))]
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    pts: dict[float, list[tuple[float, float]]] = {f: [] for f in EXPONENT_FPIRS}
    for n in EXPONENT_SIZES:
        if n > len(people) // 2:
            break
        best = []
        for _ in range(EXPONENT_REPS):
            chosen = rng.choice(len(people), n, replace=False)
            gal = x[[rng.choice(members[c]) for c in chosen]]
            probes = x[~np.isin(code, chosen)]
            best.append((probes @ gal.T).max(axis=1))
        b = np.concatenate(best)
        for f in EXPONENT_FPIRS:
            if b.size * f < 50:
                continue
            t = float(np.quantile(b, 1.0 - f))
            fmr = model.fmr_at(t)
            n_eff = math.log1p(-f) / math.log1p(-min(max(fmr, 1e-12), 1 - 1e-12))
            rows.append({"n": n, "fpir": f, "threshold": round(t, 6), "n_eff": round(n_eff, 3)})
            pts[f].append((math.log(n), math.log(max(n_eff, 1e-6))))
    exps = []
    for f in EXPONENT_FPIRS:
        if pts[f]:
            a = np.asarray(pts[f])
            exps.append((f, float(np.clip((a[:, 0] @ a[:, 1]) / (a[:, 0] @ a[:, 0]), 0.5, 1.0))))
    if not exps:
        return ((0.1, 1.0),), {"note": "too few development people to fit; comparisons taken as independent"}
    return tuple(exps), {"sizes": rows, "repetitions": EXPONENT_REPS, "seed": seed,
                         "method": "galleries of N people (one photo each) from the development people"}


def compute_impostor_model(vectors: np.ndarray, labels: Sequence[str], embedder_id: str,
                           data: dict[str, Any] | None = None, cohort: bool = True) -> ImpostorModel:
    """The impostor model of an embedder from unit embeddings of labelled development
    people it was not trained on: every pair of photos of two different people, the
    comparisons exponent fitted on simulated galleries of those people and, with
    ``cohort``, those people as the cohort of :mod:`facepipe.gallery.cohort`."""
    from dataclasses import replace

    lab = np.asarray(labels)
    scores = impostor_scores(vectors, lab)
    model = fit_impostor_model(scores, embedder_id, len(np.unique(lab)), len(lab), data)
    exponents, fit = fit_comparisons_exponent(model, vectors, lab)
    return replace(model, exponents=exponents, exponent_fit=fit,
                   cohort=build_cohort(vectors, lab) if cohort else None)


# ------------------------------------------------------------------ finding an embedder's model


_CACHE: dict[tuple[str, int, int], Any] = {}


def impostor_model_for(embedder: Any) -> ImpostorModel | None:
    """The impostor model shipped with ``embedder``, or ``None`` when it has none.

    Looks at the embedder's ``calibration`` attribute, then at the ``calibration``
    entry of its checkpoint file (``embedder.source``). A record made for another
    embedder id (other weights, or flip TTA switched) is ignored.
    """
    import logging
    import os

    log = logging.getLogger(__name__)
    rec = getattr(embedder, "calibration", None)
    source = getattr(embedder, "source", None)
    if rec is None and source and os.path.isfile(source):
        st = os.stat(source)
        key = (os.path.abspath(source), st.st_mtime_ns, st.st_size)
        if key not in _CACHE:
            import torch

            try:
                ckpt = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - the loader raises arbitrary types on garbage
                log.warning("cannot read the calibration record of %s: %s", source, exc)
                ckpt = {}
            _CACHE[key] = ckpt.get("calibration") if isinstance(ckpt, dict) else None
        rec = _CACHE[key]
    if rec is None:
        return None
    try:
        model = ImpostorModel.from_dict(rec)
    except ValueError as exc:
        log.warning("ignoring the calibration record of %s: %s", source or embedder, exc)
        return None
    if model.embedder_id != embedder.embedder_id:
        log.warning("ignoring a calibration record made for %s, not %s", model.embedder_id,
                    embedder.embedder_id)
        return None
    return model
