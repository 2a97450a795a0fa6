"""Haar-like features, integral images and OpenCV's window normalisation.

A feature is up to three weighted rectangles ``(x, y, w, h, weight)`` inside the
detection window, in OpenCV's convention: the first rectangle covers the whole
feature with weight -1 and the others cover the parts that are added back with a
positive weight (2 for two-rectangle features, 3 for three-rectangle ones…), so a
flat patch gives 0. Its *raw* value is ``Σ weight · (sum of pixels in rect)``.

OpenCV's detector (``HaarEvaluator`` in ``modules/objdetect/src/cascadedetect.cpp``)
divides that raw value by ``nf = sqrt(A·Σp² − (Σp)²)`` computed over the window
shrunk by one pixel on every side (``normrect = (1, 1, W−2, H−2)``, ``A`` its area;
``nf = A·σ``), and skips windows whose ``σ ≤ 10`` grey levels outright
(``A/nf < 0.1`` must hold). The arithmetic is float32: ``vnf = float(1/nf)``,
``value = float(raw) · vnf``. :func:`window_norm` and :func:`feature_values`
reproduce that bit for bit so thresholds learnt here mean the same in OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facepipe.errors import ShapeError

#: Feature families per mode: ``basic`` is Viola–Jones' upright set, ``core`` adds
#: Lienhart's 4-wide lines and centre-surround. (Tilted features are not generated.)
MODES: dict[str, tuple[str, ...]] = {
    "basic": ("x2", "y2", "x3", "y3", "x2y2"),
    "core": ("x2", "y2", "x3", "y3", "x4", "y4", "x2y2", "point"),
}

#: OpenCV's rule: a window is evaluated only when ``normrect.area() / nf < 0.1`` (σ > 10).
MIN_STD_RATIO = 0.1


def _family(kind: str) -> tuple[tuple[int, int], list[tuple[int, int, int, int, float]]]:
    """Cell grid (cols, rows) of a family and its rects in cell units (x, y, w, h, weight)."""
    return {
        "x2": ((2, 1), [(0, 0, 2, 1, -1.0), (1, 0, 1, 1, 2.0)]),
        "y2": ((1, 2), [(0, 0, 1, 2, -1.0), (0, 1, 1, 1, 2.0)]),
        "x3": ((3, 1), [(0, 0, 3, 1, -1.0), (1, 0, 1, 1, 3.0)]),
        "y3": ((1, 3), [(0, 0, 1, 3, -1.0), (0, 1, 1, 1, 3.0)]),
        "x4": ((4, 1), [(0, 0, 4, 1, -1.0), (1, 0, 2, 1, 2.0)]),
        "y4": ((1, 4), [(0, 0, 1, 4, -1.0), (0, 1, 1, 2, 2.0)]),
        "x2y2": ((2, 2), [(0, 0, 2, 2, -1.0), (0, 0, 1, 1, 2.0), (1, 1, 1, 1, 2.0)]),
        "point": ((3, 3), [(0, 0, 3, 3, -1.0), (1, 1, 1, 1, 9.0)]),
    }[kind]


@dataclass
class HaarFeatures:
    """A set of ``F`` Haar-like features for one window size.

    ``rects`` is ``(F, 3, 4)`` int32 ``x, y, w, h``; ``weights`` ``(F, 3)`` float32
    (0 for an unused third rectangle).
    """

    width: int
    height: int
    rects: np.ndarray
    weights: np.ndarray
    _terms: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.rects)

    def subset(self, ids: np.ndarray) -> HaarFeatures:
        """The features ``ids`` as a new set (in that order)."""
        ids = np.asarray(ids, dtype=np.int64)
        return HaarFeatures(self.width, self.height, self.rects[ids].copy(), self.weights[ids].copy())

    def n_rects(self) -> np.ndarray:
        """How many rectangles each feature uses (2 or 3)."""
        return (self.weights != 0).sum(axis=1)

    def sparse_matrix(self, ids: np.ndarray | None = None):  # -> scipy.sparse.csc_matrix
        """``(P, F)`` matrix M with ``raw = II_flat @ M`` for flattened ``(H+1)(W+1)`` integral images."""
        import scipy.sparse as sp

        rects = self.rects if ids is None else self.rects[ids]
        weights = self.weights if ids is None else self.weights[ids]
        f = len(rects)
        stride = self.width + 1
        x, y, w, h = (rects[..., k].astype(np.int64) for k in range(4))
        corners = np.stack([y * stride + x, y * stride + x + w,
                            (y + h) * stride + x, (y + h) * stride + x + w], axis=-1)  # (F, 3, 4)
        signs = np.array([1.0, -1.0, -1.0, 1.0])
        data = weights[..., None].astype(np.float64) * signs  # (F, 3, 4)
        cols = np.broadcast_to(np.arange(f)[:, None, None], corners.shape)
        keep = data != 0
        m = sp.coo_matrix((data[keep], (corners[keep], cols[keep])),
                          shape=(stride * (self.height + 1), f))
        return m.tocsc()  # duplicates (shared corners) are summed

    def merged_terms(self, idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Distinct integral-image corners of feature ``idx`` as ``(dy, dx, coef)``, or None.

        Only for integer weights, where the raw value is an exact integer and any
        summation order gives OpenCV's result; None means use the per-rect path.
        """
        if idx in self._terms:
            return self._terms[idx]
        w = self.weights[idx]
        if not np.all(np.round(w) == w):
            self._terms[idx] = None
            return None
        acc: dict[tuple[int, int], int] = {}
        for (x, y, ww, hh), wt in zip(self.rects[idx], w):
            if wt == 0:
                continue
            for dy, dx, s in ((y, x, 1), (y, x + ww, -1), (y + hh, x, -1), (y + hh, x + ww, 1)):
                acc[(int(dy), int(dx))] = acc.get((int(dy), int(dx)), 0) + s * int(wt)
        items = [(k, v) for k, v in acc.items() if v != 0]
        dy = np.array([k[0] for k, _ in items], np.int64)
        dx = np.array([k[1] for k, _ in items], np.int64)
        coef = np.array([v for _, v in items], np.int64)
        self._terms[idx] = (dy, dx, coef)
        return dy, dx, coef


def generate_features(width: int, height: int, mode: str = "basic") -> HaarFeatures:
    """Every upright Haar-like feature of ``mode`` at every position and size in the window."""
    if mode not in MODES:
        raise ValueError(f"unknown feature mode {mode!r}; valid: {', '.join(MODES)}")
    if width < 3 or height < 3:
        raise ValueError(f"window must be at least 3x3, got {width}x{height}")
    all_rects, all_weights = [], []
    for kind in MODES[mode]:
        (cx, cy), parts = _family(kind)
        # cell size (dx, dy) and top-left (x, y) such that the feature fits
        dx, dy = np.meshgrid(np.arange(1, width // cx + 1), np.arange(1, height // cy + 1), indexing="ij")
        dx, dy = dx.ravel(), dy.ravel()
        reps_x = width - cx * dx + 1
        reps_y = height - cy * dy + 1
        n = reps_x * reps_y
        cell = np.repeat(np.arange(len(dx)), n)
        start = np.repeat(np.cumsum(n) - n, n)
        k = np.arange(n.sum()) - start
        x = k % reps_x[cell]
        y = k // reps_x[cell]
        cdx, cdy = dx[cell], dy[cell]
        rects = np.zeros((len(x), 3, 4), np.int32)
        weights = np.zeros((len(x), 3), np.float32)
        for r, (px, py, pw, ph, wt) in enumerate(parts):
            rects[:, r] = np.stack([x + px * cdx, y + py * cdy, pw * cdx, ph * cdy], axis=1)
            weights[:, r] = wt
        all_rects.append(rects)
        all_weights.append(weights)
    return HaarFeatures(width, height, np.concatenate(all_rects), np.concatenate(all_weights))


def check_windows(windows: np.ndarray) -> np.ndarray:
    """``windows`` as a C-contiguous ``(N, H, W)`` uint8 array, or a ShapeError."""
    a = np.asarray(windows)
    if a.ndim != 3 or a.dtype != np.uint8:
        raise ShapeError(f"windows must be a (N, H, W) uint8 array, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def integral_images(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum and squared-sum integral images ``(N, H+1, W+1)`` int64 (zero first row/column)."""
    w = check_windows(windows).astype(np.int64)
    n, h, wd = w.shape
    ii = np.zeros((n, h + 1, wd + 1), np.int64)
    sq = np.zeros((n, h + 1, wd + 1), np.int64)
    ii[:, 1:, 1:] = w.cumsum(1).cumsum(2)
    sq[:, 1:, 1:] = (w * w).cumsum(1).cumsum(2)
    return ii, sq


def norm_from_integrals(s: np.ndarray, sq: np.ndarray, area: float) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``varianceNormFactor`` (float32) and validity from normrect sums ``s``, ``sq``.

    ``nf = area·Σp² − (Σp)²`` in double; ``vnf = float(1/sqrt(nf))`` when ``nf > 0`` and
    the window is valid when additionally ``area·vnf < 0.1``; otherwise vnf = 1, invalid.
    """
    nf = area * sq.astype(np.float64) - s.astype(np.float64) ** 2
    pos = nf > 0
    vnf = np.ones(nf.shape, np.float32)
    vnf[pos] = (1.0 / np.sqrt(nf[pos])).astype(np.float32)
    valid = pos & (area * vnf.astype(np.float64) < MIN_STD_RATIO)
    return vnf, valid


def window_norm(ii: np.ndarray, sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(vnf, valid)`` for windows given their integral images ``(N, H+1, W+1)``."""
    h, w = ii.shape[1] - 1, ii.shape[2] - 1
    y0, y1, x0, x1 = 1, h - 1, 1, w - 1

    def rect(a: np.ndarray) -> np.ndarray:
        return a[:, y1, x1] - a[:, y0, x1] - a[:, y1, x0] + a[:, y0, x0]

    return norm_from_integrals(rect(ii), rect(sq), float((w - 2) * (h - 2)))


def feature_values(features: HaarFeatures, windows: np.ndarray, ids: np.ndarray | None = None,
                   chunk: int = 2048) -> np.ndarray:
    """Normalised values ``(N, F)`` float32 of features ``ids`` (default all) on ``windows``.

    Windows that OpenCV would skip (σ ≤ 10) still get values (normalised by their
    own ``nf``); callers decide what to do with them (see :func:`window_norm`).
    """
    w = check_windows(windows)
    if w.shape[1:] != (features.height, features.width):
        raise ShapeError(f"windows are {w.shape[2]}x{w.shape[1]}, features want "
                         f"{features.width}x{features.height}")
    ii, sq = integral_images(w)
    vnf, _ = window_norm(ii, sq)
    flat = ii.reshape(len(w), -1).astype(np.float64)
    return values_from_flat(features, flat, vnf, ids, chunk)


def values_from_flat(features: HaarFeatures, flat: np.ndarray, vnf: np.ndarray,
                     ids: np.ndarray | None = None, chunk: int = 2048, transposed: bool = False) -> np.ndarray:
    """Like :func:`feature_values` from flattened float64 integral images ``(N, P)`` and their vnf.

    With ``transposed=True``, ``flat`` is given as a C-contiguous ``(P, N)`` array
    (callers evaluating many feature batches on the same samples transpose once).
    """
    ids = np.arange(len(features)) if ids is None else np.asarray(ids, dtype=np.int64)
    flat_t = flat if transposed else np.ascontiguousarray(flat.T)
    out = np.empty((flat_t.shape[1], len(ids)), np.float32)
    for c0 in range(0, len(ids), chunk):
        m = features.sparse_matrix(ids[c0:c0 + chunk])
        raw = m.T.tocsr() @ flat_t  # (F, N): exact integers in float64
        out[:, c0:c0 + chunk] = raw.T.astype(np.float32) * vnf[:, None]
    return out


def brute_force_value(features: HaarFeatures, idx: int, window: np.ndarray) -> float:
    """One feature on one window by summing pixels directly (reference for tests)."""
    win = np.asarray(window, dtype=np.int64)
    h, w = win.shape
    inner = win[1:h - 1, 1:w - 1]
    area = float(inner.size)
    nf = area * float((inner * inner).sum()) - float(inner.sum()) ** 2
    vnf = np.float32(1.0 / np.sqrt(nf)) if nf > 0 else np.float32(1.0)
    raw = 0
    for (x, y, ww, hh), wt in zip(features.rects[idx], features.weights[idx]):
        if wt != 0:
            raw += int(wt) * int(win[y:y + hh, x:x + ww].sum())
    return float(np.float32(raw) * vnf)
