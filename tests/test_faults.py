"""The fault corpus: every command over broken, strange and hostile inputs.

The corpus is written by the tests into a temporary directory (no binary fixtures):
empty, truncated, text and garbage "images", a 30000 x 30000 PNG decompression bomb
of under 1 MB, images too small for any face, symbolic-link loops, broken links, a
directory named like an image, a missing path, JPEGs renamed to video extensions,
damaged galleries (no manifest, corrupt manifest, truncated index, changed labels,
read-only) and bad person names. For each command it asserts what facepipe promises
(README, "Bad input"): the exit code, exactly one stderr line that names the file and
the problem, no traceback, the good files of the same batch still processed, and
galleries byte-identical after a refused write.

Permission problems need a process without root's override capabilities: as root,
these tests re-run the command under ``setpriv`` with CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH dropped (so permission bits apply to it, as to any user); as a
normal user they run it directly. The in-process read-only gallery cases use
``chattr +i`` when running as root (the immutable flag stops root too) and skip when
neither works.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from facepipe.cli import cli

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--embedder", "untrained", "--device", "cpu"]

#: bad image inputs and the problem each must be reported with (regex, lower case)
BAD_IMAGES: dict[str, str] = {
    "zero.jpg": "empty file",
    "truncated.jpg": "truncated",
    "text.jpg": "not a recognised image",
    "garbage.png": "not a recognised image|cannot decode",
    "bomb.png": "too large to decode",
    "loop_a.jpg": "symbolic link loop",
    "broken.jpg": "broken symbolic link",
    "folder.jpg": "directory contains no files",
    "missing.jpg": "no such file",
}
#: real images with no room for a face (MTCNN used to crash on them)
TINY = ["tiny1.png", "tiny5.png", "tiny11.png"]
#: ways a gallery gets damaged (see _damage)
DAMAGE = ["no_manifest", "corrupt_manifest", "truncated_index", "changed_labels"]


# --------------------------------------------------------------------------- corpus


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit greyscale PNG of ``width`` x ``height`` black pixels, built in ~10 ms.

    The deflate stream is one compressed block of rows, repeated: a full flush resets
    the compressor's history, so every block of identical input compresses to the
    same bytes. A 30000 x 30000 image (900 MB decoded) is about 0.9 MB on disk.
    """
    row = b"\x00" * (width + 1)  # filter byte 0 + pixels
    k = max(1, min(height, (1 << 20) // (width + 1)))
    while height % k:
        k -= 1
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(row * k) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush(zlib.Z_FINISH)
    adler = (((width + 1) * height % 65521) << 16) | 1  # adler32 of all-zero bytes
    data = b"\x78\xda" + block * (height // k) + tail + struct.pack(">I", adler)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_png_bomb_is_a_valid_png() -> None:
    png = png_bomb(600, 400)
    im = Image.open(io.BytesIO(png))
    im.load()
    assert im.size == (600, 400) and not np.asarray(im).any()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, format="JPEG", quality=90)
    jpg = buf.getvalue()
    (root / "good.jpg").write_bytes(jpg)
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "text.jpg").write_text("not a picture\n")
    rng = np.random.default_rng(0)
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 3000, np.uint8).tobytes())
    for s in (1, 5, 11):
        Image.fromarray(np.full((s, s, 3), 128, np.uint8)).save(root / f"tiny{s}.png")
    (root / "bomb.png").write_bytes(png_bomb(30000, 30000))
    os.symlink("loop_b.jpg", root / "loop_a.jpg")
    os.symlink("loop_a.jpg", root / "loop_b.jpg")
    os.symlink("nowhere.jpg", root / "broken.jpg")
    (root / "folder.jpg").mkdir()
    (root / "strangers" / "zed").mkdir(parents=True)
    shutil.copy(root / "good.jpg", root / "strangers" / "zed" / "z.jpg")
    return root


def inputs(corpus: Path, names: list[str]) -> list[str]:
    return [str(corpus / n) for n in names]


# --------------------------------------------------------------------------- running


@pytest.fixture(scope="module", autouse=True)
def _one_model_load() -> Iterator[None]:
    """Build each (detector, embedder) pipeline once for the module, single-threaded."""
    import torch

    import facepipe.commands.embed as embed_mod
    import facepipe.commands.enroll as enroll_mod
    import facepipe.commands.gallery as gallery_mod
    import facepipe.commands.identify as identify_mod

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    original = enroll_mod.build_pipeline
    cache: dict[tuple, object] = {}

    def cached(detector_name: str | None, embedder_name: str | None, device: str | None, min_face: int | None,
               largest_only: bool = False, min_detect_size: int | None = None) -> object:
        key = (detector_name, embedder_name, device, min_face, min_detect_size)
        if key not in cache:
            cache[key] = original(detector_name, embedder_name, device, min_face,
                                  min_detect_size=min_detect_size)
        pipe = cache[key]
        pipe.largest_only = largest_only  # type: ignore[attr-defined]
        return pipe

    mp = pytest.MonkeyPatch()
    for mod in (enroll_mod, gallery_mod, identify_mod, embed_mod):
        mp.setattr(mod, "build_pipeline", cached)
    yield
    mp.undo()
    torch.set_num_threads(threads)


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def no_traceback(r: Result) -> None:
    """The command ended by itself (exit code), with no Python traceback anywhere."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.stdout and "Traceback" not in r.stderr


def split_failure_list(stderr: str) -> tuple[list[str], list[str]]:
    """stderr's lines as the run went, and the closing list of failed inputs that ends a
    batch run's summary ("facepipe: N input(s) failed:" then one indented line each)."""
    import re

    lines = stderr.splitlines()
    for i, ln in enumerate(lines):
        if re.fullmatch(r"facepipe: \d+ input\(s\) failed:", ln):
            return lines[:i], [x.strip() for x in lines[i + 1:] if x.startswith("  ")]
    return lines, []


def lines_naming(stderr: str, name: str) -> list[str]:
    """The lines naming ``name`` as the run went (the closing failure list aside)."""
    return [ln for ln in split_failure_list(stderr)[0] if name in ln]


def assert_reported_once(stderr: str, name: str, problem: str) -> None:
    """Exactly one stderr line names ``name`` as the run goes and it says ``problem`` (a
    regex); the closing failure list, when there is one, repeats that line's problem once."""
    import re

    found = lines_naming(stderr, name)
    assert len(found) == 1, f"{name}: expected one line, got {found}\n{stderr}"
    assert re.search(problem, found[0].lower()), found[0]
    listed = [ln for ln in split_failure_list(stderr)[1] if name in ln]
    if "error:" in found[0] and split_failure_list(stderr)[1]:
        assert len(listed) == 1 and found[0].endswith(listed[0]), (found, listed)


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file in a directory (recursively)."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _unprivileged_prefix() -> list[str] | None:
    """A command prefix under which permission bits apply, or None when there is none."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return None
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search",
              "--inh-caps=-dac_override,-dac_read_search", "--"]
    probe = subprocess.run(prefix + ["true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def run_unprivileged(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    prefix = _unprivileged_prefix()
    if prefix is None:
        pytest.skip("needs a non-root user or setpriv to drop root's permission override")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run(prefix + [sys.executable, "-m", "facepipe.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make ``directory`` unwritable for this (possibly root) process, then restore it."""
    if os.geteuid() != 0:
        mode = directory.stat().st_mode
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if not chattr or subprocess.run([chattr, "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("root without chattr +i (CAP_LINUX_IMMUTABLE) cannot make a read-only directory")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(directory)], check=True)


# --------------------------------------------------------------------------- image commands


def test_detect_over_the_corpus(corpus: Path) -> None:
    r = run("detect", *inputs(corpus, ["good.jpg", *BAD_IMAGES, *TINY]))
    no_traceback(r)
    assert r.exit_code == 1
    for name, problem in BAD_IMAGES.items():
        assert_reported_once(r.stderr, name, problem)
    for name in TINY:
        assert not lines_naming(r.stderr, name) and name not in r.stdout  # no face, no fuss
    rows = r.stdout.splitlines()
    assert len(rows) == 1 and rows[0].startswith(str(corpus / "good.jpg"))


@pytest.mark.parametrize("name", [*BAD_IMAGES, *TINY])
def test_detect_exit_code_per_case(corpus: Path, name: str) -> None:
    r = run("detect", "--detector", "haar", str(corpus / name))
    no_traceback(r)
    assert r.exit_code == (0 if name in TINY else 1), r.stderr
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(err) == (0 if name in TINY else 1), r.stderr


def test_embed_over_the_corpus(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "vecs.npy"
    r = run("embed", *MODEL, "--out", out, *inputs(corpus, ["good.jpg", *BAD_IMAGES, *TINY]))
    no_traceback(r)
    assert r.exit_code == 1
    for name, problem in BAD_IMAGES.items():
        assert_reported_once(r.stderr, name, problem)
    for name in TINY:
        assert_reported_once(r.stderr, name, "no face")
    assert np.load(out).shape[0] == 1
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["faces"][0]["source"].endswith("good.jpg")


def test_identify_over_the_corpus(corpus: Path, gallery: Path) -> None:
    before = snapshot(gallery)
    r = run("identify", *MODEL, "-g", gallery, *inputs(corpus, ["good.jpg", *BAD_IMAGES, *TINY]))
    no_traceback(r)
    assert r.exit_code == 1
    for name, problem in BAD_IMAGES.items():
        assert_reported_once(r.stderr, name, problem)
    rows = dict(line.split(",")[:2] for line in r.stdout.splitlines())
    assert rows[str(corpus / "good.jpg")] == "ada"
    assert all(rows[str(corpus / n)] == "no_persons_found" for n in TINY)
    assert snapshot(gallery) == before


def test_enroll_over_the_corpus(corpus: Path, gallery: Path) -> None:
    r = run("enroll", *MODEL, "-g", gallery, "bea", *inputs(corpus, ["good.jpg", *BAD_IMAGES, *TINY]))
    no_traceback(r)
    assert r.exit_code == 1
    for name, problem in BAD_IMAGES.items():
        assert_reported_once(r.stderr, name, problem)
    for name in TINY:
        assert_reported_once(r.stderr, name, "no face")
    # the same photo is already enrolled as ada: enrolled again, with a warning
    assert_reported_once(r.stderr, "good.jpg", "also enrolled as 'ada'")
    listed = run("gallery", "list", "-g", gallery)
    assert listed.exit_code == 0 and listed.stdout.split() == ["ada,1", "bea,1"]


def test_explain_over_the_corpus(corpus: Path, tmp_path: Path) -> None:
    r = run("explain", "--detector", "mtcnn", "--device", "cpu", "--out", tmp_path / "x",
            *inputs(corpus, ["good.jpg", *BAD_IMAGES, *TINY]))
    no_traceback(r)
    assert r.exit_code == 1
    for name, problem in BAD_IMAGES.items():
        assert_reported_once(r.stderr, name, problem)
    assert r.stdout.startswith(str(corpus / "good.jpg"))
    assert (tmp_path / "x" / "good_gradcam.png").is_file()


def test_bomb_header_is_refused_without_decoding(corpus: Path) -> None:
    """The 30000 x 30000 PNG is refused from its header: the process's peak memory
    does not grow (decoding would take 900 MB for the pixels alone). The child caps
    its address space so a regression fails with MemoryError instead of swapping."""
    code = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        from PIL import Image
        from facepipe.errors import ImageReadError
        from facepipe.io import load_image
        load_image({str(corpus / 'good.jpg')!r})  # warm up the decoders
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (600 << 20), hard))
        try:
            load_image({str(corpus / 'bomb.png')!r})
        except ImageReadError as exc:
            print("refused:", exc.problem)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("grown_kib", grown)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FACEPIPE_MAX_IMAGE_MB", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    assert "refused: image too large to decode: 30000x30000" in p.stdout
    grown = int(p.stdout.split("grown_kib")[1])
    assert grown < 20 * 1024, f"peak memory grew by {grown} KiB"


def test_image_memory_budget_is_configurable(corpus: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from facepipe.errors import ImageReadError, InputError
    from facepipe.io import load_image

    big = tmp_path / "big.png"
    Image.new("RGB", (1000, 1000)).save(big)  # needs about 7 MB
    assert load_image(big).shape == (1000, 1000, 3)
    with pytest.raises(ImageReadError, match="over the 5 MiB limit"):
        load_image(big, max_mb=5)
    monkeypatch.setenv("FACEPIPE_MAX_IMAGE_MB", "5")
    with pytest.raises(ImageReadError, match="FACEPIPE_MAX_IMAGE_MB"):
        load_image(big)
    monkeypatch.setenv("FACEPIPE_MAX_IMAGE_MB", "lots")
    with pytest.raises(InputError, match="must be a number"):
        load_image(big)


# --------------------------------------------------------------------------- video

#: bad video inputs and the problem each must be reported with
BAD_VIDEOS: dict[str, str] = {
    "zero.mp4": "empty file",
    "text.mp4": "cannot open video",
    "half.avi": "truncated",
    "photo.mp4": "is a still jpeg image, not a video",
    "good.jpg": "is a still jpeg image, not a video",
    "loop_v.mp4": "symbolic link loop",
    "broken.mkv": "broken symbolic link",
    "missing.mp4": "no such file",
}


@pytest.fixture(scope="module")
def videos(corpus: Path, astronaut: np.ndarray) -> Path:
    from test_video import face_clip

    root = corpus / "videos"
    root.mkdir()
    face_clip(root / "clip.avi", astronaut, n=6, fourcc="MJPG")
    (root / "zero.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("not a video\n")
    good = face_clip(corpus / "long.avi", astronaut, n=20, fourcc="MJPG")
    (root / "half.avi").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    shutil.copy(corpus / "good.jpg", root / "photo.mp4")
    shutil.copy(corpus / "good.jpg", root / "good.jpg")
    os.symlink("loop_v.mp4", root / "loop_v.mp4")
    os.symlink("gone.mkv", root / "broken.mkv")
    return root


def test_video_over_the_corpus(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run("video", "--out", out, "--min-detect-size", "40", "--no-annotate",
            *inputs(videos, ["clip.avi", *BAD_VIDEOS]))
    no_traceback(r)
    assert r.exit_code == 1, r.stderr
    for name, problem in BAD_VIDEOS.items():
        assert_reported_once(r.stderr, name, problem)
    assert (out / "clip.avi.done.json").is_file() or any(out.glob("clip*.done.json"))
    done = sorted(p.name for p in out.iterdir())
    assert all(n.startswith("clip") for n in done), done  # nothing was written for a bad input


@pytest.mark.parametrize("how", DAMAGE)
def test_video_refuses_a_damaged_gallery(videos: Path, gallery: Path, tmp_path: Path, how: str) -> None:
    problem = _damage(gallery, how)
    before = snapshot(gallery)
    r = run("video", "--out", tmp_path / "out", "-g", gallery, "--embedder", "untrained", "--no-annotate",
            videos / "clip.avi")
    no_traceback(r)
    assert r.exit_code == 1, r.stderr
    assert_reported_once(r.stderr, str(gallery), problem)
    assert snapshot(gallery) == before


# --------------------------------------------------------------------------- galleries


@pytest.fixture(scope="module")
def golden_gallery(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    g = tmp_path_factory.mktemp("golden") / "g"
    r = run("enroll", *MODEL, "-g", g, "ada", corpus / "good.jpg")
    assert r.exit_code == 0, r.stderr
    return g


@pytest.fixture()
def gallery(golden_gallery: Path, tmp_path: Path) -> Path:
    """A fresh copy of a one-person gallery (ada)."""
    g = tmp_path / "gallery"
    shutil.copytree(golden_gallery, g)
    return g


def _damage(g: Path, how: str) -> str:
    """Damage a gallery in place; returns the problem it must be refused with."""
    manifest = json.loads((g / "manifest.json").read_text())
    if how == "no_manifest":
        (g / "manifest.json").unlink()
        return "holds gallery files .* but no manifest.json"
    if how == "corrupt_manifest":
        (g / "manifest.json").write_text("{ not json")
        return "corrupt gallery manifest"
    if how == "truncated_index":
        p = g / manifest["index"]["file"]["file"]
        p.write_bytes(p.read_bytes()[:-40])
        return "truncated or changed"
    if how == "changed_labels":
        p = g / manifest["labels"]["file"]
        p.write_bytes(p.read_bytes().replace(b"ada", b"eve"))
        return "corrupt \\(sha256 differs"
    raise AssertionError(how)



def _gallery_commands(corpus: Path, g: Path) -> dict[str, list[str]]:
    return {
        "enroll": ["enroll", *MODEL, "-g", str(g), "bea", str(corpus / "good.jpg")],
        "identify": ["identify", *MODEL, "-g", str(g), str(corpus / "good.jpg")],
        "list": ["gallery", "list", "-g", str(g)],
        "info": ["gallery", "info", "-g", str(g)],
        "remove": ["gallery", "remove", "-g", str(g), "ada"],
        "calibrate": ["gallery", "calibrate", *MODEL, "-g", str(g), "--impostors", str(corpus / "strangers")],
    }


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_gallery_is_refused_by_every_command_and_left_untouched(
        corpus: Path, gallery: Path, how: str) -> None:
    problem = _damage(gallery, how)
    before = snapshot(gallery)
    for cmd, args in _gallery_commands(corpus, gallery).items():
        r = run(*args)
        no_traceback(r)
        assert r.exit_code == 1, (cmd, r.stdout, r.stderr)
        assert_reported_once(r.stderr, str(gallery), problem)
        assert snapshot(gallery) == before, f"{cmd} changed a damaged gallery"


def test_read_only_gallery_is_read_but_never_written(corpus: Path, gallery: Path) -> None:
    before = snapshot(gallery)
    with read_only(gallery):
        cmds = _gallery_commands(corpus, gallery)
        for cmd in ("identify", "list", "info"):
            r = run(*cmds[cmd])
            no_traceback(r)
            assert r.exit_code == 0, (cmd, r.stderr)
        for cmd in ("enroll", "remove", "calibrate"):
            r = run(*cmds[cmd])
            no_traceback(r)
            assert r.exit_code == 1, (cmd, r.stderr)
            assert_reported_once(r.stderr, str(gallery), "gallery directory is not writable")
            assert snapshot(gallery) == before
    assert snapshot(gallery) == before


def test_writes_fail_before_the_work(corpus: Path, gallery: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Unwritable outputs are found before any image is decoded."""
    import facepipe.io

    def no_decoding(*a: object, **k: object) -> None:
        raise AssertionError("an image was decoded before the output was checked")

    monkeypatch.setattr(facepipe.io, "load_image", no_decoding)
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        r = run("embed", *MODEL, "--out", out / "v.npy", corpus / "good.jpg")
        no_traceback(r)
        assert r.exit_code == 1
        assert_reported_once(r.stderr, str(out), "not writable")
    with read_only(gallery):
        for args in (["enroll", *MODEL, "-g", gallery, "bea", corpus / "good.jpg"],
                     ["gallery", "calibrate", *MODEL, "-g", gallery, "--impostors", corpus / "strangers"]):
            r = run(*args)
            no_traceback(r)
            assert r.exit_code == 1 and "not writable" in r.stderr


@pytest.mark.parametrize("name,problem", [
    ("", "empty"), ("   ", "empty"), ("a/b", "path separator"), ("a\\b", "path separator"),
    ("..", "'.' and '..'"), (".", "'.' and '..'"), ("x" * 5000, "at most 128"),
    ("tab\there", "control characters"), ("new\nline", "control characters"),
    ("unknown", "reserved"), ("Unknown_Person", "reserved"),
])
def test_bad_person_names_are_refused(corpus: Path, gallery: Path, name: str, problem: str) -> None:
    before = snapshot(gallery)
    r = run("enroll", *MODEL, "-g", gallery, name, corpus / "good.jpg")
    no_traceback(r)
    assert r.exit_code == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0], r.stderr
    assert snapshot(gallery) == before


def test_name_rule_accepts_real_names() -> None:
    import unicodedata

    from facepipe.gallery import check_name

    for ok in ["Ada Lovelace", "José", "李小龙", "O'Brien-Smith", "x" * 128, "Ada (2019)"]:
        assert check_name(ok) == unicodedata.normalize("NFC", ok)
    # the decomposed form a macOS folder name has is the same person
    assert check_name(unicodedata.normalize("NFD", "José")) == "José"
    assert check_name("  Ada  ") == "Ada"


def test_enroll_from_folders_skips_a_badly_named_folder(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "people"
    for person in ("ada", "unknown"):
        (root / person).mkdir(parents=True)
        shutil.copy(corpus / "good.jpg", root / person / "1.jpg")
    g = tmp_path / "g"
    r = run("enroll", *MODEL, "-g", g, "--from-folders", root)
    no_traceback(r)
    assert r.exit_code == 1
    assert_reported_once(r.stderr, str(root / "unknown"), "reserved")
    assert run("gallery", "list", "-g", g).stdout.split() == ["ada,1"]


# --------------------------------------------------------------------------- permissions


def test_permission_problems_in_input_expansion(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "locked").mkdir(parents=True)
    shutil.copy(corpus / "good.jpg", root / "ok.jpg")
    shutil.copy(corpus / "good.jpg", root / "locked" / "inside.jpg")
    (root / "locked").chmod(0o000)
    try:
        p = run_unprivileged(["detect", "--detector", "haar", root, root / "locked" / "inside.jpg"])
    finally:
        (root / "locked").chmod(0o755)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 1, p.stderr
    assert_reported_once(p.stderr, f"{root / 'locked'}:", "cannot read directory: permission denied")
    assert_reported_once(p.stderr, "inside.jpg", "permission denied")
    assert p.stdout.startswith(str(root / "ok.jpg"))


def test_unprivileged_read_only_gallery(corpus: Path, gallery: Path) -> None:
    before = snapshot(gallery)
    mode = gallery.stat().st_mode
    gallery.chmod(0o555)
    try:
        removed = run_unprivileged(["gallery", "remove", "-g", gallery, "ada"])
        enrolled = run_unprivileged(["enroll", *MODEL, "-g", gallery, "bea", corpus / "good.jpg"])
        listed = run_unprivileged(["gallery", "list", "-g", gallery])
    finally:
        gallery.chmod(mode)
    for p in (removed, enrolled):
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert_reported_once(p.stderr, str(gallery), "gallery directory is not writable")
    assert listed.returncode == 0 and listed.stdout.split() == ["ada,1"], listed.stderr
    assert snapshot(gallery) == before
