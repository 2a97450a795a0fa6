#!/usr/bin/env python
"""Write an embedder's impostor model (open-set calibration record) into its checkpoint.

The record (:class:`facepipe.gallery.openset.ImpostorModel`) holds the similarity
thresholds at false-match rates 0.5 ... 1e-6 for pairs of photos of two *different*
people, with a generalised Pareto fit of the upper tail for rates the data cannot
resolve, and says which people, photos and pairs it came from. A new gallery derives
its threshold from it (``facepipe enroll``), so ``enroll`` + ``identify`` keep the
false-positive identification rate near its target without any calibration data.
The record also holds those people's embeddings (float16) as the **cohort** of
:mod:`facepipe.gallery.cohort`: enrolled faces close to many of them get a penalty.

Development people: the LFW DevTrain people held out of embedder training
(:func:`facepipe.train.embedder_data.people_split`, validation fraction 0.2, seed 0 —
the people every verification benchmark scores on, and never trained on). Each photo
goes through the same pipeline as ``facepipe enroll`` (default detector, the
embedder's alignment, the largest face); photos without a face are left out. The
embeddings are cached in ``out/calibration/``.

Usage::

    python scripts/calibrate_embedder.py facepipe/weights/embedder_default.pt
    python scripts/calibrate_embedder.py runs/x.pt --dry-run --json out/x_calibration.json

The checkpoint is rewritten atomically with one new top-level entry, ``calibration``;
its weights (and so the embedder id) are unchanged, which the script verifies.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("calibrate_embedder")


def dev_people(data: Path, val_fraction: float, seed: int) -> tuple[dict[str, list[Path]], str]:
    """LFW DevTrain people held out of every embedder's training, with their photos, and the
    name of the function that chose them."""
    from facepipe.datasets import list_identities
    from facepipe.train import embedder_data

    lfw = list_identities(data / "identities" / "lfw_devtrain")
    bench = getattr(embedder_data, "benchmark_heldout_people", None)
    if bench is not None and (val_fraction, seed) == (0.2, 0):
        _, val = bench(data / "identities" / "lfw_devtrain")
        how = "facepipe.train.embedder_data.benchmark_heldout_people"
    else:
        _, val = embedder_data.people_split(np.asarray(sorted(lfw)), val_fraction, seed)
        how = "facepipe.train.embedder_data.people_split"
    return {p: lfw[p] for p in sorted(val)}, how


def embed_photos(pipe: object, people: dict[str, list[Path]], cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Unit embedding of the largest face of every photo (cached); ``(vectors, labels)``."""
    from facepipe.errors import FacepipeError
    from facepipe.io import load_image

    items = [(p, f) for p, fs in people.items() for f in fs]
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if int(z["n_items"]) == len(items):
            log.info("embeddings from cache %s", cache)
            return z["vectors"], z["labels"]
    vecs, labels, t0 = [], [], time.time()
    for k, (person, f) in enumerate(items):
        try:
            res = pipe.process(load_image(f))  # type: ignore[attr-defined]
        except FacepipeError as exc:
            log.warning("%s", exc)
            continue
        if res.faces:
            best = max(res.faces, key=lambda face: face.detection.box.area)
            vecs.append(np.asarray(best.embedding, np.float32))
            labels.append(person)
        if (k + 1) % 200 == 0:
            log.info("%d/%d photos, %.0fs", k + 1, len(items), time.time() - t0)
    v, lab = np.stack(vecs), np.asarray(labels)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, vectors=v, labels=lab, n_items=len(items))
    return v, lab


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--detector", default=None, help="detector of the pipeline [facepipe's default]")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=ROOT / "out" / "calibration")
    ap.add_argument("--dry-run", action="store_true", help="compute and print the record, do not write it")
    ap.add_argument("--json", type=Path, default=None, help="also write the record here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from facepipe import defaults
    from facepipe.builders import build_pipeline
    from facepipe.datasets import data_root
    from facepipe.gallery.openset import compute_impostor_model

    torch.set_num_threads(args.threads)
    detector = args.detector or defaults.DETECTOR
    pipe = build_pipeline(detector, str(args.checkpoint), args.device, largest_only=True)
    emb_id = pipe.embedder.embedder_id
    people, split_fn = dev_people(data_root(), args.val_fraction, args.seed)
    n_photos = sum(len(v) for v in people.values())
    log.info("%s: %d held-out LFW people, %d photos", emb_id, len(people), n_photos)
    cache = args.cache / f"{emb_id.replace('@', '_').replace('+', '_')}_{detector}_lfwval{args.val_fraction}-s{args.seed}.npz"
    vecs, labels = embed_photos(pipe, people, cache)
    data = {
        "set": "LFW DevTrain (deep-funneled), people held out of embedder training",
        "split": {"function": split_fn, "val_fraction": args.val_fraction,
                  "seed": args.seed},
        "pipeline": {"detector": detector, "face": "largest", "alignment": "the embedder's (FacePipeline)"},
        "photos": n_photos, "photos_with_a_face": int(len(vecs)),
        "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
    }
    model = compute_impostor_model(vecs, labels, emb_id, data)
    rec = model.to_dict()
    for f, t, e in zip(model.fmr, model.thresholds, model.empirical):
        log.info("FMR %-7g threshold %.4f (%s)", f, t, "empirical" if e else "tail fit")
    log.info("tail: %s; %d people, %d photos, %d impostor pairs", model.tail, model.n_people, model.n_images,
             model.n_pairs)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rec, indent=1) + "\n")
    if args.dry_run:
        print(json.dumps(rec, indent=1))
        return 0
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    ckpt["calibration"] = rec
    tmp = args.checkpoint.with_name(f".{args.checkpoint.name}.tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, args.checkpoint)
    from facepipe.embed import load_embedder
    from facepipe.gallery.openset import impostor_model_for

    again = load_embedder(str(args.checkpoint), device="cpu")
    if again.embedder_id != emb_id or impostor_model_for(again) is None:
        raise SystemExit(f"{args.checkpoint}: the rewritten checkpoint does not load back with its record")
    log.info("wrote the calibration record into %s (%s)", args.checkpoint, emb_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
