"""The only place where facepipe decodes images and finds input files.

Inside the library every image is an RGB ``uint8`` array of shape ``(H, W, 3)``.
Grey, grey+alpha, RGBA, palette, 16-bit and 32-bit/float images are converted to
that on load; EXIF orientation is applied so phone photos come out upright.
"""

from __future__ import annotations

import errno
import glob as _glob
import os
import stat as _stat
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from facepipe.errors import ImageReadError, InputError, NoInputsError, OutputError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pgm", ".ppm", ".tif", ".tiff", ".gif"}
)

#: Largest image (in pixels) facepipe decodes: 1 gigapixel, OpenCV's own limit.
MAX_IMAGE_PIXELS = 1 << 30

#: Environment variable overriding :data:`DEFAULT_MAX_IMAGE_MB`.
MAX_IMAGE_MB_ENV = "FACEPIPE_MAX_IMAGE_MB"
#: Memory budget for decoding one image, in MiB: an image whose decoded pixels plus
#: the RGB copy facepipe works on would need more is refused from its header alone,
#: before anything is decoded (a 30000 x 30000 PNG can be under 1 MB on disk).
DEFAULT_MAX_IMAGE_MB = 2048

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


def path_problem(exc: OSError, path: str | os.PathLike[str]) -> str:
    """A user-facing description of why ``os.stat``/``open`` failed on ``path``."""
    code = exc.errno
    if code == errno.ELOOP:
        return "symbolic link loop (the link points back at itself)"
    if code == errno.ENOENT:
        if os.path.islink(path):
            return f"broken symbolic link (its target {os.readlink(path)!r} does not exist)"
        return "no such file or directory"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied (the file, or a directory on its path, is not accessible)"
    if code == errno.ENOTDIR:
        return "no such file (a component of the path is not a directory)"
    if code == errno.ENAMETOOLONG:
        return "file name too long"
    return f"cannot access ({exc.strerror or exc})"


def stat_path(path: str | os.PathLike[str]) -> tuple[os.stat_result | None, str | None]:
    """``(stat, None)`` for an accessible path, else ``(None, problem)`` (see :func:`path_problem`)."""
    try:
        return os.stat(path), None
    except OSError as exc:
        return None, path_problem(exc, path)
    except ValueError as exc:  # embedded NUL byte
        return None, f"invalid path ({exc})"


def check_input_file(path: str | os.PathLike[str], error: type[InputError], kind: str) -> Path:
    """Raise ``error`` naming ``path`` if it is missing, a directory, inaccessible or empty."""
    p = Path(path)
    st, problem = stat_path(p)
    if st is None:
        raise error(p, "no such file" if problem == "no such file or directory" else str(problem))
    if _stat.S_ISDIR(st.st_mode):
        raise error(p, f"is a directory, not {kind}")
    if not _stat.S_ISREG(st.st_mode):
        raise error(p, f"not a regular file, not {kind}")
    if st.st_size == 0:
        raise error(p, "empty file (0 bytes)")
    return p


def max_image_bytes(max_mb: float | None = None) -> int:
    """The decode budget in bytes: ``max_mb``, else ``$FACEPIPE_MAX_IMAGE_MB``, else the default."""
    if max_mb is None:
        env = os.environ.get(MAX_IMAGE_MB_ENV, "").strip()
        if env:
            try:
                max_mb = float(env)
            except ValueError:
                raise InputError(f"${MAX_IMAGE_MB_ENV}", f"must be a number of MiB, got {env!r}") from None
        else:
            max_mb = DEFAULT_MAX_IMAGE_MB
    if not max_mb > 0 or max_mb != max_mb:
        raise InputError(f"${MAX_IMAGE_MB_ENV}", f"image memory budget must be positive, got {max_mb!r}")
    return int(max_mb * (1 << 20))


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Memory to decode an image of this header: its pixels as decoded plus the RGB copy."""
    from PIL import Image

    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        per_pixel = 2
    elif mode in ("I", "F"):
        per_pixel = 4
    else:
        try:
            per_pixel = 4 if Image.getmodebands(mode) > 1 else 1  # Pillow keeps multi-band as 32-bit
        except (KeyError, ValueError):
            per_pixel = 4
    return int(width) * int(height) * (per_pixel + 3)


def load_image(path: str | os.PathLike[str], max_mb: float | None = None) -> np.ndarray:
    """Decode an image file to an RGB ``uint8`` array ``(H, W, 3)``.

    Raises :class:`ImageReadError` naming the file when it is missing, empty,
    truncated, corrupt, not an image, larger than :data:`MAX_IMAGE_PIXELS`, or when
    decoding it would need more than ``max_mb`` MiB (default ``$FACEPIPE_MAX_IMAGE_MB``
    or :data:`DEFAULT_MAX_IMAGE_MB`). The size is checked from the header, before
    any pixel is decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = check_input_file(path, ImageReadError, "an image")
    budget = max_image_bytes(max_mb)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _pil_pixel_limit(MAX_IMAGE_PIXELS):
                with Image.open(p) as im:  # lazy: reads the header only
                    need = decoded_bytes(im.width, im.height, im.mode)
                    if need > budget:
                        raise ImageReadError(
                            p, f"image too large to decode: {im.width}x{im.height} {im.mode} needs about "
                               f"{need / (1 << 20):,.0f} MiB, over the {budget / (1 << 20):,.0f} MiB limit "
                               f"(set ${MAX_IMAGE_MB_ENV} to raise it)")
                    im.load()
                    im = ImageOps.exif_transpose(im) or im
                    arr = _to_rgb_uint8(im)
    except UnidentifiedImageError as exc:
        raise ImageReadError(p, "not a recognised image format (corrupt or not an image)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(p, f"image too large (over {MAX_IMAGE_PIXELS} pixels)") from exc
    except PermissionError as exc:
        raise ImageReadError(p, "permission denied") from exc
    except MemoryError as exc:
        raise ImageReadError(p, "out of memory while decoding (lower the image size or "
                                f"${MAX_IMAGE_MB_ENV})") from exc
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


def _walk_files(root: Path, extensions: frozenset[str]) -> tuple[list[Path], list[NoInputsError]]:
    """Files under ``root`` with one of ``extensions`` (sorted), and what could not be read.

    Follows symbolic links to directories but never visits a directory twice (no
    loops); hidden files are skipped. Unreadable directories, broken
    links and link loops with a wanted extension are returned as problems, not dropped.
    """
    found: list[Path] = []
    problems: list[NoInputsError] = []
    visited: set[tuple[int, int]] = set()

    def onerror(exc: OSError) -> None:
        where = exc.filename if exc.filename is not None else root
        problems.append(NoInputsError(where, f"cannot read directory: {path_problem(exc, where)}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError:
            key = None
        if key is not None:
            if key in visited:
                dirnames[:] = []
                continue
            visited.add(key)
        dirnames.sort()
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in extensions:
                continue
            f = Path(dirpath) / name
            st_f, problem = stat_path(f)
            if st_f is None:
                problems.append(NoInputsError(f, str(problem)))
            elif _stat.S_ISREG(st_f.st_mode):
                found.append(f)
    return sorted(found), problems


def iter_inputs(
    args: Sequence[str | os.PathLike[str]],
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
) -> Iterator[InputFile | NoInputsError]:
    """Expand user arguments (files, directories walked recursively, globs) into files.

    Yields :class:`InputFile` for each candidate and, in place of an argument that
    yields nothing (or a part of a directory that cannot be read), a
    :class:`NoInputsError` describing why, so a batch can report it and go on. Files
    named explicitly are yielded whatever their extension.
    """
    seen: set[Path] = set()

    def first_time(f: Path) -> bool:
        try:
            key = f.resolve()
        except (OSError, RuntimeError):
            key = f.absolute()
        if key in seen:
            return False
        seen.add(key)
        return True

    reported: set[str] = set()

    def once(problems: Iterable[NoInputsError]) -> Iterator[NoInputsError]:
        for e in problems:
            if e.path not in reported:
                reported.add(e.path)
                yield e

    for arg in args:
        s = os.fspath(arg)
        p = Path(s)
        st, problem = stat_path(p)
        if st is not None and _stat.S_ISREG(st.st_mode):
            if first_time(p):
                yield InputFile(p, None)
            continue
        if st is not None and _stat.S_ISDIR(st.st_mode):
            found, problems = _walk_files(p, extensions)
            yield from once(problems)
            if not found and not problems:
                kinds = "/".join(sorted(e.lstrip(".") for e in extensions))
                yield NoInputsError(p, f"directory contains no files of type {kinds}")
            for f in found:
                if first_time(f):
                    yield InputFile(f, p)
            continue
        if st is None and _has_glob(s) and problem == "no such file or directory":
            files, bad = [], 0
            for m in sorted(Path(m) for m in _glob.glob(s, recursive=True)):
                if m.suffix.lower() not in extensions:
                    continue
                st_m, problem_m = stat_path(m)
                if st_m is None:
                    bad += 1
                    yield from once([NoInputsError(m, str(problem_m))])
                elif _stat.S_ISREG(st_m.st_mode):
                    files.append(m)
            if not files and not bad:
                yield NoInputsError(p, "glob matches no files")
            for f in files:
                if first_time(f):
                    yield InputFile(f, None)
            continue
        if st is not None:
            yield NoInputsError(p, "not a regular file or directory")
        else:
            yield NoInputsError(p, str(problem))


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
