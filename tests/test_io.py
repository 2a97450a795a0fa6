"""Image decoding and input discovery on real and deliberately broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facepipe.errors import ImageReadError, NoInputsError
from facepipe.io import ensure_output_dir, iter_inputs, load_image, save_image
from facepipe.errors import OutputError


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "1"])
def test_colour_modes_become_rgb_uint8(tmp_path: Path, astronaut: np.ndarray, mode: str) -> None:
    src = Image.fromarray(astronaut).convert(mode)
    ext = ".jpg" if mode in ("L", "CMYK") else ".png"
    p = _save(src, tmp_path / f"a_{mode}{ext}")
    arr = load_image(p)
    assert arr.dtype == np.uint8 and arr.shape == (512, 512, 3)
    if mode in ("L", "1"):
        assert np.array_equal(arr[..., 0], arr[..., 1])


def test_palette_with_transparency_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 0
    p = tmp_path / "t.png"
    im.save(p, transparency=0)
    arr = load_image(p)
    assert (arr == 255).all()


def test_16bit_png_scaled_to_8bit(tmp_path: Path) -> None:
    ramp = (np.arange(256 * 4, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(ramp).save(p)
    arr = load_image(p)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    expected = np.round(ramp.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    assert np.abs(arr[..., 0].astype(int) - expected.astype(int)).max() <= 1


def test_rgba_alpha_composited(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom fully transparent
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    arr = load_image(p)
    assert tuple(arr[0, 0]) == (200, 0, 0)
    assert tuple(arr[3, 3]) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path: Path, astronaut: np.ndarray) -> None:
    img = Image.fromarray(astronaut[:, :300])  # 512 high, 300 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes())
    assert load_image(p).shape == (300, 512, 3)


def test_very_large_image_is_decoded(tmp_path: Path) -> None:
    # Above Pillow's 89.5 Mpx decompression-bomb warning: still valid input.
    side = 9500
    p = tmp_path / "huge.png"
    Image.new("L", (side, side), 128).save(p, compress_level=1)
    arr = load_image(p)
    assert arr.shape == (side, side, 3)
    assert arr[side // 2, side // 2, 0] == 128


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file"):
        load_image(p)


def test_truncated_jpeg(tmp_path: Path, astronaut: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, format="JPEG", quality=95)
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="truncated") as ei:
        load_image(p)
    assert str(p) in str(ei.value)


def test_text_file_with_image_extension(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n")
    with pytest.raises(ImageReadError, match="not a recognised image"):
        load_image(p)


def test_corrupt_jpeg_body(tmp_path: Path) -> None:
    p = tmp_path / "garbage.jpg"
    rng = np.random.default_rng(0)
    p.write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError):
        load_image(p)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageReadError, match="directory"):
        load_image(tmp_path)


def test_iter_inputs_walks_dirs_globs_and_reports_empty(tmp_path: Path, astronaut: np.ndarray) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for rel in ["a/one.jpg", "a/b/two.PNG", "a/b/skip.txt"]:
        f = tmp_path / rel
        if f.suffix == ".txt":
            f.write_text("x")
        else:
            Image.fromarray(astronaut[:8, :8]).save(f)
    items = list(iter_inputs([tmp_path / "a", str(tmp_path / "a" / "*.jpg"), tmp_path / "empty",
                              tmp_path / "missing.jpg", str(tmp_path / "*.gif")]))
    files = [i for i in items if not isinstance(i, NoInputsError)]
    errors = [i for i in items if isinstance(i, NoInputsError)]
    assert sorted(f.path.name for f in files) == ["one.jpg", "two.PNG"]  # glob duplicate removed
    assert {f.relative.as_posix() for f in files} == {"one.jpg", "b/two.PNG"}
    problems = sorted(e.problem for e in errors)
    assert len(errors) == 3
    assert any("no files of type" in p for p in problems)
    assert any("no such file" in p for p in problems)
    assert any("glob matches no files" in p for p in problems)


def test_output_dir_checks(tmp_path: Path, astronaut: np.ndarray) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        ensure_output_dir(blocker)
    with pytest.raises(OutputError):
        ensure_output_dir(blocker / "sub")
    out = ensure_output_dir(tmp_path / "new" / "dir")
    save_image(out / "x.png", astronaut)
    assert np.array_equal(load_image(out / "x.png"), astronaut)
    assert [p.name for p in out.iterdir()] == ["x.png"]  # no temp files left behind
