#!/usr/bin/env python
"""Does mirror test-time augmentation lift the single-pass ``cnn`` detector's recall?

For every image of each detection set the shipped ``cnn`` detector runs twice, on the
image and on its mirror image (boxes mapped back), with a low threshold so the whole
score range is kept. The two box sets are paired greedily (IoU ≥ ``--pair-iou``,
highest score first); a pair becomes one box (the mean of both boxes) scored by the
mean of both scores, a box without a partner keeps half its score (its partner's is
taken as 0), and NMS at the detector's IoU removes what overlaps. Reported for the
plain and the mirrored detector, at IoU 0.3 and 0.5: AP, precision and recall at the
shipped threshold, and the best recall at the precision of MTCNN's default operating
point on that set (``--mtcnn-precision``, from docs/detection_bench.json) and at 0.95.
It answers one question (is it a way to MTCNN's recall at its precision?) and is a
diagnosis on the benchmark sets, not a tuning step: nothing is chosen from it.

Example::

    python scripts/analyse_detector_flip.py --threads 1 --json docs/results/detection_flip_tta.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def _xywh(b: np.ndarray) -> np.ndarray:
    return np.c_[b[:, :2], b[:, 2:] - b[:, :2]]


def mirror_merge(b1: np.ndarray, s1: np.ndarray, b2: np.ndarray, s2: np.ndarray, pair_iou: float,
                 nms_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Merge boxes (xyxy) of an image and of its mirror (already mapped back): see the module doc."""
    import torch
    from torchvision.ops import nms

    from facepipe.evaluate import box_iou_matrix

    iou = box_iou_matrix(_xywh(b1), _xywh(b2)) if len(b1) and len(b2) else np.zeros((len(b1), len(b2)))
    used = np.zeros(len(b2), bool)
    boxes, scores = [], []
    for i in np.argsort(-s1, kind="stable"):
        cand = np.where(used, -1.0, iou[i]) if len(b2) else np.zeros(0)
        j = int(np.argmax(cand)) if len(cand) else -1
        if j >= 0 and cand[j] >= pair_iou:
            used[j] = True
            boxes.append((b1[i] + b2[j]) / 2.0)
            scores.append((s1[i] + s2[j]) / 2.0)
        else:
            boxes.append(b1[i])
            scores.append(s1[i] / 2.0)
    for j in np.flatnonzero(~used):
        boxes.append(b2[j])
        scores.append(s2[j] / 2.0)
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    b = np.asarray(boxes, np.float32)
    s = np.asarray(scores, np.float32)
    keep = nms(torch.from_numpy(b), torch.from_numpy(s), nms_iou).numpy()
    return b[keep], s[keep]


def _report(dets: list, gt: list, threshold: float, mtcnn_p: float | None) -> dict:
    from bench_detectors import best_recall_at_precision
    from facepipe.evaluate import precision_recall

    out = {}
    for t in (0.3, 0.5):
        r = precision_recall(dets, gt, t)
        sc, rec, pre = np.array(r.scores), np.array(r.recall_curve), np.array(r.precision_curve)
        k = int(np.searchsorted(-sc, -threshold, side="right")) - 1

        def best(p: float) -> float:
            return best_recall_at_precision(r, p)

        row = {"ap": round(r.ap, 4), "precision_at_threshold": round(float(pre[k]), 4) if k >= 0 else None,
               "recall_at_threshold": round(float(rec[k]), 4) if k >= 0 else 0.0,
               "best_recall_at_precision_0.95": best(0.95)}
        if mtcnn_p is not None:
            row["best_recall_at_mtcnn_precision"] = best(mtcnn_p)
        out[f"iou{t:g}"] = row
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print/write it."""
    from bench_detectors import add_analysis_options, detection_sets, mtcnn_default_precision, run_record, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_analysis_options(ap, "score floor of both passes", sets=True)
    ap.add_argument("--pair-iou", type=float, default=0.5)
    args = ap.parse_args(argv)

    import torch

    from facepipe.detect.fpn import FPNDetector
    from facepipe.evaluate import load_annotations
    from facepipe.io import load_image
    from facepipe.types import Box, Detection

    torch.set_num_threads(args.threads)
    root, sets = detection_sets(args.sets)
    mtcnn_p = mtcnn_default_precision(args.bench)
    det = FPNDetector(device="cpu")
    result = {**run_record("analyse_detector_flip.py", argv),
              "threshold": det.threshold, "pair_iou": args.pair_iou, "sets": {}}

    def to_dets(b: np.ndarray, s: np.ndarray) -> list:
        return [Detection(Box.from_xyxy(*map(float, bb)), float(ss), "cnn") for bb, ss in zip(b, s)]

    for name in sets:
        gt = load_annotations(root / name)
        plain, flip = [], []
        t0 = time.perf_counter()
        for g in gt:
            im = load_image(g.path)
            w = im.shape[1]
            b1, s1, _ = det.raw([im], threshold=args.low_threshold)[0]
            b2, s2, _ = det.raw([np.ascontiguousarray(im[:, ::-1])], threshold=args.low_threshold)[0]
            b2 = b2.copy()
            b2[:, [0, 2]] = w - b2[:, [2, 0]]
            plain.append(to_dets(b1, s1))
            flip.append(to_dets(*mirror_merge(b1, s1, b2, s2, args.pair_iou, det.nms_iou)))
        gtb = [list(g.boxes) for g in gt]
        entry = {"images": len(gt), "faces": sum(len(b) for b in gtb), "mtcnn_precision": mtcnn_p.get(name),
                 "seconds": round(time.perf_counter() - t0, 1),
                 "plain": _report(plain, gtb, det.threshold, mtcnn_p.get(name)),
                 "mirror_tta": _report(flip, gtb, det.threshold, mtcnn_p.get(name))}
        result["sets"][name] = entry
        for label in ("plain", "mirror_tta"):
            r = entry[label]["iou0.3"]
            print(f"{name:22s} {label:10s} AP@0.3 {r['ap']:.4f}  P/R at {det.threshold:.3f}: "
                  f"{r['precision_at_threshold']}/{r['recall_at_threshold']}  best recall at MTCNN's precision "
                  f"{r.get('best_recall_at_mtcnn_precision')}, at 0.95: {r['best_recall_at_precision_0.95']}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
