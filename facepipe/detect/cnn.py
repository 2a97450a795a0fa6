"""The transfer-learned CNN face/non-face classifier and the detector built on it.

One network serves both roles (OverFeat-style): a MobileNetV2 trunk truncated at
stride 8 (ImageNet-pretrained, ``features[:7]``) followed by a head whose first
layer is a ``window/8 × window/8`` convolution, i.e. a fully-connected layer over a
``window × window`` pixel window written as a convolution. On a ``window + 16``
pixel crop (the window plus 8 px of context on each side) the net outputs a 3×3
grid of windows 8 px apart; the centre cell is the classifier's answer for the
crop. On a whole image the same weights give a face logit and four box offsets
for every window at stride 8, so detection is an image pyramid scored
convolutionally (no Python loop over windows), box refinement, then NMS.

Box offsets are relative to the window ``(x, y, W, W)``:
``dx = (cx_face - cx_win) / W``, ``dy`` likewise, ``dw = log(w_face / W)``,
``dh = log(h_face / W)``. Boxes follow the head-box convention of the training data
(Hays' rule: 3× the landmark spread, as in ``caltech_webfaces_dev``).

Checkpoints are self-describing ``.pt`` files (``torch.save`` of a plain dict,
loadable with ``weights_only=True``): format tag, version, architecture config,
preprocessing (window, context, mean/std), operating threshold, training summary
and an fp16 state dict.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facepipe.backbones import IMAGENET_MEAN, IMAGENET_STD
from facepipe.detect.base import Detector, check_image
from facepipe.errors import CheckpointError, ShapeError
from facepipe.types import Box, Detection

import torch
from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "facepipe-face-classifier"
CHECKPOINT_VERSION = 1
#: Shipped checkpoints, by short name (files under ``facepipe/weights/``).
SHIPPED_WEIGHTS: dict[str, str] = {
    "finetune": "face_classifier.pt",
    "transfer": "face_classifier_transfer.pt",
}
DEFAULT_WEIGHTS = "finetune"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and preprocessing of a :class:`FaceClassifierNet`."""

    arch: str = "mobilenet_v2_s8_fc"
    trunk_layers: int = 7  # torchvision mobilenet_v2().features[:7] -> stride 8, 32 channels
    stride: int = 8
    window: int = 32  # face window in pixels (the head's receptive window)
    context: int = 8  # pixels of context on each side of the window in classifier crops
    hidden: int = 64
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def input_size(self) -> int:
        """Side of a classifier crop: the window plus context on both sides."""
        return self.window + 2 * self.context

    @property
    def head_kernel(self) -> int:
        """Feature-map cells spanned by one window."""
        return self.window // self.stride


class FaceClassifierNet(nn.Module):
    """MobileNetV2 stride-8 trunk + window head (face logit and 4 box offsets per window)."""

    def __init__(self, config: ClassifierConfig, pretrained: bool = True) -> None:
        super().__init__()
        from facepipe.backbones import mobilenet_v2

        if config.arch != "mobilenet_v2_s8_fc" or config.window % config.stride:
            raise ValueError(f"unsupported classifier architecture {config}")
        self.config = config
        self.trunk = mobilenet_v2(pretrained=pretrained).features[: config.trunk_layers]
        ch = self.trunk[-1].out_channels
        self.head = nn.Sequential(
            nn.Conv2d(ch, config.hidden, kernel_size=config.head_kernel),
            nn.ReLU(inplace=True),
            nn.Conv2d(config.hidden, config.hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(config.hidden, 5, kernel_size=1),
        )
        mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` 0-255 RGB (uint8 or float) to the normalised float input."""
        return (x.float() - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(N, 3, H, W)`` -> ``(N, 5, H', W')``: logit, dx, dy, dw, dh per window."""
        return self.head(self.trunk(x))


def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every ``Conv2d`` → ``BatchNorm2d`` pair into the convolution (inference only, in place).

    The outputs are unchanged up to float rounding (see the tests); inference gets faster
    because the normalisation no longer runs as a separate pass over each feature map.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        fuse_batchnorm(child)
    if isinstance(module, nn.Sequential):
        mods = list(module)
        for k in range(len(mods) - 1):
            if isinstance(mods[k], nn.Conv2d) and isinstance(mods[k + 1], nn.BatchNorm2d):
                module[k] = fuse_conv_bn_eval(mods[k].eval(), mods[k + 1].eval())
                module[k + 1] = nn.Identity()
    return module


# --------------------------------------------------------------------------- checkpoints


@dataclass
class ClassifierCheckpoint:
    """A loaded classifier: network (eval mode, CPU), config, threshold and metadata."""

    net: Any
    config: ClassifierConfig
    threshold: float
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    sha256: str = ""


def save_checkpoint(
    path: str | Path,
    net: nn.Module,
    config: ClassifierConfig,
    threshold: float,
    meta: dict[str, Any] | None = None,
    fp16: bool = True,
) -> Path:
    """Write a self-describing checkpoint (fp16 weights by default) and return its path."""
    import torch

    from facepipe import __version__

    state = {
        k: (v.detach().cpu().half() if fp16 and v.is_floating_point() else v.detach().cpu())
        for k, v in net.state_dict().items()
    }
    cfg = asdict(config)
    cfg["mean"], cfg["std"] = list(config.mean), list(config.std)
    doc = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "facepipe_version": __version__,
        "config": cfg,
        "preprocessing": {
            "input": "RGB uint8, grey replicated to 3 channels",
            "window": config.window,
            "context": config.context,
            "input_size": config.input_size,
            "mean": list(config.mean),
            "std": list(config.std),
            "scale": "pixel/255 then (x-mean)/std",
        },
        "threshold": float(threshold),
        "meta": dict(meta or {}),
        "state_dict": state,
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    torch.save(doc, tmp)
    tmp.replace(p)
    return p


def resolve_weights(weights: str | Path | None) -> Path:
    """A shipped name (``finetune``, ``transfer``) or a file path -> checkpoint file."""
    import importlib.resources

    spec = str(weights) if weights is not None else DEFAULT_WEIGHTS
    if spec in SHIPPED_WEIGHTS:
        return Path(str(importlib.resources.files("facepipe"))) / "weights" / SHIPPED_WEIGHTS[spec]
    return Path(spec).expanduser()


def load_checkpoint(weights: str | Path | None = None) -> ClassifierCheckpoint:
    """Load a classifier checkpoint; any problem raises :class:`CheckpointError` naming the file."""
    import torch

    path = resolve_weights(weights)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    try:
        raw = path.read_bytes()
        import io

        doc = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt pickles/zips
        raise CheckpointError(path, f"cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, f"not a facepipe face-classifier checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if int(doc.get("version", -1)) != CHECKPOINT_VERSION:
        raise CheckpointError(path, f"checkpoint version {doc.get('version')!r} not supported "
                              f"(this facepipe reads version {CHECKPOINT_VERSION})")
    try:
        cfg = dict(doc["config"])
        cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
        config = ClassifierConfig(**cfg)
        net = FaceClassifierNet(config, pretrained=False)
        state = {k: v.float() if v.is_floating_point() else v for k, v in doc["state_dict"].items()}
        net.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"checkpoint does not match the classifier architecture ({exc})") from exc
    net.eval()
    return ClassifierCheckpoint(net, config, float(doc.get("threshold", 0.5)), dict(doc.get("meta", {})),
                                str(path), hashlib.sha256(raw).hexdigest())


# --------------------------------------------------------------------------- classifier API


def to_tensor_batch(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """RGB (or grey) uint8 images of one size -> ``(N, 3, H, W)`` uint8 tensor."""
    import torch

    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ShapeError(f"expected uint8 crops, got {arr.dtype}")
    if arr.ndim == 3:  # (N, H, W) grey
        arr = np.repeat(arr[..., None], 3, axis=3)
    if arr.ndim != 4 or arr.shape[3] != 3:
        raise ShapeError(f"expected crops (N, H, W, 3) or (N, H, W), got {arr.shape}")
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # torch.from_numpy wants writable memory
        arr = arr.copy()
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def classify_crops(ckpt: ClassifierCheckpoint, crops: np.ndarray, device: str = "cpu",
                   batch_size: int = 512) -> np.ndarray:
    """Face probability of each ``input_size``-square crop (window centred, context around).

    Crops of another size are resized to ``input_size`` first. Returns float32 ``(N,)``.
    """
    import cv2
    import torch

    from facepipe.device import resolve_device

    dev = resolve_device(device)
    s = ckpt.config.input_size
    arr = np.asarray(crops)
    if arr.ndim in (3, 4) and arr.shape[1:3] != (s, s):
        arr = np.stack([cv2.resize(c, (s, s), interpolation=cv2.INTER_AREA) for c in arr])
    net = ckpt.net.to(dev)
    out = []
    with torch.inference_mode():
        for i in range(0, len(arr), batch_size):
            x = net.normalize(to_tensor_batch(arr[i:i + batch_size]).to(dev))
            y = net(x)
            c = y.shape[-1] // 2
            out.append(torch.sigmoid(y[:, 0, c, c]).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# --------------------------------------------------------------------------- detector


def pyramid_scales(height: int, width: int, window: int, min_size: float,
                   max_size: float | None, step: float, max_pixels: float | None = None) -> list[float]:
    """Scales at which a ``window`` px window covers faces from ``min_size`` up to ``max_size``."""
    scales = []
    s = window / float(min_size)
    if max_pixels is not None and height * width * s * s > max_pixels:
        s = math.sqrt(max_pixels / (height * width))
    smallest = window / float(max_size) if max_size else 0.0
    while min(height, width) * s >= window and s >= smallest * 0.999:
        scales.append(s)
        s /= step
    if not scales and min(height, width) * (window / float(min_size)) >= window * 0.5:
        scales.append(window / float(min(height, width)))
    return scales


def decode_map(out: torch.Tensor, scale: float, window: int, stride: int, pad: int,
               threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score/offset maps ``(N, 5, h, w)`` at one pyramid level -> (image idx, boxes xyxy, scores).

    Window ``(i, j)`` covers ``[stride*j - pad, stride*i - pad, window, window]`` in the
    resized image; boxes are mapped back to original pixels by dividing by ``scale``.
    """
    import torch

    prob = torch.sigmoid(out[:, 0].float())
    n, i, j = torch.nonzero(prob >= threshold, as_tuple=True)
    if n.numel() == 0:
        return n, out.new_zeros((0, 4), dtype=torch.float32), prob.new_zeros(0)
    d = out[n, 1:, i, j].float()
    wx = j.float() * stride - pad + window / 2.0
    wy = i.float() * stride - pad + window / 2.0
    cx = wx + d[:, 0] * window
    cy = wy + d[:, 1] * window
    bw = window * torch.exp(d[:, 2].clamp(-2.0, 2.0))
    bh = window * torch.exp(d[:, 3].clamp(-2.0, 2.0))
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1) / scale
    return n, boxes, prob[n, i, j]


class CNNDetector(Detector):
    """Full-image face detector from the transfer-learned classifier (``--detector cnn-pyramid``).

    ``weights``: ``finetune`` (default), ``transfer`` or a checkpoint path.
    ``threshold``: minimum face probability of a returned box (default: the
    checkpoint's ``detection_threshold``, chosen on validation images for at most
    0.1 false positives per image, else 0.5). ``min_size``/``max_size``: head-box sizes searched (pixels;
    head boxes are ~1.3–1.5× a tight face box). ``scale_step``: pyramid ratio.
    ``nms_iou``: IoU above which lower-scoring boxes are suppressed.
    ``max_pixels``: cap on the largest pyramid level (keeps huge photos tractable).
    ``device``: auto, cpu, cuda, cuda:N (batched, fp16 autocast on CUDA).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        threshold: float | None = None,
        min_size: float = 24.0,
        max_size: float | None = None,
        scale_step: float = math.sqrt(2.0),
        nms_iou: float = 0.3,
        max_pixels: float | None = 4.0e6,
        device: str = "auto",
        amp: bool = True,
    ) -> None:
        from facepipe.device import resolve_device

        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if min_size <= 0:
            raise ValueError(f"min_size must be > 0, got {min_size}")
        if scale_step <= 1.0:
            raise ValueError(f"scale_step must be > 1, got {scale_step}")
        self.device = resolve_device(device)
        self.ckpt = load_checkpoint(weights)
        self.net = fuse_batchnorm(copy.deepcopy(self.ckpt.net).eval()).to(self.device)
        self.config = self.ckpt.config
        if threshold is None:
            threshold = float(self.ckpt.meta.get("detection_threshold", 0.5))
        self.threshold = float(threshold)
        self.min_size = float(min_size)
        self.max_size = float(max_size) if max_size else None
        self.scale_step = float(scale_step)
        self.nms_iou = float(nms_iou)
        self.max_pixels = max_pixels
        self.amp = bool(amp) and self.device.type == "cuda"
        self.name = "cnn-pyramid"

    def describe(self) -> dict[str, object]:
        """Checkpoint identity and pyramid/NMS settings."""
        return {
            "name": self.name,
            "weights": Path(self.ckpt.path).name,
            "weights_sha256": self.ckpt.sha256[:12],
            "regime": self.ckpt.meta.get("regime"),
            "threshold": self.threshold,
            "window_validation_threshold": self.ckpt.threshold,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "scale_step": self.scale_step,
            "nms_iou": self.nms_iou,
            "device": str(self.device),
        }

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in one RGB image, highest score first."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Faces in several images; same-sized images run as one batch per pyramid level."""
        for k, im in enumerate(images):
            check_image(im, f"image {k}")
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, im in enumerate(images):
            groups.setdefault(im.shape, []).append(k)
        results: list[list[Detection]] = [[] for _ in images]
        for idx in groups.values():
            for k, dets in zip(idx, self._detect_same_size([images[k] for k in idx])):
                results[k] = dets
        return results

    def raw_boxes(self, images: Sequence[np.ndarray], threshold: float | None = None
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image ``(boxes xyxy float32 (K, 4), scores (K,))`` after NMS, before conversion."""
        return self._run(images, self.threshold if threshold is None else threshold)

    def _detect_same_size(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        out = []
        for boxes, scores in self._run(images, self.threshold):
            dets = [Detection(Box.from_xyxy(*map(float, b)), float(s), self.name)
                    for b, s in zip(boxes, scores)]
            out.append(dets)
        return out

    def _run(self, images: Sequence[np.ndarray], threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
        import torch
        import torch.nn.functional as F
        from torchvision.ops import batched_nms

        cfg = self.config
        h, w = images[0].shape[:2]
        scales = pyramid_scales(h, w, cfg.window, self.min_size, self.max_size, self.scale_step,
                                self.max_pixels)
        if not scales:
            return [(np.zeros((0, 4), np.float32), np.zeros(0, np.float32)) for _ in images]
        pad = cfg.stride  # one cell of border so faces touching the edge get a window
        all_n, all_b, all_s = [], [], []
        with torch.inference_mode():
            x = to_tensor_batch(np.stack(images)).to(self.device)
            x = self.net.normalize(x)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            for s in scales:
                size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
                xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                   antialias=s < 1.0)
                xs = F.pad(xs, (pad, pad, pad, pad))
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                    y = self.net(xs)
                sy, sx = size[0] / h, size[1] / w
                n, b, sc = decode_map(y, 1.0, cfg.window, cfg.stride, pad, threshold)
                if n.numel():
                    b = b / torch.tensor([sx, sy, sx, sy], device=b.device)
                    all_n.append(n)
                    all_b.append(b)
                    all_s.append(sc)
            if not all_n:
                return [(np.zeros((0, 4), np.float32), np.zeros(0, np.float32)) for _ in images]
            n = torch.cat(all_n)
            b = torch.cat(all_b).float()
            sc = torch.cat(all_s).float()
            keep = batched_nms(b, sc, n, self.nms_iou)
            n, b, sc = n[keep].cpu().numpy(), b[keep].cpu().numpy(), sc[keep].cpu().numpy()
        res = []
        for k in range(len(images)):
            m = n == k
            order = np.argsort(-sc[m], kind="stable")
            res.append((b[m][order].astype(np.float32), sc[m][order].astype(np.float32)))
        return res


# --------------------------------------------------------------------------- haar + cnn


#: A Haar box (tight face) scaled by this about its centre approximates the head box
#: the CNN was trained on: median ratio 1.146 (centre shift +0.05 of the Haar side
#: downwards, left to the CNN's box regression) over 298 LFW training faces, measured
#: with ``facepipe.train.classifier.measure_haar_head_ratio``.
HAAR_TO_HEAD = 1.15


def crops_around(image: np.ndarray, boxes_xyxy: np.ndarray, window: int, context: int) -> np.ndarray:
    """Resample each box's window (square about its centre) with context to classifier crops."""
    import cv2

    size = window + 2 * context
    out = np.empty((len(boxes_xyxy), size, size, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes_xyxy, dtype=np.float64)):
        side = max(math.sqrt(max(x2 - x1, 1e-3) * max(y2 - y1, 1e-3)), 1e-3)
        cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
        a = window / side  # pixels of crop per pixel of image
        m = np.array([[a, 0.0, size / 2.0 - a * cx], [0.0, a, size / 2.0 - a * cy]])
        interp = cv2.INTER_AREA if a < 1 else cv2.INTER_LINEAR
        out[k] = cv2.warpAffine(image, m, (size, size), flags=interp, borderMode=cv2.BORDER_REFLECT_101)
    return out


class HaarCNNDetector(Detector):
    """Haar proposals verified (and re-boxed) by the CNN classifier.

    Haar runs permissively (``min_neighbors`` 2) to keep recall; each proposal is
    turned into a head-sized window, scored by the CNN's centre cell, and its box
    refined with the CNN's regression. Scores are CNN probabilities; ``threshold``
    defaults to the checkpoint's detection threshold (as for ``cnn``).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        threshold: float | None = None,
        min_size: int = 20,
        scale_factor: float = 1.1,
        min_neighbors: int = 2,
        nms_iou: float = 0.3,
        device: str = "auto",
    ) -> None:
        from facepipe.detect.haar import HaarDetector
        from facepipe.device import resolve_device

        self.haar = HaarDetector(scale_factor=scale_factor, min_neighbors=min_neighbors, min_size=min_size)
        self.device = resolve_device(device)
        self.ckpt = load_checkpoint(weights)
        self.net = fuse_batchnorm(copy.deepcopy(self.ckpt.net).eval()).to(self.device)
        if threshold is None:
            threshold = float(self.ckpt.meta.get("detection_threshold", 0.5))
        self.threshold = float(threshold)
        self.nms_iou = float(nms_iou)
        self.name = "haar+cnn"

    def describe(self) -> dict[str, object]:
        """Haar settings plus the verifying checkpoint."""
        return {"name": self.name, "haar": self.haar.describe(), "weights": Path(self.ckpt.path).name,
                "weights_sha256": self.ckpt.sha256[:12], "threshold": self.threshold}

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Haar proposals that the CNN accepts, highest CNN probability first."""
        import torch
        from torchvision.ops import nms

        check_image(image)
        props = self.haar.detect(image)
        if not props:
            return []
        cfg = self.ckpt.config
        xyxy = np.array([d.box.scaled(HAAR_TO_HEAD).xyxy() for d in props], dtype=np.float64)
        crops = crops_around(image, xyxy, cfg.window, cfg.context)
        with torch.inference_mode():
            x = self.net.normalize(to_tensor_batch(crops).to(self.device))
            y = self.net(x)[:, :, 1, 1].float().cpu().numpy()
        prob = 1.0 / (1.0 + np.exp(-y[:, 0]))
        side = np.sqrt((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]))
        cx = (xyxy[:, 0] + xyxy[:, 2]) / 2 + y[:, 1] * side
        cy = (xyxy[:, 1] + xyxy[:, 3]) / 2 + y[:, 2] * side
        bw = side * np.exp(np.clip(y[:, 3], -2, 2))
        bh = side * np.exp(np.clip(y[:, 4], -2, 2))
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        ok = prob >= self.threshold
        if not ok.any():
            return []
        boxes, prob = boxes[ok], prob[ok]
        keep = nms(torch.from_numpy(boxes).float(), torch.from_numpy(prob).float(), self.nms_iou).numpy()
        return [Detection(Box.from_xyxy(*map(float, boxes[k])), float(prob[k]), self.name) for k in keep]
