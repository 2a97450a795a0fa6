"""Alignment: the similarity fit against a closed-form reference, pixel placement, errors."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.align import (
    ARCFACE_112, align_face, box_crop, reference_points, similarity_matrix, transform_points,
)
from facepipe.errors import ShapeError
from facepipe.types import Box


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Brute-force least-squares similarity (Umeyama 1991), 2x3."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    r = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def _similar(points: np.ndarray, angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ (scale * np.array([[c, -s], [s, c]])).T + [tx, ty]


def test_reference_points_scale_with_crop() -> None:
    assert np.allclose(reference_points(112), ARCFACE_112)
    assert np.allclose(reference_points(224), ARCFACE_112 * 2)
    with pytest.raises(ShapeError):
        reference_points(8)


@pytest.mark.parametrize("size", [96, 112, 160])
def test_exact_similarity_is_recovered(size: int) -> None:
    lm = _similar(ARCFACE_112, 0.3, 1.7, 40.0, -12.0)
    m = similarity_matrix(lm, size)
    assert np.allclose(transform_points(m, lm), reference_points(size), atol=1e-3)


def test_noisy_landmarks_match_least_squares_reference() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        lm = _similar(ARCFACE_112, rng.uniform(-0.5, 0.5), rng.uniform(0.5, 3), *rng.uniform(-50, 50, 2))
        lm = lm + rng.normal(0, 0.8, lm.shape)
        m = similarity_matrix(lm, 112)
        ref = umeyama(lm, ARCFACE_112)
        assert np.allclose(transform_points(m, lm), transform_points(ref, lm), atol=0.05)


def test_align_face_places_landmark_pixels_on_template() -> None:
    # Bright dots at the landmark positions of a rotated, scaled face must land on the template.
    lm = _similar(ARCFACE_112, -0.25, 2.0, 60.0, 30.0)
    img = np.zeros((400, 400, 3), np.uint8)
    for x, y in lm:
        img[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    crop = align_face(img, lm, 112)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    for x, y in ARCFACE_112:
        assert crop[int(round(y)), int(round(x))].min() > 100


def test_align_real_face(astronaut: np.ndarray) -> None:
    from facepipe.detect.mtcnn import MTCNNDetector

    faces = MTCNNDetector(device="cpu").detect(astronaut)
    assert faces and faces[0].landmarks is not None
    crop = align_face(astronaut, faces[0].landmarks_array(), 112)
    # The aligned face is roughly mirror-symmetric: eyes level after alignment.
    m = similarity_matrix(faces[0].landmarks_array(), 112)
    eyes = transform_points(m, faces[0].landmarks_array()[:2])
    assert abs(eyes[0, 1] - eyes[1, 1]) < 3.0
    assert crop.std() > 20  # real content, not a replicated border


def test_bad_landmarks_raise() -> None:
    img = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ShapeError):
        align_face(img, np.zeros((4, 2)), 112)
    with pytest.raises(ShapeError):
        align_face(img, np.full((5, 2), np.nan), 112)
    with pytest.raises(ShapeError):
        align_face(img, np.ones((5, 2)), 112)
    with pytest.raises(ShapeError):
        align_face(np.zeros((50, 50), np.uint8), ARCFACE_112, 112)


def test_box_crop_centres_the_box() -> None:
    img = np.zeros((200, 300, 3), np.uint8)
    img[80:120, 180:220] = 200  # a 40x40 square centred at (200, 100)
    crop = box_crop(img, Box(180, 80, 40, 40), 112)
    assert crop.shape == (112, 112, 3)
    ys, xs = np.nonzero(crop[:, :, 0] > 100)
    assert abs(xs.mean() - 55.5) < 1.5 and abs(ys.mean() - 55.5) < 1.5
    with pytest.raises(ShapeError):
        box_crop(img, Box(0, 0, 0, 10), 112)


# -- dlib's chip geometry (dlib-chip-5pt) ------------------------------------------------------
def test_dlib_chip_geometry_places_landmarks_on_its_template() -> None:
    from facepipe.align import DLIB_CHIP, DLIB_CHIP_150, align_to

    assert reference_points(150, DLIB_CHIP) == pytest.approx(DLIB_CHIP_150)
    assert reference_points(112, DLIB_CHIP) == pytest.approx(DLIB_CHIP_150 * 112 / 150)
    lm = _similar(DLIB_CHIP_150, 0.2, 1.5, 40.0, 20.0)
    img = np.zeros((400, 400, 3), np.uint8)
    for x, y in lm:
        img[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    crop = align_to(img, lm, DLIB_CHIP)
    assert crop.shape == (150, 150, 3)
    for x, y in DLIB_CHIP_150:
        assert crop[int(round(y)), int(round(x))].min() > 60
    # ArcFace by name is exactly align_face
    assert np.array_equal(align_to(img, lm, "arcface-5pt-similarity", 112), align_face(img, lm, 112))
    with pytest.raises(ShapeError, match="unknown alignment"):
        align_to(img, lm, "nope")


def test_dlib_chip_template_is_a_plausible_face_layout() -> None:
    from facepipe.align import DLIB_CHIP_150

    le, re, nose, lm, rm = DLIB_CHIP_150
    assert le[0] < nose[0] < re[0] and lm[0] < nose[0] < rm[0]          # left/right order
    assert abs(le[1] - re[1]) < 1 and abs(lm[1] - rm[1]) < 1           # level eyes and mouth
    assert le[1] < nose[1] < lm[1]                                       # eyes, nose, mouth top to bottom
    assert abs((le[0] + re[0]) / 2 - 75) < 2                             # centred


def test_large_faces_are_antialiased_like_dlibs_pyramid() -> None:
    """A fine stripe pattern shrunk 6x must come out as its mean grey, not as aliasing moire."""
    from facepipe.align import warp_antialiased

    stripes = np.zeros((900, 900, 3), np.uint8)
    stripes[:, ::2] = 255
    m = np.array([[1 / 6, 0, 0], [0, 1 / 6, 0]], np.float64)
    out = warp_antialiased(stripes, m, 150).astype(np.float64)
    assert abs(out[10:-10, 10:-10].mean() - 127.5) < 3 and out[10:-10, 10:-10].std() < 3
    import cv2

    naive = cv2.warpAffine(stripes, m, (150, 150), flags=cv2.INTER_LINEAR).astype(np.float64)
    assert abs(naive[10:-10, 10:-10].mean() - 127.5) > 60  # plain bilinear sampling aliases (all white here)


def test_box_crop_uses_the_geometry_box_fraction() -> None:
    from facepipe.align import DLIB_CHIP, DLIB_CHIP_BOX_FRACTION

    img = np.zeros((300, 300, 3), np.uint8)
    img[100:200, 100:200] = 200
    crop = box_crop(img, Box(100, 100, 100, 100), 150, DLIB_CHIP)
    ys, xs = np.nonzero(crop[:, :, 0] > 100)
    assert (xs.max() - xs.min() + 1) / 150 == pytest.approx(DLIB_CHIP_BOX_FRACTION if DLIB_CHIP_BOX_FRACTION < 1
                                                            else 1.0, abs=0.03)
