#!/usr/bin/env python
"""Haar vs CNN benchmark: accuracy on every shared detection set, and speed.

For haar, cnn (fine-tune and transfer weights), haar+cnn and mtcnn on each set under
``$FACEPIPE_DATA/detection``: AP at IoU 0.5 and 0.3, recall, precision and false
positives per image at the detector's operating point; all precision–recall curves
of a set on one figure (IoU 0.3 and 0.5 panels). Speed: median ms/image on
640×480 images (the set's images resized) on the CPU with ``--threads`` threads,
and, when CUDA is available, batched images/s at 640×480 on the GPU.

Writes ``<out>/detection_bench.json``, ``<img>/detection_pr_<set>.png`` and prints
Markdown tables (pasted into docs/detection.md).

    python scripts/bench_detectors.py --out docs --img docs/img
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.device import describe_machine


DETECTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "haar": ("haar", {}),
    "cnn-finetune": ("cnn", {"weights": "finetune"}),
    "cnn-transfer": ("cnn", {"weights": "transfer"}),
    "cnn-min48": ("cnn", {"weights": "finetune", "min_size": 48}),
    # the whole score range (threshold 0.3 instead of the operating point) for the PR curve
    "cnn-finetune-t0.3": ("cnn", {"weights": "finetune", "threshold": 0.3}),
    # the from-scratch baseline is not shipped; benchmarked from its training output
    "cnn-scratch": ("cnn", {"weights": "runs/classifier_scratch/scratch.pt"}),
    "haar+cnn": ("haar+cnn", {}),
    "mtcnn": ("mtcnn", {}),
}


def _build(label: str, device: str, extra: dict[str, Any]) -> Any:
    from facepipe.detect import create_detector

    name, kw = DETECTORS[label]
    kw = dict(kw)
    kw.update(extra.get(label, {}))
    if name != "haar":
        kw["device"] = device
    return create_detector(name, **kw)


def _curve(r: Any, points: int = 400) -> dict[str, Any]:
    """A PR curve downsampled for the JSON file (enough points to plot)."""
    rec, prec = np.asarray(r.recall_curve), np.asarray(r.precision_curve)
    if len(rec) > points:
        idx = np.unique(np.linspace(0, len(rec) - 1, points).round().astype(int))
        rec, prec = rec[idx], prec[idx]
    return {"ap": r.ap, "recall": np.round(rec, 4).tolist(), "precision": np.round(prec, 4).tolist()}


def _plot(curves: dict[str, dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110)
    for ax, iou in zip(axes, ("0.3", "0.5")):
        for label, per in curves.items():
            r = per[iou]
            ax.plot(r["recall"], r["precision"], lw=1.7, label=f"{label} (AP {r['ap']:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{title}, IoU {iou}")
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def speed_gpu(det: Any, images: list[np.ndarray], batch: int) -> float:
    """Images/s for batched detection on CUDA (same-size 640×480 images)."""
    import torch

    stack = (images * (batch // len(images) + 1))[:batch]
    det.detect_batch(stack)
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 5.0:
        det.detect_batch(stack)
        n += len(stack)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    import cv2
    import torch

    from facepipe.datasets import data_root
    from facepipe.evaluate import load_annotations, precision_recall, run_detector, summarize
    from facepipe.io import load_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--img", type=Path, default=Path("docs/img"))
    ap.add_argument("--detectors", default=",".join(k for k in DETECTORS if k != "cnn-scratch"),
                    help=f"Comma-separated subset of: {', '.join(DETECTORS)}.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-images", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cnn-threshold", type=float, default=None,
                    help="Override the CNN detectors' score threshold (default: their own).")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--gpu-batch", type=int, default=64)
    ap.add_argument("--no-accuracy", action="store_true", help="Only measure speed.")
    ap.add_argument("--merge", action="store_true",
                    help="Update <out>/detection_bench.json (keep other detectors' results).")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    root = args.data or data_root()
    labels = [s for s in args.detectors.split(",") if s]
    extra: dict[str, dict[str, Any]] = {}
    if args.cnn_threshold is not None:
        for lab in labels:
            if DETECTORS[lab][0] in ("cnn", "haar+cnn"):
                extra[lab] = {"threshold": args.cnn_threshold}
    sets = sorted(p for p in (root / "detection").iterdir() if (p / "annotations.json").is_file())
    old: dict[str, Any] = {}
    if args.merge and (args.out / "detection_bench.json").is_file():
        old = json.loads((args.out / "detection_bench.json").read_text())
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": describe_machine(),
        "threads": args.threads,
        "load_average_at_start": os.getloadavg(),
        "command": "python scripts/bench_detectors.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)
            and k in ("detectors", "threads", "cnn_threshold")),
        "sets": {},
        "speed": {},
    }
    dets = {lab: _build(lab, "cpu", extra) for lab in labels}
    results["detectors"] = {lab: d.describe() for lab, d in dets.items()}
    if old:
        for key in ("detectors", "speed"):
            results[key] = {**{k: v for k, v in old.get(key, {}).items() if k not in labels}, **results[key]}
        results["sets"] = old.get("sets", {})
        results["runs"] = old.get("runs", [])
    results.setdefault("runs", []).append({"date": results["date"], "detectors": labels,
                                           "accuracy": not args.no_accuracy, "speed": not args.no_speed,
                                           "load_average_at_start": results["load_average_at_start"]})
    for sdir in ([] if args.no_accuracy else sets):
        gt = load_annotations(sdir)
        imgs = [load_image(g.path) for g in gt]
        gtb = [list(g.boxes) for g in gt]
        prev = results["sets"].get(sdir.name, {})
        curves: dict[str, dict[str, Any]] = dict(prev.get("curves", {}))
        per: dict[str, Any] = dict(prev.get("results", {}))
        for lab, det in dets.items():
            run = run_detector(det.detect, imgs, lab)
            per[lab] = summarize(run, gtb)
            curves[lab] = {f"{t:g}": _curve(precision_recall(run.detections, gtb, t)) for t in (0.3, 0.5)}
            print(f"{sdir.name:24s} {lab:14s} AP@0.3 {per[lab]['iou0.3']['ap']:.4f} "
                  f"AP@0.5 {per[lab]['iou0.5']['ap']:.4f} ({per[lab]['median_ms_per_image']:.0f} ms/img median)",
                  flush=True)
        order = [k for k in DETECTORS if k in per] + [k for k in per if k not in DETECTORS]
        per = {k: per[k] for k in order}
        curves = {k: curves[k] for k in order if k in curves}
        results["sets"][sdir.name] = {"images": len(imgs), "faces": sum(len(b) for b in gtb), "results": per,
                                      "curves": curves}
        _plot(curves, args.img / f"detection_pr_{sdir.name}.png", sdir.name)
    if not args.no_speed:
        gt = load_annotations(sets[0])
        speed_imgs = [cv2.resize(load_image(g.path), (640, 480), interpolation=cv2.INTER_AREA)
                      for g in gt[: args.speed_images]]
        # interleaved (image by image, detector by detector) so that load from other
        # processes on a shared machine hits every detector alike
        times: dict[str, list[float]] = {lab: [] for lab in dets}
        for det in dets.values():
            det.detect(speed_imgs[0])
        for _ in range(args.repeats):
            for im in speed_imgs:
                for lab, det in dets.items():
                    t0 = time.perf_counter()
                    det.detect(im)
                    times[lab].append((time.perf_counter() - t0) * 1000)
        for lab in dets:
            ms = float(np.median(times[lab]))
            results["speed"][lab] = {"cpu_ms_per_image_640x480_median": round(ms, 1)}
            print(f"speed {lab:14s} {ms:.1f} ms/img (CPU, {args.threads} threads, 640x480)", flush=True)
        if torch.cuda.is_available():
            for lab in labels:
                if DETECTORS[lab][0] in ("cnn", "mtcnn"):
                    det = _build(lab, "cuda", extra)
                    ips = speed_gpu(det, speed_imgs, args.gpu_batch)
                    results["speed"][lab]["gpu_images_per_s_640x480"] = round(ips, 1)
                    results["speed"][lab]["gpu"] = torch.cuda.get_device_name(0)
                    print(f"speed {lab:14s} {ips:.0f} img/s (GPU batch {args.gpu_batch})", flush=True)
        results["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detection_bench.json").write_text(json.dumps(results, indent=2))
    # Markdown tables
    for sname, s in results["sets"].items():
        print(f"\n#### {sname} ({s['images']} images, {s['faces']} faces)\n")
        print("| detector | AP@0.3 | AP@0.5 | recall@0.3 | FP/image@0.3 | recall@0.5 | FP/image@0.5 |")
        print("|---|---|---|---|---|---|---|")
        for lab, r in s["results"].items():
            a, b = r["iou0.3"], r["iou0.5"]
            print(f"| {lab} | {a['ap']:.3f} | {b['ap']:.3f} | {a['recall']:.3f} | {a['fp_per_image']:.2f} "
                  f"| {b['recall']:.3f} | {b['fp_per_image']:.2f} |")
    if results["speed"]:
        print("\n| detector | CPU ms/image 640×480 (median) | GPU images/s 640×480 |\n|---|---|---|")
        for lab, r in results["speed"].items():
            print(f"| {lab} | {r['cpu_ms_per_image_640x480_median']:.0f} | "
                  f"{r.get('gpu_images_per_s_640x480', 'not measured')} |")


if __name__ == "__main__":
    main()
