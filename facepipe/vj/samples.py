"""Training samples: positive windows and negative windows mined from object-free images.

Positives are windows of the detector's size (an NPZ of patches or a folder of
cropped images, resized like OpenCV's image pyramid resizes: bilinear).

Negatives are never stored up front: :class:`NegativeSource` holds grey images
(optionally with boxes around objects to stay away from) and draws windows at
random positions and pyramid scales. :meth:`NegativeSource.mine` returns windows
that the current cascade still accepts (bootstrapping); the fraction of scanned
windows it accepts estimates the cascade's false-alarm rate.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from facepipe.errors import InputError, NoInputsError
from facepipe.vj.model import Cascade, image_integrals, positions_norm, window_grid

log = logging.getLogger(__name__)


def resize_windows(images: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """Grey uint8 images of any size as ``(N, height, width)`` windows (bilinear, like OpenCV's pyramid)."""
    import cv2

    out = np.empty((len(images), height, width), np.uint8)
    for k, im in enumerate(images):
        out[k] = im if im.shape == (height, width) else cv2.resize(im, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def to_grey(image: np.ndarray) -> np.ndarray:
    """An RGB or grey image as grey uint8 (OpenCV's weights, like the Haar detector)."""
    import cv2

    a = np.asarray(image)
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY) if a.shape[2] == 3 else a[..., 0]
    return np.ascontiguousarray(a.astype(np.uint8))


def load_positives(path: str | Path, width: int, height: int) -> np.ndarray:
    """Positive windows from an NPZ (``images`` uint8 ``(N, H, W)``) or a folder of cropped images."""
    from facepipe.io import IMAGE_EXTENSIONS, load_image

    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".npz":
        try:
            with np.load(p) as z:
                if "images" not in z:
                    raise InputError(p, "NPZ has no 'images' array")
                arr = z["images"]
        except (OSError, ValueError) as exc:
            raise InputError(p, f"cannot read NPZ ({exc})") from exc
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or len(arr) == 0:
            raise InputError(p, f"'images' must be a non-empty uint8 (N, H, W) array, got {arr.dtype} {arr.shape}")
        return resize_windows([to_grey(a) for a in arr], width, height)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise NoInputsError(p, "no images in the positives folder")
        return resize_windows([to_grey(load_image(f)) for f in files], width, height)
    if not p.exists():
        raise InputError(p, "positives not found")
    raise InputError(p, "positives must be an .npz of patches or a folder of images")


def mirrored(windows: np.ndarray) -> np.ndarray:
    """The windows followed by their horizontal mirror images."""
    return np.concatenate([windows, windows[:, :, ::-1]])


@dataclass
class NegativeImage:
    """A grey image to draw negatives from; windows overlapping ``exclude`` boxes (IoU ≥ ``max_iou``) are skipped."""

    grey: np.ndarray
    exclude: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    name: str = ""


@dataclass
class MiningReport:
    """What a mining pass scanned and found."""

    found: int
    scanned: int
    accepted: int
    pages_visited: int
    pages_total: int

    @property
    def acceptance(self) -> float:
        """Fraction of scanned windows the cascade accepted: its false-alarm rate estimate."""
        return self.accepted / self.scanned if self.scanned else 1.0


class NegativeSource:
    """Windows of object-free images over a pyramid of scales, mined against a cascade.

    A *page* is one image at one pyramid scale (resized with bilinear interpolation
    to ``1/scale``, as OpenCV's detector does); windows lie on a ``stride``-pixel grid.
    """

    def __init__(self, images: list[NegativeImage], width: int, height: int, scale_step: float = 1.25,
                 stride: int = 1, max_iou: float = 0.3) -> None:
        if not images:
            raise ValueError("no negative images")
        self.images = images
        self.width, self.height = width, height
        self.scale_step = scale_step
        self.stride = stride
        self.max_iou = max_iou
        pages = []
        for i, im in enumerate(images):
            h, w = im.grey.shape[:2]
            s = 1.0
            while round(w / s) > width and round(h / s) > height:
                pages.append((i, s))
                s *= scale_step
        if not pages:
            raise ValueError(f"no negative image is larger than the {width}x{height} window")
        self.pages = pages

    @classmethod
    def from_folder(cls, path: str | Path, width: int, height: int, **kwargs: object) -> NegativeSource:
        """Every image under ``path`` (recursively) as a negative image."""
        from facepipe.errors import ImageReadError
        from facepipe.io import IMAGE_EXTENSIONS, load_image

        p = Path(path)
        if not p.exists():
            raise InputError(p, "negatives not found")
        if not p.is_dir():
            raise InputError(p, "negatives must be a folder of object-free images")
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        images = []
        for f in files:
            try:
                images.append(NegativeImage(to_grey(load_image(f)), name=f.name))
            except ImageReadError as exc:
                log.warning("skipping unreadable negative %s (%s)", f, exc.problem)
        if not images:
            raise NoInputsError(p, "no readable images in the negatives folder")
        small = [im for im in images if min(im.grey.shape) <= min(width, height)]
        if len(small) == len(images):
            raise InputError(p, f"every negative image is smaller than the {width}x{height} window")
        return cls(images, width, height, **kwargs)  # type: ignore[arg-type]

    def fingerprint(self) -> str:
        """A hash of the images' pixels and exclusion boxes (resume checks it)."""
        h = hashlib.sha1()
        for im in self.images:
            h.update(np.ascontiguousarray(im.grey).tobytes())
            h.update(np.asarray(im.exclude, np.float64).tobytes())
        h.update(f"{self.scale_step}/{self.stride}/{self.max_iou}".encode())
        return h.hexdigest()

    def n_windows(self) -> int:
        """Windows on all pages (before exclusion): the size of the negative pool."""
        total = 0
        for i, s in self.pages:
            h, w = self.images[i].grey.shape[:2]
            sw, sh = round(w / s), round(h / s)
            total += ((sw - self.width) // self.stride + 1) * ((sh - self.height) // self.stride + 1)
        return total

    # ------------------------------------------------------------------ pages
    def page(self, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Scaled grey image of page k, its allowed window positions and its scale."""
        import cv2

        from facepipe.evaluate import box_iou_matrix

        i, s = self.pages[k]
        im = self.images[i]
        h, w = im.grey.shape[:2]
        size = (int(round(w / s)), int(round(h / s)))
        scaled = im.grey if s == 1.0 else cv2.resize(im.grey, size, interpolation=cv2.INTER_LINEAR)
        pos = window_grid(scaled.shape, self.width, self.height, self.stride)
        if len(im.exclude) and len(pos):
            boxes = np.stack([pos[:, 1] * s, pos[:, 0] * s, np.full(len(pos), self.width * s),
                              np.full(len(pos), self.height * s)], axis=1)
            keep = box_iou_matrix(boxes, np.asarray(im.exclude, np.float64)).max(axis=1) < self.max_iou
            pos = pos[keep]
        return scaled, pos, s

    def _accepted(self, cascade: Cascade | None, scaled: np.ndarray, pos: np.ndarray, whole_page: bool
                  ) -> np.ndarray:
        """Which windows at ``pos`` (y, x) of a page the cascade accepts (σ ≤ 10 windows never)."""
        ii, sq = image_integrals(scaled)
        n_stages = len(cascade.stages) if cascade is not None else 0
        if n_stages == 0:
            return positions_norm(ii, sq, pos, self.width, self.height)[1]
        if not whole_page:
            return cascade.run_positions(ii, sq, pos)[0] == n_stages
        # every allowed position of the page: evaluate the whole grid, then pick them
        passed, _ = cascade.run_grid(ii, sq, self.stride)
        nx = (scaled.shape[1] - self.width) // self.stride + 1
        return passed[(pos[:, 0] // self.stride) * nx + pos[:, 1] // self.stride] == n_stages

    def false_alarm(self, cascade: Cascade, max_windows: int, seed: int = 12345) -> tuple[int, int]:
        """``(scanned, accepted)`` over up to ``max_windows`` windows of pages in a fixed random order."""
        rng = np.random.default_rng(seed)
        scanned = accepted = 0
        for k in rng.permutation(len(self.pages)):
            if scanned >= max_windows:
                break
            scaled, pos, _ = self.page(int(k))
            n_allowed = len(pos)
            if len(pos) > max_windows - scanned:
                pos = pos[rng.choice(len(pos), max_windows - scanned, replace=False)]
            if len(pos) == 0:
                continue
            accepted += int(self._accepted(cascade, scaled, pos, whole_page=len(pos) == n_allowed).sum())
            scanned += len(pos)
        return scanned, accepted

    def random_windows(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` windows at random pages and positions (what an empty cascade accepts)."""
        return self.mine(None, n, rng)[0]

    def mine(self, cascade: Cascade | None, n: int, rng: np.random.Generator,
             prior_acceptance: float = 1.0) -> tuple[np.ndarray, MiningReport]:
        """Up to ``n`` distinct windows the cascade accepts, spread over many pages.

        Pages are visited in a random order; on each, a random subset of positions
        (sized from the running acceptance estimate) is evaluated and at most ``cap``
        accepted windows are kept, so no single image dominates. Windows OpenCV
        skips (σ ≤ 10) count as scanned and rejected. Later passes raise the cap.
        """
        n_pages = len(self.pages)
        cap = max(4, math.ceil(2.0 * n / n_pages))
        found: list[np.ndarray] = []
        taken = np.zeros(0, np.int64)  # keys page·2^42 + y·2^21 + x of windows already returned
        n_found = scanned = accepted = visited = 0
        acc_rate = max(prior_acceptance, 1e-9)
        for pass_cap in (cap, cap * 8, None):
            for k in rng.permutation(n_pages):
                if n_found >= n:
                    break
                scaled, pos, _ = self.page(int(k))
                if len(pos) == 0:
                    continue
                visited += 1
                if pass_cap is not None:
                    m = min(len(pos), int(math.ceil(3.0 * pass_cap / acc_rate)) + 16)
                    if m < len(pos):
                        pos = pos[rng.choice(len(pos), m, replace=False)]
                ok = self._accepted(cascade, scaled, pos, whole_page=pass_cap is None or m == len(pos))
                scanned += len(pos)
                accepted += int(ok.sum())
                acc_rate = max(accepted / scanned, 0.5 / scanned)
                hits = pos[ok]
                keys = (int(k) << 42) + (hits[:, 0] << 21) + hits[:, 1]
                fresh = ~np.isin(keys, taken)
                hits, keys = hits[fresh], keys[fresh]
                limit = min(len(hits), n - n_found, pass_cap if pass_cap is not None else len(hits))
                if limit < len(hits):
                    sel = rng.choice(len(hits), limit, replace=False)
                    hits, keys = hits[sel], keys[sel]
                if len(hits) == 0:
                    continue
                taken = np.concatenate([taken, keys])
                view = sliding_window_view(scaled, (self.height, self.width))
                found.append(view[hits[:, 0], hits[:, 1]].copy())
                n_found += len(hits)
            if n_found >= n:
                break
        wins = np.concatenate(found) if found else np.zeros((0, self.height, self.width), np.uint8)
        return wins, MiningReport(len(wins), scanned, accepted, visited, n_pages)
