"""Every command's JSON output validates against its documented schema (docs/schema/*.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from facepipe.cli import cli

jsonschema = pytest.importorskip("jsonschema")
referencing = pytest.importorskip("referencing")

SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schema"


def _validator(name: str) -> Any:
    from referencing import Registry, Resource

    resources = []
    for p in SCHEMAS.glob("*.json"):
        doc = json.loads(p.read_text())
        resources.append((doc["$id"], Resource.from_contents(doc)))
    registry = Registry().with_resources(resources)
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def _valid(name: str, records: list[Any]) -> None:
    v = _validator(name)
    assert records, f"no {name} records to validate"
    for rec in records:
        errors = sorted(v.iter_errors(rec), key=lambda e: list(e.path))
        assert not errors, f"{name}: {errors[0].message} at {list(errors[0].path)} in {json.dumps(rec)[:400]}"


def _jsonl(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module", autouse=True)
def _one_model_load():
    """One pipeline per (detector, embedder) for the whole module, on one thread."""
    import torch

    import facepipe.builders as builders
    import facepipe.commands.embed as embed_mod
    import facepipe.commands.enroll as enroll_mod
    import facepipe.commands.gallery as gallery_mod
    import facepipe.commands.identify as identify_mod
    import facepipe.commands.reembed as reembed_mod

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    original = builders.build_pipeline
    cache: dict[tuple, Any] = {}

    def cached(detector_name=None, embedder_name=None, device=None, min_face=None, largest_only=False,
               min_detect_size=None):
        key = (detector_name, embedder_name, min_face, min_detect_size)
        if key not in cache:
            cache[key] = original(detector_name, embedder_name, device, min_face, min_detect_size=min_detect_size)
        cache[key].largest_only = largest_only
        return cache[key]

    mp = pytest.MonkeyPatch()
    for mod in (builders, embed_mod, enroll_mod, gallery_mod, identify_mod, reembed_mod):
        mp.setattr(mod, "build_pipeline", cached)
    yield
    mp.undo()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("schema")
    p1, p2, blank, broken = d / "eileen1.jpg", d / "eileen2.png", d / "blank.png", d / "broken.jpg"
    Image.fromarray(astronaut).save(p1, quality=95)
    Image.fromarray(astronaut[20:480, 10:500]).resize((400, 360)).save(p2)
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(blank)
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    g = d / "g"
    r = run("enroll", "-g", g, "--embedder", "untrained", "--device", "cpu", "eileen", p1)
    assert r.exit_code == 0, r.output
    return {"p1": p1, "p2": p2, "blank": blank, "broken": broken, "g": g, "dir": d}


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_detect_output(files: dict[str, Path], fmt: str) -> None:
    r = run("detect", "--detector", "haar", "--format", fmt, files["p1"], files["blank"], files["broken"])
    assert r.exit_code == 1
    recs = json.loads(r.stdout) if fmt == "json" else _jsonl(r.stdout)
    assert len(recs) == 3 and any("error" in x for x in recs)
    _valid("detect", recs)


def test_identify_output(files: dict[str, Path]) -> None:
    r = run("identify", "-g", files["g"], "--device", "cpu", "--format", "jsonl", "--top-k", "3",
            "--min-embed-size", "150", files["p2"], files["blank"], files["broken"])
    recs = _jsonl(r.stdout)
    _valid("identify", recs)
    r = run("identify", "-g", files["g"], "--device", "cpu", "--format", "json", "--min-margin", "0.1", files["p2"])
    recs = json.loads(r.stdout)
    assert recs[0]["faces"][0]["name"] == "eileen"
    _valid("identify", recs)


def test_explain_output(files: dict[str, Path], tmp_path: Path) -> None:
    r = run("explain", "--device", "cpu", "--out", tmp_path / "a", "--format", "jsonl", files["p1"], files["broken"])
    _valid("explain", _jsonl(r.stdout))
    r = run("explain", "-g", files["g"], "--device", "cpu", "--out", tmp_path / "b", "--format", "json", files["p2"])
    assert r.exit_code == 0, r.output
    recs = json.loads(r.stdout)
    assert recs[0]["faces"][0]["match"]["reference"] is not None
    _valid("explain", recs)


def test_embed_sidecar(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "vecs"
    run("embed", "--embedder", "untrained", "--device", "cpu", "--out", out, "--min-embed-size", "150",
        files["p1"], files["p2"], files["blank"], files["broken"])
    _valid("embed", [json.loads((tmp_path / "vecs.json").read_text())])


def test_gallery_outputs(files: dict[str, Path], tmp_path: Path) -> None:
    r = run("gallery", "list", "-g", files["g"], "--format", "jsonl", "--sources")
    _valid("gallery-list", _jsonl(r.stdout))
    r = run("gallery", "info", "-g", files["g"])
    _valid("gallery-info", [json.loads(r.stdout)])
    r = run("gallery", "reembed", "-g", files["g"], "--embedder", "untrained", "--device", "cpu",
            "--out", tmp_path / "g2")
    assert r.exit_code == 0, r.output
    _valid("gallery-reembed", [json.loads(r.stdout)])


@pytest.mark.data
def test_gallery_calibrate_output(files: dict[str, Path], shared_data: Path) -> None:
    impostors = shared_data / "identities" / "face_recognition_examples"
    r = run("gallery", "calibrate", "-g", files["g"], "--device", "cpu", "--dry-run", "--impostors", impostors,
            "--fpir", "0.1")
    assert r.exit_code == 0, r.output
    _valid("gallery-calibrate", [json.loads(r.stdout)])


def test_schemas_reject_wrong_output() -> None:
    """The schemas are not vacuous: a detection score called 'score', a distance above 2,
    or a missing tolerance are refused."""
    v = _validator("identify")
    face = {"x": 1, "y": 2, "w": 3, "h": 4, "det_score": 0.9, "detector": "mtcnn", "name": "a", "best": "a",
            "similarity": 0.8, "distance": 0.2, "penalty": 0.0, "threshold": 0.5, "tolerance": 0.5, "margin": None,
            "min_margin": 0.0, "ambiguous": False,
            "candidates": [{"name": "a", "similarity": 0.8, "distance": 0.2, "penalty": 0.0}]}
    good = {"path": "x.jpg", "width": 10, "height": 10, "faces": [face], "skipped": []}
    assert v.is_valid(good)
    bad_score = {**good, "faces": [{**{k: x for k, x in face.items() if k != "det_score"}, "score": 0.9}]}
    assert not v.is_valid(bad_score)
    assert not v.is_valid({**good, "faces": [{**face, "distance": 2.5}]})
    assert not v.is_valid({**good, "faces": [{k: x for k, x in face.items() if k != "tolerance"}]})
    assert not v.is_valid({**good, "faces": [{**face, "penalty": -0.1}]})


def test_video_outputs(files: dict[str, Path], tmp_path: Path, astronaut: np.ndarray) -> None:
    """frames.jsonl and tracks.json, with a gallery (MTCNN: det_score) and without (Haar: det_response)."""
    from test_video import face_clip

    clip = face_clip(tmp_path / "clip.mp4", astronaut, n=6)
    out = tmp_path / "out"
    r = run("video", clip, "--out", out, "-g", files["g"], "--device", "cpu", "--no-annotate", "--stride", "2")
    assert r.exit_code == 0, r.output
    assert (out / "clip.tracks.csv").is_file() and not list(out.glob("*.mp4.*"))
    frames = _jsonl((out / "clip.frames.jsonl").read_text())
    assert any(f.get("interpolated") for rec in frames for f in rec["faces"])
    _valid("video-frame", frames)
    tracks = json.loads((out / "clip.tracks.json").read_text())
    assert all(t["identity"] for t in tracks["tracks"])  # never empty with a gallery
    _valid("video-tracks", [tracks])
    out2 = tmp_path / "out2"
    r = run("video", clip, "--out", out2, "--detector", "haar", "--min-detect-size", "40", "--no-annotate")
    assert r.exit_code == 0, r.output
    frames = _jsonl((out2 / "clip.frames.jsonl").read_text())
    face = frames[0]["faces"][0]
    assert face["det_score"] is None and face["det_response"] > 0
    _valid("video-frame", frames)
    tracks = json.loads((out2 / "clip.tracks.json").read_text())
    assert tracks["tracks"][0]["identity"] is None and tracks["tracks"][0]["mean_det_response"] > 0
    _valid("video-tracks", [tracks])
