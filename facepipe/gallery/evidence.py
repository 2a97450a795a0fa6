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
    from facepipe.gallery.openset import ImpostorModel


@dataclass(frozen=True)
class LeaveOneOut:
    """Scores of enrolled vectors used as probes (see the module docstring)."""

    genuine_scores: np.ndarray    # own person's score, probes whose person has >= 2 vectors
    genuine_correct: np.ndarray   # own person scored strictly above every other person
    impostor_scores: np.ndarray   # best other person's score, every probe
    impostor_people: np.ndarray   # the probe's person index, per impostor score
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
                  max_probes: int = 2000, seed: int = 0, chunk: int = 64) -> LeaveOneOut:
    """Leave-one-out genuine and leave-one-person-out impostor scores of enrolled vectors.

    ``vectors`` are unit rows, ``person`` their person index (0..P-1). Needs at least two
    people for impostor scores; genuine scores need people with two or more vectors.
    """
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    person = np.asarray(person, dtype=np.int64)
    n = len(v)
    empty = np.zeros(0)
    if n == 0:
        return LeaveOneOut(empty, np.zeros(0, bool), empty, np.zeros(0, np.int64), 0)
    order = np.argsort(person, kind="stable")
    uniq, starts, counts = np.unique(person[order], return_index=True, return_counts=True)
    n_two = int((counts >= 2).sum())
    pos = np.searchsorted(uniq, person)  # dense person position
    rng = np.random.default_rng(seed)
    probes = np.arange(n) if n <= max_probes else np.sort(rng.choice(n, max_probes, replace=False))
    gen_s, gen_ok, imp_s, imp_p = [], [], [], []
    for a in range(0, len(probes), chunk):
        idx = probes[a:a + chunk]
        sims = v[idx] @ v.T
        sims[np.arange(len(idx)), idx] = -np.inf  # leave the probe itself out
        for r, i in enumerate(idx):
            per = _person_scores(sims[r], order, starts, counts, method, agg_n)
            own = per[pos[i]]
            per[pos[i]] = -np.inf
            best_other = per.max() if len(per) > 1 else -np.inf
            if np.isfinite(best_other):
                imp_s.append(best_other)
                imp_p.append(pos[i])
            if counts[pos[i]] >= 2:
                gen_s.append(own)
                gen_ok.append(bool(own > best_other))
    return LeaveOneOut(np.asarray(gen_s, dtype=np.float64), np.asarray(gen_ok, dtype=bool),
                       np.asarray(imp_s, dtype=np.float64), np.asarray(imp_p, dtype=np.int64), n_two)


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold ``gallery calibrate`` stores, the rule that chose it and its inputs."""

    threshold: float
    rule: str
    model_threshold: float | None
    data_threshold: float | None
    n_impostor: int
    warnings: tuple[str, ...]


def choose_threshold(target_fpir: float, n_comparisons: int, model: "ImpostorModel | None",
                     impostor: np.ndarray) -> ThresholdChoice:
    """Combine the embedder's impostor model with the user's own impostor scores.

    With ``R = 1 / target_fpir`` and ``n`` impostor scores from the user's data:

    - ``n >= 10 R``: the user's scores alone resolve the target well: their threshold;
    - ``R <= n < 10 R``: the stricter (higher) of the model's and the data's thresholds;
    - ``n < R``: the data cannot resolve the target: the model's threshold (without a
      model, the data's, which then rejects every impostor seen, with a warning).
    """
    from facepipe.gallery.decision import calibrate_threshold

    imp = np.asarray(impostor, dtype=np.float64)
    n = int(imp.size)
    need = 1.0 / target_fpir
    t_model = None if model is None else float(model.threshold_for_fpir(target_fpir, n_comparisons))
    t_data = float(calibrate_threshold(imp, target_fpir).threshold) if n else None
    warnings: list[str] = []
    if n and n >= 10 * need:
        return ThresholdChoice(t_data, "your impostor probes", t_model, t_data, n, ())  # type: ignore[arg-type]
    if n and n >= need and t_model is not None:
        t = max(t_model, t_data)  # type: ignore[arg-type]
        rule = "stricter of the impostor model and your impostor probes"
        return ThresholdChoice(t, rule, t_model, t_data, n, ())
    if t_model is not None:
        if n:
            warnings.append(f"{n} impostor probes cannot resolve FPIR {target_fpir:g} (at least "
                            f"{int(np.ceil(need))} needed); the threshold comes from the embedder's impostor model")
        return ThresholdChoice(t_model, "impostor model", t_model, t_data, n, tuple(warnings))
    if n:
        if n < need:
            warnings.append(f"only {n} impostor probes and no impostor model: FPIR {target_fpir:g} cannot be "
                            f"resolved, the threshold merely rejects every impostor seen (give at least "
                            f"{int(np.ceil(need))} photos of people who are not enrolled with --impostors)")
        return ThresholdChoice(t_data, "your impostor probes", None, t_data, n, tuple(warnings))  # type: ignore[arg-type]
    raise ValueError("no impostor evidence: the embedder ships no impostor model, the gallery has fewer than "
                     "two people and no --impostors photos were given")
