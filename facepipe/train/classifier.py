"""Train the face/non-face classifier in three regimes and mine hard negatives.

Regimes (same architecture, :class:`facepipe.detect.cnn.FaceClassifierNet`):

* ``transfer``: ImageNet MobileNetV2 trunk frozen (BatchNorm statistics too), new head trained.
* ``finetune``: starts from the transfer result (linear-probe-then-fine-tune) and
  trains all layers with a small learning rate for a few epochs.
* ``scratch``: random initialisation, all layers, as many optimiser steps as
  transfer + fine-tune together — what ImageNet pretraining buys.

Each regime then gets one bootstrapping round: its own false positives on the
training scenes and LFW backgrounds are added as hard negatives and training
continues. Loss: binary cross-entropy on logits over labelled windows plus
smooth-L1 box regression on windows overlapping a face. Seeded; CUDA with AMP
when available, else CPU.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from facepipe.detect.cnn import (
    ClassifierConfig, FaceClassifierNet, crops_around, decode_map, pyramid_scales, save_checkpoint,
    to_tensor_batch,
)
from facepipe.train.classifier_data import NEG_IOU, DataSplit, WindowSampler, _square

log = logging.getLogger(__name__)

REGIMES = ("transfer", "finetune", "scratch")


@dataclass
class TrainSettings:
    """Hyper-parameters of one training run (all regimes)."""

    seed: int = 0
    batch_size: int = 128
    steps_per_epoch: int = 60
    epochs_transfer: int = 3
    epochs_finetune: int = 3
    epochs_scratch: int = 6
    epochs_bootstrap: int = 1
    bootstrap_rounds: int = 1
    mine_lfw: int = 400
    init: dict[str, str] = field(default_factory=dict)  # regime -> checkpoint to continue from
    lr_head: float = 2e-3
    lr_finetune: float = 3e-4
    lr_scratch: float = 2e-3
    weight_decay: float = 1e-4
    box_weight: float = 0.5
    val_samples: int = 6000
    hard_negatives: int = 3000
    device: str = "auto"
    amp: bool = True


@dataclass
class RegimeResult:
    """Outcome of one regime: metrics on the validation split and timings."""

    regime: str
    metrics: dict[str, float]
    train_seconds: float
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    hard_negatives: int = 0
    threshold: float = 0.5


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney statistic with tie handling)."""
    from scipy.stats import rankdata

    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(prob: np.ndarray, labels: np.ndarray, threshold: float | None = None
                           ) -> dict[str, float]:
    """Accuracy, ROC AUC, precision and recall; threshold = max-F1 point when not given."""
    labels = labels.astype(int)
    if threshold is None:
        order = np.argsort(-prob)
        tp = np.cumsum(labels[order] == 1)
        fp = np.cumsum(labels[order] == 0)
        prec = tp / np.maximum(tp + fp, 1)
        rec = tp / max(int((labels == 1).sum()), 1)
        f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
        k = int(np.argmax(f1))
        threshold = float(prob[order][k])
    pred = prob >= threshold
    tp = int((pred & (labels == 1)).sum())
    fp = int((pred & (labels == 0)).sum())
    fn = int((~pred & (labels == 1)).sum())
    return {
        "accuracy": float((pred == (labels == 1)).mean()),
        "accuracy_at_0.5": float(((prob >= 0.5) == (labels == 1)).mean()),
        "roc_auc": roc_auc(prob, labels),
        "threshold": float(threshold),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "n_pos": int((labels == 1).sum()),
        "n_neg": int((labels == 0).sum()),
    }


def make_val_set(split: DataSplit, n: int, seed: int, config: ClassifierConfig) -> dict[str, np.ndarray]:
    """A fixed validation set: crops and the centre window's label (ignore-labelled dropped)."""
    s = WindowSampler(split, config.window, config.context, config.stride, seed=seed + 7919, augment=False)
    crops, labels, targets, masks = s.sample(n)
    c = labels.shape[1] // 2
    keep = labels[:, c, c] >= 0
    return {"crops": crops[keep], "label": labels[keep, c, c], "target": targets[keep, c, c],
            "mask": masks[keep, c, c]}


@torch.no_grad()
def predict_centre(net: torch.nn.Module, crops: np.ndarray, device: torch.device,
                   batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Centre-window face probability and box offsets for classifier crops."""
    net.eval()
    probs, boxes = [], []
    for i in range(0, len(crops), batch):
        x = net.normalize(to_tensor_batch(crops[i:i + batch]).to(device))
        y = net(x).float()
        c = y.shape[-1] // 2
        probs.append(torch.sigmoid(y[:, 0, c, c]).cpu().numpy())
        boxes.append(y[:, 1:, c, c].cpu().numpy())
    return np.concatenate(probs), np.concatenate(boxes)


def evaluate(net: torch.nn.Module, val: dict[str, np.ndarray], device: torch.device,
             threshold: float | None = None) -> dict[str, float]:
    """Classification metrics and box-offset error of the centre window on the validation set."""
    prob, box = predict_centre(net, val["crops"], device)
    m = classification_metrics(prob, val["label"], threshold)
    sel = val["mask"] > 0
    m["box_l1"] = float(np.abs(box[sel] - val["target"][sel]).mean()) if sel.any() else float("nan")
    return m


def _set_trainable(net: torch.nn.Module, regime: str) -> list[dict[str, Any]]:
    for p in net.trunk.parameters():
        p.requires_grad = regime != "transfer"
    return [{"params": [p for p in net.parameters() if p.requires_grad]}]


def _train_mode(net: torch.nn.Module, regime: str) -> None:
    net.train()
    if regime == "transfer":
        net.trunk.eval()  # frozen trunk: keep ImageNet BatchNorm statistics


def train_steps(net: torch.nn.Module, sampler: WindowSampler, regime: str, steps: int, lr: float,
                settings: TrainSettings, device: torch.device,
                on_step: Callable[[int, float], None] | None = None) -> float:
    """Run ``steps`` optimiser steps (AdamW, cosine decay); returns the mean loss of the last 50."""
    groups = _set_trainable(net, regime)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 20) * 0.5 * (1 + math.cos(math.pi * k / max(steps, 1))))
    use_amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    losses: list[float] = []
    for step in range(steps):
        _train_mode(net, regime)
        crops, labels, targets, masks = sampler.sample(settings.batch_size)
        x = net.normalize(to_tensor_batch(crops).to(device, non_blocking=True))
        lab = torch.from_numpy(labels).to(device)
        tgt = torch.from_numpy(targets).to(device)
        msk = torch.from_numpy(masks).to(device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            y = net(x)
        y = y.float()
        logit = y[:, 0]
        valid = lab >= 0
        cls = F.binary_cross_entropy_with_logits(logit[valid], lab[valid])
        box_pred = y[:, 1:].permute(0, 2, 3, 1)
        if msk.sum() > 0:
            box = F.smooth_l1_loss(box_pred[msk > 0], tgt[msk > 0], beta=0.1)
        else:
            box = logit.sum() * 0.0
        loss = cls + settings.box_weight * box
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    net.eval()
    return float(np.mean(losses[-50:])) if losses else float("nan")


@torch.no_grad()
def mine_hard_negatives(net: torch.nn.Module, split: DataSplit, config: ClassifierConfig,
                        device: torch.device, limit: int, min_size: float = 24.0,
                        threshold: float = 0.3, max_lfw: int = 400) -> list[np.ndarray]:
    """The detector's false positives on the split's scenes and LFW backgrounds, as crops.

    Each window scoring ≥ ``threshold`` whose box overlaps no face (IoU < 0.3 with every
    head box) is cut out as a classifier crop; the highest-scoring ``limit`` are kept.
    """
    import copy

    from facepipe.detect.cnn import fuse_batchnorm

    net = fuse_batchnorm(copy.deepcopy(net).eval())  # inference copy, BatchNorm folded (faster)
    found: list[tuple[float, np.ndarray]] = []
    pad = config.stride
    sources = list(split.scenes) + list(split.faces[:max_lfw])
    for src in sources:
        img = src.image
        h, w = img.shape[:2]
        x0 = net.normalize(to_tensor_batch(img[None]).to(device))
        boxes, scores = [], []
        for s in pyramid_scales(h, w, config.window, min_size, None, math.sqrt(2.0), 2.0e6):
            size = (max(1, round(h * s)), max(1, round(w * s)))
            xs = F.pad(F.interpolate(x0, size=size, mode="bilinear", align_corners=False, antialias=s < 1),
                       (pad, pad, pad, pad))
            y = net(xs)
            _, b, sc = decode_map(y, 1.0, config.window, config.stride, pad, threshold)
            if len(sc):
                b = b / torch.tensor([size[1] / w, size[0] / h] * 2, device=b.device)
                boxes.append(b.cpu().numpy())
                scores.append(sc.cpu().numpy())
        if not boxes:
            continue
        b = np.concatenate(boxes)
        sc = np.concatenate(scores)
        xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
        if len(src.boxes):
            from facepipe.evaluate import box_iou_matrix

            ok = box_iou_matrix(_square(xywh), _square(src.boxes)).max(axis=1) < NEG_IOU
            # A box around a face centre at about the face's scale may be a badly placed
            # face (or an unlabelled neighbour): not mined. A box that contains a face but
            # is >= 1.8x its size is a wrong-scale window, which the detector must reject.
            fc = np.stack([src.boxes[:, 0] + src.boxes[:, 2] / 2, src.boxes[:, 1] + src.boxes[:, 3] / 2], 1)
            inside = ((fc[None, :, 0] >= b[:, None, 0]) & (fc[None, :, 0] <= b[:, None, 2])
                      & (fc[None, :, 1] >= b[:, None, 1]) & (fc[None, :, 1] <= b[:, None, 3]))
            side_b = np.sqrt(xywh[:, 2] * xywh[:, 3])[:, None]
            side_f = np.sqrt(src.boxes[:, 2] * src.boxes[:, 3])[None, :]
            ok &= ~(inside & (side_b < 1.8 * side_f)).any(axis=1)
            b, sc = b[ok], sc[ok]
        if len(sc) == 0:
            continue
        top = np.argsort(-sc)[:50]
        crops = crops_around(img, b[top], config.window, config.context)
        found.extend(zip(sc[top].tolist(), crops))
    found.sort(key=lambda t: -t[0])
    return [c for _, c in found[:limit]]


def train_classifiers(
    train: DataSplit,
    val: DataSplit,
    out_dir: Path,
    settings: TrainSettings,
    regimes: tuple[str, ...] = REGIMES,
    data_info: dict[str, Any] | None = None,
    report: Callable[[str], None] = print,
) -> dict[str, RegimeResult]:
    """Train the requested regimes, write ``<regime>.pt`` and ``metrics.json`` into ``out_dir``."""
    from facepipe.device import resolve_device

    device = resolve_device(settings.device)
    config = ClassifierConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    val_set = make_val_set(val, settings.val_samples, settings.seed, config)
    report(f"validation set: {int((val_set['label'] == 1).sum())} face / "
           f"{int((val_set['label'] == 0).sum())} non-face windows")
    results: dict[str, RegimeResult] = {}
    nets: dict[str, torch.nn.Module] = {}
    spe = settings.steps_per_epoch
    plan = {
        "transfer": (settings.epochs_transfer, settings.lr_head, None),
        "finetune": (settings.epochs_finetune, settings.lr_finetune, "transfer"),
        "scratch": (settings.epochs_scratch, settings.lr_scratch, None),
    }
    order = [r for r in REGIMES if r in regimes]
    if "finetune" in order and "transfer" not in order and "finetune" not in settings.init:
        order.insert(0, "transfer")
    for k, regime in enumerate(order):
        epochs, lr, init_from = plan[regime]
        torch.manual_seed(settings.seed + k)
        net = FaceClassifierNet(config, pretrained=regime != "scratch")
        prev: dict[str, Any] = {}
        if regime in settings.init:
            from facepipe.detect.cnn import load_checkpoint

            ck = load_checkpoint(settings.init[regime])
            net.load_state_dict(ck.net.state_dict())
            prev = ck.meta
            report(f"{regime}: continuing from {settings.init[regime]} ({prev.get('steps')} steps)")
        elif init_from is not None:
            net.load_state_dict(nets[init_from].state_dict())
        net.to(device)
        sampler = WindowSampler(train, config.window, config.context, config.stride,
                                seed=settings.seed * 1000 + k)
        history = []
        t0 = time.perf_counter()
        for epoch in range(epochs):
            # each epoch is one cosine cycle whose peak halves epoch by epoch (warm restarts)
            loss = train_steps(net, sampler, regime, spe, lr * (0.5 ** epoch if epoch else 1.0),
                               settings, device)
            m = evaluate(net, val_set, device)
            history.append({"epoch": epoch + 1, "loss": loss, "val_auc": m["roc_auc"],
                            "val_acc": m["accuracy_at_0.5"], "seconds": time.perf_counter() - t0})
            report(f"{regime} epoch {epoch + 1}/{epochs}: loss {loss:.4f} val AUC {m['roc_auc']:.4f} "
                   f"acc@0.5 {m['accuracy_at_0.5']:.4f} ({time.perf_counter() - t0:.0f}s)")
        # bootstrapping: the model's own false positives become hard negatives; each
        # round mines with the current model and adds to the negatives of earlier rounds
        hard: list[np.ndarray] = []
        for rnd in range(settings.bootstrap_rounds):
            hard = hard + mine_hard_negatives(net, train, config, device, settings.hard_negatives,
                                              max_lfw=settings.mine_lfw)
            boot = DataSplit(train.crops, train.faces, train.scenes, hard)
            sampler = WindowSampler(boot, config.window, config.context, config.stride,
                                    seed=settings.seed * 1000 + 100 * (rnd + 1) + k)
            for epoch in range(settings.epochs_bootstrap):
                loss = train_steps(net, sampler, regime, spe, lr * 0.5 ** (epoch + 1), settings, device)
                m = evaluate(net, val_set, device)
                history.append({"epoch": epochs + rnd * settings.epochs_bootstrap + epoch + 1, "loss": loss,
                                "val_auc": m["roc_auc"], "val_acc": m["accuracy_at_0.5"],
                                "bootstrap_round": rnd + 1, "seconds": time.perf_counter() - t0})
                report(f"{regime} bootstrap round {rnd + 1} epoch {epoch + 1}/{settings.epochs_bootstrap} "
                       f"({len(hard)} hard negatives): loss {loss:.4f} val AUC {m['roc_auc']:.4f} "
                       f"acc@0.5 {m['accuracy_at_0.5']:.4f}")
        elapsed = time.perf_counter() - t0 + float(prev.get("train_seconds", 0.0))
        metrics = evaluate(net, val_set, device)
        steps = spe * (epochs + settings.epochs_bootstrap * settings.bootstrap_rounds) + int(prev.get("steps", 0))
        res = RegimeResult(regime, metrics, elapsed, steps, history, len(hard), metrics["threshold"])
        results[regime] = res
        nets[regime] = net
        meta = {
            "regime": regime,
            "trained_on": str(device),
            "train_seconds": round(elapsed, 1),
            "steps": steps,
            "batch_size": settings.batch_size,
            "seed": settings.seed,
            "init": {"transfer": "ImageNet MobileNetV2, trunk frozen",
                     "finetune": "transfer checkpoint, all layers",
                     "scratch": "random"}[regime],
            "continued_from": None if not prev else {
                "checkpoint": Path(settings.init[regime]).name, "steps": prev.get("steps"),
                "train_seconds": prev.get("train_seconds"), "hard_negatives": prev.get("hard_negatives")},
            "hard_negatives": len(hard) + int(prev.get("hard_negatives", 0)),
            "validation": {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()},
            "data": data_info or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        save_checkpoint(out_dir / f"{regime}.pt", net.cpu(), config, metrics["threshold"], meta)
        # the detector's operating point, chosen on validation images
        meta["detection_calibration"] = calibrate_detection_threshold(out_dir / f"{regime}.pt", val,
                                                                      device=str(device))
        meta["detection_threshold"] = meta["detection_calibration"]["threshold"]
        report(f"{regime}: detection threshold {meta['detection_threshold']:.3f} "
               f"({meta['detection_calibration']})")
        save_checkpoint(out_dir / f"{regime}.pt", net.cpu(), config, metrics["threshold"], meta)
        net.to(device)
        report(f"{regime}: AUC {metrics['roc_auc']:.4f} acc {metrics['accuracy']:.4f} "
               f"P {metrics['precision']:.4f} R {metrics['recall']:.4f} @ {metrics['threshold']:.3f}, "
               f"{elapsed:.0f}s on {device}")
    summary = {
        r: {"metrics": v.metrics, "train_seconds": v.train_seconds, "steps": v.steps, "history": v.history,
            "hard_negatives": v.hard_negatives}
        for r, v in results.items()
    }
    summary["_settings"] = settings.__dict__
    summary["_device"] = str(device)
    summary["_data"] = data_info or {}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    return results


def measure_haar_head_ratio(split: DataSplit, limit: int = 300) -> dict[str, float]:
    """Median size ratio and centre shift between Haar boxes and the head boxes of LFW faces.

    Used to set :data:`facepipe.detect.cnn.HAAR_TO_HEAD` (the scale applied to a Haar
    proposal before the CNN verifies it).
    """
    from facepipe.detect.haar import HaarDetector
    from facepipe.evaluate import box_iou_matrix

    haar = HaarDetector()
    ratios, dxs, dys = [], [], []
    for src in split.faces[:limit]:
        dets = haar.detect(src.image)
        if not dets or len(src.boxes) == 0:
            continue
        hb = np.array([[d.box.x, d.box.y, d.box.w, d.box.h] for d in dets])
        iou = box_iou_matrix(_square(src.boxes), hb)
        i, j = np.unravel_index(int(iou.argmax()), iou.shape)
        if iou[i, j] < 0.2:
            continue
        f, h = src.boxes[i], hb[j]
        ratios.append(math.sqrt(f[2] * f[3]) / h[2])
        dxs.append((f[0] + f[2] / 2 - h[0] - h[2] / 2) / h[2])
        dys.append((f[1] + f[3] / 2 - h[1] - h[3] / 2) / h[2])
    return {"n": len(ratios), "ratio": float(np.median(ratios)) if ratios else float("nan"),
            "dx": float(np.median(dxs)) if dxs else float("nan"),
            "dy": float(np.median(dys)) if dys else float("nan")}


def calibrate_detection_threshold(checkpoint: str | Path, val: DataSplit, max_fp_per_image: float = 0.1,
                                  max_lfw: int = 300, device: str = "cpu") -> dict[str, float]:
    """Choose the detector's operating threshold on validation images (never on a benchmark set).

    Runs the detector at a low threshold over the validation LFW photos (head boxes from
    the MTCNN teacher) and face-free validation scenes, and returns the lowest score
    threshold at which false positives (IoU < 0.3 with every face) stay within
    ``max_fp_per_image``, with the recall reached there.
    """
    from facepipe.detect.cnn import CNNDetector
    from facepipe.evaluate import box_iou_matrix

    det = CNNDetector(checkpoint, threshold=0.3, device=device)
    images = [s for s in val.faces[:max_lfw]] + list(val.scenes)
    fp_scores: list[float] = []
    tp_scores: list[float] = []
    n_faces = 0
    for src in images:
        boxes, scores = det.raw_boxes([src.image])[0]
        n_faces += len(src.boxes)
        if len(boxes) == 0:
            continue
        xywh = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)
        matched = np.zeros(len(src.boxes), bool)
        for k in np.argsort(-scores):
            iou = box_iou_matrix(xywh[k:k + 1], src.boxes)[0] if len(src.boxes) else np.zeros(0)
            if len(iou):
                iou[matched] = -1
            if len(iou) and iou.max() >= NEG_IOU:
                matched[int(iou.argmax())] = True
                tp_scores.append(float(scores[k]))
            else:
                fp_scores.append(float(scores[k]))
    fp = np.sort(np.asarray(fp_scores))[::-1]
    allowed = int(math.floor(max_fp_per_image * len(images)))
    thr = float(fp[allowed]) + 1e-4 if len(fp) > allowed else 0.3
    thr = min(max(thr, 0.3), 0.999)
    recall = float(np.sum(np.asarray(tp_scores) >= thr)) / max(n_faces, 1)
    return {"threshold": round(thr, 4), "val_images": len(images), "val_faces": n_faces,
            "fp_per_image": float(np.sum(fp >= thr)) / len(images), "recall_iou0.3": recall,
            "max_fp_per_image": max_fp_per_image}
