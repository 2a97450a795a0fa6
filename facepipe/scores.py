"""What users see of an identification: distance, tolerance, margin and the ambiguity rule.

The gallery ranks enrolled people by cosine similarity ``s`` (higher = more alike), less
the enrolled face's cohort penalty when the gallery has a cohort (a higher bar for faces
in crowded parts of face space; :mod:`facepipe.gallery.cohort`). Users
see the **distance** ``d = 1 − s`` (lower = more alike) and the **tolerance**
``1 − threshold``: a face is named when ``d <= tolerance`` (face_recognition's rule,
on facepipe's scale; see :mod:`facepipe.defaults`).

The **margin** is the best person's similarity minus the runner-up person's,
``s1 − s2``, which is also ``d2 − d1``: the same number in both units. With a
*minimum margin* ``m > 0`` (``--min-margin``), a face whose best person passes the
threshold but leads the runner-up by less than ``m`` is called ``unknown`` and flagged
``ambiguous``: a near-tie between two enrolled people is not evidence for either.
With one enrolled person there is no runner-up: the margin is ``None`` and the rule
does not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from facepipe.defaults import distance_to_similarity, similarity_to_distance
from facepipe.types import Match

UNKNOWN = "unknown"

__all__ = ["UNKNOWN", "Verdict", "decide", "similarity_to_distance", "distance_to_similarity"]


def _r(x: float | None, nd: int = 5) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


@dataclass(frozen=True)
class Verdict:
    """The decision for one face, in the units users see.

    ``name`` is a person or ``"unknown"``; ``similarity`` the best person's (``None``
    for an empty gallery); ``margin`` its lead over the runner-up (``None`` without
    one); ``ambiguous`` is true when only the margin rule made the face unknown.
    """

    name: str
    similarity: float | None
    margin: float | None
    threshold: float
    min_margin: float
    ambiguous: bool = False
    candidates: tuple[Match, ...] = field(default_factory=tuple)

    @property
    def known(self) -> bool:
        """Whether the face was named."""
        return self.name != UNKNOWN

    @property
    def distance(self) -> float | None:
        """``1 − similarity`` (``None`` for an empty gallery)."""
        return None if self.similarity is None else similarity_to_distance(self.similarity)

    @property
    def tolerance(self) -> float:
        """The threshold in distance units: ``1 − threshold``."""
        return similarity_to_distance(self.threshold)

    @property
    def best(self) -> str | None:
        """The best-ranked person, whether accepted or not (``None`` for an empty gallery)."""
        return self.candidates[0].name if self.candidates else None

    def to_dict(self, top_k: int | None = None) -> dict[str, Any]:
        """JSON fields: name, best, similarity, distance, penalty (the best person's cohort
        penalty), threshold, tolerance, margin, min_margin, ambiguous and the top-k
        candidates (each with similarity, distance and penalty)."""
        cands = self.candidates if top_k is None else self.candidates[:top_k]
        return {
            "name": self.name,
            "best": self.best,
            "similarity": _r(self.similarity),
            "distance": _r(self.distance),
            "penalty": _r(self.candidates[0].penalty) if self.candidates else None,
            "threshold": _r(self.threshold),
            "tolerance": _r(self.tolerance),
            "margin": _r(self.margin),
            "min_margin": _r(self.min_margin),
            "ambiguous": self.ambiguous,
            "candidates": [{"name": m.name, "similarity": _r(m.score),
                            "distance": _r(similarity_to_distance(m.score)), "penalty": _r(m.penalty)}
                           for m in cands],
        }


def decide(candidates: Sequence[Match], threshold: float, min_margin: float = 0.0) -> Verdict:
    """The open-set decision from a face's ranked candidates (best first, distinct people).

    Named when the best similarity reaches ``threshold`` and, when there is a runner-up,
    leads it by at least ``min_margin``; otherwise ``unknown``.
    """
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if not math.isfinite(min_margin) or min_margin < 0:
        raise ValueError(f"min_margin must be a finite number >= 0, got {min_margin!r}")
    cands = tuple(candidates)
    if not cands:
        return Verdict(UNKNOWN, None, None, threshold, min_margin, False, ())
    best = cands[0]
    margin = best.score - cands[1].score if len(cands) > 1 else None
    passes = best.score >= threshold
    clear = margin is None or margin >= min_margin
    name = best.name if passes and clear else UNKNOWN
    return Verdict(name, best.score, margin, threshold, min_margin, passes and not clear, cands)


def resolve_threshold(gallery_threshold: float, tolerance: float | None = None,
                      threshold: float | None = None) -> float:
    """The similarity threshold in force: from ``tolerance`` (distance), else ``threshold``
    (similarity), else the gallery's calibrated one."""
    if tolerance is not None:
        return distance_to_similarity(tolerance)
    if threshold is not None:
        return float(threshold)
    return float(gallery_threshold)
