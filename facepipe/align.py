"""Landmark-based face alignment: a similarity transform to a fixed square crop.

Every embedding path (enroll, identify, video, ``facepipe embed``, training and
the verification benchmark) goes through :func:`align_face`, so the network
always sees faces placed the same way.

The five reference points are the ArcFace / InsightFace template for a 112×112
crop (left eye, right eye, nose tip, left and right mouth corners, image
left/right as MTCNN reports them), scaled to the requested crop size. The
transform (rotation + uniform scale + translation, 4 degrees of freedom) is
fitted with :func:`cv2.estimateAffinePartial2D` as a plain least-squares fit over
all five points (the robust step is disabled with a huge inlier threshold, so the
Levenberg–Marquardt refinement runs over every point): the same fit as
InsightFace's Umeyama estimate, which the tests check against a closed form.
Robust fitting (LMEDS) was tried and drops correct-but-noisy points, moving the
crop by a pixel or more for no gain on detector landmarks.

For detectors that give no landmarks (Haar), :func:`box_crop` is the documented
fallback: a square crop around the box centre, scaled so that the box fills the
same fraction of the crop as an aligned face does. It is *not* rotation
corrected, and the pipeline normally prefers to run MTCNN's landmark step on
the box region instead (see :mod:`facepipe.pipeline`).
"""

from __future__ import annotations

import numpy as np

from facepipe.errors import ShapeError
from facepipe.types import Box

#: ArcFace's five reference points for a 112×112 crop, ``(x, y)`` pixels.
ARCFACE_112: np.ndarray = np.array(
    [
        [38.2946, 51.6963],  # left eye
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)

#: Fraction of the crop side a detector box of an aligned face typically spans
#: (measured on MTCNN boxes of LFW faces aligned with :func:`align_face`).
BOX_FRACTION: float = 0.78


def reference_points(size: int) -> np.ndarray:
    """The ArcFace template scaled to a ``size``×``size`` crop, float64 ``(5, 2)``."""
    if int(size) < 16:
        raise ShapeError(f"crop size must be at least 16 pixels, got {size}")
    return ARCFACE_112 * (float(size) / 112.0)


def _check_landmarks(landmarks: np.ndarray | tuple | list) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (5, 2):
        raise ShapeError(f"landmarks: expected shape (5, 2), got {lm.shape}")
    if not np.all(np.isfinite(lm)):
        raise ShapeError("landmarks: contain NaN or infinite values")
    return lm


def similarity_matrix(landmarks: np.ndarray | tuple | list, size: int) -> np.ndarray:
    """The 2×3 similarity transform taking ``landmarks`` to the reference points of a ``size`` crop."""
    import cv2

    src = _check_landmarks(landmarks)
    dst = reference_points(size)
    if np.ptp(src[:, 0]) < 1e-6 and np.ptp(src[:, 1]) < 1e-6:
        raise ShapeError("landmarks: all five points coincide; cannot align")
    m, _ = cv2.estimateAffinePartial2D(src.astype(np.float32), dst.astype(np.float32),
                                       method=cv2.RANSAC, ransacReprojThreshold=1e6,
                                       maxIters=1, refineIters=100)
    if m is None:
        raise ShapeError("landmarks: no similarity transform fits these points")
    return m.astype(np.float64)


def align_face(image: np.ndarray, landmarks: np.ndarray | tuple | list, size: int = 112) -> np.ndarray:
    """Warp ``image`` so the five ``landmarks`` land on the ArcFace template; RGB uint8 ``(size, size, 3)``.

    ``image`` is RGB ``uint8`` ``(H, W, 3)``; ``landmarks`` are ``(5, 2)`` pixel
    coordinates in facepipe's order. Pixels outside the image are filled by
    border replication (a black border would be a strong, identity-free cue).
    """
    import cv2

    from facepipe.detect.base import check_image

    check_image(image)
    m = similarity_matrix(landmarks, size)
    return cv2.warpAffine(image, m, (int(size), int(size)), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def box_crop(image: np.ndarray, box: Box, size: int = 112) -> np.ndarray:
    """Fallback crop without landmarks: square around the box centre, no rotation correction.

    The square's side is ``max(w, h) / BOX_FRACTION`` so a face box occupies
    about the same part of the crop as in a landmark-aligned crop.
    """
    import cv2

    from facepipe.detect.base import check_image

    check_image(image)
    if box.w <= 0 or box.h <= 0:
        raise ShapeError(f"box: degenerate size {box.w}x{box.h}")
    cx, cy = box.center
    side = max(box.w, box.h) / BOX_FRACTION
    scale = float(size) / side
    # Map (cx, cy) to the crop centre with uniform scale.
    m = np.array([[scale, 0.0, size / 2.0 - scale * cx],
                  [0.0, scale, size / 2.0 - scale * cy]], dtype=np.float64)
    return cv2.warpAffine(image, m, (int(size), int(size)), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def transform_points(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2×3 affine matrix to ``(N, 2)`` points."""
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:, :2].T + m[:, 2]
