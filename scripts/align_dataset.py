#!/usr/bin/env python
"""Detect (MTCNN, 5 landmarks) and align every face of a data set once, into a cached NPZ.

Training and the verification benchmark read these caches instead of decoding and
detecting 10k photos each run. The crops go through :func:`facepipe.align.align_face`,
the same function every embedding path uses.

Sources (``--kind``):

* ``identities``: ``<root>/<person>/<image>``; one face per photo, the detection nearest
  the image centre (LFW photos are centred on the labelled person). Labels = person.
* ``detection``: ``<root>/annotations.json`` images; every MTCNN face (no labels).
* ``video``: every ``--video-step``-th frame of each video; every MTCNN face (no labels).

Examples::

    python scripts/align_dataset.py --kind identities \
        --root ../shared/data/identities/lfw_devtrain --out out/aligned/lfw_devtrain_112.npz
    python scripts/align_dataset.py --kind detection \
        --root ../shared/data/detection/caltech_webfaces_dev --out out/aligned/caltech_112.npz

The NPZ holds ``crops`` uint8 (N, S, S, 3), ``labels`` (str, "" when unlabelled),
``sources`` (file path, plus ``#frame`` for video), ``boxes`` float32 (N, 4) xywh,
``landmarks`` float32 (N, 5, 2), ``scores``, ``skipped`` (sources with no face), the
``alignment`` name and, with ``--dlib-shapes``, ``dlib_shapes`` float32 (N, 5, 2): dlib's
5-point shape predicted in the MTCNN box (for ``scripts/fit_chip_template.py`` and dlib chips).

Re-cropping without detecting again: ``--from CACHE`` reuses a cache's detections and
writes crops in another geometry (``--alignment``): ``arcface-5pt-similarity`` (112 px,
the default), ``dlib-chip-5pt`` (150 px, dlib's chip from MTCNN's landmarks, see
:mod:`facepipe.align`) or ``dlib`` (dlib's own ``get_face_chip`` from the stored dlib
shapes, padding 0.25, 150 px; needs the ``[peers]`` extra)::

    python scripts/align_dataset.py --from out/aligned/lfw_multi_112.npz --alignment dlib \
        --out out/aligned/lfw_multi_dlib150.npz
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("align_dataset")


def _iter_identities(root: Path, min_images: int = 1, reverse: bool = False, max_images: int = 0) \
        -> Iterator[tuple[str, str, np.ndarray]]:
    from facepipe.datasets import list_identities
    from facepipe.io import load_image

    people = [(k, v) for k, v in list_identities(root).items()
              if len(v) >= min_images and (not max_images or len(v) <= max_images)]
    for person, paths in (people[::-1] if reverse else people):
        for p in paths:
            yield str(p), person, load_image(p)


def _iter_detection(root: Path) -> Iterator[tuple[str, str, np.ndarray]]:
    from facepipe.io import load_image

    ann = json.loads((root / "annotations.json").read_text())
    for item in ann["images"]:
        p = root / item["file"]
        yield str(p), "", load_image(p)


def _iter_video(root: Path, step: int) -> Iterator[tuple[str, str, np.ndarray]]:
    import cv2

    videos = sorted(root.glob("*.mp4")) if root.is_dir() else [root]
    for v in videos:
        cap = cv2.VideoCapture(str(v))
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % step == 0:
                yield f"{v}#{i}", "", np.ascontiguousarray(frame[:, :, ::-1])
            i += 1
        cap.release()


def _crop(image: np.ndarray, landmarks: np.ndarray, dlib_shape: np.ndarray | None, alignment: str,
          size: int) -> np.ndarray:
    """One aligned crop: facepipe's geometries from MTCNN landmarks, or dlib's own chip from its shape."""
    if alignment == "dlib":
        import dlib

        if dlib_shape is None:
            raise ValueError("dlib chips need dlib shapes")
        pts = dlib.points([dlib.point(int(x), int(y)) for x, y in dlib_shape])
        x0, y0 = np.floor(dlib_shape.min(0)).astype(int)
        x1, y1 = np.ceil(dlib_shape.max(0)).astype(int)
        det = dlib.full_object_detection(dlib.rectangle(int(x0), int(y0), int(x1), int(y1)), pts)
        return np.asarray(dlib.get_face_chip(np.ascontiguousarray(image), det, size, 0.25), np.uint8)
    from facepipe.align import align_to

    return align_to(image, landmarks, alignment, size)


def realign(args: argparse.Namespace) -> int:
    """Crops in ``args.alignment`` for every face of an existing cache (no detection)."""
    from facepipe.io import load_image

    with np.load(args.from_cache, allow_pickle=False) as z:
        meta = {k: z[k] for k in z.files if k != "crops"}
    shapes = meta.get("dlib_shapes")
    if args.alignment == "dlib" and shapes is None:
        raise SystemExit(f"{args.from_cache}: no dlib_shapes; detect again with --dlib-shapes")
    sources = meta["sources"].astype(str)
    crops = np.zeros((len(sources), args.size, args.size, 3), np.uint8)
    t0 = time.time()
    cache: tuple[str, np.ndarray | None] = ("", None)
    for k, src in enumerate(sources):
        path, _, frame = src.partition("#")
        if cache[0] != src:
            if frame:
                import cv2

                cap = cv2.VideoCapture(path)
                cap.set(cv2.CAP_PROP_POS_FRAMES, int(frame))
                ok, bgr = cap.read()
                cap.release()
                if not ok:
                    raise SystemExit(f"{src}: frame unreadable")
                cache = (src, np.ascontiguousarray(bgr[:, :, ::-1]))
            else:
                cache = (src, load_image(path))
        crops[k] = _crop(cache[1], meta["landmarks"][k].astype(np.float64),
                         None if shapes is None else shapes[k].astype(np.float64), args.alignment, args.size)
        if (k + 1) % 1000 == 0:
            log.info("%d/%d crops, %.0fs", k + 1, len(sources), time.time() - t0)
    meta.update(crops=crops, size=args.size, alignment=args.alignment, derived_from=str(args.from_cache))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez(tmp, **meta)
    tmp.replace(args.out)
    log.info("done: %d crops (%s, %d px) in %.0fs -> %s", len(crops), args.alignment, args.size,
             time.time() - t0, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["identities", "detection", "video"])
    ap.add_argument("--root", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--from", dest="from_cache", type=Path, default=None,
                    help="reuse this cache's detections instead of detecting (re-crop only)")
    ap.add_argument("--alignment", choices=["arcface-5pt-similarity", "dlib-chip-5pt", "dlib"],
                    default="arcface-5pt-similarity", help="crop geometry [arcface-5pt-similarity]")
    ap.add_argument("--size", type=int, default=0,
                    help="aligned crop side [112 for arcface, 150 for the dlib geometries]")
    ap.add_argument("--min-face", type=int, default=40, help="smallest face side kept (detection/video) [40]")
    ap.add_argument("--video-step", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="images per MTCNN batch (same-size images)")
    ap.add_argument("--detect-min", type=int, default=20,
                    help="MTCNN min face size for the first pass [20; 60 for LFW is ~3x faster]")
    ap.add_argument("--limit", type=int, default=0, help="stop after this many source images (0 = all)")
    ap.add_argument("--min-images", type=int, default=1, help="identities: only people with this many photos")
    ap.add_argument("--max-images", type=int, default=0,
                    help="identities: only people with at most this many photos (0 = no limit)")
    ap.add_argument("--reverse", action="store_true", help="identities: people in reverse order")
    ap.add_argument("--dlib-shapes", action="store_true",
                    help="also store dlib's 5-point landmarks (shape predictor in the MTCNN box) as "
                         "dlib_shapes; needs the [peers] extra")
    ap.add_argument("--save-every", type=int, default=0,
                    help="also rewrite the output every N source images (usable partial results)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.size:
        args.size = 112 if args.alignment == "arcface-5pt-similarity" else 150
    if args.from_cache is not None:
        return realign(args)
    if args.kind is None or args.root is None:
        ap.error("--kind and --root are required unless --from is given")
    if args.alignment == "dlib" and not args.dlib_shapes:
        args.dlib_shapes = True

    import torch

    from facepipe.detect.mtcnn import MTCNNDetector

    torch.set_num_threads(args.threads)
    det = MTCNNDetector(min_size=args.detect_min, device="cpu")
    it = {"identities": lambda: _iter_identities(args.root, args.min_images, args.reverse, args.max_images),
          "detection": lambda: _iter_detection(args.root),
          "video": lambda: _iter_video(args.root, args.video_step)}[args.kind]()

    crops, labels, sources, boxes, lms, scores, skipped = [], [], [], [], [], [], []
    dshapes: list[np.ndarray] = []
    shape_predictor = None
    if args.dlib_shapes:
        from facepipe.embed.dlib_peer import dlib_shape_predictor

        shape_predictor = dlib_shape_predictor()
    t0 = time.time()
    n = 0
    # A large minimum face size makes MTCNN's image pyramid short (LFW faces are ~100 px);
    # photos where it finds nothing are retried at min_size 20 one by one.
    fine = MTCNNDetector(min_size=20, device="cpu")

    def handle(batch: list[tuple[str, str, np.ndarray]]) -> None:
        results = det.detect_batch([b[2] for b in batch])
        for (src, label, image), faces in zip(batch, results):
            if not faces:
                faces = fine.detect(image)
            faces = [d for d in faces if d.landmarks is not None]
            if args.kind == "identities":
                h, w = image.shape[:2]
                faces = [d for d in faces if d.score >= 0.9] or faces
                if faces:
                    cx, cy = w / 2.0, h / 2.0
                    faces = [min(faces, key=lambda d: (d.box.center[0] - cx) ** 2
                                 + (d.box.center[1] - cy) ** 2)]
            else:
                faces = [d for d in faces if d.score >= 0.95 and min(d.box.w, d.box.h) >= args.min_face]
            if not faces:
                skipped.append(src)
                continue
            for d in faces:
                shape = shape_predictor(image, d.box) if shape_predictor is not None else None
                crops.append(_crop(image, d.landmarks_array(), shape, args.alignment, args.size))
                labels.append(label)
                sources.append(src)
                boxes.append([d.box.x, d.box.y, d.box.w, d.box.h])
                lms.append(d.landmarks_array())
                scores.append(d.score)
                if shape is not None:
                    dshapes.append(shape)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp.npz")
        np.savez(tmp, crops=np.stack(crops) if crops else np.zeros((0, args.size, args.size, 3), np.uint8),
                 labels=np.array(labels), sources=np.array(sources),
                 boxes=np.array(boxes, np.float32).reshape(-1, 4),
                 landmarks=np.array(lms, np.float32).reshape(-1, 5, 2),
                 scores=np.array(scores, np.float32), skipped=np.array(skipped), size=args.size,
                 alignment=args.alignment,
                 **({"dlib_shapes": np.array(dshapes, np.float32).reshape(-1, 5, 2)} if args.dlib_shapes else {}),
                 kind=args.kind, root=str(args.root))
        tmp.replace(args.out)

    batch: list[tuple[str, str, np.ndarray]] = []
    for item in it:
        n += 1
        if args.limit and n > args.limit:
            break
        if batch and (len(batch) >= args.batch or batch[0][2].shape != item[2].shape):
            handle(batch)
            batch = []
        batch.append(item)
        if args.save_every and n % args.save_every == 0:
            save()
        if n % 500 == 0:
            log.info("%d images, %d faces, %d skipped, %.0fs", n, len(crops), len(skipped), time.time() - t0)
    if batch:
        handle(batch)
    save()
    log.info("done: %d source images, %d faces, %d skipped (no face) in %.0fs -> %s",
             n, len(crops), len(skipped), time.time() - t0, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
