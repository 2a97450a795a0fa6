#!/usr/bin/env python
"""LFW-style verification on people held out from every training run, plus CPU/GPU throughput.

Pairs: the benchmark's held-out people (:func:`facepipe.train.embedder_data.people_split`
with fraction 0.2, seed 0: the same per-name rule every training run excludes), dealt
into 10 people-disjoint folds of up to 300 matched + 300 mismatched pairs
(:func:`make_pairs`). Accuracy uses the threshold chosen on the other 9 folds (mean ±
std over folds); ROC AUC and TAR at FAR 1e-2 / 1e-3 over all pairs. Every row is on the
same pairs.

Crops: ``--data`` is the detection cache the pairs come from (``scripts/align_dataset.py``,
ArcFace 112 px). ``--crops NAME=CACHE`` adds caches of the *same faces* in other
geometries (made with ``align_dataset.py --from``): ``dlib-chip-5pt`` (facepipe's dlib-chip
template from MTCNN landmarks) and ``dlib`` (dlib's own chips: its 5-point predictor and
``get_face_chip``). A model row uses the cache of its checkpoint's alignment, or the one
named after ``@``.

Models: ``--model LABEL=SPEC`` where SPEC is a registered embedder name
(``default``, ``dlib-port``, ``dlib`` …) or a checkpoint path, optionally ``@CROPS``;
``--untrained`` adds the floor. Network rows are measured without and with flip TTA
(``--no-flip`` to skip). Throughput: ``embed()`` on ``--speed-n`` aligned crops in batches
of ``--speed-batch``, all rows in this one run (ratios are meaningful even on a shared CPU).

Example (the table in docs/embedding.md)::

    python scripts/bench_verification.py --data out/aligned/lfw_multi_112.npz \\
        --crops dlib-chip-5pt=out/aligned/lfw_multi_tmpl150.npz --crops dlib=out/aligned/lfw_multi_dlib150.npz \\
        --untrained --model "MobileNetV2 (previous default)=mobilenet-v2" \\
        --model "dlib (peer)=dlib" --model "port, dlib chips=dlib-port@dlib" --model "port=dlib-port" \\
        --json docs/embedding_bench.json --plot docs/img/embedding_roc.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
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


def throughput(embedder, crops: np.ndarray, batch: int, repeats: int = 2) -> float:  # noqa: ANN001
    """Aligned faces per second of ``embedder.embed`` on ``crops`` in batches (best of ``repeats``)."""
    embedder.embed(crops[:min(batch, len(crops))])  # warm-up (allocations, autotuning)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(crops), batch):
            embedder.embed(crops[i:i + batch])
        best = max(best, len(crops) / (time.perf_counter() - t))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="detection cache the pairs come from")
    ap.add_argument("--crops", action="append", default=[], metavar="NAME=CACHE",
                    help="same faces in another geometry (dlib-chip-5pt, dlib, ...)")
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=NAME_OR_PATH[@CROPS]")
    ap.add_argument("--untrained", action="store_true")
    ap.add_argument("--no-flip", action="store_true", help="skip the flip-TTA rows")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-n", type=int, default=256, help="crops timed per embedder (0 = skip)")
    ap.add_argument("--speed-batch", type=int, default=64, help="batch size for the throughput timing")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--note", default="", help="free text stored in the JSON meta (e.g. machine load)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from facepipe.device import describe_machine
    from facepipe.embed import load_embedder
    from facepipe.embed.network import untrained_embedder
    from facepipe.train.embedder_data import (
        load_aligned, make_pairs, people_split, roc_points, verification_metrics,
    )

    torch.set_num_threads(args.threads)
    data = load_aligned([args.data])
    _, val_people = people_split(data.labels, args.val_fraction, args.seed)
    val_idx = np.flatnonzero(np.isin(data.labels, sorted(val_people)))
    val = data.subset(val_idx)
    pairs = make_pairs(val.labels, val_people, seed=args.seed)
    caches = {"arcface-5pt-similarity": val.crops}
    for spec in args.crops:
        name, _, path = spec.partition("=")
        other = load_aligned([path])
        if len(other) != len(data) or not np.array_equal(other.sources, data.sources):
            raise SystemExit(f"{path}: not the same faces as {args.data} (make it with align_dataset.py --from)")
        caches[name] = other.crops[val_idx]
        del other
    log.info("held-out validation: %s, %d pairs (%d same); crops: %s", val.summary(), len(pairs),
             int(pairs.same.sum()), {k: v.shape[1:] for k, v in caches.items()})

    def speed_set(crops: np.ndarray) -> np.ndarray:
        reps = -(-args.speed_n // len(crops))
        return np.concatenate([crops] * reps)[: args.speed_n]

    models = []
    if args.untrained:
        models.append(("untrained floor (ImageNet MobileNetV2 + random 128-d head)", None, None))
    for spec in args.model:
        label, _, rest = spec.partition("=")
        target, _, crops_key = rest.partition("@")
        models.append((label, target, crops_key or None))

    rows, curves = [], {}
    for label, target, crops_key in models:
        flips = (False,) if (args.no_flip or target in (None, "dlib")) else (False, True)
        for flip in flips:
            if target is None:
                emb = untrained_embedder(device=args.device)
            elif target == "dlib":
                emb = load_embedder("dlib", device="cpu")
            else:
                emb = load_embedder(target, device=args.device, flip_tta=flip)
            key = crops_key or ("dlib" if target == "dlib" else getattr(emb, "alignment", "arcface-5pt-similarity"))
            if key not in caches:
                raise SystemExit(f"{label}: needs crops {key!r}; pass --crops {key}=CACHE")
            crops = _resize(caches[key], emb.crop_size)
            t = time.perf_counter()
            vec = emb.embed(crops)
            m = verification_metrics(vec, pairs)
            name = label + (" + flip TTA" if flip else "")
            m["embedder"] = emb.embedder_id
            m["registry_name"] = getattr(emb, "registry_name", None)
            m["crops"] = f"{key} {emb.crop_size}px"
            if args.speed_n:
                dev = "cpu" if target == "dlib" else args.device
                m[f"{dev}_faces_per_s"] = throughput(emb, speed_set(crops), args.speed_batch,
                                                     repeats=1 if target == "dlib" else 2)
                m["speed_batch"] = args.speed_batch
            m["training"] = {k: v for k, v in (getattr(emb, "training", None) or {}).items()
                             if k in ("loss", "regime", "train_seconds", "steps", "data_summary")}
            rows.append((name, m))
            curves[name] = roc_points(vec, pairs)
            log.info("%s: %s (%.0fs)", name, {k: v for k, v in m.items() if k != "training"},
                     time.perf_counter() - t)

    speed_col = f"{args.device} faces/s (batch {args.speed_batch})"
    print(f"| embedder | crops | accuracy ± std | ROC AUC | TAR@FAR=1e-2 | TAR@FAR=1e-3 | {speed_col} |")
    print("|---|---|---|---|---|---|---|")
    for name, m in rows:
        fps = m.get(f"{args.device}_faces_per_s", m.get("cpu_faces_per_s", float("nan")))
        print(f"| {name} | {m['crops']} | {100 * m['accuracy']:.2f} ± {100 * m['accuracy_std']:.2f} % | "
              f"{m['auc']:.4f} | {m['tar@far=0.01']:.3f} | {m['tar@far=0.001']:.3f} | {fps:.1f} |")
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + [
                f'"{a}"' if " " in a else a for a in sys.argv[1:]]),
            "machine": describe_machine(), "torch_threads": args.threads, "device": args.device,
            "pairs": len(pairs), "same_pairs": int(pairs.same.sum()), "validation": val.summary(),
            "split": f"people_split(val_fraction={args.val_fraction}, seed={args.seed}) of {args.data}",
            "note": args.note}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": [{"name": n, **m} for n, m in rows]},
                                        indent=2, default=str) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 5.2))
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
