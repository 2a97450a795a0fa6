#!/usr/bin/env python
"""Landmark quality of the detectors: error against MTCNN and against human points, and what it does to recognition.

1. **Against MTCNN on held-out LFW people** (the people the detector and the embedder
   never trained on: :func:`facepipe.train.embedder_data.people_split`, seed 0, 20 %):
   normalised mean error (NME, mean point distance / MTCNN's inter-ocular distance) of
   each detector's five landmarks, on the photos of an MTCNN-aligned cache
   (``scripts/align_dataset.py`` output, e.g. ``out/aligned/lfw_multi_112.npz``).
2. **Against human landmarks** on ``caltech_webfaces_dev`` (evaluation only): the set's
   four annotated points (eyes, nose, mouth centre); NME normalised by the annotated
   inter-ocular distance, for every face each detector finds (IoU ≥ 0.3 with the
   annotated head box).
3. **Verification** (the embedding benchmark's protocol, its functions): the same
   photos aligned with each detector's landmarks onto the embedder's own template
   (``Embedder.align_landmarks``: what ``enroll``/``identify`` do), embedded by it, 10-fold people-disjoint pairs
   (:func:`~facepipe.train.embedder_data.make_pairs`) over the photos every detector
   found, accuracy with the threshold chosen on the other folds.

    python scripts/bench_landmarks.py --cache out/aligned/lfw_multi_112.npz --json docs/landmarks_bench.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_landmarks")


def central_face(dets: list[Any], shape: tuple[int, ...]) -> Any:
    """The detection nearest the image centre among those with landmarks (LFW photos are centred)."""
    dets = [d for d in dets if d.landmarks is not None]
    if not dets:
        return None
    cy, cx = shape[0] / 2.0, shape[1] / 2.0
    return min(dets, key=lambda d: (d.box.center[0] - cx) ** 2 + (d.box.center[1] - cy) ** 2)


def nme(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean point distance over the reference's inter-ocular distance (points 0 and 1)."""
    return float(np.linalg.norm(pred - ref, axis=1).mean() / max(np.linalg.norm(ref[0] - ref[1]), 1e-6))


def four_points(lm5: np.ndarray) -> np.ndarray:
    """Five landmarks -> Caltech's four: eyes, nose, mouth centre."""
    return np.stack([lm5[0], lm5[1], lm5[2], (lm5[3] + lm5[4]) / 2.0])


def caltech_nme(det: Any, root: Path) -> dict[str, Any]:
    """NME of ``det``'s landmarks against caltech_webfaces_dev's human points (found faces only)."""
    from facepipe.evaluate import box_iou_matrix
    from facepipe.io import load_image

    ann = json.loads((root / "detection" / "caltech_webfaces_dev" / "annotations.json").read_text())
    errs = []
    n_faces = 0
    for entry in ann["images"]:
        img = load_image(root / "detection" / "caltech_webfaces_dev" / entry["file"])
        gt = np.asarray(entry["boxes"], np.float64).reshape(-1, 4)
        lms = np.asarray(entry["landmarks"], np.float64).reshape(-1, 4, 2)
        n_faces += len(gt)
        dets = [d for d in det.detect(img) if d.landmarks is not None]
        if not dets or not len(gt):
            continue
        db = np.array([[d.box.x, d.box.y, d.box.w, d.box.h] for d in dets])
        iou = box_iou_matrix(db, gt)
        used = set()
        for j in range(len(gt)):
            k = int(np.argmax(iou[:, j]))
            if iou[k, j] >= 0.3 and k not in used:
                used.add(k)
                errs.append(nme(four_points(dets[k].landmarks_array()), lms[j]))
    e = np.asarray(errs)
    return {"faces": n_faces, "faces_found": len(e), "nme_mean": round(float(e.mean()), 4) if len(e) else None,
            "nme_median": round(float(np.median(e)), 4) if len(e) else None,
            "failures_nme_gt_0.1": round(float((e > 0.1).mean()), 4) if len(e) else None}


def main(argv: list[str] | None = None) -> int:
    import torch

    from facepipe.datasets import data_root
    from facepipe.detect import available_detectors, create_detector
    from facepipe.device import describe_machine
    from facepipe.embed import load_embedder
    from facepipe.embed.base import Embedder
    from facepipe.io import load_image
    from facepipe.train.embedder_data import make_pairs, people_split, verification_metrics

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True, help="MTCNN-aligned cache of LFW (scripts/align_dataset.py)")
    ap.add_argument("--detectors", default="cnn,retinaface", help="detectors whose landmarks are compared with MTCNN's")
    ap.add_argument("--embedder", default="default")
    ap.add_argument("--max-photos", type=int, default=0, help="cap on held-out photos (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    root = args.data or data_root()
    labels_ = [d for d in args.detectors.split(",") if d]
    labels_ = [d for d in labels_ if d in available_detectors()]
    dets = {lab: create_detector(lab, device="cpu") if lab != "retinaface" else create_detector(lab)
            for lab in labels_}

    with np.load(args.cache, allow_pickle=False) as z:
        sources = z["sources"].astype(str)
        labels = z["labels"].astype(str)
        mt_lms = z["landmarks"].astype(np.float64)
    _, val_people = people_split(labels, 0.2, 0)
    idx = np.flatnonzero(np.isin(labels, sorted(val_people)))
    if args.max_photos:
        idx = idx[: args.max_photos]
    log.info("%d held-out photos of %d people", len(idx), len(set(labels[idx])))
    embedder = load_embedder(args.embedder, device="cpu")
    if type(embedder).align is not Embedder.align:  # dlib's peer aligns from its own 68 points, not five
        ap.error(f"--embedder {args.embedder}: it aligns faces its own way; landmark-based alignment "
                 "cannot be compared with it")
    crops: dict[str, list[np.ndarray | None]] = {"mtcnn": [], **{k: [] for k in dets}}
    errors: dict[str, list[float]] = {k: [] for k in dets}
    t0 = time.time()
    for n, i in enumerate(idx):
        img = load_image(sources[i])
        crops["mtcnn"].append(embedder.align_landmarks(img, mt_lms[i]))
        for lab, det in dets.items():
            face = central_face(det.detect(img), img.shape)
            if face is None or face.box.iou(_box_of(mt_lms[i])) < 0.05:
                crops[lab].append(None)
                continue
            lm = face.landmarks_array().astype(np.float64)
            errors[lab].append(nme(lm, mt_lms[i]))
            crops[lab].append(embedder.align_landmarks(img, lm))
        if (n + 1) % 200 == 0:
            log.info("%d/%d photos, %.0fs", n + 1, len(idx), time.time() - t0)
    found = np.array([all(crops[k][j] is not None for k in crops) for j in range(len(idx))])
    log.info("every detector found the face in %d/%d photos", found.sum(), len(idx))
    sub = idx[found]
    pairs = make_pairs(labels[sub], set(labels[sub]), seed=0)
    verification: dict[str, Any] = {}
    for lab, cs in crops.items():
        x = np.stack([c for c, ok in zip(cs, found) if ok])
        emb = embedder.embed(x)
        verification[lab] = verification_metrics(emb, pairs)
        log.info("%s landmarks: %s", lab, verification[lab])
    out: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/bench_landmarks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": describe_machine(),
        "embedder": getattr(embedder, "embedder_id", args.embedder),
        "held_out_photos": int(len(idx)), "held_out_people": int(len(set(labels[idx]))),
        "photos_found_by_all": int(found.sum()),
        "detector_missed": {lab: int(sum(c is None for c in crops[lab])) for lab in dets},
        "nme_vs_mtcnn_lfw_heldout": {lab: {"mean": round(float(np.mean(e)), 4), "median": round(float(np.median(e)), 4),
                                           "p90": round(float(np.percentile(e, 90)), 4), "faces": len(e)}
                                     for lab, e in errors.items() if e},
        "verification": {"pairs": int(len(pairs)), "same_pairs": int(pairs.same.sum()),
                         "by_landmarks": verification},
        "caltech_human_points": {lab: caltech_nme(d, root) for lab, d in
                                 {**dets, "mtcnn": create_detector("mtcnn", device="cpu")}.items()},
    }
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


def _box_of(lm5: np.ndarray) -> Any:
    """A loose box around five landmarks (for checking a detection is the same face)."""
    from facepipe.types import Box

    x0, y0 = lm5.min(axis=0)
    x1, y1 = lm5.max(axis=0)
    s = max(x1 - x0, y1 - y0) * 1.5
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return Box(cx - s, cy - s, 2 * s, 2 * s)


if __name__ == "__main__":
    raise SystemExit(main())
