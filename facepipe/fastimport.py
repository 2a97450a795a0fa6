"""Import facenet-pytorch's MTCNN without importing all of torchvision (start-up time).

``import facenet_pytorch`` runs its package ``__init__``, which imports InceptionResnetV1
(and ``requests``) and the training utilities, and its face-detection module imports
``torchvision.ops`` and ``torchvision.transforms``. Importing anything from torchvision
runs ``torchvision/__init__``, which imports every model family, the datasets, and
``torch._dynamo`` (through ``torchvision.ops.roi_align``): about as long as importing
torch itself, before a single face is found.

MTCNN needs two things from torchvision: ``batched_nms`` (a C++ kernel) and, only in
``extract_face``, ``transforms.functional.to_tensor``. :func:`mtcnn_class` loads
``facenet_pytorch.models.mtcnn`` with

* the ``facenet_pytorch`` package's ``__init__`` skipped (its submodules import as usual),
* ``batched_nms`` computed exactly as torchvision's does for inputs of MTCNN's size
  (the coordinate-offset trick over ``torch.ops.torchvision.nms``, the same C++ kernel,
  loaded from torchvision's extension library without importing the Python package),
* ``to_tensor`` forwarded to the real torchvision on first use.

Module stand-ins are only in ``sys.modules`` while that one module is imported, so a
later ``import torchvision`` or ``import facenet_pytorch`` gets the real packages. When
torchvision is already imported, or anything here fails, the ordinary import is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_TORCHVISION_OPS_LOADED = False


def _load_torchvision_ops() -> None:
    """Register torchvision's C++ operators (``torch.ops.torchvision.*``) without importing it."""
    global _TORCHVISION_OPS_LOADED
    if _TORCHVISION_OPS_LOADED or "torchvision" in sys.modules:
        _TORCHVISION_OPS_LOADED = True
        return
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    libs = sorted(root.glob("_C*.so")) + sorted(root.glob("_C*.pyd"))
    if not libs:
        raise ImportError(f"no torchvision extension library in {root}")
    torch.ops.load_library(str(libs[0]))
    _TORCHVISION_OPS_LOADED = True


def batched_nms(boxes: Any, scores: Any, idxs: Any, iou_threshold: float) -> Any:
    """Per-class NMS: torchvision's ``batched_nms`` (coordinate trick) on its own C++ kernel."""
    import torch

    if "torchvision" in sys.modules:
        from torchvision.ops.boxes import batched_nms as tv_batched_nms

        return tv_batched_nms(boxes, scores, idxs, iou_threshold)
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    _load_torchvision_ops()
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return torch.ops.torchvision.nms(boxes + offsets[:, None], scores, float(iou_threshold))


def _to_tensor(pic: Any) -> Any:
    from torchvision.transforms import functional

    return functional.to_tensor(pic)


def _stub_package(name: str, path: Path | None) -> types.ModuleType:
    mod = types.ModuleType(name)
    if path is not None:
        mod.__path__ = [str(path)]  # a package whose __init__ is not run
    return mod


def mtcnn_module() -> types.ModuleType:
    """``facenet_pytorch.models.mtcnn`` (MTCNN, PNet, RNet, ONet), without torchvision's Python package."""
    if "facenet_pytorch.models.mtcnn" in sys.modules:
        return sys.modules["facenet_pytorch.models.mtcnn"]
    if "torchvision" in sys.modules or "facenet_pytorch" in sys.modules:
        return importlib.import_module("facenet_pytorch.models.mtcnn")
    try:
        return _light_import()
    except Exception as exc:  # any surprise in a future facenet-pytorch: take the ordinary route
        log.debug("light MTCNN import failed (%s); importing facenet_pytorch normally", exc)
        for name in [m for m in sys.modules if m.split(".")[0] == "facenet_pytorch"]:
            sys.modules.pop(name, None)
        return importlib.import_module("facenet_pytorch.models.mtcnn")


def mtcnn_class() -> type:
    """facenet-pytorch's ``MTCNN`` class, imported without torchvision's Python package."""
    return mtcnn_module().MTCNN  # type: ignore[no-any-return]


def _light_import() -> types.ModuleType:
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("facenet-pytorch is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    _load_torchvision_ops()  # fail here, before any stand-in is installed, if the kernel is missing

    boxes_mod = types.ModuleType("torchvision.ops.boxes")
    boxes_mod.batched_nms = batched_nms  # type: ignore[attr-defined]
    functional_mod = types.ModuleType("torchvision.transforms.functional")
    functional_mod.to_tensor = _to_tensor  # type: ignore[attr-defined]
    transforms_mod = _stub_package("torchvision.transforms", None)
    transforms_mod.functional = functional_mod  # type: ignore[attr-defined]
    ops_mod = _stub_package("torchvision.ops", None)
    ops_mod.boxes = boxes_mod  # type: ignore[attr-defined]
    tv_mod = _stub_package("torchvision", None)
    tv_mod.ops, tv_mod.transforms = ops_mod, transforms_mod  # type: ignore[attr-defined]
    stand_ins = {
        "torchvision": tv_mod, "torchvision.ops": ops_mod, "torchvision.ops.boxes": boxes_mod,
        "torchvision.transforms": transforms_mod, "torchvision.transforms.functional": functional_mod,
        "facenet_pytorch": _stub_package("facenet_pytorch", root),
        "facenet_pytorch.models": _stub_package("facenet_pytorch.models", root / "models"),
        "facenet_pytorch.models.utils": _stub_package("facenet_pytorch.models.utils", root / "models" / "utils"),
    }
    sys.modules.update(stand_ins)
    try:
        module = importlib.import_module("facenet_pytorch.models.mtcnn")
    finally:
        for name, mod in stand_ins.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]
    # the loaded modules stay importable by their names; their parents load for real when asked
    return module
