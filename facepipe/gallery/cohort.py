"""Cohort penalties: a higher bar for enrolled faces that sit in a crowded part of face space.

One threshold for every enrolled person assumes every person is as easy to confuse
as the typical development person. Some are not: a face whose nearest *other*
people (in the embedder's space) are unusually close draws false matches from
strangers far more often than the impostor model predicts (the Yale faces: three
subjects collect most false identifications, for dlib's own network too; see
``docs/gallery.md``). Speaker verification meets the same problem with **cohort
score normalisation** (adaptive S-norm: a score is judged against the top-K
scores of the enrolled model with a cohort of impostors); this module applies
the idea to the gallery's threshold.

The **cohort** is a set of development people the embedder was not trained on
(the people of its impostor model), stored with the impostor model. For an
enrolled vector ``v`` its **crowding** is the mean, over the ``k`` most similar
cohort people after the ``skip`` most similar (a look-alike or the person
themself), of ``v``'s best similarity to each person's photos. The **reference**
is the median crowding of the cohort's own photos (each against the other
people). The vector's **penalty** is ``max(0, crowding − reference)``; the
gallery compares a probe with it by ``similarity − penalty``. Typical and
isolated faces keep the model's threshold (penalty 0); crowded ones need a
closer match. Since scores only go down, the impostor model's FPIR at a
threshold becomes an upper bound.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

#: Format tag of the cohort record (inside the impostor model record).
COHORT_FORMAT = "facepipe-cohort/1"
#: Cohort people averaged for a vector's crowding, after skipping the most similar.
DEFAULT_K = 10
DEFAULT_SKIP = 1
#: Vectors scored against the cohort per matrix product (bounds memory).
BLOCK = 8192


def _encode(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode("ascii")


def _decode(s: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    raw = base64.b64decode(s.encode("ascii"), validate=True)
    a = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    if a.size != int(np.prod(shape)):
        raise ValueError(f"cohort array holds {a.size} values, expected {int(np.prod(shape))}")
    return a.reshape(shape).astype(np.float32 if dtype.startswith("f") else np.int64)


@dataclass(frozen=True)
class Cohort:
    """Development people's unit vectors (grouped by person) and the crowding rule's settings.

    ``vectors`` are sorted by person; ``starts[i]`` is where person ``i``'s rows begin.
    """

    vectors: np.ndarray
    starts: np.ndarray
    k: int
    skip: int
    reference: float

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the vectors and settings: which cohort stored penalties came from."""
        h = hashlib.sha256(np.ascontiguousarray(self.vectors, dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(self.starts, dtype="<i8").tobytes())
        h.update(f"{self.k},{self.skip},{self.reference!r}".encode())
        return h.hexdigest()[:16]

    @property
    def n_people(self) -> int:
        """Cohort people."""
        return int(self.starts.size)

    def crowding(self, v: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
        """Mean best similarity of each row of ``v`` to its ``k`` most similar cohort people
        after the ``skip`` most similar; ``own[i]`` (a cohort person index, or −1) is left
        out for row ``i`` (used to score the cohort's own photos)."""
        v = np.ascontiguousarray(v, dtype=np.float32)
        out = np.empty(v.shape[0], np.float64)
        lo, hi = self.n_people - self.k - self.skip, self.n_people - self.skip
        for i in range(0, v.shape[0], BLOCK):
            per_person = np.maximum.reduceat(v[i:i + BLOCK] @ self.vectors.T, self.starts, axis=1)
            if own is not None:
                o = np.asarray(own[i:i + BLOCK], dtype=np.int64)
                rows = np.flatnonzero(o >= 0)
                per_person[rows, o[rows]] = -np.inf  # sorts first: out of the top window
            out[i:i + BLOCK] = np.partition(per_person, (lo, hi - 1), axis=1)[:, lo:hi].mean(axis=1)
        return out

    def penalties(self, v: np.ndarray) -> np.ndarray:
        """``max(0, crowding − reference)`` for each row of ``v`` (float32, ≥ 0)."""
        if len(v) == 0:
            return np.zeros(0, np.float32)
        return np.maximum(self.crowding(v) - self.reference, 0.0).astype(np.float32)

    # -------------------------------------------------------------- record

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe record: settings, then the vectors (float16) and person sizes (base64)."""
        sizes = np.diff(np.append(self.starts, self.vectors.shape[0]))
        return {
            "format": COHORT_FORMAT, "k": int(self.k), "skip": int(self.skip),
            "reference": float(self.reference),
            "rule": "penalty = max(0, crowding - reference); crowding = mean best similarity to the k most "
                    "similar cohort people after the skip most similar",
            "people": self.n_people, "photos": int(self.vectors.shape[0]), "dim": int(self.vectors.shape[1]),
            "vectors_f16": _encode(self.vectors, "f2"), "sizes_u16": _encode(sizes, "u2"),
        }

    @classmethod
    def from_dict(cls, rec: Any) -> "Cohort":
        """Parse and validate a record; raises ``ValueError`` saying what is wrong."""
        if not isinstance(rec, dict) or rec.get("format") != COHORT_FORMAT:
            got = rec.get("format") if isinstance(rec, dict) else type(rec).__name__
            raise ValueError(f"not a {COHORT_FORMAT} record (format {got!r})")
        try:
            people, photos, dim = int(rec["people"]), int(rec["photos"]), int(rec["dim"])
            k, skip, ref = int(rec["k"]), int(rec["skip"]), float(rec["reference"])
            vectors = _decode(rec["vectors_f16"], "f2", (photos, dim))
            sizes = _decode(rec["sizes_u16"], "u2", (people,))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"cohort record is missing or has a bad field ({exc})") from exc
        if k < 1 or skip < 0 or k + skip > people:
            raise ValueError(f"cohort record: k={k}, skip={skip} do not fit {people} people")
        if (sizes < 1).any() or int(sizes.sum()) != photos:
            raise ValueError("cohort record: person sizes do not add up to the photos")
        if not (np.isfinite(vectors).all() and np.isfinite(ref)):
            raise ValueError("cohort record: non-finite values")
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return cls(vectors, starts, k, skip, ref)


def build_cohort(vectors: np.ndarray, labels: Sequence[str], k: int = DEFAULT_K,
                 skip: int = DEFAULT_SKIP) -> Cohort:
    """A cohort from unit embeddings of labelled development people: vectors grouped by
    person (stored as float16, and used as stored) and the reference crowding (median over
    the cohort's photos, each against the other people)."""
    lab = np.asarray(labels)
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(lab) != len(x):
        raise ValueError(f"vectors {x.shape} and {len(lab)} labels do not match")
    people, code = np.unique(lab, return_inverse=True)
    if k < 1 or skip < 0 or len(people) < k + skip + 1:
        raise ValueError(f"{len(people)} people are too few for a cohort with k={k}, skip={skip}")
    order = np.argsort(code, kind="stable")
    xs = x[order].astype(np.float16).astype(np.float32)
    _, starts = np.unique(code[order], return_index=True)
    provisional = Cohort(xs, starts.astype(np.int64), int(k), int(skip), 0.0)
    ref = float(np.median(provisional.crowding(xs, own=code[order])))
    return Cohort(xs, starts.astype(np.int64), int(k), int(skip), ref)
