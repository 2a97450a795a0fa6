"""A small synthetic detection problem for trying cascade training in seconds.

The object is a bright square filling about 60 % of a 16×16 window, on Gaussian
noise; negatives are noise images with bright bars (rectangles that are not
squares), so a cascade must learn the square's corners, not just "bright".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facepipe.vj.samples import NegativeImage, NegativeSource

WINDOW = 16


def noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Background: grey-level noise (mean 110, σ 40)."""
    return np.clip(rng.normal(110, 40, (h, w)), 0, 255).astype(np.uint8)


def bright(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Object texture: brighter noise (mean 165, σ 25)."""
    return np.clip(rng.normal(165, 25, (h, w)), 0, 255).astype(np.uint8)


def positives(rng: np.random.Generator, n: int = 500) -> np.ndarray:
    """``(n, 16, 16)`` windows, each framing one 8–10 px square at offset 3–4 px."""
    out = []
    for _ in range(n):
        img = noise(rng, WINDOW, WINDOW)
        o = rng.integers(3, 5, 2)
        s = int(rng.integers(8, 11))
        img[o[0]:o[0] + s, o[1]:o[1] + s] = bright(rng, s, s)
        out.append(img)
    return np.stack(out)


def negative_images(rng: np.random.Generator, n: int = 16, size: int = 110) -> list[np.ndarray]:
    """Noise images with 25 bright bars each (2–4 px by 10–29 px, either orientation)."""
    out = []
    for _ in range(n):
        img = noise(rng, size, size)
        for _ in range(25):
            y, x = rng.integers(0, size - 15, 2)
            h, w = int(rng.integers(2, 5)), int(rng.integers(10, 30))
            if rng.random() < 0.5:
                h, w = w, h
            region = img[y:y + h, x:x + w]
            region[:] = bright(rng, *region.shape)
        out.append(img)
    return out


def scene(rng: np.random.Generator, side: int = 36) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A 240×200 noise image with one bright square, and the window box that frames it like the positives."""
    img = noise(rng, 200, 240)
    y0, x0 = 60, 110
    img[y0:y0 + side, x0:x0 + side] = bright(rng, side, side)
    win = side / 0.59
    cx, cy = x0 + side / 2, y0 + side / 2
    return img, (cx - win / 2, cy - win / 2, win, win)


def problem(seed: int = 0) -> tuple[np.ndarray, NegativeSource]:
    """Positives and a negative source for the square problem."""
    rng = np.random.default_rng(seed)
    pos = positives(rng)
    return pos, NegativeSource([NegativeImage(im) for im in negative_images(rng)], WINDOW, WINDOW)


def write_example(out: str | Path, seed: int = 0) -> dict[str, str]:
    """Write the problem as files: ``positives.npz``, ``negatives/*.png`` and a test ``scene.png``."""
    from PIL import Image

    d = Path(out)
    (d / "negatives").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.savez_compressed(d / "positives.npz", images=positives(rng))
    for i, im in enumerate(negative_images(rng)):
        Image.fromarray(im).save(d / "negatives" / f"bars_{i:02d}.png")
    img, box = scene(rng)
    Image.fromarray(img).save(d / "scene.png")
    return {"positives": str(d / "positives.npz"), "negatives": str(d / "negatives"),
            "scene": str(d / "scene.png"), "expected_box": ",".join(f"{v:.1f}" for v in box)}


if __name__ == "__main__":  # python -m facepipe.vj.synthetic OUT_DIR
    import json
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m facepipe.vj.synthetic OUT_DIR")
    print(json.dumps(write_example(sys.argv[1]), indent=1))
