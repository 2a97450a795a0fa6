#!/usr/bin/env python
"""Evaluate face detectors on sets in the facepipe-detection-v1 format.

For each detector and set: AP at IoU 0.5 and 0.3 (all-point interpolated), recall,
precision and false positives per image at the detector's operating point, and
median ms/image (detection only, decoding excluded). Writes one JSON file with
all results, a precision–recall plot per set, and prints a table.

Examples:
  python scripts/eval_detector.py --detector haar \
      --set ../shared/data/detection/caltech_webfaces_dev \
      --set ../shared/data/detection/dlib_pascal_faces --out docs/results/haar
  python scripts/eval_detector.py --detector haar --opt min_neighbors=3 \
      --detector mtcnn --opt device=cpu --set ... --out ...

``--opt key=value`` applies to the ``--detector`` given just before it; values are
parsed as int, float or string. ``--label`` names that detector in reports.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from facepipe.datasets import data_root
from facepipe.device import describe_machine
from facepipe.detect import create_detector
from facepipe.evaluate import load_annotations, plot_pr_curves, precision_recall, run_detector, summarize
from facepipe.io import load_image


def _parse_value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


class _DetectorSpecs(argparse.Action):
    """Collects --detector/--opt/--label into a list of specs in command-line order."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        specs = getattr(ns, "specs", None) or []
        if option_string == "--detector":
            specs.append({"name": values, "kwargs": {}, "label": None})
        elif not specs:
            parser.error(f"{option_string} must follow a --detector")
        elif option_string == "--opt":
            key, _, val = values.partition("=")
            specs[-1]["kwargs"][key.replace("-", "_")] = _parse_value(val)
        else:
            specs[-1]["label"] = values
        ns.specs = specs


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation and write results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", action=_DetectorSpecs, dest="specs", help="registered detector name")
    ap.add_argument("--opt", action=_DetectorSpecs, dest="specs", help="key=value option for the last --detector")
    ap.add_argument("--label", action=_DetectorSpecs, dest="specs", help="report name for the last --detector")
    ap.add_argument("--set", dest="sets", action="append", default=None,
                    help="detection set dir or annotations.json (default: every set under $FACEPIPE_DATA/detection)")
    ap.add_argument("--out", type=Path, required=True, help="output directory for JSON + PNG")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images of each set (quick runs)")
    args = ap.parse_args(argv)
    specs = args.specs or [{"name": "haar", "kwargs": {}, "label": None}]
    sets = args.sets or sorted(str(p.parent) for p in (data_root() / "detection").glob("*/annotations.json"))

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "machine": describe_machine(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "sets": {},
    }
    rows = []
    for set_path in sets:
        gt = load_annotations(set_path)
        if args.limit:
            gt = gt[: args.limit]
        set_name = Path(set_path).name if Path(set_path).is_dir() else Path(set_path).parent.name
        images = [load_image(g.path) for g in gt]
        boxes = [list(g.boxes) for g in gt]
        set_report: dict[str, Any] = {"images": len(gt), "faces": sum(len(b) for b in boxes), "detectors": []}
        curves = {}
        for spec in specs:
            det = create_detector(spec["name"], **spec["kwargs"])
            label = spec["label"] or spec["name"]
            run = run_detector(det.detect, images, label)
            summary = summarize(run, boxes)
            summary["settings"] = det.describe()
            set_report["detectors"].append(summary)
            for iou in (0.3, 0.5):
                curves[f"{label} @IoU{iou:g}"] = precision_recall(run.detections, boxes, iou)
            rows.append((set_name, label, summary))
        plot_pr_curves(curves, args.out / f"pr_{set_name}.png", title=f"{set_name}: precision–recall")
        report["sets"][set_name] = set_report
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")

    hdr = f"{'set':<22} {'detector':<18} {'AP@.5':>6} {'AP@.3':>6} {'rec@.3':>6} {'FP/img':>6} {'ms/img':>7}"
    print(hdr)
    print("-" * len(hdr))
    for set_name, label, s in rows:
        i5, i3 = s["iou0.5"], s["iou0.3"]
        print(f"{set_name:<22} {label:<18} {i5['ap']:>6.3f} {i3['ap']:>6.3f} {i3['recall']:>6.3f} "
              f"{i3['fp_per_image']:>6.2f} {s['median_ms_per_image']:>7.1f}")
    print(f"\nwrote {args.out / 'results.json'} and pr_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
