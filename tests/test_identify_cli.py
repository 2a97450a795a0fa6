"""`facepipe enroll`, `identify` and `gallery ...` end to end on real photos (CliRunner, CPU).

The embedder is ``untrained`` (ImageNet MobileNetV2 with a seeded random head): it
needs no trained checkpoint, so these tests check the plumbing (detection, alignment,
embedding, gallery, decisions, output formats, errors), not recognition accuracy.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from facepipe.cli import cli
from facepipe.gallery import Gallery

MODEL = ["--embedder", "untrained", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def _one_model_load() -> object:
    """Build each (detector, embedder) pipeline once per module, single-threaded.

    Every command calls ``build_pipeline``; loading MTCNN and MobileNetV2 for each of
    the ~20 invocations would dominate the run time. One intra-op thread avoids
    thread oversubscription on the shared 2-core test machine.
    """
    import torch

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
        pipe.largest_only = largest_only
        return pipe

    mp = pytest.MonkeyPatch()
    for mod in (enroll_mod, gallery_mod, identify_mod):
        mp.setattr(mod, "build_pipeline", cached)
    yield cache
    mp.undo()
    torch.set_num_threads(threads)


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(r, needle: str) -> None:
    assert r.exit_code != 0
    assert "Traceback" not in r.output and "Traceback" not in r.stderr
    assert needle in r.stderr, r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, astronaut_photos: dict[str, Path]) -> dict[str, Path]:
    """The astronaut photo twice (conftest's first two files) and a face-free image."""
    blank = tmp_path_factory.mktemp("blank") / "blank.png"
    grad = np.tile(np.linspace(0, 255, 200, dtype=np.uint8)[None, :, None], (150, 1, 3))
    Image.fromarray(grad).save(blank)
    return {"p1": astronaut_photos["p1"], "p2": astronaut_photos["p2"], "blank": blank}


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Path]) -> Path:
    g = tmp_path_factory.mktemp("g") / "people"
    r = run("enroll", "-g", g, *MODEL, "eileen", photos["p1"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "enrolled 1 photo(s) (1 new people)" in r.stderr
    return g


def test_enroll_is_incremental(gallery_dir: Path, photos: dict[str, Path]) -> None:
    r = run("enroll", "-g", gallery_dir, *MODEL, "eileen", photos["p1"])
    assert r.exit_code == 0 and "nothing new to enrol (1 photo(s) already enrolled" in r.stderr
    g = Gallery.open(gallery_dir)
    assert g.people() == {"eileen": 1} and g.generation == 1
    r = run("gallery", "list", "-g", gallery_dir)
    assert r.stdout.strip() == "eileen,1"
    info = json.loads(run("gallery", "info", "-g", gallery_dir).stdout)
    assert info["embedder"]["id"].startswith("untrained-mnv2@") and info["dim"] == 128
    assert info["index"]["type"] == "flat" and info["decision"]["calibration"]["method"] == "default"


def test_identify_csv_like_face_recognition(gallery_dir: Path, photos: dict[str, Path]) -> None:
    r = run("identify", "-g", gallery_dir, *MODEL, "--show-similarity", photos["p2"], photos["blank"])
    assert r.exit_code == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0][:2] == [str(photos["p2"]), "eileen"] and float(rows[0][2]) > 0.5
    assert rows[-1] == [str(photos["blank"]), "no_persons_found", "None"]
    # a zero tolerance accepts only identical vectors: the same face in another photo is
    # rejected as face_recognition's unknown_person
    r = run("identify", "-g", gallery_dir, *MODEL, "--tolerance", "0", "--show-distance", photos["p2"])
    path, name, dist = next(csv.reader(io.StringIO(r.stdout)))
    assert name == "unknown_person" and 0 <= float(dist) < 0.5
    r = run("identify", "-g", gallery_dir, *MODEL, "--header", photos["p2"])
    assert r.stdout.splitlines()[0] == "path,name"


def test_identify_json_and_bad_inputs(gallery_dir: Path, photos: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = run("identify", "-g", gallery_dir, *MODEL, "--format", "json", "--top-k", "3",
            photos["p2"], broken, tmp_path / "missing.jpg")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    face = doc[0]["faces"][0]
    assert face["name"] == "eileen" and face["candidates"][0]["name"] == "eileen"
    assert {"x", "y", "w", "h", "det_score", "landmarks"} <= set(face)
    assert doc[1]["path"] == str(broken) and "error" in doc[1]
    assert "missing.jpg: no such file" in r.stderr and str(broken) in r.stderr
    r = run("identify", "-g", gallery_dir, *MODEL, "--format", "jsonl", photos["blank"])
    assert json.loads(r.stdout.splitlines()[0])["faces"] == []


def test_identify_refuses_other_embedder_and_corruption(gallery_dir: Path, photos: dict[str, Path],
                                                        tmp_path: Path) -> None:
    other = tmp_path / "other"
    Gallery.create(other, 128, "someone-else@123456789abc")
    _one_line_error(run("identify", "-g", other, *MODEL, photos["p2"]), "built by embedder 'someone-else@")
    _one_line_error(run("enroll", "-g", other, *MODEL, "x", photos["p2"]), "built by embedder")
    # a truncated index file in a copy of the gallery
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in gallery_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    idx = next(bad.glob("index-*.faiss"))
    idx.write_bytes(idx.read_bytes()[:100])
    _one_line_error(run("identify", "-g", bad, *MODEL, photos["p2"]), "index file is truncated")
    _one_line_error(run("gallery", "list", "-g", bad), "truncated")
    _one_line_error(run("identify", "--search-device", "cuda", "-g", gallery_dir, *MODEL, photos["p2"]),
                    "cuda")


def test_enroll_errors_and_remove(tmp_path: Path, photos: dict[str, Path]) -> None:
    g = tmp_path / "g"
    r = run("enroll", "-g", g, *MODEL, "ghost", photos["blank"], photos["p1"])
    assert r.exit_code == 1 and "blank.png: no face found" in r.stderr
    assert Gallery.open(g).people() == {"ghost": 1}
    _one_line_error(run("enroll", "-g", g, *MODEL, "unknown", photos["p1"]), "reserved")
    r = run("enroll", "-g", g, *MODEL, "--replace", "ghost", photos["p2"])
    assert r.exit_code == 0 and Gallery.open(g).sources("ghost") == [os.fspath(photos["p2"])]
    _one_line_error(run("gallery", "remove", "-g", g, "nobody"), "not enrolled: nobody")
    r = run("gallery", "remove", "-g", g, "ghost")
    assert r.exit_code == 0 and Gallery.open(g).people() == {}
    _one_line_error(run("gallery", "list", "-g", tmp_path / "nothing"), "no such gallery directory")


def _link_tree(root: Path, people: dict[str, list[Path]]) -> Path:
    for name, paths in people.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for p in paths:
            os.symlink(p, root / name / p.name)
    return root


@pytest.mark.data
def test_folders_enrol_and_calibrate_on_lfw(shared_data: Path, tmp_path: Path) -> None:
    from facepipe.datasets import list_identities

    lfw = list_identities(shared_data / "identities" / "lfw_devtrain")
    multi = [n for n, ps in lfw.items() if len(ps) >= 3][:2]
    single = [n for n, ps in lfw.items() if len(ps) == 1][:10]
    enrol = _link_tree(tmp_path / "enrol", {n: lfw[n][:1] for n in multi})
    genuine = _link_tree(tmp_path / "genuine", {n: lfw[n][:3] for n in multi})  # 1st is enrolled
    impostors = _link_tree(tmp_path / "impostors", {n: lfw[n] for n in single})
    g = tmp_path / "g"
    r = run("enroll", "-g", g, *MODEL, "--from-folders", enrol)
    assert r.exit_code == 0, r.stderr
    assert Gallery.open(g).people() == {n: 1 for n in multi}
    r = run("gallery", "calibrate", "-g", g, *MODEL, "--fpir", "0.1", "--genuine", genuine,
            "--impostors", impostors)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stored"] and out["excluded_enrolled_photos"] == 2
    assert out["n_genuine"] + out["failed_photos"] >= 4 and out["n_impostor"] >= 8
    assert out["fpir"] <= 0.1
    m = Gallery.open(g)
    assert m.threshold == out["threshold"]
    assert m.manifest["decision"]["calibration"]["target_fpir"] == 0.1
    # at the stored threshold, at most 10% of the impostors are accepted by identify
    r = run("identify", "-g", g, *MODEL, impostors)
    names = [row[1] for row in csv.reader(io.StringIO(r.stdout))]
    accepted = sum(n not in ("unknown_person", "no_persons_found") for n in names)
    assert accepted <= 0.1 * out["n_impostor"] + 1e-9


def test_index_params_parsing() -> None:
    import click

    from facepipe.commands.enroll import parse_index_params

    assert parse_index_params(("efSearch=64", "nprobe=32", "nlist=0")) == {
        "hnsw": {"efSearch": 64}, "ivf": {"nprobe": 32, "nlist": 0}}
    for bad in ("efSearch", "foo=1", "M=x", "M=0"):
        with pytest.raises(click.BadParameter):
            parse_index_params((bad,))
