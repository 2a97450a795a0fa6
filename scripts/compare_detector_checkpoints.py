#!/usr/bin/env python
"""Compare single-pass detector checkpoints (``cnn``) on the detection sets: should one replace the shipped one?

Each checkpoint runs once per image with a low threshold (``--low-threshold``) so the
whole score range is kept, then is scored at IoU 0.3 and 0.5: AP, precision / recall /
false boxes per image / recall by face size at *its own* stored threshold (calibrated on
development images by ``facepipe train detector``), and the best recall it reaches at the
precision of MTCNN's default operating point on that set (``--bench``) and at 0.95. The
checkpoint's own development figures (``describe()['calibration']``) are printed beside
them, so a gain on development images that does not carry over to the benchmark sets shows.

``--montage DIR`` also writes, per set and checkpoint, a sheet of its false boxes and one
of its missed faces at its own threshold (IoU 0.3, the benchmark's greedy matching),
each crop with its score and image name, for review by eye.

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


def write_sheet(crops: list[tuple[np.ndarray, tuple[float, float, float, float], str]], path: Path,
                per_row: int = 10, tile: int = 128) -> int:
    """Tile ``(image, xywh box, label)`` crops (the box with one box-side of context) into one PNG."""
    import cv2

    tiles = []
    for img, (x, y, w, h), label in crops:
        c = max(w, h)
        x0, y0 = int(max(0, x - c)), int(max(0, y - c))
        x1, y1 = int(min(img.shape[1], x + w + c)), int(min(img.shape[0], y + h + c))
        t = cv2.cvtColor(np.ascontiguousarray(img[y0:y1, x0:x1]), cv2.COLOR_RGB2BGR)
        cv2.rectangle(t, (int(x - x0), int(y - y0)), (int(x - x0 + w), int(y - y0 + h)), (0, 0, 255), 1)
        t = cv2.resize(t, (tile, tile), interpolation=cv2.INTER_AREA)
        cv2.putText(t, label, (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 255), 1, cv2.LINE_AA)
        tiles.append(t)
    if not tiles:
        return 0
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % per_row)
    rows = [np.hstack(tiles[i:i + per_row]) for i in range(0, len(tiles), per_row)]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack(rows))
    return len(crops)


def main(argv: list[str] | None = None) -> int:
    """Run every checkpoint over every set and print/write the comparison."""
    from bench_detectors import add_analysis_options

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=None, metavar="NAME=PATH",
                    help="detector checkpoint to compare (repeatable; default: the shipped one)")
    add_analysis_options(ap, sets=True)
    ap.add_argument("--montage", type=Path, default=None, metavar="DIR",
                    help="write <set>_<name>_false.png / _missed.png sheets for review by eye")
    args = ap.parse_args(argv)

    import torch

    from bench_detectors import best_recall_at_precision as best_recall
    from bench_detectors import detection_sets, match, mtcnn_default_precision, operating_point, run_record, write_json
    from facepipe.detect.fpn import FPNDetector
    from facepipe.evaluate import load_annotations, precision_recall
    from facepipe.io import load_image
    from facepipe.types import Box, Detection

    torch.set_num_threads(args.threads)
    specs = [parse_checkpoint(s) for s in (args.checkpoint or [f"shipped={ROOT / 'facepipe/weights/detector_fpn.pt'}"])]
    for name, path in specs:
        if not path.is_file():
            ap.error(f"--checkpoint {name}: {path} does not exist")
    root, sets = detection_sets(args.sets)
    mtcnn_p = mtcnn_default_precision(args.bench)
    result: dict = {**run_record("compare_detector_checkpoints.py", argv), "checkpoints": {}, "sets": {}}
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
            if args.montage:
                false, missed = [], []
                for im, g, ds, path in zip(images, gtb, kept, (x.path for x in gt)):
                    true, found = match(ds, g, 0.3)
                    false += [(im, (d.box.x, d.box.y, d.box.w, d.box.h), f"{d.score:.2f} {path.stem}")
                              for d, t in zip(ds, true) if not t]
                    missed += [(im, (b.x, b.y, b.w, b.h), f"{path.stem} {int(round(b.w))}px")
                               for b, f in zip(g, found) if not f]
                write_sheet(false, args.montage / f"{set_name}_{name}_false.png")
                write_sheet(missed, args.montage / f"{set_name}_{name}_missed.png")
            r3 = row["iou0.3"]
            op = r3["operating_point"]
            rb = op["recall_by_size"]
            print(f"{set_name:22s} {name:12s} AP@0.3 {r3['ap']:.4f} AP@0.5 {row['iou0.5']['ap']:.4f} | "
                  f"P {op['precision']:.3f} R {op['recall']:.3f} FP/img {op['fp_per_image']:.2f} | "
                  f"R <40 {rb['<40']['recall']} 40-80 {rb['40-80']['recall']} >=80 {rb['>=80']['recall']} | "
                  f"best R at MTCNN's P {r3.get('best_recall_at_mtcnn_precision')}, at 0.95 "
                  f"{r3['best_recall_at_precision_0.95']}", flush=True)
        result["sets"][set_name] = entry
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
