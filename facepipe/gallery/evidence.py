"""Calibration evidence a user already has: the enrolled vectors themselves.

Leave one out, each enrolled vector ``v`` of person ``P`` is a probe against the
gallery without ``v``:

- **genuine** (``P`` has another vector): ``P``'s aggregated score over their *other*
  vectors, and whether ``P`` beats every other person, give the detection-and-
  identification rate (DIR) a threshold would keep for photos like the enrolled ones;
- **impostor** (leave-one-*person*-out): the best score among the *other* people is
  what a stranger who looks like ``v`` would get, so these scores measure the false-
  positive identification rate (FPIR) in the user's own domain (lighting, cameras,
  ages) with a gallery one person smaller.

Scores use the gallery's aggregation exactly (``max``, or the mean of a person's top
``n`` vectors). Probes are a seeded sample of at most ``max_probes`` vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from facepipe.gallery.core import Gallery
    from facepipe.gallery.openset import ImpostorModel


@dataclass(frozen=True)
class LeaveOneOut:
    """Scores of enrolled vectors used as probes (see the module docstring)."""

    genuine_scores: np.ndarray    # own person's score, probes whose person has >= 2 vectors
    genuine_correct: np.ndarray   # own person scored strictly above every other person
    impostor_scores: np.ndarray   # best other person's score, every probe
    impostor_people: np.ndarray   # the probe's person index, per impostor score
    impostor_own: np.ndarray      # how many vectors the probe's person has (left out with it)
    n_people_with_two: int        # people with at least two vectors


def _person_scores(row: np.ndarray, order: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                   method: str, agg_n: int) -> np.ndarray:
    """Aggregated score per person for one probe's similarities (``-inf`` for no vector)."""
    s = row[order]  # grouped by person
    if method == "max":
        return np.maximum.reduceat(s, starts).astype(np.float64)
    group = np.repeat(np.arange(len(starts)), counts)
    by = np.lexsort((-s, group))  # each person's scores, best first
    s2, g2 = s[by].astype(np.float64), group[by]
    rank = np.arange(len(s2)) - starts[g2]
    keep = (rank < agg_n) & np.isfinite(s2)
    sums = np.bincount(g2[keep], weights=s2[keep], minlength=len(starts))
    used = np.bincount(g2[keep], minlength=len(starts))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(used > 0, sums / np.maximum(used, 1), -np.inf)


def leave_one_out(vectors: np.ndarray, person: np.ndarray, method: str = "max", agg_n: int = 3,
                  max_probes: int = 2000, seed: int = 0, chunk: int = 64,
                  penalties: np.ndarray | None = None) -> LeaveOneOut:
    """Leave-one-out genuine and leave-one-person-out impostor scores of enrolled vectors.

    ``vectors`` are unit rows, ``person`` their person index (0..P-1). Needs at least two
    people for impostor scores; genuine scores need people with two or more vectors.
    ``penalties`` (per vector, the gallery's cohort penalties) are subtracted from the
    similarity to each vector, as :meth:`Gallery.rank` scores.
    """
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    person = np.asarray(person, dtype=np.int64)
    n = len(v)
    empty = np.zeros(0)
    if n == 0:
        return LeaveOneOut(empty, np.zeros(0, bool), empty, np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    order = np.argsort(person, kind="stable")
    uniq, starts, counts = np.unique(person[order], return_index=True, return_counts=True)
    n_two = int((counts >= 2).sum())
    pos = np.searchsorted(uniq, person)  # dense person position
    rng = np.random.default_rng(seed)
    probes = np.arange(n) if n <= max_probes else np.sort(rng.choice(n, max_probes, replace=False))
    gen_s, gen_ok, imp_s, imp_p, imp_own = [], [], [], [], []
    for a in range(0, len(probes), chunk):
        idx = probes[a:a + chunk]
        sims = v[idx] @ v.T
        if penalties is not None:
            sims -= np.asarray(penalties, dtype=np.float32)[None, :]
        sims[np.arange(len(idx)), idx] = -np.inf  # leave the probe itself out
        for r, i in enumerate(idx):
            per = _person_scores(sims[r], order, starts, counts, method, agg_n)
            own = per[pos[i]]
            per[pos[i]] = -np.inf
            best_other = per.max() if len(per) > 1 else -np.inf
            if np.isfinite(best_other):
                imp_s.append(best_other)
                imp_p.append(pos[i])
                imp_own.append(counts[pos[i]])
            if counts[pos[i]] >= 2:
                gen_s.append(own)
                gen_ok.append(bool(own > best_other))
    return LeaveOneOut(np.asarray(gen_s, dtype=np.float64), np.asarray(gen_ok, dtype=bool),
                       np.asarray(imp_s, dtype=np.float64), np.asarray(imp_p, dtype=np.int64),
                       np.asarray(imp_own, dtype=np.int64), n_two)


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold ``gallery calibrate`` stores, the rule that chose it and its inputs."""

    threshold: float
    rule: str
    model_threshold: float | None
    data_threshold: float | None
    shift: float | None
    n_impostor: int
    warnings: tuple[str, ...]


#: Likelihood-ratio statistic (chi-square, 1 d.o.f., p = 0.01) above which the user's
#: impostor scores are taken to run higher than the impostor model's ...
SHIFT_SIGNIFICANCE = 6.63
#: ... given at least this many of them.
SHIFT_MIN_PROBES = 10


def choose_threshold(target_fpir: float, n_comparisons: int, model: "ImpostorModel | None",
                     impostor: np.ndarray, impostor_n: np.ndarray | None = None) -> ThresholdChoice:
    """Combine the embedder's impostor model with the user's own impostor scores.

    With ``R = 1 / target_fpir`` and ``n`` impostor scores from the user's data
    (``impostor_n[i]``: how many entries score ``i`` was the best of):

    - ``n >= 10 R``: the user's scores alone resolve the target well: their threshold;
    - otherwise the model's threshold, first raised by the shift of the user's scores
      over the model's (:func:`~facepipe.gallery.openset.estimate_shift`) when they run
      significantly higher (a domain the development data did not cover: same lighting,
      same camera, relatives), never lowered on thin evidence;
    - ``R <= n < 10 R``: the stricter of that and the data's own threshold;
    - no model: the data's threshold (with fewer than ``R`` scores it merely rejects
      every impostor seen, with a warning).
    """
    from facepipe.gallery.decision import calibrate_threshold
    from facepipe.gallery.openset import estimate_shift

    imp = np.asarray(impostor, dtype=np.float64)
    n = int(imp.size)
    need = 1.0 / target_fpir
    t_model = None if model is None else float(model.threshold_for_fpir(target_fpir, n_comparisons))
    t_data = float(calibrate_threshold(imp, target_fpir).threshold) if n else None
    if n and n >= 10 * need:
        return ThresholdChoice(t_data, "your impostor probes", t_model, t_data, None, n, ())  # type: ignore[arg-type]
    warnings: list[str] = []
    if t_model is not None:
        t, rule, shift = t_model, "impostor model", None
        if n >= SHIFT_MIN_PROBES and impostor_n is not None:
            # The leave-one-out best scores fill the whole best-of-N distribution (half lie
            # above its median), where N correlated comparisons act about as N independent
            # ones; the comparisons exponent fitted at the target FPIR (~0.7 at 1%) describes
            # only the far tail. With it the model predicts too low a bulk and reads a shift
            # into data that has none (LFW galleries: +0.013..+0.015 in 16-20 of 20, DIR
            # 0.89 -> 0.54 at 30 people x 3 photos; bench_openset_defaults.py, part 3).
            n_eff = np.maximum(np.asarray(impostor_n, dtype=np.float64), 1.0)
            d, gain = estimate_shift(model, imp, n_eff)  # type: ignore[arg-type]
            if d > 0 and 2 * gain > SHIFT_SIGNIFICANCE:
                shift = d
                t = min(t_model + d, 1.0)
                rule = "impostor model, shifted up by your photos' impostor scores"
                warnings.append(f"your photos of different people look more alike than the development data "
                                f"(impostor scores {d:+.3f} higher); the threshold is raised accordingly")
        if n >= need:
            t = max(t, t_data)  # type: ignore[arg-type]
            rule = f"stricter of the {rule} and your impostor probes"
        elif n:
            warnings.append(f"{n} impostor probes cannot resolve FPIR {target_fpir:g} on their own (at least "
                            f"{int(np.ceil(need))} needed); the threshold rests on the embedder's impostor model")
        return ThresholdChoice(t, rule, t_model, t_data, shift, n, tuple(warnings))
    if n:
        if n < need:
            warnings.append(f"only {n} impostor probes and no impostor model: FPIR {target_fpir:g} cannot be "
                            f"resolved, the threshold merely rejects every impostor seen (give at least "
                            f"{int(np.ceil(need))} photos of people who are not enrolled with --impostors)")
        return ThresholdChoice(t_data, "your impostor probes", None, t_data, None, n, tuple(warnings))  # type: ignore[arg-type]
    raise ValueError("no impostor evidence: the embedder ships no impostor model, the gallery has fewer than "
                     "two people and no --impostors photos were given")


@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate_gallery` found: the threshold, a JSON record and warnings."""

    threshold: float
    record: dict
    warnings: tuple[str, ...]


def calibrate_gallery(gallery: "Gallery", target_fpir: float, model: "ImpostorModel | None",
                      impostor: np.ndarray | None = None, genuine: np.ndarray | None = None,
                      genuine_correct: np.ndarray | None = None, max_probes: int = 2000) -> CalibrationResult:
    """The threshold for ``target_fpir`` from all the evidence: the enrolled vectors left out
    one at a time, the embedder's impostor model, and optional extra impostor scores
    (strangers' best scores against the whole gallery) and genuine scores (with whether
    the right person ranked first). Warns when the evidence is too thin to trust."""
    method, agg_n = gallery.aggregation
    loo = leave_one_out(gallery.vectors(), gallery.person_index(), method, agg_n, max_probes,
                        penalties=gallery.penalties() if gallery.cohort is not None else None)
    n_all = gallery.n_comparisons
    extra_imp = np.zeros(0) if impostor is None else np.asarray(impostor, dtype=np.float64)
    if method == "max":
        loo_n = np.maximum(n_all - loo.impostor_own, 1)
    else:
        loo_n = np.full(loo.impostor_scores.size, max(n_all - 1, 1))
    imp = np.concatenate([loo.impostor_scores, extra_imp])
    imp_n = np.concatenate([loo_n, np.full(extra_imp.size, n_all)])
    gen = np.concatenate([loo.genuine_scores, np.zeros(0) if genuine is None else np.asarray(genuine, float)])
    ok = np.concatenate([loo.genuine_correct,
                         np.zeros(0, bool) if genuine_correct is None else np.asarray(genuine_correct, bool)])
    choice = choose_threshold(target_fpir, n_all, model, imp, imp_n)
    warnings = list(choice.warnings)
    t = choice.threshold
    n_gen = int(gen.size)
    dir_rate = float(((gen >= t) & ok).mean()) if n_gen else None
    observed = float((imp >= t).mean()) if imp.size else None
    if model is None:
        warnings.append(f"the embedder {gallery.embedder_id} ships no impostor model: the threshold rests on "
                        f"your {imp.size} impostor probes alone")
    if n_gen == 0:
        warnings.append("no genuine evidence: no enrolled person has two or more photos and no --genuine "
                        "photos were given, so DIR (how many of your people are still recognised) cannot be "
                        "estimated; enrol 2-3 photos per person")
    elif n_gen < 20:
        warnings.append(f"only {n_gen} genuine probes: the DIR estimate is rough (enrol 2-3 photos per person)")
    if dir_rate is not None and n_gen >= 5 and dir_rate < 0.5:
        warnings.append(f"at this threshold only {dir_rate:.0%} of your enrolled people's other photos are "
                        "recognised: the embedder separates your people poorly at this FPIR; enrol more or "
                        "better photos, or accept a larger --fpir")
    if imp.size >= 20:
        from scipy.stats import binom

        k = int((imp >= t).sum())
        if k and binom.sf(k - 1, imp.size, target_fpir) < 0.01:
            warnings.append(f"at this threshold {k} of your {imp.size} impostor probes ({observed:.1%}) are "
                            f"taken for someone, well above the target {target_fpir:g}: your photos look more "
                            "alike than the development data; give more photos of strangers with --impostors "
                            "or choose a smaller --fpir")
    record = {
        "method": "fpir", "rule": choice.rule, "threshold": t, "tolerance": 1.0 - t, "target_fpir": target_fpir,
        "expected_fpir": None if model is None else float(model.expected_fpir(t, n_all)),
        "observed_fpir": observed, "dir": dir_rate, "rank1": float(ok.mean()) if n_gen else None,
        "model_threshold": choice.model_threshold, "data_threshold": choice.data_threshold,
        "domain_shift": choice.shift, "n_impostor": int(imp.size), "n_genuine": n_gen,
        "leave_one_out": {"impostor_probes": int(loo.impostor_scores.size),
                          "genuine_probes": int(loo.genuine_scores.size),
                          "people_with_two_or_more_photos": loo.n_people_with_two},
        "impostor_model": None if model is None else {"people": model.n_people, "pairs": model.n_pairs},
        "n_comparisons": n_all, "aggregation": method, "aggregation_n": agg_n,
        "embedder_id": gallery.embedder_id,
    }
    return CalibrationResult(t, record, tuple(warnings))
