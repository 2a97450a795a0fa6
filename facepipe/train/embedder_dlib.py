"""Metric learning on dlib's face-pretrained ResNet: transfer (frozen trunk + new head) and fine-tuning.

Both regimes start from the port of dlib's public-domain network
(:mod:`facepipe.embed.dlib_resnet`), train on crops in the run-time geometry
(``dlib-chip-5pt`` 150×150 chips from MTCNN landmarks: ``scripts/align_dataset.py
--alignment dlib-chip-5pt``), and never see the benchmark's held-out people
(:func:`facepipe.train.embedder_data.is_heldout`; rows of those people are dropped and
counted). Early stopping and model selection use a *second*, independent
people-disjoint split of the remaining development people (``val_fraction``,
``val_seed``), never the benchmark pairs.

* ``transfer``: the trunk (everything up to global pooling, 256-d) is frozen; its
  features are computed once per photo for the plain crop, the mirror image and
  ``aug_views`` augmented copies and cached on disk, and only a new head is trained —
  seconds to minutes per loss on the CPU.
* ``finetune``: every layer (or all but the stem, ``freeze_stem``) is trained at a small
  learning rate with fresh augmentations each step.

Losses: :func:`make_loss_for` (pytorch-metric-learning), with margins set for dlib's
embedding geometry (its own decision threshold, L2 distance 0.6 between ~unit vectors,
is cosine ≈ 0.82): ``triplet`` (semi-hard mining, margin 0.1), ``contrastive``
(positive margin 0, negative margin 0.8 in L2 distance), ``multisimilarity``
(base 0.75), ``supcon`` (InfoNCE form, temperature 0.1) and ``dlib-metric`` (dlib's own
``loss_metric`` as a contrastive loss on the raw vectors: same person within L2 0.56,
others beyond 0.64).

:class:`MetricTrainer` is one optimisation step on a batch, usable on its own (the GPU
benchmark times ``MetricTrainer.step``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from facepipe.train.embedder_data import (
    AlignedSet, Pairs, cache_digest, is_heldout, load_aligned, make_pairs, people_split, verification_metrics,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LOSSES = ("triplet", "contrastive", "multisimilarity", "supcon", "dlib-metric")
#: Losses computed on the raw (unnormalised) embedding, as dlib trains and compares.
RAW_LOSSES = ("dlib-metric",)
REGIMES = ("transfer", "finetune")
HEADS = ("linear", "linear-bn", "mlp", "dlib-fc")
#: Early-stop metrics (keys of the verification metrics) a run can select its step by.
SELECT_METRICS = ("auc", "accuracy", "tar@far=0.001", "tar@far=0.01")
VERSION = "2.0"


def make_loss_for(name: str) -> tuple[Any, Any]:
    """(loss, miner) for dlib-geometry metric learning (module docstring)."""
    from pytorch_metric_learning import distances, losses, miners

    if name == "triplet":
        return (losses.TripletMarginLoss(margin=0.1),
                miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard"))
    if name == "contrastive":
        d = distances.LpDistance(normalize_embeddings=True)
        return (losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.8, distance=d),
                miners.PairMarginMiner(pos_margin=0.0, neg_margin=0.8, distance=d))
    if name == "multisimilarity":
        return (losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.75),
                miners.MultiSimilarityMiner(epsilon=0.1))
    if name == "supcon":
        return losses.SupConLoss(temperature=0.1), None
    if name == "dlib-metric":
        # dlib's own loss_metric: raw L2 distances, same person below 0.6 - 0.04, others above
        # 0.6 + 0.04; only violating pairs contribute (gentle on an already trained network)
        d = distances.LpDistance(normalize_embeddings=False)
        return (losses.ContrastiveLoss(pos_margin=0.56, neg_margin=0.64, distance=d),
                miners.PairMarginMiner(pos_margin=0.56, neg_margin=0.64, distance=d))
    raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")


@dataclass
class DlibTrainConfig:
    """Everything that determines a run (recorded in the checkpoint)."""

    data: list[str]
    regime: str = "finetune"
    loss: str = "multisimilarity"
    head: str = "linear-bn"          # transfer only
    dim: int = 128
    steps: int = 1000
    batch_size: int = 64
    m_per_class: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    val_fraction: float = 0.15
    val_seed: int = 1
    eval_every: int = 100
    patience: int = 5                # evaluations without improvement before stopping
    select_metric: str = "auc"       # early-stop metric: auc, accuracy or tar@far=0.001
    aug_views: int = 2               # transfer: cached augmented views per photo
    freeze_stem: bool = False        # finetune: keep the 7x7 stem fixed
    cut: int = 0                     # finetune: >0 trains blocks[cut:] + fc from cached activations
    l2sp: float = 0.0                # finetune: pull weights towards the port's (L2-SP)
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    flip_tta: bool = True
    feature_cache: str = "out/features"
    name: str = "facepipe-dlib-ft"
    registry_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- data --------------------------------------------------------------------------------------
@dataclass
class DevData:
    """Development data: training people's crops, a people-disjoint early-stopping split, its pairs."""

    train: AlignedSet
    val: AlignedSet
    pairs: Pairs
    summary: dict[str, Any]


def load_dev_data(paths: list[str], val_fraction: float, val_seed: int, seed: int) -> DevData:
    """Load caches, drop the benchmark's held-out people, split the rest into train / early-stop people."""
    data = load_aligned(paths)
    labelled = data.labels != ""
    held = np.array([is_heldout(x) for x in data.labels])
    keep = np.flatnonzero(labelled & ~held)
    dropped = int((labelled & held).sum())
    data = data.subset(keep)
    train_people, val_people = people_split(data.labels, val_fraction, val_seed)
    train = data.subset(np.flatnonzero(np.isin(data.labels, sorted(train_people))))
    val = data.subset(np.flatnonzero(np.isin(data.labels, sorted(val_people))))
    # 10 LFW-style folds; fewer when there are too few early-stop people to fill them
    pairs = make_pairs(val.labels, val_people, folds=max(2, min(10, len(val_people) // 3)), seed=seed)
    summary = {"caches": [str(p) for p in paths], "cache_digest": cache_digest(paths),
               "benchmark_heldout_rows_dropped": dropped, "train": train.summary(), "early_stop_val": val.summary(),
               "early_stop_pairs": len(pairs),
               "split": f"benchmark held-out people excluded (is_heldout); early-stop people = "
                        f"people_split(val_fraction={val_fraction}, seed={val_seed}) of the rest"}
    if len(train) == 0 or len(pairs) == 0:
        raise ValueError(f"not enough development data in {paths}: {summary}")
    return DevData(train, val, pairs, summary)


def dlib_input(x01: "torch.Tensor", mean: "torch.Tensor") -> "torch.Tensor":
    """[0, 1] RGB ``(N, 3, H, W)`` → dlib's input ``(pixel − mean) / 256``."""
    return x01 * (255.0 / 256.0) - mean / 256.0


def _to01(crops: np.ndarray, device: "torch.device") -> "torch.Tensor":
    import torch

    return torch.from_numpy(np.ascontiguousarray(crops)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def embed_crops(net: "torch.nn.Module", crops: np.ndarray, mean: "torch.Tensor", device: "torch.device",
                flip: bool = False, batch: int = 128) -> np.ndarray:
    """L2-normalised embeddings of uint8 crops (eval mode; flip TTA sums both views)."""
    import torch
    import torch.nn.functional as F

    was = net.training
    net.eval()
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(crops), batch):
            x = dlib_input(_to01(crops[i:i + batch], device), mean)
            e = F.normalize(net.forward_unnormalised(x).float(), dim=1)
            if flip:
                e = e + F.normalize(net.forward_unnormalised(torch.flip(x, [3])).float(), dim=1)
            out.append(F.normalize(e, dim=1).cpu().numpy())
    net.train(was)
    return np.concatenate(out)


# -- one optimisation step -----------------------------------------------------------------------
class MetricTrainer:
    """One metric-learning step on a labelled batch: ``loss = trainer.step(crops, labels)``.

    ``net`` maps dlib-normalised inputs to raw embeddings (``forward_unnormalised``);
    ``step`` takes uint8 crops ``(N, S, S, 3)`` (or a float tensor already on the device,
    ``[0, 1]`` NCHW) and integer labels, applies ``augment`` when given, and runs
    forward, loss, backward and the optimiser step under bf16 autocast on CUDA.
    """

    def __init__(self, net: "torch.nn.Module", loss: str, lr: float, device: "torch.device | str",
                 preprocess: dict[str, Any], weight_decay: float = 1e-4,
                 params: "list[torch.nn.Parameter] | None" = None,
                 augment: Callable[["torch.Tensor"], "torch.Tensor"] | None = None,
                 schedule: Callable[[int], float] | None = None, l2sp: float = 0.0) -> None:
        import torch

        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.loss_fn, self.miner = make_loss_for(loss)
        self.raw = loss in RAW_LOSSES
        trainable = params if params is not None else [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule) if schedule else None
        from facepipe.embed.network import input_affine

        a, b = input_affine(preprocess)  # the network's own input normalisation (dlib's or ImageNet's)
        self.scale = torch.from_numpy(a).to(self.device).view(1, 3, 1, 1) * 255.0
        self.shift = torch.from_numpy(b).to(self.device).view(1, 3, 1, 1)
        self.augment = augment
        self.l2sp = float(l2sp)
        self.anchor = ({n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
                       if self.l2sp > 0 else {})
        self.amp = self.device.type == "cuda"

    def step(self, crops: "np.ndarray | torch.Tensor", labels: "np.ndarray | torch.Tensor") -> float:
        """One optimisation step; returns the loss."""
        import torch
        import torch.nn.functional as F

        x = _to01(crops, self.device) if isinstance(crops, np.ndarray) else crops.to(self.device)
        y = torch.as_tensor(labels, device=self.device)
        if self.augment is not None:
            x = self.augment(x)
        x = x * self.scale - self.shift
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        self.net.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            e = self.net.forward_unnormalised(x).float()
        if not self.raw:
            e = F.normalize(e, dim=1)
        mined = self.miner(e, y) if self.miner is not None else None
        loss = self.loss_fn(e, y, mined)
        if self.l2sp > 0:
            loss = loss + self.l2sp * sum(((p - self.anchor[n]) ** 2).sum()
                                          for n, p in self.net.named_parameters() if n in self.anchor)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return float(loss.detach())


def make_train_step(model: str = "dlib-port", loss: str = "multisimilarity", lr: float = 1e-4,
                    device: str = "auto", augment: bool = True) -> Callable[[Any, Any], float]:
    """A ready training step for timing: ``step(crops_uint8 (N, S, S, 3), labels (N,)) -> loss``.

    ``model`` is any network embedder name or checkpoint (``dlib-port``, ``default``,
    ``mobilenet-v2``, a fine-tuned checkpoint, a student; ``S`` is its crop size). Every
    layer is trained (full fine-tuning, augmentation on the device). Runs on CUDA with
    bf16 autocast when ``device`` resolves to a GPU.
    """
    import torch

    from facepipe.device import resolve_device
    from facepipe.embed import checkpoint_dict
    from facepipe.embed.network import build_network
    from facepipe.train.embedder import augment as augment_fn

    dev = resolve_device(device)
    ck = checkpoint_dict(model)
    net = build_network(ck["arch"])
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()})
    if dev.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    aug = (lambda x: augment_fn(x, x.shape[-1], gen)) if augment else None
    return MetricTrainer(net, loss, lr, dev, ck["preprocess"], augment=aug).step


# -- training --------------------------------------------------------------------------------------
def _schedule(warmup_steps: int, steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to zero at ``steps``."""
    return lambda s: min(1.0, (s + 1) / max(warmup_steps, 1)) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps))


def _batches(labels: np.ndarray, batch_size: int, m_per_class: int):  # noqa: ANN202 - generator
    """Endless batches of row indices, ``m_per_class`` photos per person (MPerClassSampler)."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    sampler = MPerClassSampler(labels, m=m_per_class, batch_size=batch_size,
                               length_before_new_iter=max(len(labels), batch_size))
    while True:
        idx = np.fromiter(iter(sampler), dtype=np.int64)
        for b in range(0, len(idx) - batch_size + 1, batch_size):
            yield idx[b:b + batch_size]


def _metric_rows(train: AlignedSet) -> tuple[np.ndarray, np.ndarray]:
    """Indices of people with >= 2 photos and their integer labels."""
    names, counts = np.unique(train.labels, return_counts=True)
    multi = sorted(names[counts >= 2].tolist())
    idx = np.flatnonzero(np.isin(train.labels, multi))
    ids = {n: k for k, n in enumerate(multi)}
    return idx, np.array([ids[x] for x in train.labels[idx]], np.int64)


def _port() -> tuple["torch.nn.Module", dict[str, Any]]:
    from facepipe.embed.dlib_resnet import build_dlib_resnet
    from facepipe.embed.port import port_checkpoint

    ck = port_checkpoint()
    net = build_dlib_resnet(ck["arch"])
    net.load_state_dict({k: v.float() for k, v in ck["state_dict"].items()})
    return net, ck


def trunk_cache(net: "torch.nn.Module", crops: np.ndarray, mean: "torch.Tensor", device: "torch.device",
                views: list[str], gen: "torch.Generator", cut: int, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Frozen-port activations for each view (plain / flip / augN) of each crop, in one pass.

    Returns fp16 ``(V, N, C, H, W)`` after ``blocks[:cut]`` (what a partial fine-tune of
    ``blocks[cut:]`` trains on) and fp16 ``(V, N, width)`` pooled trunk features (what a
    transfer head trains on).
    """
    import torch

    from facepipe.embed.dlib_resnet import fuse_affines
    from facepipe.train.embedder import augment

    fused = fuse_affines(net)  # frozen: the inference form (same outputs) is ~2x faster
    if device.type == "cpu":
        fused = fused.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        probe = fused.blocks[:cut](fused.stem(torch.zeros(1, 3, crops.shape[1], crops.shape[2], device=device)))
    mid = np.zeros((len(views), len(crops)) + tuple(probe.shape[1:]), np.float16)
    gap = np.zeros((len(views), len(crops), fused.width), np.float16)
    t0 = time.time()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(crops), batch):
            x0 = _to01(crops[i:i + batch], device)
            for v, kind in enumerate(views):
                x = x0 if kind == "plain" else torch.flip(x0, [3]) if kind == "flip" else augment(x0, x0.shape[-1], gen)
                x = dlib_input(x, mean)
                if device.type == "cpu":
                    x = x.contiguous(memory_format=torch.channels_last)
                h = fused.blocks[:cut](fused.stem(x))
                mid[v, i:i + len(x0)] = h.float().cpu().numpy()
                gap[v, i:i + len(x0)] = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(
                    fused.blocks[cut:](h), 1), 1).float().cpu().numpy()
            if (i // batch) % 10 == 0:
                log.info("trunk features %d/%d (%d views) %.0fs", i + len(x0), len(crops), len(views),
                         time.time() - t0)
    return mid, gap


def _cached_trunk(cfg: DlibTrainConfig, dev: DevData, metric_idx: np.ndarray, net: "torch.nn.Module",
                  mean: "torch.Tensor", device: "torch.device", gen: "torch.Generator") -> dict[str, np.ndarray]:
    """Trunk activations of the training and early-stop crops, computed once and kept under ``feature_cache``."""
    views = ["plain", "flip"] + [f"aug{k}" for k in range(cfg.aug_views)]
    key = hashlib.sha256(f"{dev.summary['cache_digest']}|{len(dev.train)}|{len(dev.val)}|{views}|{cfg.seed}|"
                         f"cut{cfg.cut}|v2".encode()).hexdigest()[:16]
    fdir = Path(cfg.feature_cache)
    files = {k: fdir / f"dlibtrunk_{key}_{k}.npy" for k in ("train_mid", "train_gap", "val_mid", "val_gap")}
    if all(f.is_file() for f in files.values()):
        log.info("trunk features from %s", fdir / f"dlibtrunk_{key}_*.npy")
        return {k: np.load(f, mmap_mode="r") for k, f in files.items()}
    tm, tg = trunk_cache(net, dev.train.crops[metric_idx], mean, device, views, gen, cfg.cut)
    vm, vg = trunk_cache(net, dev.val.crops, mean, device, ["plain", "flip"], gen, cfg.cut)
    fdir.mkdir(parents=True, exist_ok=True)
    for k, a in zip(files, (tm, tg, vm, vg)):
        np.save(files[k], a)
    return {"train_mid": tm, "train_gap": tg, "val_mid": vm, "val_gap": vg}


def train_dlib_embedder(cfg: DlibTrainConfig, out: str | Path,
                        progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train (transfer or fine-tune), select on the early-stop people, write the checkpoint; returns the report."""
    import torch
    import torch.nn.functional as F

    from facepipe.device import resolve_device
    from facepipe.embed.dlib_resnet import DLIB_PROVENANCE, build_dlib_resnet
    from facepipe.embed.network import make_checkpoint, save_checkpoint
    from facepipe.train.embedder import augment

    if cfg.select_metric not in SELECT_METRICS:
        raise ValueError(f"unknown selection metric {cfg.select_metric!r}; valid: {', '.join(SELECT_METRICS)}")
    if cfg.regime not in REGIMES:
        raise ValueError(f"unknown regime {cfg.regime!r}; valid: {', '.join(REGIMES)}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; valid: {', '.join(LOSSES)}")
    if cfg.head not in HEADS:
        raise ValueError(f"unknown head {cfg.head!r}; valid: {', '.join(HEADS)}")
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)  # MPerClassSampler draws from numpy's global generator
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    dev = load_dev_data(cfg.data, cfg.val_fraction, cfg.val_seed, cfg.seed)
    if dev.train.crops.shape[1] != 150:
        raise ValueError(f"dlib-family training needs 150-px dlib-chip-5pt crops, got {dev.train.crops.shape[1]}")
    metric_idx, y = _metric_rows(dev.train)
    port, port_ck = _port()
    pre = dict(port_ck["preprocess"], flip_tta=cfg.flip_tta)
    mean = torch.tensor(pre["pixel_mean"], device=device).view(1, 3, 1, 1)
    batches = _batches(y, cfg.batch_size, cfg.m_per_class)
    history: list[dict[str, Any]] = []
    t0 = time.time()
    uses_cache = cfg.regime == "transfer" or cfg.cut > 0

    arch = dict(port_ck["arch"], init_seed=cfg.seed)
    if cfg.regime == "transfer" and cfg.head != "dlib-fc":
        arch.update(dim=cfg.dim, head={"type": "mlp", "hidden": 512} if cfg.head == "mlp"
                    else {"type": "linear", "bn": cfg.head == "linear-bn"})
    elif cfg.dim != 128:
        raise ValueError("fine-tuning and the dlib-fc head keep dlib's 128-d output")
    net = build_dlib_resnet(arch)
    res = net.load_state_dict({k: v for k, v in port.state_dict().items()
                               if arch.get("head") is None or not k.startswith("fc.")}, strict=False)
    if res.missing_keys:
        log.info("new head %s, re-initialised: %s", arch.get("head"), res.missing_keys)
    net = net.to(device)
    feats = _cached_trunk(cfg, dev, metric_idx, port.to(device), mean, device, gen) if uses_cache else None

    # trainable part and its forward from cached activations
    if cfg.regime == "transfer":
        trainable = [p for n, p in net.named_parameters() if n.startswith(("fc.", "hidden.", "head_bn."))]
        tr_key, va_key = "train_gap", "val_gap"

        def fwd_cached(f: "torch.Tensor") -> "torch.Tensor":
            return net.head(f)
    else:
        frozen = ("stem.",) + tuple(f"blocks.{k}." for k in range(cfg.cut)) + (("stem.",) if cfg.freeze_stem else ())
        trainable = [p for n, p in net.named_parameters() if not n.startswith(frozen)]
        tr_key, va_key = "train_mid", "val_mid"

        def fwd_cached(f: "torch.Tensor") -> "torch.Tensor":
            return net.head(torch.flatten(F.adaptive_avg_pool2d(net.blocks[cfg.cut:](f), 1), 1))
    for p in net.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    log.info("%s: %d trainable tensors (%d parameters)%s", cfg.regime, len(trainable),
             sum(p.numel() for p in trainable), f", from cached activations ({tr_key})" if uses_cache else "")

    def embed_cached(arr: np.ndarray) -> np.ndarray:
        net.eval()
        with torch.inference_mode():
            e = [F.normalize(fwd_cached(torch.from_numpy(np.asarray(arr[i:i + 256], np.float32)).to(device)).float(),
                             dim=1) for i in range(0, len(arr), 256)]
        return torch.cat(e).cpu().numpy()

    def eval_now(step: int) -> dict[str, Any]:
        if uses_cache:
            p, f = embed_cached(feats[va_key][0]), embed_cached(feats[va_key][1])
            fl = (p + f) / np.linalg.norm(p + f, axis=1, keepdims=True)
        else:
            p = embed_crops(net, dev.val.crops, mean, device)
            fl = embed_crops(net, dev.val.crops, mean, device, flip=True) if cfg.flip_tta else None
        m = {"step": step, "seconds": round(time.time() - t0, 1), "plain": verification_metrics(p, dev.pairs)}
        if fl is not None:
            m["flip"] = verification_metrics(fl, dev.pairs)
        history.append(m)
        k = "flip" if (cfg.flip_tta and fl is not None) else "plain"
        log.info("step %d early-stop val: acc %.4f auc %.5f tar@1e-3 %.3f (%s) %.0fs", step, m[k]["accuracy"],
                 m[k]["auc"], m[k]["tar@far=0.001"], k, m["seconds"])
        return m

    def score(m: dict[str, Any]) -> float:
        return float(m["flip" if (cfg.flip_tta and "flip" in m) else "plain"][cfg.select_metric])

    if uses_cache:
        loss_fn, miner = make_loss_for(cfg.loss)
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg.warmup_steps, cfg.steps))
        anchor = {id(p): p.detach().clone() for p in trainable} if cfg.l2sp > 0 else {}

        def step_fn(bidx: np.ndarray) -> float:
            view = rng.integers(0, feats[tr_key].shape[0], len(bidx))
            order = np.argsort(bidx)  # memory-mapped rows read in order
            f = np.stack([np.asarray(feats[tr_key][v, b], np.float32) for v, b in zip(view[order], bidx[order])])
            f = torch.from_numpy(f[np.argsort(order)]).to(device)
            yy = torch.from_numpy(y[bidx]).to(device)
            net.train()
            e = fwd_cached(f).float()
            if cfg.loss not in RAW_LOSSES:
                e = F.normalize(e, dim=1)
            loss = loss_fn(e, yy, miner(e, yy) if miner is not None else None)
            if anchor:
                loss = loss + cfg.l2sp * sum(((p - anchor[id(p)]) ** 2).sum() for p in trainable)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return float(loss.detach())
    else:
        if device.type == "cpu":
            net = net.to(memory_format=torch.channels_last)
        trainer = MetricTrainer(net, cfg.loss, cfg.lr, device, pre, cfg.weight_decay,
                                params=trainable, augment=lambda x: augment(x, x.shape[-1], gen),
                                schedule=_schedule(cfg.warmup_steps, cfg.steps), l2sp=cfg.l2sp)

        def step_fn(bidx: np.ndarray) -> float:
            return trainer.step(dev.train.crops[metric_idx[bidx]], y[bidx])

    best, best_m, bad = copy.deepcopy(net.state_dict()), eval_now(0), 0
    losses: list[float] = []
    for step in range(1, cfg.steps + 1):
        losses.append(step_fn(next(batches)))
        if progress is not None:
            progress(step, {"loss": losses[-1]})
        if step % 10 == 0:
            log.info("step %d/%d loss %.4f (mean of 10) %.0fs", step, cfg.steps, float(np.mean(losses[-10:])),
                     time.time() - t0)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            m = eval_now(step)
            m["train_loss"] = float(np.mean(losses[-cfg.eval_every:]))
            if score(m) > score(best_m):
                best, best_m, bad = copy.deepcopy(net.state_dict()), m, 0
            else:
                bad += 1
                if bad >= cfg.patience:
                    log.info("early stop at step %d (best step %d)", step, best_m["step"])
                    break
    train_seconds = time.time() - t0
    net.load_state_dict(best)
    net = net.cpu().float().to(memory_format=torch.contiguous_format)
    if cfg.regime == "transfer":
        provenance = {"trunk": DLIB_PROVENANCE + " (frozen)",
                      "head": f"{arch.get('head') or 'dlib fc'} trained by facepipe (transfer regime, "
                              f"{cfg.loss}) on LFW DevTrain development people"}
    else:
        what = "all layers" if cfg.cut == 0 else f"blocks[{cfg.cut}:] + fc (stem and blocks[:{cfg.cut}] frozen)"
        provenance = {"initialisation": DLIB_PROVENANCE,
                      "fine_tuning": f"{what} trained by facepipe ({cfg.loss}) on LFW DevTrain development people"}
    if cfg.extra.get("command"):
        provenance["training_command"] = str(cfg.extra["command"])
    provenance["data"] = ("LFW DevTrain development people (the benchmark's held-out people removed; "
                          f"{cfg.val_fraction:.0%} of the rest kept apart for early stopping): "
                          + ", ".join(Path(p).name for p in cfg.data))
    provenance["selection"] = (f"step with the best {cfg.select_metric} "
                               f"({'flip TTA' if cfg.flip_tta else 'no flip'}) on the people-disjoint "
                               "early-stop split; the benchmark's test pairs were never looked at")
    training = {"regime": cfg.regime, "loss": cfg.loss, "config": asdict(cfg), "data": dev.summary,
                "data_summary": dev.summary,
                "train_seconds": round(train_seconds, 1), "device": str(device),
                "amp": "bf16" if device.type == "cuda" else "fp32", "best_step": best_m["step"],
                "selected_on": f"early-stop people, {cfg.select_metric} ({'flip' if cfg.flip_tta else 'plain'})",
                "early_stop_metrics": best_m, "history": history}
    ck = make_checkpoint(net, name=cfg.name, version=VERSION, arch=arch, preprocess=pre, training=training,
                         registry_name=cfg.registry_name, provenance=provenance)
    save_checkpoint(ck, out)
    return {"checkpoint": str(out), "best": best_m, "history": history, "train_seconds": train_seconds,
            "data": dev.summary}
