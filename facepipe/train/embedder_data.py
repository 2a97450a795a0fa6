"""Data for embedder training and verification: aligned-face caches, people-disjoint splits, pairs.

An aligned cache is the NPZ written by ``scripts/align_dataset.py``: ``crops`` uint8
``(N, S, S, 3)`` aligned with :func:`facepipe.align.align_face`, ``labels`` (person,
``""`` when unlabelled) and ``sources`` (the photo each crop came from).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from facepipe.errors import InputError


@dataclass
class AlignedSet:
    """Aligned crops with their person labels ("" = unknown) and source files."""

    crops: np.ndarray
    labels: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.crops)

    def subset(self, idx: np.ndarray) -> "AlignedSet":
        """The rows ``idx``."""
        return AlignedSet(self.crops[idx], self.labels[idx], self.sources[idx])

    def summary(self) -> dict[str, int]:
        """Counts for checkpoints and reports."""
        lab = self.labels[self.labels != ""]
        people, counts = np.unique(lab, return_counts=True)
        return {"images": int(len(self)), "labelled": int(len(lab)), "people": int(len(people)),
                "people_with_2plus": int((counts >= 2).sum())}


def load_aligned(paths: Sequence[str | Path]) -> AlignedSet:
    """Concatenate one or more aligned caches (all with the same crop size)."""
    crops, labels, sources = [], [], []
    size = None
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InputError(p, "aligned cache not found (run scripts/align_dataset.py)")
        try:
            with np.load(p, allow_pickle=False) as z:
                c = z["crops"]
                if size is not None and c.shape[1] != size:
                    raise InputError(p, f"crop size {c.shape[1]} differs from {size}")
                size = c.shape[1]
                crops.append(c)
                labels.append(z["labels"].astype(str))
                sources.append(z["sources"].astype(str))
        except (OSError, ValueError, KeyError, EOFError, AttributeError, IndexError) as exc:
            # np.load of a non-.npz file says only "allow_pickle=False": name the file instead
            what = ("it lacks the crops, labels or sources array" if isinstance(exc, KeyError)
                    else "not a readable .npz archive")
            raise InputError(p, f"not an aligned cache from scripts/align_dataset.py ({what})") from exc
    if not crops:
        raise InputError("<none>", "no aligned caches given")
    return AlignedSet(np.concatenate(crops), np.concatenate(labels), np.concatenate(sources))


def cache_digest(paths: Sequence[str | Path]) -> str:
    """SHA-256 prefix over the cache files (recorded in checkpoints)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def people_split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> tuple[set[str], set[str]]:
    """Split the labelled people into disjoint (train, validation) sets, reproducibly.

    Each person goes to validation when a seeded hash of the name falls below
    ``val_fraction``, so the split does not change when other people are added.
    """
    people = sorted(set(labels.tolist()) - {""})
    val = {p for p in people if _name_hash(p, seed) < val_fraction}
    return set(people) - val, val


#: The verification benchmark's split: people whose seeded name hash falls below this
#: fraction are held out from every training run (``scripts/bench_verification.py``).
BENCHMARK_VAL_FRACTION = 0.2
BENCHMARK_SEED = 0


def _name_hash(name: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def is_heldout(name: str, val_fraction: float = BENCHMARK_VAL_FRACTION, seed: int = BENCHMARK_SEED) -> bool:
    """Whether a person is one of the benchmark's held-out (never trained on) people.

    The same per-name rule as :func:`people_split`, so it holds for any data set: a
    person of LFW with one photo, or a name in another identity set, is classified the
    same way whichever other people are present.
    """
    return bool(name) and _name_hash(name, seed) < val_fraction


def benchmark_heldout_people(root: str | Path | None = None) -> tuple[set[str], set[str]]:
    """The benchmark's people-disjoint split of an identity folder: (development, held-out) names.

    ``root`` defaults to LFW DevTrain in the development data (``$FACEPIPE_DATA``).
    Every person is classified (also those with one photo): calibrating open-set
    thresholds on the held-out people uses only people no facepipe embedder was
    trained on.
    """
    from facepipe.datasets import data_root, list_identities

    r = Path(root) if root is not None else data_root() / "identities" / "lfw_devtrain"
    names = list(list_identities(r))
    held = {n for n in names if is_heldout(n)}
    return set(names) - held, held


@dataclass
class Pairs:
    """Verification pairs: indices into a set, same-person flag and fold number."""

    i: np.ndarray
    j: np.ndarray
    same: np.ndarray
    fold: np.ndarray

    def __len__(self) -> int:
        return len(self.i)


def make_pairs(labels: np.ndarray, people: set[str], folds: int = 10, per_fold: int = 300,
               max_images_per_person: int = 8, seed: int = 0) -> Pairs:
    """LFW-style pairs over ``people`` only: ``per_fold`` matched and mismatched pairs per fold.

    People are dealt into ``folds`` disjoint groups (as in LFW View 2); matched pairs
    come from two photos of one person in the fold, mismatched pairs from photos of
    two different people in the fold. At most ``max_images_per_person`` photos of a
    person are used, so a few heavily photographed people do not dominate.
    """
    rng = np.random.default_rng(seed)
    by_person: dict[str, np.ndarray] = {}
    for p in sorted(people):
        idx = np.flatnonzero(labels == p)
        if len(idx):
            by_person[p] = rng.permutation(idx)[:max_images_per_person]
    names = list(by_person)
    order = rng.permutation(len(names))
    fold_of = {names[k]: f for f, ks in enumerate(np.array_split(order, folds)) for k in ks}
    ii, jj, ss, ff = [], [], [], []
    for f in range(folds):
        members = [p for p in names if fold_of[p] == f]
        multi = [p for p in members if len(by_person[p]) >= 2]
        cand_same = [(a, b) for p in multi for x, a in enumerate(by_person[p]) for b in by_person[p][x + 1:]]
        if not cand_same or len(members) < 2:
            continue
        pick = rng.permutation(len(cand_same))[:per_fold]
        for k in pick:
            ii.append(cand_same[k][0]); jj.append(cand_same[k][1]); ss.append(True); ff.append(f)
        n_diff, seen, tries = 0, set(), 0
        while n_diff < min(per_fold, len(pick)) and tries < 50 * per_fold:  # tiny folds run out of pairs
            tries += 1
            pa, pb = rng.choice(len(members), 2, replace=False)
            a = by_person[members[pa]][rng.integers(len(by_person[members[pa]]))]
            b = by_person[members[pb]][rng.integers(len(by_person[members[pb]]))]
            key = (min(a, b), max(a, b))
            if key in seen:
                continue
            seen.add(key)
            ii.append(a); jj.append(b); ss.append(False); ff.append(f)
            n_diff += 1
    return Pairs(np.array(ii, int), np.array(jj, int), np.array(ss, bool), np.array(ff, int))


def verification_metrics(emb: np.ndarray, pairs: Pairs) -> dict[str, float]:
    """LFW 10-fold accuracy (threshold chosen on the other folds), ROC AUC and TAR at FAR.

    ``emb`` rows must be L2-normalised; the score is cosine similarity.
    """
    scores = np.sum(emb[pairs.i] * emb[pairs.j], axis=1)
    accs = []
    for f in np.unique(pairs.fold):
        tr, te = pairs.fold != f, pairs.fold == f
        s_tr, y_tr = scores[tr], pairs.same[tr]
        # brute force over midpoints of sorted training scores
        srt = np.sort(s_tr)
        thr = np.concatenate([[srt[0] - 1e-6], (srt[1:] + srt[:-1]) / 2, [srt[-1] + 1e-6]])
        pos = np.sort(s_tr[y_tr]); neg = np.sort(s_tr[~y_tr])
        tp = len(pos) - np.searchsorted(pos, thr, side="left")
        tn = np.searchsorted(neg, thr, side="left")
        acc = (tp + tn) / len(s_tr)
        k = int(np.argmax(acc))
        best_t = thr[k]
        accs.append(float(np.mean((scores[te] >= best_t) == pairs.same[te])))
    fpr, tpr = roc_curve(pairs.same, scores)
    out = {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
           "auc": float(np.trapezoid(tpr, fpr)), "pairs": int(len(pairs)),
           "folds": int(len(accs))}
    for far in (1e-2, 1e-3):
        ok = fpr <= far
        out[f"tar@far={far:g}"] = float(tpr[ok].max()) if ok.any() else 0.0
    return out


def roc_points(emb: np.ndarray, pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the cosine score over all pairs, for plotting."""
    return roc_curve(pairs.same, np.sum(emb[pairs.i] * emb[pairs.j], axis=1))


def roc_curve(same: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC of ``scores`` (higher = same person): (FPR, TPR) at every distinct threshold, from (0, 0)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], same[order].astype(bool)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each tied score
    tps = np.cumsum(y)[last]
    fps = np.cumsum(~y)[last]
    tpr = np.r_[0.0, tps / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~y).sum(), 1)]
    return fpr, tpr
