#!/usr/bin/env python
"""Diagnosis: does a second opinion from the face/non-face classifier rank the single-pass
detector's boxes better (a two-stage cascade, as MTCNN's later stages or ``haar+cnn``)?

Runs the shipped ``cnn`` detector with a low score floor over every detection set, cuts
each box out as a classifier crop (``crops_around``: the box's square window with the
classifier's context, resampled to its 48-px input) and scores it with each shipped
classifier (``finetune``, ``transfer``). Then re-ranks the boxes by fixed combinations of
the two scores, chosen before looking at any set (no weight is fitted), and reports AP at
IoU 0.3 and the best recall at MTCNN's default precision and at precision 0.95:

* ``detector``: the detector's own score (the reference);
* ``mean_logit_<clf>``: the mean of the two logits;
* ``weighted_logit_<clf>``: detector logit ×2 plus classifier logit, over 3;
* ``geometric_<clf>``: the geometric mean of the two probabilities.

Then an **oracle** bound on re-ranking by face size: one threshold per box-size bin
(``sqrt(w·h)`` < 20, 20–40, ≥ 40 px), all combinations on a grid searched *on the set
itself* for the most faces at MTCNN's precision (exact greedy matching for each). No
deployable threshold rule can do better on that set than this.

    python scripts/analyse_detector_rescoring.py --threads 2 --json docs/results/detector_rescoring.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

CLASSIFIERS = ("finetune", "transfer")
SIZE_EDGES = (20.0, 40.0)
ORACLE_GRID = tuple(round(0.30 + 0.03 * k, 2) for k in range(15))  # 0.30 .. 0.72


def logit(p: np.ndarray) -> np.ndarray:
    """Log-odds of probabilities (clipped away from 0 and 1)."""
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`logit`."""
    return 1.0 / (1.0 + np.exp(-z))


def rules() -> dict[str, Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray]]:
    """Name -> f(detector scores, {classifier: scores}) giving the new scores."""
    out: dict[str, Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray]] = {"detector": lambda s, c: s}
    for k in CLASSIFIERS:
        out[f"mean_logit_{k}"] = lambda s, c, k=k: sigmoid((logit(s) + logit(c[k])) / 2)
        out[f"weighted_logit_{k}"] = lambda s, c, k=k: sigmoid((2 * logit(s) + logit(c[k])) / 3)
        out[f"geometric_{k}"] = lambda s, c, k=k: np.sqrt(s * c[k])
    return out


def size_oracle(per_image: list[tuple[np.ndarray, np.ndarray]], gtb: list[list], precision: float
                ) -> dict:
    """Best recall at ``precision`` with one threshold per size bin (grid search on the set itself)."""
    import itertools

    from bench_detectors import match
    from facepipe.types import Box, Detection

    n_gt = sum(len(g) for g in gtb)
    dets = [[Detection(Box.from_xyxy(*map(float, bb)), float(ss), "cnn") for bb, ss in zip(b, s)]
            for b, s in per_image]
    bins = [np.digitize([np.sqrt(max(d.box.w * d.box.h, 0.0)) for d in ds], SIZE_EDGES) for ds in dets]
    best: dict = {"recall": 0.0, "thresholds": None, "precision": None}
    for ths in itertools.product(ORACLE_GRID, repeat=len(SIZE_EDGES) + 1):
        t = np.asarray(ths)
        tp = fp = 0
        for ds, bn, g in zip(dets, bins, gtb):
            kept = [d for d, k in zip(ds, bn) if d.score >= t[k]]
            true, _ = match(kept, g, 0.3)
            tp += int(true.sum())
            fp += int((~true).sum())
        p, r = tp / max(tp + fp, 1), tp / max(n_gt, 1)
        if p >= precision and r > best["recall"]:
            best = {"recall": round(r, 4), "thresholds": [float(x) for x in ths], "precision": round(p, 4)}
    return {"size_edges_px": list(SIZE_EDGES), "grid": list(ORACLE_GRID), **best}


def main(argv: list[str] | None = None) -> int:
    """Score every box twice, re-rank by each rule, print and write the comparison."""
    from bench_detectors import (add_analysis_options, best_recall_at_precision, detection_sets,
                                 mtcnn_default_precision, run_record, write_json)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_analysis_options(ap, "score floor of the detector's boxes")
    args = ap.parse_args(argv)

    import torch

    from facepipe.detect.cnn import classify_crops, crops_around, load_checkpoint
    from facepipe.detect.fpn import FPNDetector
    from facepipe.evaluate import load_annotations, precision_recall
    from facepipe.io import load_image
    from facepipe.types import Box, Detection

    torch.set_num_threads(args.threads)
    det = FPNDetector(device="cpu")
    clfs = {k: load_checkpoint(k) for k in CLASSIFIERS}
    mtcnn_p = mtcnn_default_precision(args.bench)
    root, sets = detection_sets()
    result: dict = {**run_record("analyse_detector_rescoring.py", argv),
                    "detector": det.describe()["weights"], "classifiers": {k: Path(c.path).name for k, c in clfs.items()},
                    "sets": {}}
    for set_name in sets:
        t0 = time.perf_counter()
        gt = load_annotations(root / set_name)
        gtb = [list(g.boxes) for g in gt]
        per_image = []  # (boxes xyxy, detector scores, {classifier: scores})
        for g in gt:
            im = load_image(g.path)
            b, s, _ = det.raw([im], threshold=args.low_threshold)[0]
            c = {}
            for k, ck in clfs.items():
                cr = crops_around(im, b, ck.config.window, ck.config.context)
                c[k] = classify_crops(ck, cr) if len(b) else np.zeros(0, np.float32)
            per_image.append((b, s, c))
        entry: dict = {"images": len(gt), "faces": sum(len(x) for x in gtb), "boxes": sum(len(x[1]) for x in per_image),
                       "mtcnn_precision": mtcnn_p.get(set_name), "seconds": round(time.perf_counter() - t0, 1),
                       "results": {}}
        for name, rule in rules().items():
            dets = [[Detection(Box.from_xyxy(*map(float, bb)), float(ss), "cnn")
                     for bb, ss in zip(b, rule(s, c) if len(s) else s)] for b, s, c in per_image]
            r = precision_recall(dets, gtb, 0.3)
            row = {"ap_iou0.3": round(r.ap, 4), "best_recall_at_precision_0.95": best_recall_at_precision(r, 0.95)}
            if set_name in mtcnn_p:
                row["best_recall_at_mtcnn_precision"] = best_recall_at_precision(r, mtcnn_p[set_name])
            entry["results"][name] = row
            print(f"{set_name:22s} {name:24s} AP@0.3 {row['ap_iou0.3']:.4f} | best R at MTCNN's P "
                  f"{row.get('best_recall_at_mtcnn_precision')}, at 0.95 {row['best_recall_at_precision_0.95']}",
                  flush=True)
        if set_name in mtcnn_p:
            o = size_oracle([(b, s) for b, s, _ in per_image], gtb, mtcnn_p[set_name])
            entry["size_oracle_at_mtcnn_precision"] = o
            print(f"{set_name:22s} size-bin thresholds {o['thresholds']} (oracle, on this set): "
                  f"best R at MTCNN's P {o['recall']} (P {o['precision']})", flush=True)
        result["sets"][set_name] = entry
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
