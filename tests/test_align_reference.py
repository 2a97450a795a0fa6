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


# -- killed mutants (scripts/mutation_test.py --target align): defaults, the box fallback, messages


def test_default_crop_is_112_pixels(corner_face) -> None:  # type: ignore[no-untyped-def]
    from facepipe.align import box_crop
    from facepipe.types import Box

    image, lm = corner_face
    assert align_face(image, lm).shape == (112, 112, 3)
    np.testing.assert_array_equal(align_face(image, lm), align_face(image, lm, 112))
    assert box_crop(image, Box(10, 10, 60, 60)).shape == (112, 112, 3)


@pytest.mark.parametrize("size", [96, 112, 160])
def test_box_crop_scales_the_box_to_the_aligned_face_fraction(size: int) -> None:
    """Without landmarks, the box fills BOX_FRACTION of the crop (as a face does in an aligned crop)."""
    from facepipe.align import BOX_FRACTION, box_crop
    from facepipe.types import Box

    img = np.full((300, 400, 3), 40, np.uint8)
    img[100:160, 250:310] = 220                       # a 60x60 "face" box centred at (280, 130)
    crop = box_crop(img, Box(250, 100, 60, 60), size)
    ys, xs = np.nonzero(crop[:, :, 0] > 130)
    side = BOX_FRACTION * size
    assert abs((xs.max() - xs.min() + 1) - side) <= 2 and abs((ys.max() - ys.min() + 1) - side) <= 2
    assert abs(xs.mean() - (size - 1) / 2) < 1.0 and abs(ys.mean() - (size - 1) / 2) < 1.0


def test_box_crop_reaching_outside_the_photo_repeats_its_edge() -> None:
    from facepipe.align import box_crop
    from facepipe.types import Box

    img = np.full((120, 120, 3), 200, np.uint8)
    crop = box_crop(img, Box(0, 0, 50, 50), 112)      # the square crop extends past the top-left corner
    assert crop.min() == 200


def test_errors_name_the_problem() -> None:
    from facepipe.align import box_crop, reference_points, similarity_matrix
    from facepipe.errors import ShapeError
    from facepipe.types import Box

    img = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ShapeError, match=r"\(5, 2\).*\(4, 2\)"):
        align_face(img, np.zeros((4, 2)), 112)
    with pytest.raises(ShapeError, match="NaN"):
        align_face(img, np.full((5, 2), np.nan), 112)
    with pytest.raises(ShapeError, match="coincide"):
        align_face(img, np.ones((5, 2)), 112)
    with pytest.raises(ShapeError, match="at least 16"):
        reference_points(15)
    assert reference_points(16).shape == (5, 2)
    with pytest.raises(ShapeError, match="degenerate"):
        box_crop(img, Box(0, 0, 10, 0), 112)
    # points on one vertical line still define a similarity (only five coinciding points do not)
    line = np.array([[30.0, 10.0], [30.0, 20.0], [30.0, 30.0], [30.0, 40.0], [30.0, 50.0]])
    assert np.all(np.isfinite(similarity_matrix(line, 112)))
    assert np.all(np.isfinite(similarity_matrix(line[:, ::-1], 112)))   # ... and on one horizontal line
    assert box_crop(img, Box(20, 20, 1, 1), 112).shape == (112, 112, 3)  # a 1-px box is small, not degenerate
