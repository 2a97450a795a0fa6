#!/usr/bin/env python
"""Would enlarging images at test time find the small faces the ``cnn`` detector misses?

Most faces the single-pass detector misses at MTCNN's precision are heads under 44 px in
crowded photos (``docs/detection.md``). Its smallest anchor is 16 px on the stride-8 level,
and the classifier it grew from was trained on 36-px crops, so an enlarged image puts
those heads where the network is strongest. This script runs one checkpoint once at the
image's own size and once per ``--factor`` (bilinear enlargement), each with a low
threshold so the whole score range is kept, and scores these ways of using the passes:

* ``x1``: the image as it is (what ``facepipe detect --detector cnn`` does);
* ``xF whole``: only the enlarged pass, boxes mapped back to original pixels;
* ``xF small images``: the enlarged pass for images whose shorter side is under
  ``--small-image`` px, the plain pass for the others;
* ``xF fine <S px``: the plain pass plus the enlarged pass's boxes under ``S`` px
  (original pixels), merged with the detector's own NMS and containment suppression —
  a "fine" pass for small heads only, as the detector's coarse pass is for large ones.

Reported at IoU 0.3: AP, precision / recall / false boxes per image / recall of faces
under 40 px at the checkpoint's own threshold, the best recall at MTCNN's default
precision on that set (``docs/detection_bench.json``) and at 0.95, and each pass's
seconds. A diagnosis on the benchmark sets: nothing is chosen from it or shipped.

Example::

    python scripts/analyse_detector_upscaling.py --threads 2 --json docs/results/detector_upscaling.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

Raw = tuple[np.ndarray, np.ndarray]  # boxes xyxy (K, 4) in original pixels, scores (K,)


def merge(parts: list[Raw], nms_iou: float, contain: float) -> Raw:
    """Boxes of several passes over one image, suppressed as ``FPNDetector`` suppresses its own passes."""
    import torch
    from torchvision.ops import nms

    from facepipe.detect.fpn import suppress_contained

    b = np.concatenate([p[0] for p in parts]).astype(np.float32)
    s = np.concatenate([p[1] for p in parts]).astype(np.float32)
    if not len(b):
        return b, s
    k = nms(torch.from_numpy(b), torch.from_numpy(s), nms_iou).numpy()
    b, s = b[k], s[k]
    k = suppress_contained(b, s, contain)
    return b[k], s[k]


def side(boxes: np.ndarray) -> np.ndarray:
    """Head size ``sqrt(w*h)`` of xyxy boxes."""
    return np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))


def main(argv: list[str] | None = None) -> int:
    """Run the passes over every detection set and score each way of combining them."""
    from bench_detectors import add_analysis_options, detection_sets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "facepipe" / "weights" / "detector_fpn.pt")
    ap.add_argument("--factor", type=float, action="append", default=None,
                    help="enlargement factor of the extra pass (repeatable; default 1.5 and 2)")
    ap.add_argument("--fine-below", type=float, action="append", default=None,
                    help="head size (px) under which the fine pass's boxes are kept (repeatable; default 32, 40)")
    ap.add_argument("--small-image", type=int, default=400, help="shorter side (px) of a 'small image'")
    add_analysis_options(ap)
    args = ap.parse_args(argv)
    factors = args.factor or [1.5, 2.0]
    fine = args.fine_below or [32.0, 40.0]
    if any(f <= 1.0 for f in factors):
        ap.error("--factor must be > 1")
    if not args.checkpoint.is_file():
        ap.error(f"--checkpoint {args.checkpoint} does not exist")

    import cv2
    import torch

    from bench_detectors import (best_recall_at_precision, mtcnn_default_precision, operating_point, run_record,
                                 write_json)
    from facepipe.detect.fpn import FPNDetector
    from facepipe.evaluate import load_annotations, precision_recall
    from facepipe.io import load_image
    from facepipe.types import Box, Detection

    torch.set_num_threads(args.threads)
    det = FPNDetector(str(args.checkpoint), device="cpu")
    mtcnn_p = mtcnn_default_precision(args.bench)
    root, sets = detection_sets()
    result: dict[str, Any] = {
        **run_record("analyse_detector_upscaling.py", argv), "checkpoint": args.checkpoint.name, "threshold": det.threshold,
        "small_image_px": args.small_image, "sets": {}}
    for set_name in sets:
        gt = load_annotations(root / set_name)
        gtb = [list(g.boxes) for g in gt]
        images = [load_image(g.path) for g in gt]
        passes: dict[float, list[Raw]] = {}
        seconds: dict[str, float] = {}
        for f in [1.0, *factors]:
            t0 = time.perf_counter()
            out = []
            for im in images:
                big = im if f == 1.0 else cv2.resize(im, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
                b, s, _ = det.raw([big], threshold=args.low_threshold)[0]
                out.append((b / f, s))
            passes[f] = out
            seconds[f"x{f:g}"] = round(time.perf_counter() - t0, 1)
        small = [min(im.shape[:2]) < args.small_image for im in images]
        variants: dict[str, list[Raw]] = {"x1": passes[1.0]}
        for f in factors:
            variants[f"x{f:g} whole"] = passes[f]
            variants[f"x{f:g} small images"] = [u if sm else p for p, u, sm in zip(passes[1.0], passes[f], small)]
            for lim in fine:
                variants[f"x{f:g} fine <{lim:g}px"] = [
                    merge([p, (u[0][side(u[0]) < lim], u[1][side(u[0]) < lim])], det.nms_iou, det.contain)
                    for p, u in zip(passes[1.0], passes[f])]
        rows: dict[str, Any] = {}
        for name, raws in variants.items():
            dets = [[Detection(Box.from_xyxy(*map(float, bb)), float(ss), "cnn") for bb, ss in zip(b, s)]
                    for b, s in raws]
            r = precision_recall(dets, gtb, 0.3)
            op = operating_point([[d for d in ds if d.score >= det.threshold] for ds in dets], gtb, 0.3)
            rows[name] = {"ap_iou0.3": round(r.ap, 4), "precision": op["precision"], "recall": op["recall"],
                          "fp_per_image": op["fp_per_image"], "recall_under_40px": op["recall_by_size"]["<40"]["recall"],
                          "best_recall_at_mtcnn_precision": best_recall_at_precision(r, mtcnn_p[set_name])
                          if set_name in mtcnn_p else None,
                          "best_recall_at_precision_0.95": best_recall_at_precision(r, 0.95)}
            row = rows[name]
            print(f"{set_name:22s} {name:18s} AP@0.3 {row['ap_iou0.3']:.4f} | P {row['precision']:.3f} "
                  f"R {row['recall']:.3f} FP/img {row['fp_per_image']:.2f} R<40 {row['recall_under_40px']} | "
                  f"best R at MTCNN's P {row['best_recall_at_mtcnn_precision']} at 0.95 "
                  f"{row['best_recall_at_precision_0.95']}", flush=True)
        print(f"{set_name:22s} seconds per pass: {seconds}", flush=True)
        result["sets"][set_name] = {"images": len(gt), "faces": sum(len(b) for b in gtb),
                                    "small_images": int(sum(small)), "mtcnn_precision": mtcnn_p.get(set_name),
                                    "seconds_per_pass": seconds, "results": rows}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
