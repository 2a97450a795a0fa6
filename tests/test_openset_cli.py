"""Open-set defaults through the commands: automatic thresholds from an impostor model,
`gallery calibrate` from the enrolled photos alone, loud warnings on thin evidence.

The embedder is ``untrained`` (no shipped impostor model); tests that need one attach a
synthetic model made for its embedder id, so they check the plumbing, not accuracy
(``scripts/bench_openset_defaults.py`` measures the FPIR obtained with real models).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from facepipe.cli import cli
from facepipe.gallery import Gallery
from facepipe.gallery.openset import ImpostorModel, fit_impostor_model

MODEL = ["--embedder", "untrained", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def _one_model_load() -> Iterator[dict]:
    import torch

    import facepipe.commands.enroll as enroll_mod
    import facepipe.commands.gallery as gallery_mod
    import facepipe.commands.identify as identify_mod

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    original = enroll_mod.build_pipeline
    cache: dict[tuple, Any] = {}

    def cached(detector_name: str | None, embedder_name: str | None, device: str | None, min_face: int | None,
               largest_only: bool = False, min_detect_size: int | None = None) -> Any:
        key = (detector_name, embedder_name, device, min_face, min_detect_size)
        if key not in cache:
            cache[key] = original(detector_name, embedder_name, device, min_face, min_detect_size=min_detect_size)
        cache[key].largest_only = largest_only
        return cache[key]

    mp = pytest.MonkeyPatch()
    for mod in (enroll_mod, gallery_mod, identify_mod):
        mp.setattr(mod, "build_pipeline", cached)
    yield cache
    mp.undo()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def emb_id() -> str:
    from facepipe.embed import load_embedder

    return load_embedder("untrained", device="cpu").embedder_id


@pytest.fixture()
def with_model(monkeypatch: pytest.MonkeyPatch, emb_id: str) -> ImpostorModel:
    """Ship a (synthetic) impostor model with the untrained embedder."""
    import facepipe.gallery
    import facepipe.gallery.openset

    model = fit_impostor_model(np.random.default_rng(0).normal(0.3, 0.12, 20000), emb_id, 200, 600)

    def shipped(embedder: Any) -> ImpostorModel | None:
        return model if embedder.embedder_id == emb_id else None

    monkeypatch.setattr(facepipe.gallery, "impostor_model_for", shipped)
    monkeypatch.setattr(facepipe.gallery.openset, "impostor_model_for", shipped)
    return model


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("photos")
    out = {}
    for name, img in {"a1": astronaut, "a2": astronaut[20:480, 10:500], "a3": astronaut[:, ::-1],
                      "b1": astronaut[40:400, 60:460]}.items():
        out[name] = d / f"{name}.png"
        Image.fromarray(np.ascontiguousarray(img)).save(out[name])
    return out


def run(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def manifest(g: Path) -> dict:
    return json.loads((g / "manifest.json").read_text())


def test_enroll_derives_the_threshold_from_the_impostor_model(tmp_path: Path, photos: dict[str, Path],
                                                              with_model: ImpostorModel) -> None:
    g = tmp_path / "g"
    r = run("enroll", "-g", g, *MODEL, "ada", photos["a1"])
    assert r.exit_code == 0, r.stderr
    d = manifest(g)["decision"]
    assert d["mode"] == "auto" and d["target_fpir"] == 0.01
    assert d["threshold"] == pytest.approx(with_model.threshold_for_fpir(0.01, 1))
    assert "for FPIR 0.01 over 1 enrolled vectors (automatic)" in r.stderr
    # more people, more chances of a false match: the threshold rises
    r = run("enroll", "-g", g, *MODEL, "bob", photos["b1"], photos["a2"])
    assert r.exit_code == 0, r.stderr
    d2 = manifest(g)["decision"]
    assert d2["threshold"] == pytest.approx(with_model.threshold_for_fpir(0.01, 3))
    assert d2["threshold"] > d["threshold"]
    assert "also enrolled" not in r.stderr
    # a new target
    assert run("enroll", "-g", g, *MODEL, "--fpir", "0.1", "cy", photos["a3"]).exit_code == 0
    d3 = manifest(g)["decision"]
    assert d3["target_fpir"] == 0.1 and d3["threshold"] == pytest.approx(with_model.threshold_for_fpir(0.1, 4))
    info = json.loads(run("gallery", "info", "-g", g).stdout)["decision"]
    assert info["mode"] == "auto" and info["expected_fpir"] == pytest.approx(0.1, rel=0.02)
    assert info["impostor_model"]["pairs"] == with_model.n_pairs


def test_identify_says_which_threshold_and_fpir_are_in_force(tmp_path: Path, photos: dict[str, Path],
                                                             with_model: ImpostorModel) -> None:
    g = tmp_path / "g"
    assert run("enroll", "-g", g, *MODEL, "ada", photos["a1"], photos["a2"]).exit_code == 0
    assert run("enroll", "-g", g, *MODEL, "bob", photos["b1"]).exit_code == 0
    thr = manifest(g)["decision"]["threshold"]
    r = run("identify", "-g", g, *MODEL, "--format", "jsonl", photos["a3"], photos["b1"])
    assert r.exit_code == 0, r.stderr
    faces = [f for line in r.stdout.splitlines() for f in json.loads(line)["faces"]]
    assert faces
    for f in faces:
        assert f["threshold_mode"] == "auto" and f["target_fpir"] == 0.01
        assert f["threshold"] == pytest.approx(thr, abs=1e-4)
        assert f["expected_fpir"] == pytest.approx(with_model.expected_fpir(thr, 3), rel=1e-3)
    assert "auto, target FPIR 1%, expected FPIR" in r.stderr and "over 3 comparisons" in r.stderr
    # a tolerance for one run: no target any more, and the FPIR the model expects at it
    r = run("identify", "-g", g, *MODEL, "--format", "jsonl", "--tolerance", "0.9", photos["a3"])
    assert r.exit_code == 0, r.stderr
    f = json.loads(r.stdout.splitlines()[0])["faces"][0]
    assert f["threshold_mode"] == "override" and f["target_fpir"] is None
    assert f["expected_fpir"] == pytest.approx(with_model.expected_fpir(0.1, 3), rel=1e-3)
    assert f["expected_fpir"] > 0.01


def test_a_fixed_threshold_stays_fixed(tmp_path: Path, photos: dict[str, Path], with_model: ImpostorModel) -> None:
    g = tmp_path / "g"
    assert run("enroll", "-g", g, *MODEL, "--threshold", "0.7", "ada", photos["a1"]).exit_code == 0
    assert run("enroll", "-g", g, *MODEL, "bob", photos["b1"]).exit_code == 0
    d = manifest(g)["decision"]
    assert d["mode"] == "manual" and d["threshold"] == 0.7


def test_without_a_model_the_fixed_default_is_said_out_loud(tmp_path: Path, photos: dict[str, Path]) -> None:
    g = tmp_path / "g"
    r = run("enroll", "-g", g, *MODEL, "ada", photos["a1"])
    assert r.exit_code == 0 and "ships no impostor model" in r.stderr
    assert manifest(g)["decision"]["mode"] == "default"
    # calibration needs impostor evidence of some kind: a one-person gallery has none
    r = run("gallery", "calibrate", "-g", g, *MODEL)
    assert r.exit_code == 1 and "no impostor evidence" in r.stderr


def test_calibrate_from_the_enrolled_photos_alone(tmp_path: Path, photos: dict[str, Path],
                                                  with_model: ImpostorModel) -> None:
    g = tmp_path / "g"
    assert run("enroll", "-g", g, *MODEL, "ada", photos["a1"]).exit_code == 0
    assert run("enroll", "-g", g, *MODEL, "bob", photos["b1"]).exit_code == 0
    r = run("gallery", "calibrate", "-g", g, *MODEL)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    # one photo per person: no genuine pair, and the command says so loudly
    assert out["n_genuine"] == 0 and out["dir"] is None
    assert "WARNING: no genuine evidence" in r.stderr and out["warnings"]
    # two impostor probes are too few to estimate anything: the model decides
    assert out["rule"] == "impostor model" and out["evidence"]["leave_one_out"]["impostor_probes"] == 2
    assert out["threshold"] == pytest.approx(with_model.threshold_for_fpir(0.01, 2))
    assert out["domain_shift"] is None
    d = manifest(g)["decision"]
    assert d["mode"] == "calibrated" and d["target_fpir"] == 0.01 and d["calibration"]["rule"] == out["rule"]
    # a second photo of ada gives leave-one-out genuine probes and a DIR estimate
    assert run("enroll", "-g", g, *MODEL, "ada", photos["a2"]).exit_code == 0
    out = json.loads(run("gallery", "calibrate", "-g", g, *MODEL, "--dry-run").stdout)
    assert out["n_genuine"] == 2 and out["dir"] is not None and out["stored"] is False
    assert out["evidence"]["leave_one_out"]["people_with_two_or_more_photos"] == 1
    # back to automatic
    r = run("gallery", "calibrate", "-g", g, *MODEL, "--auto", "--fpir", "0.05")
    assert r.exit_code == 0, r.stderr
    d = manifest(g)["decision"]
    assert d["mode"] == "auto" and d["threshold"] == pytest.approx(with_model.threshold_for_fpir(0.05, 3))


def test_look_alike_photos_raise_a_warning(tmp_path: Path, photos: dict[str, Path],
                                           with_model: ImpostorModel) -> None:
    """Twenty 'people' who are all the same face: at the model's threshold they are taken for each
    other far more often than the target; calibrate must say so."""
    g = tmp_path / "g"
    root = tmp_path / "people"
    rng = np.random.default_rng(0)
    img = np.asarray(Image.open(photos["a1"]))
    for i in range(20):
        (root / f"p{i:02d}").mkdir(parents=True)
        y, x = rng.integers(0, 40, 2)
        crop = Image.fromarray(np.ascontiguousarray(img[y:y + 460, x:x + 460])).resize((240, 240))
        crop.save(root / f"p{i:02d}" / "1.png")
    assert run("enroll", "-g", g, *MODEL, "--from-folders", root).exit_code == 0
    r = run("gallery", "calibrate", "-g", g, *MODEL, "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "look more alike than the development data" in r.stderr
    out = json.loads(r.stdout)
    # the threshold is raised by the shift the 20 leave-one-out impostor scores show
    assert out["domain_shift"] > 0 and out["threshold"] > out["model_threshold"]
    assert "shifted up" in out["rule"]


@pytest.mark.data
def test_calibrate_on_lfw_people_without_strangers(shared_data: Path, tmp_path: Path,
                                                   with_model: ImpostorModel) -> None:
    from facepipe.datasets import list_identities

    lfw = list_identities(shared_data / "identities" / "lfw_devtrain")
    root = tmp_path / "people"
    picked = [p for p, fs in sorted(lfw.items()) if len(fs) >= 3][:6]
    for p in picked:
        (root / p).mkdir(parents=True)
        for f in lfw[p][:2]:
            (root / p / f.name).symlink_to(f)
    g = tmp_path / "g"
    assert run("enroll", "-g", g, *MODEL, "--from-folders", root).exit_code in (0, 1)
    n = len(Gallery.open(g))
    r = run("gallery", "calibrate", "-g", g, *MODEL)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["evidence"]["leave_one_out"]["impostor_probes"] == n
    assert out["n_genuine"] >= 2 and 0.0 <= out["dir"] <= 1.0
