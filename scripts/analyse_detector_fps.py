#!/usr/bin/env python
"""What the "false boxes" of each detector on a detection set are: montages to review by eye.

Runs the given detectors at their default operating points over one detection set,
keeps every box that matches no ground-truth face at IoU 0.3 (the benchmark's rule,
``bench_detectors.match``), groups the false boxes of all detectors that overlap one
another (IoU ≥ 0.3) into one *region*, and writes

* ``<out>/fp_regions.json``: every region (image, box, which detectors fired and with
  what score), so a reviewer's verdicts can be attached by region id;
* ``<out>/fp_montage_<k>.png``: each region cropped with context, its id and the
  detectors that fired burned in, 48 per sheet.

A reviewer then writes ``docs/results/detection_fp_review.json`` (region id →
``face`` / ``partial`` / ``not_face``) and ``--review`` recomputes every detector's
precision counting reviewed unannotated faces as neither true nor false
(the set's README: its ground truth is not exhaustive).

Example::

    python scripts/analyse_detector_fps.py --set caltech_webfaces_dev --out /tmp/fps
    python scripts/analyse_detector_fps.py --set caltech_webfaces_dev --out /tmp/fps \
        --review docs/results/detection_fp_review.json --json docs/results/detection_fp_analysis.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def _regions(per_det: dict[str, list[list[tuple[np.ndarray, float]]]], n_images: int) -> list[dict[str, Any]]:
    """Group overlapping false boxes of all detectors, image by image."""
    from facepipe.evaluate import box_iou_matrix

    out: list[dict[str, Any]] = []
    for i in range(n_images):
        items = [(name, b, s) for name, imgs in per_det.items() for b, s in imgs[i]]
        items.sort(key=lambda t: -t[2])
        groups: list[dict[str, Any]] = []
        for name, b, s in items:
            for g in groups:
                if box_iou_matrix(b[None], np.asarray(g["box"])[None])[0, 0] >= 0.3:
                    g["detectors"].setdefault(name, round(float(s), 4))
                    break
            else:
                groups.append({"image": i, "box": [round(float(v), 1) for v in b],
                               "detectors": {name: round(float(s), 4)}})
        out.extend(groups)
    for k, g in enumerate(out):
        g["id"] = k
    return out


def _montage(regions: list[dict[str, Any]], images: list[Path], gt: list[Any], out: Path,
             per_sheet: int = 30) -> list[str]:
    """Crops (2.5× context) of every region: the false box in red, annotated faces in green."""
    from PIL import Image, ImageDraw

    names = []
    tile = 200
    cols = 6
    for s in range(0, len(regions), per_sheet):
        chunk = regions[s:s + per_sheet]
        rows = (len(chunk) + cols - 1) // cols
        sheet = Image.new("RGB", (cols * tile, rows * (tile + 24)), "white")
        draw = ImageDraw.Draw(sheet)
        for j, r in enumerate(chunk):
            im = Image.open(images[r["image"]]).convert("RGB")
            x, y, w, h = r["box"]
            cx, cy, side = x + w / 2, y + h / 2, max(w, h) * 2.5
            crop = im.crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)))
            crop = crop.resize((tile, tile))
            d2 = ImageDraw.Draw(crop)
            q = tile / side
            for b in gt[r["image"]].boxes:
                d2.rectangle([(b.x - (cx - side / 2)) * q, (b.y - (cy - side / 2)) * q,
                              (b.x + b.w - (cx - side / 2)) * q, (b.y + b.h - (cy - side / 2)) * q],
                             outline=(0, 255, 0))
            d2.rectangle([(x - (cx - side / 2)) * q, (y - (cy - side / 2)) * q,
                          (x + w - (cx - side / 2)) * q, (y + h - (cy - side / 2)) * q], outline=(255, 0, 0))
            px, py = (j % cols) * tile, (j // cols) * (tile + 24)
            sheet.paste(crop, (px, py))
            short = {"cnn": "C", "mtcnn": "M", "retinaface": "R", "haar": "H"}
            tag = "".join(short.get(n, n[0]) for n in r["detectors"])
            draw.text((px + 2, py + tile + 1), f"#{r['id']} {tag} {int(w)}px", fill=(0, 0, 0))
        name = out / f"fp_montage_{s // per_sheet}.png"
        sheet.save(name)
        names.append(str(name))
    return names


def main(argv: list[str] | None = None) -> int:
    """Collect, render and (with a review) re-score the false boxes of a detection set."""
    from bench_detectors import build, match

    from facepipe.evaluate import load_annotations
    from facepipe.io import load_image as read_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="caltech_webfaces_dev")
    ap.add_argument("--detectors", nargs="+", default=["cnn", "mtcnn", "retinaface"])
    ap.add_argument("--out", type=Path, required=True, help="folder for regions JSON and montages")
    ap.add_argument("--review", type=Path, help="reviewed verdicts (region id -> face/partial/not_face)")
    ap.add_argument("--json", type=Path, help="write the re-scored summary here")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    data = Path(os.environ.get("FACEPIPE_DATA", ROOT.parent / "shared" / "data"))
    gts = load_annotations(data / "detection" / a.set)
    a.out.mkdir(parents=True, exist_ok=True)
    cache = a.out / "detections.json"
    dets: dict[str, list[list[list[float]]]] = json.loads(cache.read_text()) if cache.exists() else {}
    from facepipe.types import Box, Detection

    for name in a.detectors:
        if name in dets:
            continue
        det = build(name, "cpu")
        rows = []
        for g in gts:
            rows.append([[d.box.x, d.box.y, d.box.w, d.box.h, d.score] for d in det.detect(read_image(g.path))])
        dets[name] = rows
        cache.write_text(json.dumps(dets))
    per_det: dict[str, list[list[tuple[np.ndarray, float]]]] = {}
    tp: dict[str, int] = {}
    for name in a.detectors:
        per_det[name] = []
        tp[name] = 0
        for rows, g in zip(dets[name], gts):
            objs = [Detection(Box(*r[:4]), r[4], name) for r in rows]
            true, _ = match(objs, list(g.boxes), 0.3)
            tp[name] += int(true.sum())
            per_det[name].append([(np.asarray(r[:4]), r[4]) for r, t in zip(rows, true) if not t])
    regions = _regions(per_det, len(gts))
    (a.out / "fp_regions.json").write_text(json.dumps(regions, indent=1))
    sheets = _montage(regions, [g.path for g in gts], gts, a.out)
    n_gt = sum(len(g.boxes) for g in gts)
    summary: dict[str, Any] = {
        "meta": {"command": "python scripts/analyse_detector_fps.py " + " ".join(argv or sys.argv[1:]),
                 "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "machine": f"{platform.machine()} {os.cpu_count()} CPU core(s), shared", "set": a.set,
                 "iou": 0.3, "faces": n_gt, "images": len(gts)},
        "regions": len(regions), "sheets": sheets, "detectors": {}}
    verdict: dict[int, str] = {}
    if a.review:
        verdict = {int(k): v for k, v in json.loads(a.review.read_text())["verdicts"].items()}
    for name in a.detectors:
        fp = sum(len(x) for x in per_det[name])
        row: dict[str, Any] = {"tp": tp[name], "fp": fp, "precision": round(tp[name] / max(tp[name] + fp, 1), 4),
                               "recall": round(tp[name] / n_gt, 4)}
        if verdict:
            mine = [r for r in regions if name in r["detectors"]]
            kinds = {k: sum(1 for r in mine if verdict.get(r["id"]) == k) for k in ("face", "drawing", "partial", "not_face")}
            kinds["unreviewed"] = sum(1 for r in mine if r["id"] not in verdict)
            row["false_boxes_by_verdict"] = kinds
            fp_real = fp - kinds["face"]
            row["precision_unannotated_faces_excluded"] = round(tp[name] / max(tp[name] + fp_real, 1), 4)
            sizes: dict[str, dict[str, int]] = {}
            for r in mine:
                side = float(np.sqrt(r["box"][2] * r["box"][3]))
                bin_ = "<20" if side < 20 else ("20-40" if side < 40 else ">=40")
                v = verdict.get(r["id"], "unreviewed")
                sizes.setdefault(v, {"<20": 0, "20-40": 0, ">=40": 0})[bin_] += 1
            row["false_regions_by_verdict_and_size"] = sizes
        summary["detectors"][name] = row
    print(json.dumps(summary["detectors"], indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
