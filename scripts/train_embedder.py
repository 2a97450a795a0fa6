#!/usr/bin/env python
"""Reproduce facepipe's embedder: teacher descriptors, then metric-learning (+ distillation) training.

Steps (see docs/embedding.md for the exact commands behind the shipped weights)::

    # 1. align every LFW DevTrain photo once (MTCNN landmarks -> ArcFace 112x112)
    python scripts/align_dataset.py --kind identities \
        --root ../shared/data/identities/lfw_devtrain --out out/aligned/lfw_devtrain_112.npz
    # 2. (optional) dlib teacher descriptors for distillation; validation people are skipped
    python scripts/train_embedder.py teacher --data out/aligned/lfw_devtrain_112.npz \
        --out out/aligned/dlib_teacher.npz
    # 3. train (writes a self-describing checkpoint)
    python scripts/train_embedder.py train --data out/aligned/lfw_devtrain_112.npz \
        --loss multisimilarity --steps 600 --out runs/embedder/ms.pt

``facepipe train embedder`` runs step 3 with the same options.

On dlib's face-pretrained trunk (the port, :mod:`facepipe.train.embedder_dlib`), from
150-px ``dlib-chip-5pt`` caches (``align_dataset.py --alignment dlib-chip-5pt``)::

    # transfer: frozen trunk + new head (features cached under out/features/)
    python scripts/train_embedder.py dlib --regime transfer --loss supcon --head linear-bn \
        --data out/aligned/lfw_multi_tmpl150.npz --steps 2000 --lr 1e-3 --out runs/embedder/tr_supcon.pt
    # fine-tune: all layers, small learning rate, early stop on development people
    python scripts/train_embedder.py dlib --regime finetune --loss multisimilarity \
        --data out/aligned/lfw_multi_tmpl150.npz --steps 1500 --lr 2e-5 --out runs/embedder/ft_ms.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("train_embedder")


def teacher(args: argparse.Namespace) -> int:
    """dlib descriptors for the cache's faces (from the original photos and MTCNN boxes)."""
    import torch

    from facepipe.embed.dlib_peer import DlibEmbedder
    from facepipe.io import load_image
    from facepipe.train.embedder_data import people_split
    from facepipe.types import Box, Detection

    torch.set_num_threads(1)
    dl = DlibEmbedder(device="cpu")
    done: dict[str, np.ndarray] = {}
    if args.out.is_file():
        with np.load(args.out) as z:
            done = dict(zip(z["sources"].astype(str), z["descriptors"]))
    todo = []
    for path in args.data:
        with np.load(path) as z:
            labels, sources, boxes = z["labels"].astype(str), z["sources"].astype(str), z["boxes"]
        _, val_people = people_split(labels, args.val_fraction, args.seed)
        want = [k for k in range(len(sources))
                if (labels[k] in val_people) == args.validation and sources[k] not in done]
        rng = np.random.default_rng(args.seed)
        want = list(rng.permutation(want))[: args.limit or None]
        todo += [(sources[k], boxes[k]) for k in want]
    log.info("%d faces to describe (%d already cached)", len(todo), len(done))
    t0 = time.time()

    def save() -> None:
        tmp = args.out.with_name(args.out.name + ".tmp.npz")
        np.savez(tmp, sources=np.array(list(done)), descriptors=np.stack(list(done.values())).astype(np.float32),
                 embedder_id=dl.embedder_id)
        tmp.replace(args.out)

    for n, (src, b) in enumerate(todo, 1):
        path = src.split("#")[0]
        image = load_image(path)
        chip = dl.align(image, Detection(Box(*map(float, b)), 1.0, "mtcnn"))
        done[src] = dl.embed(chip[None])[0]
        if n % 100 == 0:
            save()
            log.info("%d/%d, %.2fs/face", n, len(todo), (time.time() - t0) / n)
    if done:
        save()
    log.info("done: %d descriptors in %s", len(done), args.out)
    return 0


def train(args: argparse.Namespace) -> int:
    """Train one embedder and write its checkpoint + a JSON report next to it."""
    from facepipe.train.embedder import EmbedderTrainConfig, train_embedder

    cfg = EmbedderTrainConfig(
        data=[str(p) for p in args.data], loss=args.loss, dim=args.dim, crop_size=args.crop_size,
        steps=args.steps, batch_size=args.batch_size, m_per_class=args.m_per_class, lr=args.lr,
        seed=args.seed, device=args.device, threads=args.threads,
        teacher=str(args.teacher) if args.teacher else None,
        extra_unlabelled=[str(p) for p in args.extra], distill_weight=args.distill_weight,
        distill_batch=args.distill_batch, metric_weight=args.metric_weight, val_fraction=args.val_fraction,
        eval_every=args.eval_every, name=args.name, freeze_blocks=args.freeze_blocks)
    report = train_embedder(cfg, args.out)
    Path(str(args.out) + ".json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["metrics"], indent=2))
    return 0


def dlib(args: argparse.Namespace) -> int:
    """Transfer or fine-tune on dlib's trunk; writes the checkpoint and OUT.json."""
    from facepipe.train.embedder_dlib import DlibTrainConfig, train_dlib_embedder

    cfg = DlibTrainConfig(
        data=[str(p) for p in args.data], regime=args.regime, loss=args.loss, head=args.head, dim=args.dim,
        steps=args.steps, batch_size=args.batch_size, m_per_class=args.m_per_class, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, val_fraction=args.val_fraction,
        val_seed=args.val_seed, eval_every=args.eval_every, patience=args.patience, aug_views=args.aug_views,
        freeze_stem=args.freeze_stem, cut=args.cut, l2sp=args.l2sp, seed=args.seed, device=args.device, threads=args.threads,
        flip_tta=not args.no_flip, name=args.name, registry_name=args.registry_name, select_metric=args.select,
        extra={"command": "python scripts/train_embedder.py " + " ".join(sys.argv[1:])})
    report = train_dlib_embedder(cfg, args.out)
    Path(str(args.out) + ".json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report["best"], indent=2))
    return 0


def distill(args: argparse.Namespace) -> int:
    """Distil a fast student from a dlib-family teacher; writes the checkpoint and OUT.json."""
    from facepipe.train.embedder_distill import DistillConfig, train_student

    cfg = DistillConfig(
        labelled=[str(p) for p in args.data], unlabelled=[str(p) for p in args.unlabelled], teacher=args.teacher,
        layout=args.layout, input_size=args.input_size, init_from_teacher=not args.no_init, steps=args.steps,
        batch_labelled=args.batch_labelled, m_per_class=args.m_per_class, batch_unlabelled=args.batch_unlabelled,
        lr=args.lr, w_reg=args.w_reg, w_kl=args.w_kl, tau=args.tau, w_metric=args.w_metric,
        val_fraction=args.val_fraction, eval_every=args.eval_every, patience=args.patience, seed=args.seed,
        device=args.device, threads=args.threads, name=args.name, registry_name=args.registry_name)
    report = train_student(cfg, args.out)
    Path(str(args.out) + ".json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report["best"], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from facepipe.train.embedder import LOSSES
    from facepipe.train.embedder_distill import STUDENTS
    from facepipe.train.embedder_dlib import HEADS, LOSSES as DLIB_LOSSES, REGIMES, SELECT_METRICS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher", help="cache dlib descriptors for distillation / the benchmark")
    t.add_argument("--data", type=Path, nargs="+", required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--validation", action="store_true", help="describe the validation people instead")
    t.add_argument("--limit", type=int, default=0)
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=teacher)
    r = sub.add_parser("train", help="train an embedder")
    r.add_argument("--data", type=Path, nargs="+", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--loss", choices=LOSSES, default="multisimilarity")
    r.add_argument("--dim", type=int, default=128)
    r.add_argument("--crop-size", type=int, default=112)
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--batch-size", type=int, default=96)
    r.add_argument("--m-per-class", type=int, default=4)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--teacher", type=Path, default=None)
    r.add_argument("--extra", type=Path, nargs="*", default=[])
    r.add_argument("--distill-weight", type=float, default=1.0)
    r.add_argument("--distill-batch", type=int, default=64)
    r.add_argument("--metric-weight", type=float, default=1.0)
    r.add_argument("--val-fraction", type=float, default=0.2)
    r.add_argument("--eval-every", type=int, default=0)
    r.add_argument("--name", default="facepipe-mnv2-128")
    r.add_argument("--freeze-blocks", type=int, default=0,
                   help="freeze MobileNetV2 features[:k] and train the rest from cached trunk features "
                        "(CPU-friendly; flip is then the only augmentation) [0 = full fine-tuning]")
    r.set_defaults(fn=train)
    d = sub.add_parser("dlib", help="transfer / fine-tune on dlib's face-pretrained trunk")
    d.add_argument("--data", type=Path, nargs="+", required=True, help="150-px dlib-chip-5pt caches")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--regime", choices=REGIMES, default="finetune")
    d.add_argument("--loss", choices=DLIB_LOSSES, default="multisimilarity")
    d.add_argument("--head", choices=HEADS, default="linear-bn", help="transfer head")
    d.add_argument("--dim", type=int, default=128)
    d.add_argument("--steps", type=int, default=1000)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--m-per-class", type=int, default=4)
    d.add_argument("--lr", type=float, default=1e-4)
    d.add_argument("--weight-decay", type=float, default=1e-4)
    d.add_argument("--warmup-steps", type=int, default=50)
    d.add_argument("--val-fraction", type=float, default=0.15, help="early-stop people (of the development people)")
    d.add_argument("--val-seed", type=int, default=1)
    d.add_argument("--eval-every", type=int, default=100)
    d.add_argument("--patience", type=int, default=5)
    d.add_argument("--aug-views", type=int, default=2, help="transfer: cached augmented views per photo")
    d.add_argument("--freeze-stem", action="store_true")
    d.add_argument("--cut", type=int, default=10,
                   help="cached activations after blocks[:cut] (transfer and partial fine-tune; the "
                        "fine-tune trains blocks[cut:] + fc); 0 = fine-tune every layer on the fly "
                        "with fresh augmentations [10: after the 128-channel level]")
    d.add_argument("--l2sp", type=float, default=0.0, help="fine-tune: L2-SP pull towards the port's weights")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto")
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--no-flip", action="store_true", help="select without flip TTA (and ship without it)")
    d.add_argument("--select", choices=SELECT_METRICS, default="auc",
                   help="early-stop metric on the people-disjoint early-stop split")
    d.add_argument("--name", default="facepipe-dlib-ft")
    d.add_argument("--registry-name", default=None)
    d.set_defaults(fn=dlib)
    s_ = sub.add_parser("distill", help="distil a fast student from a dlib-family teacher")
    s_.add_argument("--data", type=Path, nargs="+", required=True, help="labelled 150-px dlib-chip-5pt caches")
    s_.add_argument("--unlabelled", type=Path, nargs="*", default=[], help="more 150-px caches (labels unused)")
    s_.add_argument("--teacher", default="dlib-port", help="registered name or checkpoint of the teacher")
    s_.add_argument("--out", type=Path, required=True)
    s_.add_argument("--layout", choices=sorted(STUDENTS), default="slim-5")
    s_.add_argument("--input-size", type=int, default=112)
    s_.add_argument("--no-init", action="store_true", help="random init instead of the teacher's layers")
    s_.add_argument("--steps", type=int, default=3000)
    s_.add_argument("--batch-labelled", type=int, default=48)
    s_.add_argument("--m-per-class", type=int, default=4)
    s_.add_argument("--batch-unlabelled", type=int, default=48)
    s_.add_argument("--lr", type=float, default=5e-4)
    s_.add_argument("--w-reg", type=float, default=1.0)
    s_.add_argument("--w-kl", type=float, default=1.0)
    s_.add_argument("--tau", type=float, default=0.1)
    s_.add_argument("--w-metric", type=float, default=0.2)
    s_.add_argument("--val-fraction", type=float, default=0.15, help="early-stop people (of the development people)")
    s_.add_argument("--eval-every", type=int, default=250)
    s_.add_argument("--patience", type=int, default=6)
    s_.add_argument("--seed", type=int, default=0)
    s_.add_argument("--device", default="auto")
    s_.add_argument("--threads", type=int, default=1)
    s_.add_argument("--name", default="facepipe-dlib-student")
    s_.add_argument("--registry-name", default=None)
    s_.set_defaults(fn=distill)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
