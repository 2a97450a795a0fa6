"""Open-set decisions: the per-probe answer and choosing a threshold at a target FPIR.

Each person's score for a probe aggregates the similarities to that person's enrolled
vectors (``max``, or the ``mean`` of their top ``n``); the best person is returned when
the score reaches the gallery's threshold, else ``unknown``. :func:`calibrate_threshold`
chooses that threshold from impostor scores (probes of people who are not enrolled) at a
target false-positive identification rate (FPIR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from facepipe import defaults
from facepipe.gallery.names import UNKNOWN
from facepipe.types import Match

AGGREGATIONS = ("max", "mean")
#: Threshold of a gallery whose embedder ships no impostor model and that was never
#: calibrated (cosine similarity; :data:`facepipe.defaults.THRESHOLD`).
DEFAULT_THRESHOLD = defaults.THRESHOLD
#: False-positive identification rate a new gallery aims at
#: (:data:`facepipe.defaults.TARGET_FPIR`).
DEFAULT_TARGET_FPIR = defaults.TARGET_FPIR
#: How a gallery's threshold is set (see :attr:`facepipe.gallery.Gallery.mode`).
MODES = ("auto", "calibrated", "manual", "default")


@dataclass(frozen=True)
class Calibration:
    """A threshold chosen at a target FPIR, with what it achieved on the calibration data."""

    threshold: float
    target_fpir: float
    fpir: float
    dir: float | None
    n_impostor: int
    n_genuine: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "threshold": self.threshold, "target_fpir": self.target_fpir, "fpir": self.fpir,
            "dir": self.dir, "n_impostor": self.n_impostor, "n_genuine": self.n_genuine,
        }


def calibrate_threshold(
    impostor_scores: Sequence[float] | np.ndarray,
    target_fpir: float,
    genuine_scores: Sequence[float] | np.ndarray | None = None,
    genuine_correct: Sequence[bool] | np.ndarray | None = None,
) -> Calibration:
    """The lowest threshold whose FPIR on ``impostor_scores`` is at most ``target_fpir``.

    ``impostor_scores`` are the best gallery scores of probes of people who are *not*
    enrolled (a probe is a false positive when its score reaches the threshold).
    With ``genuine_scores`` (best score of probes of enrolled people) and
    ``genuine_correct`` (whether the best identity was the right one), the detection
    and identification rate DIR = P(correct and score >= threshold) is reported too.
    """
    imp = np.asarray(impostor_scores, dtype=np.float64).ravel()
    if not 0.0 <= target_fpir < 1.0:
        raise ValueError(f"target FPIR must be in [0, 1), got {target_fpir}")
    if imp.size == 0:
        raise ValueError("calibration needs at least one impostor score")
    if not np.isfinite(imp).all():
        raise ValueError("impostor scores contain NaN or infinite values")
    desc = np.sort(imp)[::-1]
    allowed = int(math.floor(target_fpir * imp.size + 1e-9))
    if allowed >= imp.size:
        threshold = float(np.nextafter(desc[-1], -np.inf))
    else:
        # strictly above the (allowed+1)-th highest impostor score: at most `allowed` pass
        threshold = float(np.nextafter(np.float32(desc[allowed]), np.float32(np.inf)))
    fpir = float((imp >= threshold).mean())
    dir_rate: float | None = None
    n_gen = 0
    if genuine_scores is not None:
        gen = np.asarray(genuine_scores, dtype=np.float64).ravel()
        n_gen = int(gen.size)
        correct = (np.ones_like(gen, dtype=bool) if genuine_correct is None
                   else np.asarray(genuine_correct, dtype=bool).ravel())
        if correct.shape != gen.shape:
            raise ValueError("genuine_scores and genuine_correct differ in length")
        dir_rate = float(((gen >= threshold) & correct).mean()) if n_gen else None
    return Calibration(threshold, float(target_fpir), fpir, dir_rate, int(imp.size), n_gen)


def dir_fpir_curve(
    genuine_scores: np.ndarray, genuine_correct: np.ndarray, impostor_scores: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DIR and FPIR at every distinct threshold: returns ``(thresholds, fpir, dir)``."""
    gen = np.asarray(genuine_scores, dtype=np.float64)
    ok = np.asarray(genuine_correct, dtype=bool)
    imp = np.sort(np.asarray(impostor_scores, dtype=np.float64))
    thr = np.unique(np.concatenate([gen, imp]))[::-1]
    fpir = 1.0 - np.searchsorted(imp, thr, side="left") / max(imp.size, 1)
    gen_ok = np.sort(gen[ok])
    dir_ = (gen_ok.size - np.searchsorted(gen_ok, thr, side="left")) / max(gen.size, 1)
    return thr, fpir, dir_


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Decision:
    """The open-set answer for one probe: ``name`` is a person or ``"unknown"``.

    ``score`` is the best person's aggregated similarity (also when rejected) or
    ``nan`` for an empty gallery; ``candidates`` are the top-k people, best first.
    """

    name: str
    score: float
    candidates: tuple[Match, ...] = field(default_factory=tuple)

    @property
    def known(self) -> bool:
        """Whether the probe was accepted as an enrolled person."""
        return self.name != UNKNOWN
