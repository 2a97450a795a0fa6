"""``align_face`` against a closed-form reference at every crop size an embedder uses.

The reference is written out here, independent of OpenCV: the least-squares similarity
(Umeyama) taking the five landmarks to the ArcFace template scaled to the crop size
(``ARCFACE_112 * size / 112``), then bilinear sampling of the image at the inverse-mapped
pixel centres with coordinates clamped to the image (border replication: a crop that
reaches past the photo's edge repeats the edge pixels instead of painting them black).
The face is placed near the photo's corner so a good part of every crop lies outside it.
"""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.align import align_face

#: ArcFace's five reference points for a 112x112 crop (x, y), as published by InsightFace.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]])
#: MTCNN's landmarks of the astronaut's face in skimage's photo.
ASTRONAUT_LANDMARKS = np.array([[205.0, 101.7], [246.8, 103.7], [224.7, 129.0],
                                [201.7, 139.2], [245.3, 141.9]])
SIZES = [96, 112, 150, 160]


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) src -> dst, 2x3."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    r = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    return np.hstack([scale * r, (mu_d - scale * r @ mu_s)[:, None]])


def reference_crop(image: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """The aligned crop by the closed form: inverse warp + bilinear sampling, edges replicated."""
    m = umeyama(landmarks, ARCFACE_112 * size / 112.0)
    a, t = m[:, :2], m[:, 2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    dst = np.stack([xs.ravel(), ys.ravel()], 1)
    src = (dst - t) @ np.linalg.inv(a).T
    h, w = image.shape[:2]
    x = np.clip(src[:, 0], 0, w - 1)
    y = np.clip(src[:, 1], 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    im = image.astype(np.float64)
    out = (im[y0, x0] * (1 - fx) * (1 - fy) + im[y0, x1] * fx * (1 - fy)
           + im[y1, x0] * (1 - fx) * fy + im[y1, x1] * fx * fy)
    return out.reshape(size, size, 3)


@pytest.fixture(scope="module")
def corner_face(astronaut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The astronaut photo cut so her face sits at the top-left corner (crops reach outside)."""
    oy, ox = 85, 185
    return np.ascontiguousarray(astronaut[oy:, ox:]), ASTRONAUT_LANDMARKS - [ox, oy]


@pytest.mark.parametrize("size", SIZES)
def test_aligned_crop_matches_the_closed_form(size: int, corner_face) -> None:  # type: ignore[no-untyped-def]
    image, lm = corner_face
    got = align_face(image, lm, size).astype(np.float64)
    ref = reference_crop(image, lm, size)
    assert got.shape == (size, size, 3)
    diff = np.abs(got - ref)
    # OpenCV interpolates in fixed point (1/32 px): a grey level or two on sharp edges
    assert diff.mean() < 0.5 and np.percentile(diff, 99.5) < 3 and diff.max() < 12, \
        (size, diff.mean(), np.percentile(diff, 99.5), diff.max())


@pytest.mark.parametrize("size", SIZES)
def test_crop_reaching_outside_the_photo_repeats_its_edge(size: int, corner_face) -> None:  # type: ignore[no-untyped-def]
    image, lm = corner_face
    m = umeyama(lm, ARCFACE_112 * size / 112.0)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    src = (np.stack([xs.ravel(), ys.ravel()], 1) - m[:, 2]) @ np.linalg.inv(m[:, :2]).T
    outside = ((src[:, 0] < -1) | (src[:, 1] < -1)).reshape(size, size)
    assert outside.mean() > 0.05, "the test face must reach past the photo's edge"
    crop = align_face(image, lm, size)
    # the astronaut photo has no black edge: replicated edge pixels are never all-zero
    assert (crop[outside].max(axis=1) > 10).all()


@pytest.mark.parametrize("size", SIZES)
def test_landmarks_land_on_the_scaled_template(size: int) -> None:
    """Bright dots drawn at the landmarks end up on the template points of a ``size`` crop."""
    angle, scale = -0.3, 1.8
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    lm = ARCFACE_112 @ rot.T + [90.0, 60.0]
    img = np.zeros((400, 400, 3), np.uint8)
    for x, y in lm:
        img[int(round(y)) - 3:int(round(y)) + 4, int(round(x)) - 3:int(round(x)) + 4] = 255
    crop = align_face(img, lm, size)
    for x, y in ARCFACE_112 * size / 112.0:
        assert crop[int(round(y)), int(round(x))].min() > 100, (size, x, y)
