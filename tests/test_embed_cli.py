"""``facepipe embed``: vectors + sidecar, bad inputs reported and skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import cli


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> Path:
    import cv2
    from PIL import Image

    d = tmp_path_factory.mktemp("embed_in")
    face = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    Image.fromarray(face).save(d / "face.jpg", quality=95)
    two = np.full((256, 410, 3), 128, np.uint8)
    two[:, :256] = face
    two[50:204, 256:] = cv2.resize(face, (154, 154), interpolation=cv2.INTER_AREA)
    Image.fromarray(two).save(d / "two.png")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((120, 120, 3)) * 40 + 100).astype(np.uint8)).save(d / "noface.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from facepipe.embed.network import build_network, default_preprocess, make_checkpoint, save_checkpoint

    arch = {"backbone": "mobilenet_v2", "dim": 128, "dropout": 0.2}
    ck = make_checkpoint(build_network(arch), name="cli-test", version="t", arch=arch,
                         preprocess=default_preprocess(112, flip_tta=False), training={"loss": "none"})
    return save_checkpoint(ck, tmp_path_factory.mktemp("ck") / "e.pt")


def _run(args: list[str]) -> "object":
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_embed_writes_vectors_and_sidecar(inputs: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "vecs"
    r = _run(["embed", str(inputs), "--out", str(out), "--embedder", str(checkpoint),
              "--device", "cpu", "--min-face", "20", "-q"])
    assert r.exit_code == 1  # broken.jpg
    assert "broken.jpg" in r.output
    vec = np.load(tmp_path / "vecs.npy")
    side = json.loads((tmp_path / "vecs.json").read_text())
    assert vec.dtype == np.float32 and vec.shape == (3, 128)  # 1 + 2 faces
    assert np.allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-5)
    assert side["embedder"].startswith("cli-test@") and side["shape"] == [3, 128]
    assert [f["row"] for f in side["faces"]] == [0, 1, 2]
    assert sorted(Path(f["source"]).name for f in side["faces"]) == ["face.jpg", "two.png", "two.png"]
    assert all({"x", "y", "w", "h", "landmarks"} <= set(f) for f in side["faces"])
    assert [Path(p).name for p in side["images_without_embedded_face"]] == ["noface.png"]
    assert [Path(f["source"]).name for f in side["failed"]] == ["broken.jpg"]


def test_largest_only_min_face_and_overwrite(inputs: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "one.npy"
    base = ["embed", str(inputs / "two.png"), "--out", str(out), "--embedder", str(checkpoint),
            "--device", "cpu"]
    r = _run(base + ["--largest-only", "--min-face", "20"])
    assert r.exit_code == 0, r.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert np.load(out).shape == (1, 128) and side["skipped_faces"][0]["reason"] == "not_largest"
    r = _run(base + ["--min-face", "20"])
    assert r.exit_code != 0 and "--overwrite" in r.output and "Traceback" not in r.output
    r = _run(base + ["--min-face", "35", "--overwrite"])
    side = json.loads(out.with_suffix(".json").read_text())
    assert r.exit_code == 0 and "below the minimum" in r.output  # the small face is reported
    assert np.load(out).shape == (1, 128)
    assert [s["reason"] for s in side["skipped_faces"]] == ["too_small"]


def test_unknown_embedder_is_one_line_error(inputs: Path, tmp_path: Path) -> None:
    r = _run(["embed", str(inputs / "face.jpg"), "--out", str(tmp_path / "x"), "--embedder", "nope"])
    assert r.exit_code != 0 and "unknown embedder 'nope'" in r.output and "Traceback" not in r.output
