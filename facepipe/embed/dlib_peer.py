"""dlib's ResNet face descriptor as a reference (peer) embedder and distillation teacher.

Needs the ``[peers]`` extra (``pip install dlib-bin face-recognition-models``).
dlib aligns with its own 5-point shape predictor to a 150×150 chip (padding
0.25), so :meth:`DlibEmbedder.align` replaces facepipe's ArcFace alignment: it runs
that predictor inside the detection box. The model files are found inside the
``face_recognition_models`` package directly (its ``__init__`` imports
``pkg_resources``, which recent setuptools no longer ships).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from facepipe.embed.base import Embedder
from facepipe.errors import DeviceUnavailableError, FacepipeError, ShapeError

if TYPE_CHECKING:
    from facepipe.types import Box, Detection

RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE5_FILE = "shape_predictor_5_face_landmarks.dat"


class PeerUnavailableError(FacepipeError):
    """An optional reference model whose package is not installed."""


def model_dir() -> Path:
    """Folder holding dlib's model files (from the ``face-recognition-models`` package)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailableError("dlib peer needs face-recognition-models: pip install 'facepipe[peers]'")
    d = Path(list(spec.submodule_search_locations)[0]) / "models"
    if not (d / RECOGNITION_FILE).is_file():
        raise PeerUnavailableError(f"{d / RECOGNITION_FILE}: dlib model file missing")
    return d


def _import_dlib():  # noqa: ANN202 - dlib has no type stubs
    try:
        import dlib
    except ImportError as exc:
        raise PeerUnavailableError("dlib peer needs dlib: pip install 'facepipe[peers]'") from exc
    return dlib


def dlib_rect(box: "Box"):  # noqa: ANN201
    """The dlib rectangle facepipe hands dlib's shape predictor for a detection box (rounded corners)."""
    dlib = _import_dlib()
    return dlib.rectangle(int(round(box.x)), int(round(box.y)), int(round(box.x2)), int(round(box.y2)))


def dlib_shape_predictor() -> "Callable[[np.ndarray, Box], np.ndarray]":
    """dlib's public-domain 5-point shape predictor as ``f(image, box) -> (5, 2)`` float points.

    Point order is dlib's: right-eye outer/inner corner, left-eye outer/inner corner
    (image left/right reversed: dlib's part 0 is the outer corner of the eye on the
    image's right), nose base. dlib stores integer pixel positions.
    """
    dlib = _import_dlib()
    sp = dlib.shape_predictor(str(model_dir() / SHAPE5_FILE))

    def predict(image: np.ndarray, box: "Box") -> np.ndarray:
        shape = sp(np.ascontiguousarray(image), dlib_rect(box))
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    return predict


class DlibEmbedder(Embedder):
    """dlib's 128-d ResNet descriptor (CPU), L2-normalised so cosine similarity applies."""

    name = "dlib-resnet-v1"
    dim = 128
    crop_size = 150
    alignment = "dlib-chip-5pt"
    registry_name = "dlib"

    def __init__(self, device: str = "auto", padding: float = 0.25, jitters: int = 0) -> None:
        if str(device).startswith("cuda"):
            raise DeviceUnavailableError("the dlib peer (dlib-bin wheel) runs on the CPU only")
        try:
            import dlib
        except ImportError as exc:
            raise PeerUnavailableError("dlib peer needs dlib: pip install 'facepipe[peers]'") from exc
        d = model_dir()
        self._dlib = dlib
        self._sp = dlib.shape_predictor(str(d / SHAPE5_FILE))
        self._fr = dlib.face_recognition_model_v1(str(d / RECOGNITION_FILE))
        self.padding = float(padding)
        self.jitters = int(jitters)
        h = hashlib.sha256((d / RECOGNITION_FILE).read_bytes()).hexdigest()
        self._id = f"{self.name}@{h[:12]}"

    @property
    def embedder_id(self) -> str:
        """``dlib-resnet-v1@<model file SHA-256 prefix>``."""
        return self._id

    def describe(self) -> dict[str, Any]:
        """Settings for reports."""
        return {"embedder_id": self._id, "crop_size": self.crop_size, "padding": self.padding,
                "alignment": "dlib 5-point shape predictor in the detection box"}

    def align(self, image: np.ndarray, detection: "Detection") -> np.ndarray:
        """dlib's own aligned 150×150 chip for the face in ``detection.box``."""
        from facepipe.detect.base import check_image

        check_image(image)
        b = detection.box
        rect = self._dlib.rectangle(int(round(b.x)), int(round(b.y)), int(round(b.x2)), int(round(b.y2)))
        shape = self._sp(np.ascontiguousarray(image), rect)
        return np.asarray(self._dlib.get_face_chip(image, shape, self.crop_size, self.padding), dtype=np.uint8)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Descriptors of dlib chips (uint8 ``(N, 150, 150, 3)``), L2-normalised."""
        if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8 or crops.ndim != 4 \
                or crops.shape[1:] != (150, 150, 3):
            shape = getattr(crops, "shape", None)
            raise ShapeError(f"crops: expected uint8 (N, 150, 150, 3), got {shape}")
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        chips = [np.ascontiguousarray(c) for c in crops]
        d = np.asarray(self._fr.compute_face_descriptor(chips, self.jitters), dtype=np.float32)
        return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
