"""A boosted cascade of Haar-feature stumps and its evaluation, exactly as OpenCV does it.

OpenCV's ``predictOrderedStump``: for every stage, ``tmp = Σ (value < threshold ?
left : right)`` accumulated in double from float leaves; the window is rejected
at the first stage where ``tmp < stageThreshold − 1e-5`` (float). The feature
``value`` is ``float(raw) · vnf`` (see :mod:`facepipe.vj.features`). Windows are
evaluated all at once (numpy gathers from integral images); the only Python loops
run over stages and stumps, and each stage only sees the windows that survived
the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from facepipe.vj.features import HaarFeatures, check_windows, integral_images, norm_from_integrals, window_norm

#: OpenCV subtracts this from every stage threshold when it loads a cascade.
THRESHOLD_EPS = np.float32(1e-5)


@dataclass
class Stump:
    """One weak classifier: ``left`` if ``value < threshold`` else ``right`` (all float32)."""

    feature: int
    threshold: float
    left: float
    right: float


@dataclass
class Stage:
    """A boosted stage: accept when the summed stump outputs reach ``threshold``."""

    stumps: list[Stump]
    threshold: float


@dataclass
class Cascade:
    """An attentional cascade over a feature set (features indexed by the stumps)."""

    width: int
    height: int
    features: HaarFeatures
    stages: list[Stage] = field(default_factory=list)
    params: dict[str, object] = field(default_factory=dict)

    @property
    def n_weak(self) -> int:
        """Total number of stumps."""
        return sum(len(s.stumps) for s in self.stages)

    def compact(self) -> Cascade:
        """The same cascade with only the features its stumps use, renumbered in order of use."""
        used: dict[int, int] = {}
        for st in self.stages:
            for s in st.stumps:
                used.setdefault(s.feature, len(used))
        ids = np.array(sorted(used, key=used.get), dtype=np.int64)
        stages = [Stage([Stump(used[s.feature], s.threshold, s.left, s.right) for s in st.stumps], st.threshold)
                  for st in self.stages]
        return Cascade(self.width, self.height, self.features.subset(ids), stages, dict(self.params))

    def truncated(self, n_stages: int) -> Cascade:
        """The first ``n_stages`` stages (sharing the feature set)."""
        return Cascade(self.width, self.height, self.features, list(self.stages[:n_stages]), dict(self.params))

    # ------------------------------------------------------------------ evaluation
    def evaluate_windows(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per window: stages passed (``len(stages)`` = accepted) and the last evaluated stage sum.

        Windows OpenCV skips (σ ≤ 10 grey levels) pass 0 stages with sum 0.
        """
        w = check_windows(windows)
        if w.shape[1:] != (self.height, self.width):
            from facepipe.errors import ShapeError

            raise ShapeError(f"windows are {w.shape[2]}x{w.shape[1]}, cascade wants {self.width}x{self.height}")
        ii, sq = integral_images(w)
        vnf, valid = window_norm(ii, sq)
        p = (self.height + 1) * (self.width + 1)
        return self.run(ii.reshape(-1), np.arange(len(w), dtype=np.int64) * p, self.width + 1, vnf, valid)

    def accepts(self, windows: np.ndarray) -> np.ndarray:
        """Boolean mask of windows the whole cascade accepts."""
        passed, _ = self.evaluate_windows(windows)
        return passed == len(self.stages)

    def run(self, ii_flat: np.ndarray, base: np.ndarray, stride: int, vnf: np.ndarray,
            valid: np.ndarray, stages: list[Stage] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate windows whose top-left corners are ``base`` offsets into a flat int64 integral image.

        ``stride`` is the integral image's row length. Returns stages passed (int32)
        and the sum of the last stage each window reached (float64, OpenCV's weight).
        """
        stages = self.stages if stages is None else stages
        passed = np.zeros(len(base), np.int32)
        sums = np.zeros(len(base), np.float64)
        self._run_from(0, stages, np.flatnonzero(valid), ii_flat, base, stride, vnf, passed, sums)
        return passed, sums

    def _run_from(self, first: int, stages: list[Stage], alive: np.ndarray, ii_flat: np.ndarray, base: np.ndarray,
                  stride: int, vnf: np.ndarray, passed: np.ndarray, sums: np.ndarray) -> None:
        """Stages ``first…`` on the windows ``alive`` (gathers), filling ``passed`` and ``sums`` in place."""
        for si in range(first, len(stages)):
            if len(alive) == 0:
                break
            b = base[alive]

            def fetch(dy: int, dx: int, b: np.ndarray = b) -> np.ndarray:
                return ii_flat.take(b + (dy * stride + dx))

            tmp = stage_sum(self.features, stages[si], fetch, vnf[alive], len(alive))
            sums[alive] = tmp
            alive = alive[tmp >= np.float64(np.float32(stages[si].threshold) - THRESHOLD_EPS)]
            passed[alive] = si + 1

    def run_grid(self, ii: np.ndarray, sq: np.ndarray, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate every ``step``-th window of an image (in :func:`window_grid` order).

        The first stage, which every window meets, is computed on whole shifted
        views of the integral image (no index arrays); the survivors go on with
        gathers. Same arithmetic, same results as :meth:`run_positions`.
        """
        h, w = self.height, self.width
        ny = (ii.shape[0] - 1 - h) // step + 1
        nx = (ii.shape[1] - 1 - w) // step + 1
        if ny <= 0 or nx <= 0:
            return np.zeros(0, np.int32), np.zeros(0, np.float64)

        def view(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
            return a[dy:dy + (ny - 1) * step + 1:step, dx:dx + (nx - 1) * step + 1:step]

        def rect(a: np.ndarray) -> np.ndarray:
            return view(a, h - 1, w - 1) - view(a, 1, w - 1) - view(a, h - 1, 1) + view(a, 1, 1)

        vnf, valid = norm_from_integrals(rect(ii), rect(sq), float((w - 2) * (h - 2)))
        passed = np.zeros(ny * nx, np.int32)
        sums = np.zeros(ny * nx, np.float64)
        if not self.stages:
            return passed, sums
        st = self.stages[0]
        tmp = stage_sum(self.features, st, lambda dy, dx: view(ii, dy, dx), vnf, (ny, nx)).ravel()
        vnf, valid = vnf.ravel(), valid.ravel()
        ok = valid & (tmp >= np.float64(np.float32(st.threshold) - THRESHOLD_EPS))
        sums[valid] = tmp[valid]
        passed[ok] = 1
        yy, xx = np.divmod(np.arange(ny * nx, dtype=np.int64), nx)
        base = yy * step * ii.shape[1] + xx * step
        self._run_from(1, self.stages, np.flatnonzero(ok), ii.reshape(-1), base, ii.shape[1], vnf, passed, sums)
        return passed, sums

    def scan(self, grey: np.ndarray, positions: np.ndarray | None = None, step: int = 1
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the cascade on windows of one (already scaled) grey image.

        ``positions`` is ``(M, 2)`` of ``(y, x)`` top-left corners (default: every
        ``step``-th position where the window fits). Returns positions, stages
        passed and last-stage sums.
        """
        if positions is None:
            positions = window_grid(grey.shape, self.width, self.height, step)
        ii, sq = image_integrals(grey)
        return (positions,) + self.run_positions(ii, sq, positions)

    def run_positions(self, ii: np.ndarray, sq: np.ndarray, positions: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate windows at ``positions`` (y, x) given an image's int64 integral images."""
        stride = ii.shape[1]
        vnf, valid = positions_norm(ii, sq, positions, self.width, self.height)
        base = positions[:, 0].astype(np.int64) * stride + positions[:, 1]
        return self.run(ii.reshape(-1), base, stride, vnf, valid)


def image_integrals(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 sum and squared-sum integral images ``(h+1, w+1)`` of a uint8 grey image."""
    import cv2

    s, sq = cv2.integral2(np.ascontiguousarray(grey), sdepth=cv2.CV_64F, sqdepth=cv2.CV_64F)
    return s.astype(np.int64), sq.astype(np.int64)


def window_grid(shape: tuple[int, ...], width: int, height: int, step: int = 1) -> np.ndarray:
    """``(M, 2)`` int64 (y, x) of every ``step``-th window position in an image of ``shape``."""
    h, w = shape[:2]
    ys = np.arange(0, h - height + 1, step)
    xs = np.arange(0, w - width + 1, step)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.int64)


def positions_norm(ii: np.ndarray, sq: np.ndarray, positions: np.ndarray, width: int, height: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``(vnf, valid)`` for windows at ``positions`` of an image's integrals."""
    y = positions[:, 0]
    x = positions[:, 1]
    y0, y1, x0, x1 = y + 1, y + height - 1, x + 1, x + width - 1

    def rect(a: np.ndarray) -> np.ndarray:
        return a[y1, x1] - a[y0, x1] - a[y1, x0] + a[y0, x0]

    return norm_from_integrals(rect(ii), rect(sq), float((width - 2) * (height - 2)))


def stump_values(features: HaarFeatures, idx: int, fetch: Callable[[int, int], np.ndarray],
                 vnf: np.ndarray) -> np.ndarray:
    """float32 normalised values of feature ``idx`` (OpenCV's arithmetic).

    ``fetch(dy, dx)`` returns the int64 integral-image values at offset ``(dy, dx)``
    from every window's top-left corner (a gather or a shifted view).
    """
    terms = features.merged_terms(idx)
    if terms is not None:  # integer weights: the exact integer raw value, any order
        dy, dx, coef = terms
        raw = None
        for y, x, c in zip(dy.tolist(), dx.tolist(), coef.tolist()):
            a = fetch(y, x)
            if raw is None:
                raw = a.copy() if c == 1 else c * a
            elif c == 1:
                np.add(raw, a, out=raw)
            elif c == -1:
                np.subtract(raw, a, out=raw)
            else:
                raw += c * a
        val = raw.astype(np.float32)
        val *= vnf
        return val
    # general weights: per-rect float arithmetic in OpenCV's order
    ret = None
    for (x, y, w, h), wt in zip(features.rects[idx], features.weights[idx]):
        if wt == 0:
            continue
        x, y, w, h = int(x), int(y), int(w), int(h)
        s = (fetch(y, x) - fetch(y, x + w) - fetch(y + h, x) + fetch(y + h, x + w)).astype(np.float32)
        term = np.float32(wt) * s
        ret = term if ret is None else ret + term
    return ret * vnf


def stage_sum(features: HaarFeatures, stage: Stage, fetch: Callable[[int, int], np.ndarray], vnf: np.ndarray,
              shape: int | tuple[int, ...]) -> np.ndarray:
    """OpenCV's stage response: stump outputs summed in double, in stump order."""
    tmp = np.zeros(shape, np.float64)
    for s in stage.stumps:
        val = stump_values(features, s.feature, fetch, vnf)
        tmp += np.where(val < np.float32(s.threshold), np.float64(np.float32(s.left)), np.float64(np.float32(s.right)))
    return tmp
