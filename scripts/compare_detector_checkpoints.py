#!/usr/bin/env python
"""Compare single-pass detector checkpoints (``cnn``) on the detection sets: should one replace the shipped one?

Each checkpoint runs once per image with a low threshold (``--low-threshold``) so the
whole score range is kept, then is scored at IoU 0.3 and 0.5: AP, precision / recall /
false boxes per image / recall by face size at *its own* stored threshold (calibrated on
development images by ``facepipe train detector``), and the best recall it reaches at the
precision of MTCNN's default operating point on that set (``--bench``) and at 0.95. The
checkpoint's own development figures (``describe()['calibration']``) are printed beside
them, so a gain on development images that does not carry over to the benchmark sets shows.

A replacement is worth shipping when it is at least as good on every set (AP@0.3, and
recall at MTCNN's precision); this script reports, it does not choose, and nothing is
tuned on the benchmark sets.

Example::

    python scripts/compare_detector_checkpoints.py --threads 2 \\
        --checkpoint shipped=facepipe/weights/detector_fpn.pt --checkpoint long=runs/detector4/detector.pt \\
        --json docs/results/detector_long/compare.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def parse_checkpoint(spec: str) -> tuple[str, Path]:
    """``name=path`` (or a bare path, named after its parent folder)."""
    name, sep, path = spec.partition("=")
    if not sep:
        p = Path(spec)
        return p.parent.name or p.stem, p
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    """Run every checkpoint over every set and print/write the comparison."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=None, metavar="NAME=PATH",
                    help="detector checkpoint to compare (repeatable; default: the shipped one)")
    ap.add_argument("--set", dest="sets", action="append", default=None,
                    help="detection set under $FACEPIPE_DATA/detection (default: all)")
    ap.add_argument("--low-threshold", type=float, default=0.05, help="score floor of the sweep")
    ap.add_argument("--bench", type=Path, default=ROOT / "docs" / "detection_bench.json",
                    help="detection benchmark JSON to read MTCNN's default precision from")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from bench_detectors import best_recall_at_precision as best_recall
    from bench_detectors import mtcnn_default_precision, operating_point
    from facepipe.datasets import data_root
    from facepipe.detect.fpn import FPNDetector
    from facepipe.device import describe_machine
    from facepipe.evaluate import load_annotations, precision_recall
    from facepipe.io import load_image
    from facepipe.types import Box, Detection

    torch.set_num_threads(args.threads)
    specs = [parse_checkpoint(s) for s in (args.checkpoint or [f"shipped={ROOT / 'facepipe/weights/detector_fpn.pt'}"])]
    for name, path in specs:
        if not path.is_file():
            ap.error(f"--checkpoint {name}: {path} does not exist")
    root = data_root() / "detection"
    sets = args.sets or sorted(p.name for p in root.iterdir() if (p / "annotations.json").is_file())
    mtcnn_p = mtcnn_default_precision(args.bench)
    result: dict = {"command": "python scripts/compare_detector_checkpoints.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                    "machine": describe_machine(), "python": platform.python_version(),
                    "checkpoints": {}, "sets": {}}
    detectors = {}
    for name, path in specs:
        det = FPNDetector(str(path), device="cpu")
        detectors[name] = det
        cal = det.describe().get("calibration", {})
        result["checkpoints"][name] = {"path": str(path), "threshold": det.threshold,
                                       "dev_ap_iou0.3": cal.get("dev_ap_iou0.3"),
                                       "dev_precision": cal.get("precision"), "dev_recall": cal.get("recall")}
        print(f"{name}: {path} threshold {det.threshold:.4f}, development AP@0.3 {cal.get('dev_ap_iou0.3')}, "
              f"P/R {cal.get('precision', float('nan')):.3f}/{cal.get('recall', float('nan')):.3f}")
    for set_name in sets:
        gt = load_annotations(root / set_name)
        gtb = [list(g.boxes) for g in gt]
        images = [load_image(g.path) for g in gt]
        entry: dict = {"images": len(gt), "faces": sum(len(b) for b in gtb),
                       "mtcnn_precision": mtcnn_p.get(set_name), "results": {}}
        for name, det in detectors.items():
            t0 = time.perf_counter()
            dets = []
            for im in images:
                b, s, _ = det.raw([im], threshold=args.low_threshold)[0]
                dets.append([Detection(Box.from_xyxy(*map(float, bb)), float(ss), "cnn") for bb, ss in zip(b, s)])
            row: dict = {"seconds": round(time.perf_counter() - t0, 1)}
            kept = [[d for d in ds if d.score >= det.threshold] for ds in dets]
            for iou in (0.3, 0.5):
                r = precision_recall(dets, gtb, iou)
                row[f"iou{iou:g}"] = {"ap": round(r.ap, 4), "operating_point": operating_point(kept, gtb, iou),
                                      "best_recall_at_precision_0.95": best_recall(r, 0.95)}
                if set_name in mtcnn_p:
                    row[f"iou{iou:g}"]["best_recall_at_mtcnn_precision"] = best_recall(r, mtcnn_p[set_name])
            entry["results"][name] = row
            r3 = row["iou0.3"]
            op = r3["operating_point"]
            rb = op["recall_by_size"]
            print(f"{set_name:22s} {name:12s} AP@0.3 {r3['ap']:.4f} AP@0.5 {row['iou0.5']['ap']:.4f} | "
                  f"P {op['precision']:.3f} R {op['recall']:.3f} FP/img {op['fp_per_image']:.2f} | "
                  f"R <40 {rb['<40']['recall']} 40-80 {rb['40-80']['recall']} >=80 {rb['>=80']['recall']} | "
                  f"best R at MTCNN's P {r3.get('best_recall_at_mtcnn_precision')}, at 0.95 "
                  f"{r3['best_recall_at_precision_0.95']}", flush=True)
        result["sets"][set_name] = entry
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
