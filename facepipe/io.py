"""The only place where facepipe decodes images and finds input files.

Inside the library every image is an RGB ``uint8`` array of shape ``(H, W, 3)``.
Grey, grey+alpha, RGBA, palette, 16-bit and 32-bit/float images are converted to
that on load; EXIF orientation is applied so phone photos come out upright.
"""

from __future__ import annotations

import glob as _glob
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from facepipe.errors import ImageReadError, InputError, NoInputsError, OutputError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pgm", ".ppm", ".tif", ".tiff", ".gif"}
)

#: Largest image (in pixels) facepipe decodes: 1 gigapixel, OpenCV's own limit.
MAX_IMAGE_PIXELS = 1 << 30

_PIL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pil_pixel_limit(limit: int) -> Iterator[None]:
    """Raise Pillow's decompression-bomb limit for one decode (very large photos are valid)."""
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _to_rgb_uint8(im: "Image.Image") -> np.ndarray:
    """Convert any Pillow mode to RGB uint8, scaling high bit depths down."""
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            arr8 = np.clip((arr - lo) * scale, 0, 255)
        else:
            peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
            if mode == "I" and arr.max() > 65535:
                peak = float(arr.max())
            arr8 = np.clip(arr * (255.0 / peak), 0, 255)
        grey = np.nan_to_num(arr8).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        # Composite transparent pixels over white, as a viewer would show them.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def check_input_file(path: str | os.PathLike[str], error: type[InputError], kind: str) -> Path:
    """Raise ``error`` naming ``path`` if it is missing, a directory, unreadable or empty."""
    p = Path(path)
    if not p.exists():
        raise error(p, "no such file")
    if p.is_dir():
        raise error(p, f"is a directory, not {kind}")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise error(p, f"cannot read ({exc.strerror or exc})") from exc
    if size == 0:
        raise error(p, "empty file (0 bytes)")
    return p


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to an RGB ``uint8`` array ``(H, W, 3)``.

    Raises :class:`ImageReadError` naming the file when it is missing, empty,
    truncated, corrupt, not an image, or larger than :data:`MAX_IMAGE_PIXELS`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = check_input_file(path, ImageReadError, "an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _pil_pixel_limit(MAX_IMAGE_PIXELS):
                with Image.open(p) as im:
                    im.load()
                    im = ImageOps.exif_transpose(im) or im
                    arr = _to_rgb_uint8(im)
    except UnidentifiedImageError as exc:
        raise ImageReadError(p, "not a recognised image format (corrupt or not an image)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(p, f"image too large (over {MAX_IMAGE_PIXELS} pixels)") from exc
    except PermissionError as exc:
        raise ImageReadError(p, "permission denied") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc).strip() or type(exc).__name__
        if "truncated" in msg.lower():
            msg = "truncated image file"
        raise ImageReadError(p, f"cannot decode image ({msg})") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(p, f"decoded to an unusable array of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def save_image(path: str | os.PathLike[str], image: np.ndarray, quality: int = 92) -> None:
    """Write an RGB ``uint8`` image; the format follows the extension (JPEG, PNG, ...)."""
    from PIL import Image

    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        fmt = Image.registered_extensions().get(p.suffix.lower(), "PNG")
        kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
        Image.fromarray(image).save(tmp, format=fmt, **kwargs)
        os.replace(tmp, p)
    except OSError as exc:
        raise OutputError(p, f"cannot write ({exc.strerror or exc})") from exc


@dataclass(frozen=True)
class InputFile:
    """A file found from a user argument; ``root`` is the directory it was found under."""

    path: Path
    root: Path | None

    @property
    def relative(self) -> Path:
        """Path relative to the directory argument, or the bare file name."""
        if self.root is None:
            return Path(self.path.name)
        return self.path.relative_to(self.root)


def _has_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def iter_inputs(
    args: Sequence[str | os.PathLike[str]],
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
) -> Iterator[InputFile | NoInputsError]:
    """Expand user arguments (files, directories walked recursively, globs) into files.

    Yields :class:`InputFile` for each candidate and, in place of an argument that
    yields nothing, a :class:`NoInputsError` describing why, so a batch can report
    it and go on. Files named explicitly are yielded whatever their extension.
    """
    seen: set[Path] = set()
    for arg in args:
        s = os.fspath(arg)
        p = Path(s)
        if p.is_file():
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                yield InputFile(p, None)
            continue
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.suffix.lower() in extensions and f.is_file() and not f.name.startswith(".")
            )
            if not found:
                kinds = "/".join(sorted(e.lstrip(".") for e in extensions))
                yield NoInputsError(p, f"directory contains no files of type {kinds}")
            for f in found:
                key = f.resolve()
                if key not in seen:
                    seen.add(key)
                    yield InputFile(f, p)
            continue
        if _has_glob(s):
            matches = sorted(Path(m) for m in _glob.glob(s, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in extensions]
            if not files:
                yield NoInputsError(p, "glob matches no files")
            for f in files:
                key = f.resolve()
                if key not in seen:
                    seen.add(key)
                    yield InputFile(f, None)
            continue
        if p.exists():
            yield NoInputsError(p, "not a regular file or directory")
        else:
            yield NoInputsError(p, "no such file or directory")


def ensure_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create an output directory (and parents) and check it is writable."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise OutputError(p, "exists and is not a directory") from exc
    except OSError as exc:
        raise OutputError(p, f"cannot create directory ({exc.strerror or exc})") from exc
    if not p.is_dir():
        raise OutputError(p, "exists and is not a directory")
    probe = p / f".facepipe-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(p, f"directory is not writable ({exc.strerror or exc})") from exc
    return p
