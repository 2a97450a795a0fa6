"""Face detectors and a small registry to build them by name.

>>> from facepipe.detect import create_detector
>>> det = create_detector("haar")            # doctest: +SKIP
>>> faces = det.detect(rgb_uint8_image)      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable

from facepipe.detect.base import Detector, check_image
from facepipe.errors import UnknownModelError

_FACTORIES: dict[str, Callable[..., Detector]] = {}


def register_detector(name: str) -> Callable[[Callable[..., Detector]], Callable[..., Detector]]:
    """Decorator registering a detector factory under ``name``."""

    def deco(fn: Callable[..., Detector]) -> Callable[..., Detector]:
        _FACTORIES[name] = fn
        return fn

    return deco


@register_detector("haar")
def _haar(**kwargs: Any) -> Detector:
    from facepipe.detect.haar import HaarDetector

    return HaarDetector(**kwargs)


@register_detector("mtcnn")
def _mtcnn(**kwargs: Any) -> Detector:
    from facepipe.detect.mtcnn import MTCNNDetector

    return MTCNNDetector(**kwargs)


@register_detector("cnn")
def _cnn(**kwargs: Any) -> Detector:
    """facepipe's single-pass detector: MobileNetV2 + feature pyramid, head boxes and five landmarks."""
    from facepipe.detect.fpn import FPNDetector

    return FPNDetector(**kwargs)


@register_detector("cnn-pyramid")
def _cnn_pyramid(**kwargs: Any) -> Detector:
    """The first CNN detector: the face/non-face classifier slid over an image pyramid."""
    from facepipe.detect.cnn import CNNDetector

    return CNNDetector(**kwargs)


@register_detector("haar+cnn")
def _haar_cnn(**kwargs: Any) -> Detector:
    from facepipe.detect.cnn import HaarCNNDetector

    return HaarCNNDetector(**kwargs)


def _register_peers() -> None:
    """Reference peers, registered only when their optional packages are installed."""
    from facepipe.detect.retinaface_peer import retinaface_available

    if retinaface_available():
        @register_detector("retinaface")
        def _retinaface(**kwargs: Any) -> Detector:
            from facepipe.detect.retinaface_peer import RetinaFaceDetector

            return RetinaFaceDetector(**kwargs)


_register_peers()


def available_detectors() -> list[str]:
    """Names accepted by :func:`create_detector`."""
    return sorted(_FACTORIES)


def create_detector(name: str, **kwargs: Any) -> Detector:
    """Build a detector by registered name; options not meant for it are an error."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise UnknownModelError("detector", name, available_detectors()) from None
    return factory(**kwargs)


__all__ = ["Detector", "check_image", "create_detector", "available_detectors", "register_detector"]
