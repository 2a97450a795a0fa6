"""Galleries outlive model changes (issue 11 item 9): the gallery's own embedder by default,
and `gallery reembed` to move a gallery to another embedder from its enrolled photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from facepipe import defaults
from facepipe.cli import cli
from facepipe.gallery import Gallery


@pytest.fixture(scope="module", autouse=True)
def _one_model_load() -> object:
    """Build each (detector, embedder) pipeline once per module on one thread (shared 2-core CPU)."""
    import torch

    import facepipe.commands.enroll as enroll_mod
    import facepipe.commands.identify as identify_mod
    import facepipe.commands.reembed as reembed_mod
    from facepipe.builders import build_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache: dict[tuple, object] = {}

    def cached(detector_name, embedder_name, device, min_face, largest_only=False, min_detect_size=None):
        key = (detector_name, embedder_name, device, min_face, min_detect_size)
        if key not in cache:
            cache[key] = build_pipeline(detector_name, embedder_name, device, min_face,
                                        min_detect_size=min_detect_size)
        pipe = cache[key]
        pipe.largest_only = largest_only
        return pipe

    mp = pytest.MonkeyPatch()
    for mod in (enroll_mod, identify_mod, reembed_mod):
        mp.setattr(mod, "build_pipeline", cached)
    yield cache
    mp.undo()
    torch.set_num_threads(threads)


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def photos(astronaut_photos: dict[str, Path]) -> dict[str, Path]:
    return astronaut_photos


@pytest.fixture(scope="module")
def untrained_gallery(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Path]) -> Path:
    g = tmp_path_factory.mktemp("g") / "people"
    r = run("enroll", "-g", g, "--embedder", "untrained", "--device", "cpu", "eileen", photos["p1"], photos["p3"])
    assert r.exit_code == 0, r.output
    return g


def test_identify_uses_the_gallerys_embedder_by_default(untrained_gallery: Path, photos: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Built with `untrained`, identified without --embedder: no refusal, the same answer."""
    assert defaults.EMBEDDER != "untrained"
    r = run("identify", "-g", untrained_gallery, "--device", "cpu", "--format", "jsonl", photos["p2"])
    assert r.exit_code == 0, r.output
    face = json.loads(r.stdout)["faces"][0]
    assert face["name"] == "eileen"
    explicit = run("identify", "-g", untrained_gallery, "--device", "cpu", "--embedder", "untrained",
                   "--format", "jsonl", photos["p2"])
    assert json.loads(explicit.stdout)["faces"][0]["similarity"] == face["similarity"]
    # an explicitly different embedder is still refused, in one line
    r = run("identify", "-g", untrained_gallery, "--device", "cpu", "--embedder", "default", photos["p2"])
    assert r.exit_code == 1 and "built by embedder" in r.stderr and "Traceback" not in r.output


def test_gallery_embedder_resolution(untrained_gallery: Path) -> None:
    from facepipe.builders import gallery_embedder

    assert gallery_embedder(Gallery.open(untrained_gallery)) == "untrained"


def test_unavailable_embedder_is_one_clear_line(untrained_gallery: Path, tmp_path: Path,
                                                photos: dict[str, Path]) -> None:
    g = tmp_path / "g"
    shutil.copytree(untrained_gallery, g)
    m = json.loads((g / "manifest.json").read_text())
    m["embedder"] = {"id": "retired-net@0123456789ab", "checkpoint_sha256": "0" * 64}
    (g / "manifest.json").write_text(json.dumps(m))
    r = run("identify", "-g", g, "--device", "cpu", photos["p2"])
    assert r.exit_code == 1 and "'retired-net@0123456789ab', which is not available" in r.stderr
    assert "gallery reembed" in r.stderr and "Traceback" not in r.output


def test_reembed_moves_a_gallery_to_another_embedder(untrained_gallery: Path, tmp_path: Path,
                                                     photos: dict[str, Path]) -> None:
    src = tmp_path / "old"
    shutil.copytree(untrained_gallery, src)
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    out = tmp_path / "new"
    r = run("gallery", "reembed", "-g", src, "--embedder", "default", "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["vectors"] == 2 and summary["of"] == 2 and summary["missing"] == []
    new = Gallery.open(out)
    from facepipe.embed import DEFAULT_NAME

    assert new.people() == {"eileen": 2} and new.embedder_id.startswith(DEFAULT_NAME + "@")
    assert sorted(new.sources("eileen")) == sorted(str(p) for p in (photos["p1"], photos["p3"]))
    # the old gallery is untouched, byte for byte
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before
    # and the new one identifies with its own (default) embedder
    r = run("identify", "-g", out, "--device", "cpu", photos["p2"])
    assert r.exit_code == 0 and r.stdout.strip().endswith(",eileen")


def test_reembed_reports_missing_and_changed_sources(tmp_path: Path, photos: dict[str, Path]) -> None:
    p1, p3 = tmp_path / "a.jpg", tmp_path / "b.jpg"
    shutil.copy(photos["p1"], p1)
    shutil.copy(photos["p3"], p3)
    g = tmp_path / "g"
    assert run("enroll", "-g", g, "--embedder", "untrained", "--device", "cpu", "eileen", p1, p3).exit_code == 0
    p1.unlink()
    Image.open(p3).rotate(90).save(p3)
    out = tmp_path / "g2"
    r = run("gallery", "reembed", "-g", g, "--embedder", "untrained", "--device", "cpu", "--out", out)
    assert r.exit_code == 1
    assert "cannot be read" in r.stderr and "changed since it was enrolled" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["vectors"] == 0 and {m["problem"] for m in summary["missing"]} >= {"changed since enrolment"}
    assert summary["identities_lost"] == ["eileen"]
    assert Gallery.open(out).people() == {}


def test_reembed_usage_errors(untrained_gallery: Path) -> None:
    r = run("gallery", "reembed", "-g", untrained_gallery, "--out", untrained_gallery)
    assert r.exit_code == 2 and "new directory" in r.stderr


def test_identify_annotate_draws_names(untrained_gallery: Path, photos: dict[str, Path], tmp_path: Path) -> None:
    """identify --annotate DIR: a copy of each image with the face boxed and labelled (issue 11 item 5)."""
    out = tmp_path / "ann"
    r = run("identify", "-g", untrained_gallery, "--device", "cpu", "--format", "jsonl", "--annotate", out,
            photos["p2"])
    assert r.exit_code == 0, r.output
    face = json.loads(r.stdout)["faces"][0]
    drawn = np.asarray(Image.open(out / photos["p2"].name).convert("RGB")).astype(int)
    original = np.asarray(Image.open(photos["p2"]).convert("RGB")).astype(int)
    assert drawn.shape == original.shape
    x, y, w, h = (int(round(face[k])) for k in ("x", "y", "w", "h"))
    diff = np.abs(drawn - original).sum(axis=2) > 60
    # the box outline is drawn (left edge) and the inside of the face is left alone
    assert diff[y + h // 4:y + 3 * h // 4, max(x - 2, 0):x + 3].mean(axis=0).max() > 0.8
    assert diff[y + h // 3:y + 2 * h // 3, x + w // 3:x + 2 * w // 3].mean() < 0.05
    # the named face is boxed in green (known), with its label above it
    green = (drawn[..., 1] > 180) & (drawn[..., 0] < 90) & (drawn[..., 2] < 150)
    assert green[max(y - 30, 0):y + h, x:x + w].sum() > 50
    # an unknown face is drawn in red
    out2 = tmp_path / "ann2"
    run("identify", "-g", untrained_gallery, "--device", "cpu", "--tolerance", "0", "--annotate", out2, photos["p2"])
    drawn2 = np.asarray(Image.open(out2 / photos["p2"].name).convert("RGB")).astype(int)
    red = (drawn2[..., 0] > 200) & (drawn2[..., 1] < 110) & (drawn2[..., 2] < 110)
    assert red[max(y - 30, 0):y + h, x:x + w].sum() > 50
