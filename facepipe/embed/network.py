"""facepipe's face embedders: networks, the self-describing checkpoint, inference.

Networks (``arch["backbone"]``):

* ``mobilenet_v2``: an ImageNet MobileNetV2 feature extractor (torchvision), global
  average pooling, dropout, a linear projection to ``dim`` with batch norm;
* ``dlib_resnet``: dlib's face-recognition ResNet family (:mod:`facepipe.embed.dlib_resnet`):
  the port of dlib's public-domain model, networks fine-tuned from it, a new head on
  its frozen trunk, or slimmer students of the same topology.

Every embedding is L2-normalised, so cosine similarity is a dot product.

Checkpoint (one ``torch.save`` dict, loadable with ``weights_only=True``)::

    {"format": "facepipe-embedder", "format_version": 2,
     "name": str, "version": str,
     "registry_name": str,            # the name load_embedder() knows it by (v2, optional)
     "arch": {"backbone": "mobilenet_v2" | "dlib_resnet", "dim": 128, ...},
     "preprocess": {"crop_size": 112 | 150,
                    "alignment": "arcface-5pt-similarity" | "dlib-chip-5pt",
                    "align_size": 150,     # optional: warp to this side, then area-resize to crop_size
                    "color": "RGB", "flip_tta": bool,
                    "mean": [...], "std": [...]            # x = (pixel/255 - mean) / std
                    # or "pixel_mean": [...], "pixel_divisor": 256  (dlib: (pixel - mean) / 256)
                   },
     "provenance": {... where every weight came from ...},   # v2, optional
     "training": {... loss, data summary, seed, metrics ...},
     "calibration": {...},            # optional: open-set statistics (facepipe.gallery)
     "state_dict": {name: fp16 tensor}}

Unknown top-level keys are kept (``NetworkEmbedder.checkpoint_extra``);
``calibration`` is exposed as ``NetworkEmbedder.calibration``. Version-1 files (the
first MobileNetV2 embedder) load unchanged. :func:`load_checkpoint` validates every
field and raises :class:`CheckpointError` naming the file on anything missing,
corrupt or mismatched.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from facepipe.embed.base import Embedder
from facepipe.errors import CheckpointError, ShapeError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

FORMAT = "facepipe-embedder"
FORMAT_VERSION = 2
BACKBONES = ("mobilenet_v2", "dlib_resnet")
ALIGNMENT = "arcface-5pt-similarity"
ALIGNMENTS = ("arcface-5pt-similarity", "dlib-chip-5pt")
#: Top-level checkpoint keys this module interprets; anything else is carried along.
KNOWN_KEYS = ("format", "format_version", "name", "version", "registry_name", "arch", "preprocess",
              "provenance", "training", "state_dict", "calibration")


def default_preprocess(crop_size: int = 112, flip_tta: bool = True) -> dict[str, Any]:
    """Preprocessing record for a checkpoint: crop size, alignment, colour, normalisation."""
    from facepipe.backbones import IMAGENET_MEAN, IMAGENET_STD

    return {"crop_size": int(crop_size), "alignment": ALIGNMENT, "color": "RGB",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "flip_tta": bool(flip_tta)}


def dlib_preprocess(pixel_mean: tuple[float, float, float] | list[float], crop_size: int = 150,
                    flip_tta: bool = False) -> dict[str, Any]:
    """Preprocessing record of dlib-family networks: dlib chip geometry, ``(pixel - mean) / 256``."""
    return {"crop_size": int(crop_size), "alignment": "dlib-chip-5pt", "color": "RGB",
            "pixel_mean": [float(m) for m in pixel_mean], "pixel_divisor": 256.0, "flip_tta": bool(flip_tta)}


def input_affine(preprocess: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(a, b)`` with network input ``x = pixel · a − b`` for a preprocess record."""
    if "pixel_mean" in preprocess:
        d = float(preprocess.get("pixel_divisor", 256.0))
        mean = np.asarray(preprocess["pixel_mean"], np.float64)
        return np.full(3, 1.0 / d, np.float32), (mean / d).astype(np.float32)
    mean = np.asarray(preprocess["mean"], np.float64)
    std = np.asarray(preprocess["std"], np.float64)
    return (1.0 / (255.0 * std)).astype(np.float32), (mean / std).astype(np.float32)


def build_network(arch: Mapping[str, Any], pretrained: bool = False) -> "nn.Module":
    """Create the embedding network an ``arch`` record describes (ImageNet backbone when ``pretrained``)."""
    import torch
    from torch import nn

    from facepipe.backbones import mobilenet_v2

    backbone = arch.get("backbone")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    dim = int(arch.get("dim", 128))
    if not 16 <= dim <= 2048:
        raise ValueError(f"embedding dim {dim} out of range 16..2048")
    if backbone == "dlib_resnet":
        from facepipe.embed.dlib_resnet import build_dlib_resnet

        return build_dlib_resnet(arch)

    class EmbeddingNet(nn.Module):
        """MobileNetV2 features -> GAP -> dropout -> linear -> BN -> L2 norm."""

        def __init__(self) -> None:
            super().__init__()
            self.features = mobilenet_v2(pretrained=pretrained).features
            self.dropout = nn.Dropout(float(arch.get("dropout", 0.2)))
            self.fc = nn.Linear(1280, dim, bias=False)
            self.bn = nn.BatchNorm1d(dim)

        def forward_unnormalised(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x)
            f = torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)
            return self.bn(self.fc(self.dropout(f)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.normalize(self.forward_unnormalised(x).float(), dim=1)

    with torch.random.fork_rng(devices=[]):  # seeded head init without touching the caller's RNG
        torch.manual_seed(int(arch.get("init_seed", 0)))
        net = EmbeddingNet()
    return net


def state_dict_hash(state_dict: Mapping[str, "torch.Tensor"]) -> str:
    """SHA-256 over parameter names and fp16 bytes: identical weights give identical ids."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k]
        h.update(k.encode())
        if t.is_floating_point():
            t = t.to(torch.float16)
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def make_checkpoint(net: "nn.Module", *, name: str, version: str, arch: Mapping[str, Any],
                    preprocess: Mapping[str, Any], training: Mapping[str, Any],
                    registry_name: str | None = None, provenance: Mapping[str, Any] | None = None,
                    dtype: str = "float16", extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The self-describing checkpoint dict for a trained network (fp16 weights unless ``dtype="float32"``).

    ``registry_name`` is the stable name :func:`facepipe.embed.load_embedder` knows the
    shipped file by (a gallery manifest can record it); ``provenance`` says where every
    weight came from; ``extra`` adds further top-level keys (e.g. ``calibration``).
    """
    import torch

    dt = {"float16": torch.float16, "float32": torch.float32}[dtype]
    sd = {k: (v.detach().cpu().to(dt) if v.is_floating_point() else v.detach().cpu())
          for k, v in net.state_dict().items()}
    ck = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": str(name),
          "version": str(version), "arch": dict(arch), "preprocess": dict(preprocess),
          "training": dict(training), "state_dict": sd}
    if registry_name:
        ck["registry_name"] = str(registry_name)
    if provenance:
        ck["provenance"] = dict(provenance)
    for k, v in (extra or {}).items():
        ck[k] = v
    return ck


def save_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a checkpoint atomically (temporary file + rename)."""
    import torch

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    torch.save(dict(ckpt), tmp)
    os.replace(tmp, p)
    return p


def _require(ckpt: Mapping[str, Any], key: str, kind: type, path: Path) -> Any:
    if key not in ckpt:
        raise CheckpointError(path, f"not a facepipe embedder checkpoint (missing {key!r})")
    if not isinstance(ckpt[key], kind):
        raise CheckpointError(path, f"field {key!r} has type {type(ckpt[key]).__name__}, "
                                    f"expected {kind.__name__}")
    return ckpt[key]


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint file; :class:`CheckpointError` naming the file on any problem."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "no such checkpoint file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the (weights-only) unpickler raises arbitrary types on garbage
        raise CheckpointError(p, f"corrupt or unreadable checkpoint ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(p, f"not a facepipe embedder checkpoint (a {type(ckpt).__name__})")
    fmt = _require(ckpt, "format", str, p)
    if fmt != FORMAT:
        raise CheckpointError(p, f"checkpoint format is {fmt!r}, expected {FORMAT!r}")
    ver = _require(ckpt, "format_version", int, p)
    if ver > FORMAT_VERSION:
        raise CheckpointError(p, f"checkpoint format version {ver} is newer than this facepipe "
                                 f"supports ({FORMAT_VERSION}); upgrade facepipe")
    arch = _require(ckpt, "arch", dict, p)
    pre = _require(ckpt, "preprocess", dict, p)
    _require(ckpt, "state_dict", dict, p)
    _require(ckpt, "name", str, p)
    if arch.get("backbone") not in BACKBONES:
        raise CheckpointError(p, f"unknown backbone {arch.get('backbone')!r}; valid: {', '.join(BACKBONES)}")
    if "crop_size" not in pre:
        raise CheckpointError(p, "preprocess record lacks 'crop_size'")
    norm = ("pixel_mean",) if "pixel_mean" in pre else ("mean", "std")
    for key in norm:
        if key not in pre:
            raise CheckpointError(p, f"preprocess record lacks {key!r}")
        if not isinstance(pre[key], (list, tuple)) or len(pre[key]) != 3:
            raise CheckpointError(p, f"preprocess {key!r} must list 3 channel values")
    if pre.get("alignment", ALIGNMENT) not in ALIGNMENTS:
        raise CheckpointError(p, f"unsupported alignment {pre.get('alignment')!r}; valid: {', '.join(ALIGNMENTS)}")
    if "calibration" in ckpt and ckpt["calibration"] is not None and not isinstance(ckpt["calibration"], dict):
        raise CheckpointError(p, "field 'calibration' must be a dict")
    return ckpt


class NetworkEmbedder(Embedder):
    """An :class:`Embedder` running a facepipe embedding network on CPU or CUDA.

    On CUDA the forward pass runs under bf16 autocast; on the CPU in float32.
    ``flip_tta`` (default: the checkpoint's setting) averages each face's
    embedding with that of its mirror image before normalising.
    """

    def __init__(self, net: "nn.Module", *, name: str, arch: Mapping[str, Any],
                 preprocess: Mapping[str, Any], training: Mapping[str, Any] | None = None,
                 version: str = "0", device: str = "auto", batch_size: int = 256,
                 flip_tta: bool | None = None, source: str | None = None,
                 registry_name: str | None = None, provenance: Mapping[str, Any] | None = None,
                 calibration: Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        import torch

        from facepipe.device import resolve_device

        self.device = resolve_device(device)
        self.name = name
        self.version = version
        self.arch = dict(arch)
        self.preprocess = dict(preprocess)
        self.training = dict(training or {})
        self.source = source
        self.registry_name = registry_name
        self.provenance = dict(provenance) if provenance else None
        #: Open-set statistics stored in the checkpoint (``None`` when it has none).
        self.calibration = dict(calibration) if calibration is not None else None
        #: Top-level checkpoint keys this class does not interpret, kept as they were.
        self.checkpoint_extra = dict(extra or {})
        self.dim = int(arch["dim"])
        self.crop_size = int(preprocess["crop_size"])
        self.alignment = str(preprocess.get("alignment", ALIGNMENT))
        self.align_size = int(preprocess["align_size"]) if preprocess.get("align_size") else None
        self.flip_tta = bool(preprocess.get("flip_tta", False)) if flip_tta is None else bool(flip_tta)
        self.batch_size = int(batch_size)
        self._hash = state_dict_hash(net.state_dict())
        net = net.float().eval()
        if arch.get("backbone") == "dlib_resnet":
            from facepipe.embed.dlib_resnet import fuse_affines

            net = fuse_affines(net)  # same outputs, one pass fewer per conv
        self.net = net.to(self.device)
        if self.device.type == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)
        a, b = input_affine(preprocess)
        self._scale = torch.from_numpy(a).to(self.device).view(1, 3, 1, 1)
        self._shift = torch.from_numpy(b).to(self.device).view(1, 3, 1, 1)

    @property
    def embedder_id(self) -> str:
        """``name@<first 12 hex of the weights' SHA-256>`` (``+flip`` with flip TTA)."""
        return f"{self.name}@{self._hash[:12]}" + ("+flip" if self.flip_tta else "")

    def describe(self) -> dict[str, Any]:
        """Everything a report or gallery manifest needs about this embedder."""
        return {"embedder_id": self.embedder_id, "name": self.name, "registry_name": self.registry_name,
                "version": self.version, "arch": self.arch, "preprocess": self.preprocess,
                "flip_tta": self.flip_tta, "device": str(self.device), "source": self.source,
                "provenance": self.provenance, "calibrated": self.calibration is not None}

    def check_crops(self, crops: np.ndarray) -> np.ndarray:
        """Validate an aligned-crop batch: uint8 ``(N, S, S, 3)`` with ``S == crop_size``."""
        if not isinstance(crops, np.ndarray):
            raise ShapeError(f"crops: expected a numpy array, got {type(crops).__name__}")
        if crops.dtype != np.uint8:
            raise ShapeError(f"crops: expected dtype uint8, got {crops.dtype}")
        s = self.crop_size
        if crops.ndim != 4 or crops.shape[1:] != (s, s, 3):
            raise ShapeError(f"crops: expected shape (N, {s}, {s}, 3), got {crops.shape}")
        return crops

    def _forward(self, batch: "torch.Tensor") -> "torch.Tensor":
        import torch

        x = batch.permute(0, 3, 1, 2).float() * self._scale - self._shift
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            e = self.net.forward_unnormalised(x).float()
            if self.flip_tta:
                e = torch.nn.functional.normalize(e, dim=1) + torch.nn.functional.normalize(
                    self.net.forward_unnormalised(torch.flip(x, dims=[3])).float(), dim=1)
        return torch.nn.functional.normalize(e, dim=1)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embed aligned crops (uint8 ``(N, S, S, 3)``); float32 ``(N, dim)`` unit rows."""
        import torch

        crops = self.check_crops(crops)
        out = np.empty((len(crops), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, len(crops), self.batch_size):
                b = torch.from_numpy(np.ascontiguousarray(crops[i:i + self.batch_size])).to(
                    self.device, non_blocking=True)
                out[i:i + len(b)] = self._forward(b).cpu().numpy()
        return out

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], device: str = "auto",
                        **kwargs: Any) -> "NetworkEmbedder":
        """Load a validated checkpoint file into an embedder."""
        ckpt = load_checkpoint(path)
        p = Path(path)
        return cls.from_checkpoint_dict(ckpt, p, device=device, **kwargs)

    @classmethod
    def from_checkpoint_dict(cls, ckpt: Mapping[str, Any], p: Path | str, device: str = "auto",
                             **kwargs: Any) -> "NetworkEmbedder":
        """An embedder from an already validated checkpoint dict (``p`` names it in errors)."""
        p = Path(p)
        try:
            net = build_network(ckpt["arch"], pretrained=False)
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(p, f"bad architecture record ({exc})") from exc
        sd = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
        missing, unexpected = _load_state(net, sd)
        if missing or unexpected:
            raise CheckpointError(p, f"weights do not match the architecture "
                                     f"(missing {len(missing)}: {missing[:3]}, unexpected {len(unexpected)}: "
                                     f"{unexpected[:3]})")
        extra = {k: v for k, v in ckpt.items() if k not in KNOWN_KEYS}
        return cls(net, name=ckpt["name"], arch=ckpt["arch"], preprocess=ckpt["preprocess"],
                   training=ckpt.get("training", {}), version=str(ckpt.get("version", "0")),
                   device=device, source=str(p), registry_name=ckpt.get("registry_name"),
                   provenance=ckpt.get("provenance"), calibration=ckpt.get("calibration"),
                   extra=extra, **kwargs)


def _load_state(net: "nn.Module", sd: Mapping[str, "torch.Tensor"]) -> tuple[list[str], list[str]]:
    """Load weights, returning (missing, unexpected) keys; shape mismatches count as missing."""
    own = net.state_dict()
    bad = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    good = {k: v for k, v in sd.items() if k not in bad}
    res = net.load_state_dict(good, strict=False)
    # a reshaped key was left out of ``good``, so torch already reports it as missing
    return list(res.missing_keys) + [k for k in bad if k not in res.missing_keys], list(res.unexpected_keys)


def untrained_embedder(dim: int = 128, crop_size: int = 112, device: str = "auto",
                       seed: int = 0) -> NetworkEmbedder:
    """ImageNet MobileNetV2 with a randomly initialised (seeded) head: the benchmark's floor."""
    arch = {"backbone": "mobilenet_v2", "dim": dim, "dropout": 0.2, "init_seed": seed}
    net = build_network(arch, pretrained=True)
    return NetworkEmbedder(net, name="untrained-mnv2", arch=arch,
                           preprocess=default_preprocess(crop_size, flip_tta=False),
                           training={"note": "ImageNet backbone, random head (no face training)"},
                           device=device)
