"""Metric-learning training of the face embedder (pytorch-metric-learning losses and sampler).

One function, :func:`train_embedder`, trains from aligned caches (``scripts/align_dataset.py``)
with a people-disjoint validation split, seeded, on CPU or CUDA (bf16 autocast on CUDA),
optionally distilling dlib's descriptors (a teacher cache of ``sources`` → 128-d vectors)
into the student alongside the metric loss, and writes a self-describing checkpoint.

Losses (all from :mod:`pytorch_metric_learning`):

==================  ===============================================================
``triplet-semihard`` TripletMarginLoss(margin 0.2) + TripletMarginMiner("semihard")
``triplet-hard``     TripletMarginLoss(margin 0.2) + TripletMarginMiner("hard")
``contrastive``      ContrastiveLoss(pos_margin 0, neg_margin 1) on L2 distance (margin form)
                     + PairMarginMiner
``multisimilarity``  MultiSimilarityLoss(2, 50, 0.5) + MultiSimilarityMiner(0.1)
``supcon``           SupConLoss(temperature 0.1) (supervised contrastive / InfoNCE)
==================  ===============================================================

Batches come from :class:`pytorch_metric_learning.samplers.MPerClassSampler`
(``m_per_class`` photos of each sampled person).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from facepipe.train.embedder_data import (
    cache_digest, load_aligned, make_pairs, people_split, verification_metrics,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LOSSES = ("triplet-semihard", "triplet-hard", "contrastive", "multisimilarity", "supcon")
VERSION = "1.0"


@dataclass
class EmbedderTrainConfig:
    """Everything that determines a training run (recorded in the checkpoint)."""

    data: list[str]
    loss: str = "multisimilarity"
    dim: int = 128
    crop_size: int = 112
    steps: int = 600
    batch_size: int = 96
    m_per_class: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    threads: int = 2
    teacher: str | None = None       # NPZ with sources + dlib descriptors for distillation
    extra_unlabelled: list[str] = field(default_factory=list)  # more aligned caches (distillation only)
    distill_weight: float = 1.0
    distill_batch: int = 64
    metric_weight: float = 1.0
    flip_tta: bool = True
    eval_every: int = 0
    freeze_blocks: int = 0   # >0: freeze MobileNetV2 features[:k] and train the rest from cached trunk features
    name: str = "facepipe-mnv2-128"


def make_loss(name: str) -> tuple[Any, Any]:
    """The (loss, miner) pair for a loss name (see the module table)."""
    from pytorch_metric_learning import distances, losses, miners

    if name == "triplet-semihard":
        return losses.TripletMarginLoss(margin=0.2), miners.TripletMarginMiner(0.2, type_of_triplets="semihard")
    if name == "triplet-hard":
        return losses.TripletMarginLoss(margin=0.2), miners.TripletMarginMiner(0.2, type_of_triplets="hard")
    if name == "contrastive":
        d = distances.LpDistance(normalize_embeddings=True)
        return (losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance=d),
                miners.PairMarginMiner(pos_margin=0.0, neg_margin=1.0, distance=d))
    if name == "multisimilarity":
        return losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
    if name == "supcon":
        return losses.SupConLoss(temperature=0.1), None
    raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")


def augment(x: "torch.Tensor", out_size: int, gen: "torch.Generator") -> "torch.Tensor":
    """Per-sample random flip, small scale/shift/rotation, brightness/contrast, 10% greyscale.

    ``x`` is float ``(N, 3, S, S)`` in [0, 1]; returns ``(N, 3, out_size, out_size)``.
    """
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    dev = x.device
    r = lambda *s: torch.rand(*s, generator=gen, device="cpu").to(dev)  # noqa: E731
    scale = 1.0 + (r(n) - 0.5) * 0.16
    ang = (r(n) - 0.5) * (2 * math.pi * 10 / 360)
    tx, ty = (r(n) - 0.5) * 0.1, (r(n) - 0.5) * 0.1
    flip = torch.where(r(n) < 0.5, -1.0, 1.0).to(dev)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [n, 3, out_size, out_size], align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    b = 1.0 + (r(n, 1, 1, 1) - 0.5) * 0.4
    c = 1.0 + (r(n, 1, 1, 1) - 0.5) * 0.4
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * c + mean) * b
    grey = (r(n, 1, 1, 1) < 0.1).float()
    y = grey * y.mean(1, keepdim=True).expand_as(y) + (1 - grey) * y
    return y.clamp(0, 1)


def _to_input(crops_u8: np.ndarray, device: "torch.device") -> "torch.Tensor":
    import torch

    return torch.from_numpy(crops_u8).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def embed_array(net: "torch.nn.Module", crops: np.ndarray, crop_size: int, device: "torch.device",
                flip: bool = False, batch: int = 256) -> np.ndarray:
    """Embed uint8 crops with a training network (resizing to ``crop_size``), eval mode."""
    import torch
    import torch.nn.functional as F

    from facepipe.backbones import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    was = net.training
    net.eval()
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=device.type == "cuda"):
        for i in range(0, len(crops), batch):
            x = _to_input(crops[i:i + batch], device)
            if x.shape[-1] != crop_size:
                x = F.interpolate(x, size=(crop_size, crop_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            x = (x - mean) / std
            e = F.normalize(net.forward_unnormalised(x).float(), dim=1)
            if flip:
                e = F.normalize(e + F.normalize(net.forward_unnormalised(torch.flip(x, [3])).float(), dim=1), dim=1)
            out.append(e.cpu().numpy())
    net.train(was)
    return np.concatenate(out) if out else np.zeros((0, net.fc.out_features), np.float32)


def trunk_features(trunk: "torch.nn.Module", crops: np.ndarray, crop_size: int,
                   device: "torch.device", batch: int = 128) -> np.ndarray:
    """Frozen-trunk features of crops and of their mirror images: fp16 ``(2, N, C, h, w)``.

    Used with ``freeze_blocks``: the frozen early layers run once per photo (and once
    per mirrored photo, the only augmentation left) instead of at every step, which
    makes CPU training several times cheaper.
    """
    import torch
    import torch.nn.functional as F

    from facepipe.backbones import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    trunk.eval()
    out: list[list[np.ndarray]] = [[], []]
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=device.type == "cuda"):
        for i in range(0, len(crops), batch):
            x = _to_input(crops[i:i + batch], device)
            if x.shape[-1] != crop_size:
                x = F.interpolate(x, size=(crop_size, crop_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            x = (x - mean) / std
            for f, xx in enumerate((x, torch.flip(x, [3]))):
                out[f].append(trunk(xx).float().cpu().numpy().astype(np.float16))
    return np.stack([np.concatenate(o) for o in out])


def _teacher_table(path: str | None) -> dict[str, np.ndarray]:
    if not path:
        return {}
    with np.load(path, allow_pickle=False) as z:
        return {s: v for s, v in zip(z["sources"].astype(str), z["descriptors"].astype(np.float32))}


def train_embedder(cfg: EmbedderTrainConfig, out: str | Path,
                   progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train, validate on held-out people, and write the checkpoint to ``out``; returns the report."""
    import torch
    import torch.nn.functional as F
    from pytorch_metric_learning.samplers import MPerClassSampler

    from facepipe.backbones import IMAGENET_MEAN, IMAGENET_STD
    from facepipe.device import resolve_device
    from facepipe.embed.network import (
        build_network, default_preprocess, make_checkpoint, save_checkpoint,
    )

    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; valid: {', '.join(LOSSES)}")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)  # MPerClassSampler draws from numpy's global generator
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    data = load_aligned(cfg.data)
    train_people, val_people = people_split(data.labels, cfg.val_fraction, cfg.seed)
    is_train = np.isin(data.labels, sorted(train_people))
    is_val = np.isin(data.labels, sorted(val_people))
    train = data.subset(np.flatnonzero(is_train))
    val = data.subset(np.flatnonzero(is_val))
    pairs = make_pairs(val.labels, val_people, seed=cfg.seed)
    # Metric learning uses people with >= 2 photos; labels as integers for the sampler.
    names, counts = np.unique(train.labels, return_counts=True)
    multi = set(names[counts >= 2].tolist())
    metric_idx = np.flatnonzero(np.isin(train.labels, sorted(multi)))
    label_ids = {n: k for k, n in enumerate(sorted(multi))}
    y_metric = np.array([label_ids[l] for l in train.labels[metric_idx]])
    sampler = MPerClassSampler(y_metric, m=cfg.m_per_class, batch_size=cfg.batch_size,
                               length_before_new_iter=max(len(y_metric), cfg.batch_size))

    # Distillation pool: every crop with a teacher vector that is not a validation person's photo.
    teacher = _teacher_table(cfg.teacher)
    pool_crops, pool_t = [], []
    if teacher:
        extra = load_aligned(cfg.extra_unlabelled) if cfg.extra_unlabelled else None
        val_sources = set(val.sources.tolist())
        for s_ in ([train] + ([extra] if extra is not None else [])):
            keep = [k for k, src in enumerate(s_.sources) if src in teacher and src not in val_sources]
            if keep:
                pool_crops.append(s_.crops[keep])
                pool_t.append(np.stack([teacher[s_.sources[k]] for k in keep]))
    pool_x = np.concatenate(pool_crops) if pool_crops else np.zeros((0,) + data.crops.shape[1:], np.uint8)
    pool_y = np.concatenate(pool_t) if pool_t else np.zeros((0, 128), np.float32)
    if len(pool_x) and cfg.dim != pool_y.shape[1]:
        raise ValueError(f"distillation needs dim == teacher dim ({pool_y.shape[1]}), got {cfg.dim}")

    arch = {"backbone": "mobilenet_v2", "dim": cfg.dim, "dropout": 0.2, "init_seed": cfg.seed}
    net = build_network(arch, pretrained=True).to(device)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    loss_fn, miner = make_loss(cfg.loss)
    k = int(cfg.freeze_blocks)
    feats = pool_feats = val_feats = None
    if k > 0:
        for prm in net.features[:k].parameters():
            prm.requires_grad_(False)
        t_feat = time.time()
        digest = cache_digest(cfg.data)

        def stored(tag: str, crops: np.ndarray) -> np.ndarray:
            # The frozen trunk is the ImageNet one, so its features depend only on the crops:
            # keep them on disk (git-ignored out/) for the next run on the same caches.
            f = Path("out/trunk") / f"{digest}_k{k}_s{cfg.crop_size}_{tag}_{len(crops)}.npy"
            if f.is_file():
                return np.load(f)
            arr = trunk_features(net.features[:k], crops, cfg.crop_size, device)
            f.parent.mkdir(parents=True, exist_ok=True)
            np.save(f, arr)
            return arr

        feats = stored(f"train{cfg.seed}", train.crops[metric_idx])
        val_feats = stored(f"val{cfg.seed}", val.crops)
        if len(pool_x):
            pool_feats = trunk_features(net.features[:k], pool_x, cfg.crop_size, device)
        log.info("trunk features[:%d] cached: %s in %.0fs", k, feats.shape[1:], time.time() - t_feat)

    def head_forward(f: "torch.Tensor") -> "torch.Tensor":
        h = net.features[k:](f)
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        return net.bn(net.fc(net.dropout(h)))

    def cached(arr: np.ndarray, idx: np.ndarray) -> "torch.Tensor":
        flip = (rng.random(len(idx)) < 0.5).astype(np.int64)
        return torch.from_numpy(arr[flip, idx].astype(np.float32)).to(device)

    opt = torch.optim.AdamW([p_ for p_ in net.parameters() if p_.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1))
                                              * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    use_amp = device.type == "cuda"

    summary = {"train": train.summary(), "val": val.summary(), "val_pairs": len(pairs),
               "distill_pool": int(len(pool_x)), "caches": [str(p) for p in cfg.data],
               "cache_digest": cache_digest(cfg.data)}
    log.info("train %s | val %s | pairs %d | distill pool %d | device %s", summary["train"],
             summary["val"], len(pairs), len(pool_x), device)

    def batches():  # endless MPerClass batches
        while True:
            idx = np.fromiter(iter(sampler), dtype=np.int64)
            for b in range(0, len(idx) - cfg.batch_size + 1, cfg.batch_size):
                yield idx[b:b + cfg.batch_size]

    history: list[dict[str, float]] = []
    t0 = time.time()
    it = batches()
    net.train()
    if k > 0:
        net.features[:k].eval()  # frozen trunk keeps its ImageNet batch-norm statistics
    for step in range(cfg.steps):
        bidx = next(it)
        y = torch.from_numpy(y_metric[bidx]).to(device)
        parts = {}
        use_distill = len(pool_x) > 0 and cfg.distill_weight > 0
        if use_distill:
            didx = rng.integers(0, len(pool_x), cfg.distill_batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            if k > 0:
                inputs = [cached(feats, bidx)] + ([cached(pool_feats, didx)] if use_distill else [])
                emb = F.normalize(head_forward(torch.cat(inputs)).float(), dim=1)
            else:
                x = augment(_to_input(train.crops[metric_idx[bidx]], device), cfg.crop_size, gen)
                inputs = [(x - mean) / std]
                if use_distill:
                    xd = augment(_to_input(pool_x[didx], device), cfg.crop_size, gen)
                    inputs.append((xd - mean) / std)
                xin = torch.cat(inputs)
                if device.type == "cpu":
                    xin = xin.contiguous(memory_format=torch.channels_last)
                emb = F.normalize(net.forward_unnormalised(xin).float(), dim=1)
        nb = len(bidx)
        e_m = emb[:nb]
        pairs_mined = miner(e_m, y) if miner is not None else None
        loss = cfg.metric_weight * loss_fn(e_m, y, pairs_mined)
        parts["metric"] = float(loss.detach())
        if len(inputs) > 1:
            e_d = emb[nb:]
            t = torch.from_numpy(pool_y[didx]).to(device)
            cos = 1.0 - (e_d * t).sum(1).mean()
            rel = F.mse_loss(e_d @ e_d.T, t @ t.T)
            dl = cfg.distill_weight * (cos + rel)
            parts["distill"] = float(dl.detach())
            loss = loss + dl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        parts["loss"] = float(loss.detach())
        parts["step"] = step + 1
        parts["seconds"] = time.time() - t0
        if (step + 1) % 10 == 0 or step == 0:
            history.append(parts)
            log.info("step %d/%d loss %.4f %s %.0fs", step + 1, cfg.steps, parts["loss"],
                     {k: round(v, 4) for k, v in parts.items() if k in ("metric", "distill")}, parts["seconds"])
        if progress is not None:
            progress(step + 1, parts)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            m = verification_metrics(embed_array(net, val.crops, cfg.crop_size, device), pairs)
            log.info("step %d val %s", step + 1, m)
            if k > 0:
                net.features[:k].eval()
    train_seconds = time.time() - t0
    if val_feats is not None:  # same computation as embed_array, reusing the frozen trunk's features
        net.eval()
        with torch.inference_mode():
            ev = [F.normalize(torch.cat([head_forward(torch.from_numpy(val_feats[f, i:i + 256].astype(np.float32))
                                                      .to(device)).float()
                                         for i in range(0, val_feats.shape[1], 256)]), dim=1)
                  for f in (0, 1)]
        plain, flipped = ev[0].cpu().numpy(), F.normalize(ev[0] + ev[1], dim=1).cpu().numpy()
    else:
        plain = embed_array(net, val.crops, cfg.crop_size, device)
        flipped = embed_array(net, val.crops, cfg.crop_size, device, flip=True) if cfg.flip_tta else None
    metrics = {"plain": verification_metrics(plain, pairs)}
    if cfg.flip_tta and flipped is not None:
        metrics["flip"] = verification_metrics(flipped, pairs)
    log.info("final val %s", metrics)
    training = {"loss": cfg.loss, "config": asdict(cfg), "data": summary, "train_seconds": train_seconds,
                "device": str(device), "amp": "bf16" if use_amp else "fp32",
                "val_metrics": metrics, "history_tail": history[-5:],
                "validation": "people-disjoint split (people_split) of the aligned caches; LFW-style 10-fold pairs"}
    ck = make_checkpoint(net, name=cfg.name, version=VERSION, arch=arch,
                         preprocess=default_preprocess(cfg.crop_size, flip_tta=cfg.flip_tta), training=training)
    save_checkpoint(ck, out)
    return {"checkpoint": str(out), "metrics": metrics, "train_seconds": train_seconds, "data": summary}
