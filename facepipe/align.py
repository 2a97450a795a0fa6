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

A second geometry, ``dlib-chip-5pt`` (:data:`DLIB_CHIP_150`), reproduces dlib's 150×150
face chip (``get_face_chip_details(shape, 150, 0.25)``) from MTCNN's five landmarks,
without dlib: the template is where MTCNN's landmarks land, on average, in dlib's own
chips of the LFW DevTrain training people (``scripts/fit_chip_template.py``; fit and
accuracy cost in docs/embedding.md). :func:`align_to` warps to either geometry by name;
for the dlib chip it first halves the image (``cv2.pyrDown``) while the warp would shrink
by more than 2×, as dlib's chip extraction does with its image pyramid, so large faces
are not aliased.

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

#: MTCNN's five landmarks (facepipe order) in dlib's 150×150 face chip (padding 0.25):
#: the mean over LFW DevTrain training people of MTCNN's points mapped through dlib's
#: own chip transform (``scripts/fit_chip_template.py``, docs/chip_template.json).
#: The mean is then refined (10 fixed-point steps) so that, on average, the weighted
#: least-squares similarity to it (:data:`DLIB_CHIP_WEIGHTS`) reproduces dlib's chip
#: transform (the plain mean gives chips ~3 % too small: regression dilution from noisy points).
DLIB_CHIP_150: np.ndarray = np.array(
    [
        [47.3412, 45.8761],   # left eye
        [102.8301, 45.7630],  # right eye
        [74.8038, 78.9081],   # nose tip
        [50.6198, 106.9830],  # left mouth corner
        [99.3614, 106.9413],  # right mouth corner
    ],
    dtype=np.float64,
)

#: Side of an MTCNN box relative to the dlib chip's side (median, same fit): the chip is
#: tighter than the box (it cuts through forehead and chin).
DLIB_CHIP_BOX_FRACTION: float = 1.088

#: Per-point weights of the dlib-chip fit: inverse variance of each point's position in
#: dlib's chips (MTCNN's eye centres are ~3x steadier than its nose and mouth points, so a
#: weighted fit lands ~20 % closer to dlib's own chip; same fit).
DLIB_CHIP_WEIGHTS: np.ndarray | None = np.array([1.0, 0.945, 0.1261, 0.1423, 0.1422])

ARCFACE = "arcface-5pt-similarity"
DLIB_CHIP = "dlib-chip-5pt"
#: Alignment geometries by name: (template for its native crop, native crop side, box fraction).
GEOMETRIES: dict[str, tuple[np.ndarray, int, float]] = {
    ARCFACE: (ARCFACE_112, 112, BOX_FRACTION),
    DLIB_CHIP: (DLIB_CHIP_150, 150, DLIB_CHIP_BOX_FRACTION),
}
#: Point weights of a geometry's least-squares fit (absent: all points equal).
WEIGHTS: dict[str, np.ndarray] = {}
if DLIB_CHIP_WEIGHTS is not None:
    WEIGHTS[DLIB_CHIP] = DLIB_CHIP_WEIGHTS


def reference_points(size: int, geometry: str = ARCFACE) -> np.ndarray:
    """A geometry's template (ArcFace by default) scaled to a ``size``×``size`` crop, float64 ``(5, 2)``."""
    if int(size) < 16:
        raise ShapeError(f"crop size must be at least 16 pixels, got {size}")
    if geometry not in GEOMETRIES:
        raise ShapeError(f"unknown alignment {geometry!r}; valid: {', '.join(GEOMETRIES)}")
    template, native, _ = GEOMETRIES[geometry]
    return template * (float(size) / native)


def _check_landmarks(landmarks: np.ndarray | tuple | list) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (5, 2):
        raise ShapeError(f"landmarks: expected shape (5, 2), got {lm.shape}")
    if not np.all(np.isfinite(lm)):
        raise ShapeError("landmarks: contain NaN or infinite values")
    return lm


def weighted_similarity(src: np.ndarray, dst: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Closed-form weighted least-squares similarity (rotation, uniform scale, shift) ``src → dst``, 2×3."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    ms, md = w @ src, w @ dst
    s, d = src - ms, dst - md
    sc, dc = s[:, 0] + 1j * s[:, 1], d[:, 0] + 1j * d[:, 1]
    a = (w * np.conj(sc) * dc).sum() / (w * np.abs(sc) ** 2).sum()
    rot = np.array([[a.real, -a.imag], [a.imag, a.real]])
    return np.hstack([rot, (md - rot @ ms)[:, None]])


def similarity_matrix(landmarks: np.ndarray | tuple | list, size: int, geometry: str = ARCFACE) -> np.ndarray:
    """The 2×3 similarity transform taking ``landmarks`` to the reference points of a ``size`` crop
    (a geometry with point weights, :data:`WEIGHTS`, uses the weighted least-squares fit)."""
    import cv2

    src = _check_landmarks(landmarks)
    dst = reference_points(size, geometry)
    if np.ptp(src[:, 0]) < 1e-6 and np.ptp(src[:, 1]) < 1e-6:
        raise ShapeError("landmarks: all five points coincide; cannot align")
    if geometry in WEIGHTS:
        return weighted_similarity(src, dst, WEIGHTS[geometry])
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


def warp_antialiased(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """``cv2.warpAffine`` to a ``size`` square (bilinear, border replicated), halving the image
    with ``cv2.pyrDown`` first while the warp shrinks by more than 2× (dlib's pyramid rule)."""
    import cv2

    m = np.asarray(m, dtype=np.float64).copy()
    img = image
    # scale of the similarity (chip pixels per image pixel)
    while np.sqrt(abs(np.linalg.det(m[:, :2]))) < 0.5 and min(img.shape[:2]) >= 4:
        img = cv2.pyrDown(img)
        # cv2.pyrDown centres output pixel i on input pixel 2i, so image point x is x/2 there
        m[:, :2] *= 2.0
    return cv2.warpAffine(img, m, (int(size), int(size)), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def align_to(image: np.ndarray, landmarks: np.ndarray | tuple | list, geometry: str = ARCFACE,
             size: int | None = None) -> np.ndarray:
    """Warp ``image`` so the five ``landmarks`` land on ``geometry``'s template; RGB uint8 crop.

    ``arcface-5pt-similarity`` is exactly :func:`align_face`; ``dlib-chip-5pt`` gives
    dlib's 150×150 chip geometry (any ``size``: the template is scaled) with pyramid
    anti-aliasing for large faces (:func:`warp_antialiased`).
    """
    from facepipe.detect.base import check_image

    if geometry not in GEOMETRIES:
        raise ShapeError(f"unknown alignment {geometry!r}; valid: {', '.join(GEOMETRIES)}")
    size = GEOMETRIES[geometry][1] if size is None else int(size)
    if geometry == ARCFACE:
        return align_face(image, landmarks, size)
    check_image(image)
    return warp_antialiased(image, similarity_matrix(landmarks, size, geometry), size)


def box_crop(image: np.ndarray, box: Box, size: int = 112, geometry: str = ARCFACE) -> np.ndarray:
    """Fallback crop without landmarks: square around the box centre, no rotation correction.

    The square's side is ``max(w, h) / fraction`` (the geometry's typical box fraction,
    :data:`BOX_FRACTION` for ArcFace) so a face box occupies about the same part of the
    crop as in a landmark-aligned crop.
    """
    import cv2

    from facepipe.detect.base import check_image

    check_image(image)
    if box.w <= 0 or box.h <= 0:
        raise ShapeError(f"box: degenerate size {box.w}x{box.h}")
    if geometry not in GEOMETRIES:
        raise ShapeError(f"unknown alignment {geometry!r}; valid: {', '.join(GEOMETRIES)}")
    cx, cy = box.center
    side = max(box.w, box.h) / GEOMETRIES[geometry][2]
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
