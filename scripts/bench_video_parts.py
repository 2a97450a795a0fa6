#!/usr/bin/env python
"""Two small measurements behind design choices in docs/video.md, written to one JSON.

* ``landmarks``: the video path's batched O-Net landmarks on detector boxes
  (:class:`facepipe.video.OnetLandmarker`) against the full MTCNN refinement that
  ``identify`` runs on the face region (:meth:`facepipe.pipeline.FacePipeline.find_landmarks`),
  on the Haar faces of the first photo of the first ``--people`` LFW DevTrain people:
  mean / p90 landmark distance as a fraction of the reference eye distance, and the time
  of each method one face at a time (one thread).
* ``shotcuts``: the colour-signature distance (:func:`facepipe.video.shot_distance`)
  between consecutive frames (every ``--step``-th) of each clip in the data's ``videos/``,
  with the frames above the cut threshold and the largest distance below it.

    python scripts/bench_video_parts.py --out docs/video_parts.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def landmarks(data: Path, people: int) -> dict:
    from facepipe.datasets import list_identities
    from facepipe.detect import create_detector
    from facepipe.embed import load_embedder
    from facepipe.io import load_image
    from facepipe.pipeline import FacePipeline
    from facepipe.video import OnetLandmarker

    lfw = list_identities(data / "identities" / "lfw_devtrain")
    haar = create_detector("haar", min_size=40)
    pipe = FacePipeline(haar, load_embedder("untrained", device="cpu"), device="cpu")
    onet = OnetLandmarker(device="cpu")
    images, boxes = [], []
    for person in list(lfw)[:people]:
        im = load_image(lfw[person][0])
        dets = haar.detect(im)
        if dets:
            images.append(im)
            boxes.append(max(dets, key=lambda d: d.box.w * d.box.h).box)
    t0 = time.perf_counter()
    refs = [pipe.find_landmarks(im, b) for im, b in zip(images, boxes)]
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = [onet([im], [[b]])[0][0] for im, b in zip(images, boxes)]
    t_onet = time.perf_counter() - t0
    errs = []
    for ref, lm in zip(refs, got):
        if ref is None or lm is None:
            continue
        ref, lm = np.asarray(ref), np.asarray(lm)
        errs.append(float(np.linalg.norm(lm - ref, axis=1).mean() / np.linalg.norm(ref[0] - ref[1])))
    e = np.asarray(errs)
    return {"people": people, "haar_faces": len(images), "compared": int(e.size),
            "no_reference": int(sum(r is None for r in refs)), "onet_rejected": int(sum(g is None for g in got)),
            "error_mean_pct": round(100 * float(e.mean()), 1), "error_p90_pct": round(100 * float(np.percentile(e, 90)), 1),
            "seconds_full_mtcnn": round(t_full, 2), "seconds_onet": round(t_onet, 2),
            "speedup": round(t_full / t_onet, 1)}


def shotcuts(data: Path, step: int) -> dict:
    import cv2

    from facepipe.video import SHOT_CUT_DISTANCE, frame_signature, shot_distance

    out = {"threshold": SHOT_CUT_DISTANCE, "step": step, "clips": {}}
    for clip in sorted((data / "videos").glob("*.mp4")):
        cap = cv2.VideoCapture(str(clip))
        prev, i, dists = None, 0, []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % step == 0:
                sig = frame_signature(np.ascontiguousarray(frame[:, :, ::-1]))
                if prev is not None:
                    dists.append((i, shot_distance(prev, sig)))
                prev = sig
            i += 1
        cap.release()
        cuts = [(f, round(d, 2)) for f, d in dists if d > SHOT_CUT_DISTANCE]
        within = [d for _, d in dists if d <= SHOT_CUT_DISTANCE]
        out["clips"][clip.name] = {"frames": i, "cuts": [{"frame": f, "distance": d} for f, d in cuts],
                                   "cut_distance_min": min((d for _, d in cuts), default=None),
                                   "cut_distance_max": max((d for _, d in cuts), default=None),
                                   "within_shot_max": round(max(within), 2) if within else None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "video_parts.json")
    ap.add_argument("--people", type=int, default=60, help="LFW people for the landmark comparison [60]")
    ap.add_argument("--step", type=int, default=1, help="frame step for the shot distances [1]")
    ap.add_argument("--only", choices=["landmarks", "shotcuts"], default=None)
    args = ap.parse_args(argv)
    import torch

    from facepipe.datasets import data_root

    torch.set_num_threads(1)
    data = data_root()
    doc = {"command": "python scripts/bench_video_parts.py" + "".join(
               f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": f"{platform.machine()} {os.cpu_count()} cores (shared; load average "
                      f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the start), torch 1 thread"}
    if args.only in (None, "landmarks"):
        doc["landmarks"] = landmarks(Path(data), args.people)
        print(json.dumps(doc["landmarks"]))
    if args.only in (None, "shotcuts"):
        doc["shotcuts"] = shotcuts(Path(data), args.step)
        print(json.dumps(doc["shotcuts"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
