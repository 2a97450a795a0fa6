#!/usr/bin/env python
"""LFW-style verification benchmark on people held out from training, plus embedder throughput.

Pairs: the validation people of :func:`facepipe.train.embedder_data.people_split` (the
same split every training run holds out), dealt into 10 people-disjoint folds of up to
300 matched + 300 mismatched pairs (:func:`make_pairs`). Accuracy uses the threshold
chosen on the other 9 folds; also ROC AUC and TAR at FAR 1e-2 / 1e-3 over all pairs.

Embedders: facepipe checkpoints (``--model LABEL=PATH``), the untrained floor
(``--untrained``) and dlib's ResNet (``--dlib CACHE``: descriptors computed by
``scripts/train_embedder.py teacher --validation`` from the original photos with dlib's
own alignment). Only pairs whose both photos have a dlib descriptor are used when
``--dlib`` is given, so every row is measured on the same pairs.

Example::

    python scripts/bench_verification.py --data out/aligned/lfw_multi_112.npz \
        --model ms=runs/embedder/ms.pt --untrained --dlib out/aligned/dlib_val.npz \
        --json docs/embedding_bench.json --plot docs/img/embedding_roc.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_verification")


def _resize(crops: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if crops.shape[1] == size:
        return crops
    return np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in crops])


def throughput(embedder, crops: np.ndarray, batch: int, repeats: int = 2) -> float:
    """Aligned faces per second of ``embedder.embed`` on ``crops`` (best of ``repeats``)."""
    embedder.embed(crops[:min(8, len(crops))])  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(crops), batch):
            embedder.embed(crops[i:i + batch])
        best = max(best, len(crops) / (time.perf_counter() - t))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", required=True)
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=CHECKPOINT")
    ap.add_argument("--untrained", action="store_true")
    ap.add_argument("--dlib", type=Path, default=None, help="dlib descriptor cache of the validation photos")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-n", type=int, default=256, help="crops timed per embedder (0 = skip)")
    ap.add_argument("--speed-batch", type=int, default=64, help="batch size for the throughput timing")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from facepipe.embed import load_embedder
    from facepipe.embed.network import untrained_embedder
    from facepipe.train.embedder_data import (
        Pairs, load_aligned, make_pairs, people_split, roc_points, verification_metrics,
    )

    torch.set_num_threads(args.threads)
    data = load_aligned(args.data)
    _, val_people = people_split(data.labels, args.val_fraction, args.seed)
    val = data.subset(np.flatnonzero(np.isin(data.labels, sorted(val_people))))
    pairs = make_pairs(val.labels, val_people, seed=args.seed)
    dlib_emb = None
    if args.dlib:
        with np.load(args.dlib) as z:
            table = dict(zip(z["sources"].astype(str), z["descriptors"].astype(np.float32)))
        have = np.array([s in table for s in val.sources])
        keep = have[pairs.i] & have[pairs.j]
        log.info("dlib descriptors for %d/%d validation photos; %d/%d pairs usable",
                 have.sum(), len(have), keep.sum(), len(pairs))
        pairs = Pairs(pairs.i[keep], pairs.j[keep], pairs.same[keep], pairs.fold[keep])
        dlib_emb = np.zeros((len(val), 128), np.float32)
        dlib_emb[have] = np.stack([table[s] for s in val.sources[have]])
    log.info("validation: %s, %d pairs (%d same)", val.summary(), len(pairs), int(pairs.same.sum()))

    rows, curves = [], {}
    speed_crops = None
    if args.speed_n:  # repeat the validation crops when more are asked for than there are
        reps = -(-args.speed_n // len(val.crops))
        speed_crops = np.concatenate([val.crops] * reps)[: args.speed_n]
    models = []
    if args.untrained:
        models.append(("untrained (ImageNet MobileNetV2 + random head)",
                       lambda flip: untrained_embedder(device=args.device)))
    for spec in args.model:
        label, _, path = spec.partition("=")
        models.append((label, lambda flip, p=path: load_embedder(p, device=args.device, flip_tta=flip)))
    for label, make in models:
        for flip in ((False, True) if not label.startswith("untrained") else (False,)):
            emb = make(flip)
            crops = _resize(val.crops, emb.crop_size)
            t = time.perf_counter()
            vec = emb.embed(crops)
            m = verification_metrics(vec, pairs)
            name = label + (" + flip TTA" if flip else "")
            m["embedder"] = emb.embedder_id
            if speed_crops is not None:
                m[f"{args.device}_faces_per_s"] = throughput(emb, _resize(speed_crops, emb.crop_size),
                                                             args.speed_batch)
            m["training"] = {k: v for k, v in getattr(emb, "training", {}).items()
                             if k in ("loss", "train_seconds", "data")}
            rows.append((name, m))
            curves[name] = roc_points(vec, pairs)
            log.info("%s: %s (%.0fs)", name, {k: v for k, v in m.items() if k != "training"},
                     time.perf_counter() - t)
    if dlib_emb is not None:
        m = verification_metrics(dlib_emb, pairs)
        m["embedder"] = "dlib-resnet-v1 (own 5-point alignment, 150x150 chip)"
        if speed_crops is not None:
            from facepipe.embed.dlib_peer import DlibEmbedder
            from facepipe.io import load_image
            from facepipe.types import Box, Detection

            dl = DlibEmbedder()
            with np.load(args.data[0]) as z:
                boxes = dict(zip(z["sources"].astype(str), z["boxes"]))
            chips = np.stack([dl.align(load_image(s), Detection(Box(*map(float, boxes[s])), 1.0, "mtcnn"))
                              for s in val.sources[:32]])
            m["cpu_faces_per_s"] = throughput(dl, chips, 32, repeats=1)
        rows.append(("dlib ResNet (peer)", m))
        curves["dlib ResNet (peer)"] = roc_points(dlib_emb, pairs)
        log.info("dlib: %s", m)

    print(f"| embedder | accuracy ± std | ROC AUC | TAR@FAR=1e-2 | TAR@FAR=1e-3 | {args.device} faces/s |")
    print("|---|---|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {100 * m['accuracy']:.2f} ± {100 * m['accuracy_std']:.2f} % | {m['auc']:.4f} | "
              f"{m['tar@far=0.01']:.3f} | {m['tar@far=0.001']:.3f} | {m.get(f'{args.device}_faces_per_s', m.get('cpu_faces_per_s', float('nan'))):.0f} |")
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "machine": f"{platform.machine()} {platform.processor()} "
            f"torch threads={args.threads}, device={args.device}", "pairs": len(pairs),
            "same_pairs": int(pairs.same.sum()), "validation": val.summary()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": [{"name": n, **m} for n, m in rows]},
                                        indent=2, default=str))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 5))
        for name, (fpr, tpr) in curves.items():
            ax.plot(np.maximum(fpr, 1e-4), tpr, label=name)
        ax.set_xscale("log")
        ax.set_xlim(1e-3, 1)
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_title(f"People-disjoint LFW DevTrain verification ({len(pairs)} pairs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
