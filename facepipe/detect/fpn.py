"""facepipe's single-pass face detector: one MobileNetV2 pass, a feature pyramid, five landmarks.

The network (:class:`FaceFPN`) runs the image once through a MobileNetV2 trunk and
reads three feature levels off it: stride 8 (``features[:7]``, 32 channels),
stride 16 (``features[7:14]``, 96) and stride 32 (``features[14:17]``, 160). A small
top-down feature pyramid mixes coarse context into the finer levels, and a head on
each level predicts, for two square anchors per cell, a face logit, four box
offsets and ten landmark offsets (left eye, right eye, nose, left and right mouth
corner). Boxes from every level go through one ``torchvision.ops.batched_nms``.

Transfer learning (the seeds): the stride-8 trunk and the stride-8 head start as
facepipe's transfer-learned face/non-face classifier (:mod:`facepipe.detect.cnn`):
its trunk is ``features[:7]``, and its window head (a 4×4 convolution over 32-pixel
windows, i.e. a fully-connected layer written as a convolution) *is* the first
part of the stride-8 head, with its face logit and box outputs copied into the
32-pixel anchor's outputs. The top-down connection into the stride-8 level is
initialised to zero, so before detector training the 32-pixel anchor's score map
equals the classifier's (see the tests). Deeper blocks keep their ImageNet weights.

Box offsets follow the classifier's parametrisation relative to an anchor
``(cx, cy, A, A)``: ``dx = (cx_face - cx) / A``, ``dy`` likewise, ``dw = log(w / A)``,
``dh = log(h / A)``; landmarks ``((x - cx) / A, (y - cy) / A)``. Boxes follow the head-box
convention of the training data (Hays' rule: centre of eyes, nose and mouth, 3× their
x- and y-spread, as in ``caltech_webfaces_dev``).

Checkpoints are self-describing ``.pt`` files (a plain dict, loadable with
``weights_only=True``): format tag, version, architecture, preprocessing, the
operating threshold *and how it was chosen*, training summary, fp16 weights.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facepipe.backbones import IMAGENET_MEAN, IMAGENET_STD
from facepipe.boxes import suppress_contained
from facepipe.detect.base import Detector, check_image
from facepipe.errors import CheckpointError
from facepipe.types import Box, Detection

CHECKPOINT_FORMAT = "facepipe-face-detector"
CHECKPOINT_VERSION = 1
#: Shipped checkpoints, by short name (files under ``facepipe/weights/``).
SHIPPED_DETECTORS: dict[str, str] = {"default": "detector_fpn.pt"}
N_LANDMARKS = 5
#: Outputs per anchor: face logit, 4 box offsets, 10 landmark offsets.
PER_ANCHOR = 1 + 4 + 2 * N_LANDMARKS


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture and preprocessing of a :class:`FaceFPN`."""

    arch: str = "mobilenet_v2_fpn"
    splits: tuple[int, int, int] = (7, 14, 17)  # features[:7] | [7:14] | [14:17]
    strides: tuple[int, int, int] = (8, 16, 32)
    anchors: tuple[tuple[float, ...], ...] = ((16.0, 32.0), (64.0, 128.0), (256.0, 512.0))
    #: anchor centre of cell (i, j) at level l: (stride*j + offset, stride*i + offset)
    offsets: tuple[float, float, float] = (8.0, 8.0, 16.0)
    width: int = 64  # channels of the stride-16/32 pyramid levels
    hidden: int = 64  # hidden channels of every head
    seed_anchor: int = 1  # index of the stride-8 anchor that inherits the classifier's outputs
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def num_anchors(self) -> int:
        """Anchors per cell (the same on every level)."""
        return len(self.anchors[0])


def _config_from_dict(d: dict[str, Any]) -> DetectorConfig:
    d = dict(d)
    for k in ("splits", "strides", "offsets", "mean", "std"):
        d[k] = tuple(d[k])
    d["anchors"] = tuple(tuple(float(a) for a in lvl) for lvl in d["anchors"])
    return DetectorConfig(**d)


class _Stride8Head(nn.Module):
    """The classifier's window head (4×4 conv over 32-px windows) widened to all anchor outputs."""

    def __init__(self, in_ch: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, hidden, kernel_size=4), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size=1), nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(hidden, outputs, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pad 1 before / 2 after: output cell (i, j) sees feature cells i-1..i+2, j-1..j+2
        return self.out(self.body(F.pad(x, (1, 2, 1, 2))))


class _Head(nn.Module):
    """3×3 conv + 1×1 conv head for the stride-16/32 levels."""

    def __init__(self, in_ch: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, hidden, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size=1), nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(hidden, outputs, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class FaceFPN(nn.Module):
    """MobileNetV2 trunk → 3-level top-down pyramid → per-level heads (score, box, landmarks)."""

    def __init__(self, config: DetectorConfig, pretrained: bool = True) -> None:
        super().__init__()
        from facepipe.backbones import mobilenet_v2

        if config.arch != "mobilenet_v2_fpn" or len(config.strides) != 3:
            raise ValueError(f"unsupported detector architecture {config}")
        if len({len(a) for a in config.anchors}) != 1:
            raise ValueError("every level needs the same number of anchors")
        self.config = config
        feats = mobilenet_v2(pretrained=pretrained).features
        a, b, c = config.splits
        self.stage3 = feats[:a]
        self.stage4 = feats[a:b]
        self.stage5 = feats[b:c]
        c3 = self.stage3[-1].out_channels
        c4 = self.stage4[-1].out_channels
        c5 = self.stage5[-1].out_channels
        w = config.width
        self.lat5 = nn.Conv2d(c5, w, 1)
        self.lat4 = nn.Conv2d(c4, w, 1)
        # top-down into stride 8, zero at initialisation: P3 == C3 (the classifier's features)
        self.top3 = nn.Conv2d(w, c3, 1)
        nn.init.zeros_(self.top3.weight)
        nn.init.zeros_(self.top3.bias)
        out = config.num_anchors * PER_ANCHOR
        self.head3 = _Stride8Head(c3, config.hidden, out)
        self.head4 = _Head(w, config.hidden, out)
        self.head5 = _Head(w, config.hidden, out)
        prior = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: p(face) = 0.01 at start
        for h in (self.head3, self.head4, self.head5):
            nn.init.normal_(h.out.weight, std=0.01)
            nn.init.zeros_(h.out.bias)
            with torch.no_grad():
                h.out.bias[0::PER_ANCHOR] = prior
        mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` 0-255 RGB (uint8 or float) to the normalised float input."""
        return (x.float() - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised ``(N, 3, H, W)`` -> per level ``(N, A*15, H/s, W/s)`` raw outputs."""
        c3 = self.stage3(x)
        c4 = self.stage4(c3)
        c5 = self.stage5(c4)
        p5 = self.lat5(c5)
        p4 = self.lat4(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = c3 + self.top3(F.interpolate(p4, size=c3.shape[-2:], mode="nearest"))
        return [self.head3(p3), self.head4(p4), self.head5(p5)]

    def seed_from_classifier(self, classifier: nn.Module) -> None:
        """Copy a :class:`~facepipe.detect.cnn.FaceClassifierNet`'s trunk and head into the stride-8 path.

        The trunk becomes ``stage3``; the head's first two layers become the stride-8
        head's body; its 5 outputs (logit, dx, dy, dw, dh) become those of anchor
        ``config.seed_anchor``. Landmark outputs of that anchor start at zero.
        """
        cfg = self.config
        if len(classifier.trunk) != len(self.stage3):
            raise ValueError("classifier trunk depth differs from the detector's stride-8 stage")
        self.stage3.load_state_dict(classifier.trunk.state_dict())
        h = classifier.head
        body = self.head3.body
        if h[0].weight.shape != body[0].weight.shape or h[2].weight.shape != body[2].weight.shape:
            raise ValueError("classifier head shape differs from the detector's stride-8 head")
        with torch.no_grad():
            body[0].load_state_dict(h[0].state_dict())
            body[2].load_state_dict(h[2].state_dict())
            k = cfg.seed_anchor * PER_ANCHOR
            out = self.head3.out
            out.weight[k:k + 5] = h[4].weight
            out.bias[k:k + 5] = h[4].bias
            out.weight[k + 5:k + PER_ANCHOR] = 0.0
            out.bias[k + 5:k + PER_ANCHOR] = 0.0


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` in eval mode with every Conv→BatchNorm pair folded into the conv."""
    from facepipe.detect.cnn import fuse_batchnorm

    return fuse_batchnorm(copy.deepcopy(net).eval())


# --------------------------------------------------------------------------- anchors and decoding


def level_anchors(config: DetectorConfig, level: int, h: int, w: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Anchors ``(h*w*A, 3)`` = (cx, cy, size) of one level's ``h × w`` map, in input pixels.

    Order matches the flattened head output: cell-major (row, column), anchor last.
    """
    s, off = config.strides[level], config.offsets[level]
    ys = torch.arange(h, device=device, dtype=torch.float32) * s + off
    xs = torch.arange(w, device=device, dtype=torch.float32) * s + off
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    sizes = torch.tensor(config.anchors[level], device=device, dtype=torch.float32)
    a = len(sizes)
    cx = cx.reshape(-1, 1).expand(-1, a)
    cy = cy.reshape(-1, 1).expand(-1, a)
    return torch.stack([cx, cy, sizes.view(1, a).expand(h * w, a)], dim=2).reshape(-1, 3)


def flatten_outputs(outputs: Sequence[torch.Tensor], num_anchors: int) -> torch.Tensor:
    """Per-level ``(N, A*15, h, w)`` -> ``(N, sum(h*w*A), 15)`` in :func:`level_anchors` order."""
    flat = []
    for y in outputs:
        n, _, h, w = y.shape
        flat.append(y.view(n, num_anchors, PER_ANCHOR, h, w).permute(0, 3, 4, 1, 2)
                    .reshape(n, h * w * num_anchors, PER_ANCHOR))
    return torch.cat(flat, dim=1)


def all_anchors(config: DetectorConfig, shapes: Sequence[tuple[int, int]],
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Anchors of every level for feature-map ``shapes`` (concatenated like :func:`flatten_outputs`)."""
    return torch.cat([level_anchors(config, k, h, w, device) for k, (h, w) in enumerate(shapes)])


def decode(raw: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``(..., 15)`` + anchors ``(..., 3)`` -> boxes ``(..., 4)`` xyxy and landmarks ``(..., 5, 2)``."""
    a = anchors[..., 2:3]
    cx = anchors[..., 0:1] + raw[..., 1:2] * a
    cy = anchors[..., 1:2] + raw[..., 2:3] * a
    bw = a * torch.exp(raw[..., 3:4].clamp(-4.0, 4.0))
    bh = a * torch.exp(raw[..., 4:5].clamp(-4.0, 4.0))
    boxes = torch.cat([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
    lm = raw[..., 5:].reshape(*raw.shape[:-1], N_LANDMARKS, 2) * a.unsqueeze(-1) \
        + anchors[..., None, 0:2]
    return boxes, lm


def encode(boxes_xywh: torch.Tensor, landmarks: torch.Tensor, anchors: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for matched anchors: box ``(K, 4)`` and landmark ``(K, 10)`` offsets."""
    a = anchors[:, 2:3]
    cx = boxes_xywh[:, 0:1] + boxes_xywh[:, 2:3] / 2
    cy = boxes_xywh[:, 1:2] + boxes_xywh[:, 3:4] / 2
    t = torch.cat([(cx - anchors[:, 0:1]) / a, (cy - anchors[:, 1:2]) / a,
                   torch.log(boxes_xywh[:, 2:3].clamp(min=1e-3) / a),
                   torch.log(boxes_xywh[:, 3:4].clamp(min=1e-3) / a)], dim=1)
    lm = ((landmarks - anchors[:, None, 0:2]) / a.unsqueeze(-1)).reshape(len(a), -1)
    return t, lm


# --------------------------------------------------------------------------- checkpoints


@dataclass
class DetectorCheckpoint:
    """A loaded detector: network (eval mode, CPU), config, threshold and metadata."""

    net: FaceFPN
    config: DetectorConfig
    threshold: float
    calibration: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    sha256: str = ""


def save_detector(path: str | Path, net: nn.Module, config: DetectorConfig, threshold: float,
                  calibration: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                  fp16: bool = True) -> Path:
    """Write a self-describing detector checkpoint (fp16 weights by default); returns its path.

    ``threshold`` is the shipped operating point; ``calibration`` says how it was chosen.
    """
    from facepipe import __version__

    state = {k: (v.detach().cpu().half() if fp16 and v.is_floating_point() else v.detach().cpu())
             for k, v in net.state_dict().items()}
    cfg = asdict(config)
    doc = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "facepipe_version": __version__,
        "config": cfg,
        "preprocessing": {
            "input": "RGB uint8, grey replicated to 3 channels, whole image at native size",
            "mean": list(config.mean), "std": list(config.std),
            "scale": "pixel/255 then (x-mean)/std",
            "boxes": "head boxes, Hays' rule (3x the spread of eyes, nose, mouth centre)",
            "landmarks": "left eye, right eye, nose, left mouth corner, right mouth corner",
        },
        "threshold": float(threshold),
        "calibration": dict(calibration or {}),
        "meta": dict(meta or {}),
        "state_dict": state,
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    torch.save(doc, tmp)
    tmp.replace(p)
    return p


def resolve_detector_weights(weights: str | Path | None) -> Path:
    """A shipped name (``default``) or a file path -> checkpoint file."""
    import importlib.resources

    spec = str(weights) if weights is not None else "default"
    if spec in SHIPPED_DETECTORS:
        return Path(str(importlib.resources.files("facepipe"))) / "weights" / SHIPPED_DETECTORS[spec]
    return Path(spec).expanduser()


def load_detector(weights: str | Path | None = None) -> DetectorCheckpoint:
    """Load a detector checkpoint; any problem raises :class:`CheckpointError` naming the file."""
    path = resolve_detector_weights(weights)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    try:
        raw = path.read_bytes()
        doc = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt pickles/zips
        raise CheckpointError(path, f"cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, f"not a facepipe face-detector checkpoint (expected format "
                              f"{CHECKPOINT_FORMAT!r})")
    if int(doc.get("version", -1)) != CHECKPOINT_VERSION:
        raise CheckpointError(path, f"checkpoint version {doc.get('version')!r} not supported "
                              f"(this facepipe reads version {CHECKPOINT_VERSION})")
    try:
        config = _config_from_dict(doc["config"])
        net = FaceFPN(config, pretrained=False)
        state = {k: v.float() if v.is_floating_point() else v for k, v in doc["state_dict"].items()}
        net.load_state_dict(state, strict=True)
        threshold = float(doc["threshold"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"checkpoint does not match the detector architecture ({exc})") from exc
    if not 0.0 <= threshold <= 1.0:
        raise CheckpointError(path, f"threshold {threshold} is not a probability")
    net.eval()
    return DetectorCheckpoint(net, config, threshold, dict(doc.get("calibration", {})),
                              dict(doc.get("meta", {})), str(path), hashlib.sha256(raw).hexdigest())


# --------------------------------------------------------------------------- detector


def _to_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    arr = np.ascontiguousarray(np.stack(images))
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


class FPNDetector(Detector):
    """The single-pass CNN face detector with five landmarks (``--detector cnn``).

    ``weights``: ``default`` (shipped) or a checkpoint path. ``threshold``: minimum
    face probability of a returned box (default: the checkpoint's operating point,
    chosen on development images for precision, see ``describe()['calibration']``).
    ``min_size``: smallest head box wanted (side ``sqrt(w·h)``, pixels; smaller boxes
    are dropped); above 16 the image is down-scaled by ``16 / min_size`` first, which
    is faster. Default: none, the image at its own size (heads from ~12 px). ``max_pixels``: larger
    images are down-scaled to this many pixels. ``large_faces``: also run the net on
    the image shrunk 4× (1/16 of the pixels, ≈6 % more time) for heads larger than
    the training canvases held (≥ ``COARSE_MIN_SIDE`` px), e.g. a portrait filling a
    phone photo. ``nms_iou``: IoU above which lower-scoring boxes are suppressed;
    ``contain``: a box that much inside a higher-scoring one (or containing it, by the
    smaller box's area) is suppressed too (:func:`suppress_contained`; 1 turns it off).
    ``device``: auto, cpu, cuda, cuda:N; the net runs channels-last with BatchNorm
    folded, on CUDA under bf16 autocast (``amp``); same-sized images are batched.
    """

    #: Boxes from the 4×-shrunk pass are kept only from this head size (original pixels) up.
    COARSE_MIN_SIDE = 192.0
    COARSE_FACTOR = 4.0

    def __init__(
        self,
        weights: str | Path | None = None,
        threshold: float | None = None,
        min_size: float | None = None,
        max_pixels: float = 4.2e6,
        large_faces: bool = True,
        nms_iou: float = 0.4,
        contain: float = 0.7,
        max_faces: int = 500,
        device: str = "auto",
        amp: bool = True,
        batch_size: int = 32,
        _checkpoint: DetectorCheckpoint | None = None,
    ) -> None:
        from facepipe.device import resolve_device

        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if min_size is not None and min_size <= 0:
            raise ValueError(f"min_size must be > 0, got {min_size}")
        if max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0, got {max_pixels}")
        if not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
        if not 0.0 < contain <= 1.0:
            raise ValueError(f"contain must be in (0, 1], got {contain}")
        self.device = resolve_device(device)
        self.ckpt = _checkpoint if _checkpoint is not None else load_detector(weights)
        self.config = self.ckpt.config
        # channels-last is the fast layout for MobileNet's depthwise convolutions on CPU and GPU
        self.net = fold_batchnorm(self.ckpt.net).to(self.device).to(memory_format=torch.channels_last)
        self.threshold = float(self.ckpt.threshold if threshold is None else threshold)
        self.min_size = float(min_size) if min_size else None
        self.max_pixels = float(max_pixels)
        self.large_faces = bool(large_faces)
        self.nms_iou = float(nms_iou)
        self.contain = float(contain)
        self.max_faces = int(max_faces)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.batch_size = int(batch_size)
        self.name = "cnn"
        self._anchor_cache: dict[tuple[Any, ...], torch.Tensor] = {}

    @classmethod
    def from_network(cls, net: FaceFPN, threshold: float = 0.5, **kwargs: Any) -> "FPNDetector":
        """A detector around an in-memory network (training-time evaluation); ``net`` is not modified."""
        ck = DetectorCheckpoint(net, net.config, float(threshold), {}, {}, "<in-memory>", "")
        return cls(threshold=threshold, _checkpoint=ck, **kwargs)

    def describe(self) -> dict[str, object]:
        """Checkpoint identity, operating point (and how it was chosen) and settings."""
        return {
            "name": self.name,
            "weights": Path(self.ckpt.path).name,
            "weights_sha256": self.ckpt.sha256[:12],
            "threshold": self.threshold,
            "checkpoint_threshold": self.ckpt.threshold,
            "calibration": self.ckpt.calibration,
            "min_size": self.min_size,
            "max_pixels": self.max_pixels,
            "large_faces": self.large_faces,
            "nms_iou": self.nms_iou,
            "contain": self.contain,
            "landmarks": True,
            "device": str(self.device),
        }

    # -- public API ----------------------------------------------------------------
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces with five landmarks in one RGB image, highest score first."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Faces in several images; same-sized images share one forward pass (chunks of ``batch_size``)."""
        return [[Detection(Box.from_xyxy(*map(float, b)), float(s), self.name,
                           tuple((float(x), float(y)) for x, y in lm))
                 for b, s, lm in zip(*r)] for r in self.raw(images)]

    def raw(self, images: Sequence[np.ndarray], threshold: float | None = None
            ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image ``(boxes xyxy (K, 4), scores (K,), landmarks (K, 5, 2))`` after NMS, in original pixels."""
        thr = self.threshold if threshold is None else float(threshold)
        for k, im in enumerate(images):
            check_image(im, f"image {k}")
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, im in enumerate(images):
            groups.setdefault(im.shape, []).append(k)
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [None] * len(images)  # type: ignore[list-item]
        for idx in groups.values():
            for i in range(0, len(idx), self.batch_size):
                chunk = idx[i:i + self.batch_size]
                for k, r in zip(chunk, self._run([images[k] for k in chunk], thr)):
                    out[k] = r
        return out

    # -- internals -----------------------------------------------------------------
    def input_scale(self, h: int, w: int) -> float:
        """Resize factor applied before the network (≤ 1: ``min_size`` and ``max_pixels``)."""
        s = 1.0
        if self.min_size is not None and self.min_size > 16.0:
            s = 16.0 / self.min_size
        if h * w * s * s > self.max_pixels:
            s = math.sqrt(self.max_pixels / (h * w))
        return s

    def _anchors(self, shapes: list[tuple[int, int]]) -> torch.Tensor:
        key = (tuple(shapes), str(self.device))
        a = self._anchor_cache.get(key)
        if a is None:
            a = all_anchors(self.config, shapes, self.device)
            if len(self._anchor_cache) > 16:
                self._anchor_cache.clear()
            self._anchor_cache[key] = a
        return a

    def _pass(self, x: torch.Tensor, h: int, w: int, threshold: float, min_side: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One network pass on the resized batch ``x``: (image idx, scores, boxes, landmarks) in original pixels."""
        sy, sx = x.shape[2] / h, x.shape[3] / w
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            outs = self.net(x)
        shapes = [(int(o.shape[2]), int(o.shape[3])) for o in outs]
        raw = flatten_outputs([o.float() for o in outs], self.config.num_anchors)
        prob = torch.sigmoid(raw[..., 0])
        n, k = torch.nonzero(prob >= threshold, as_tuple=True)
        boxes, lms = decode(raw[n, k], self._anchors(shapes)[k])
        scale = torch.tensor([sx, sy], device=boxes.device)
        boxes = boxes / scale.repeat(2)
        lms = lms / scale
        sc = prob[n, k]
        if min_side > 0 and len(sc):
            big = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) >= min_side
            n, sc, boxes, lms = n[big], sc[big], boxes[big], lms[big]
        return n, sc, boxes, lms

    def _run(self, images: Sequence[np.ndarray], threshold: float
             ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        from torchvision.ops import batched_nms

        h, w = images[0].shape[:2]
        s = self.input_scale(h, w)
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
        with torch.inference_mode():
            x0 = self.net.normalize(_to_batch(images).to(self.device, non_blocking=True))
            passes = [(s, 0.0)]
            c = s / self.COARSE_FACTOR
            if self.large_faces and min(h, w) * c >= 48:
                passes.append((c, self.COARSE_MIN_SIDE))
            parts = []
            for scale, min_side in passes:
                x = x0
                if scale < 1.0:
                    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
                    x = F.interpolate(x0, size=size, mode="bilinear", align_corners=False, antialias=True)
                parts.append(self._pass(x, h, w, threshold, min_side))
            n = torch.cat([p[0] for p in parts])
            if n.numel() == 0:
                return [empty for _ in images]
            sc = torch.cat([p[1] for p in parts])
            boxes = torch.cat([p[2] for p in parts])
            lms = torch.cat([p[3] for p in parts])
            keep = batched_nms(boxes, sc, n, self.nms_iou)
            n, sc, boxes, lms = n[keep].cpu().numpy(), sc[keep].cpu().numpy(), boxes[keep].cpu().numpy(), \
                lms[keep].cpu().numpy()
        if self.min_size is not None and len(boxes):
            big = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
            keep_big = big >= self.min_size
            n, sc, boxes, lms = n[keep_big], sc[keep_big], boxes[keep_big], lms[keep_big]
        res = []
        for i in range(len(images)):
            m = np.flatnonzero(n == i)
            m = m[suppress_contained(boxes[m], sc[m], self.contain)][: self.max_faces]
            res.append((boxes[m].astype(np.float32), sc[m].astype(np.float32), lms[m].astype(np.float32)))
        return res
