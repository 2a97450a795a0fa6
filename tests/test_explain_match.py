"""`facepipe explain` (issue 11 item 7): labelled columns, boxes inside the image, and
"why this name?" against a gallery, with the similarity maps checked against
finite differences and brute force."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from facepipe.cli import cli


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def pipe():
    import torch

    from facepipe.builders import build_pipeline

    torch.set_num_threads(1)
    # Grad-CAM needs a fine last feature map: MobileNetV2's (4x4); the default dlib-family
    # network pools a 2x2 map and is explained by occlusion (test_dlib_family_falls_back_to_occlusion)
    return build_pipeline("mtcnn", "mobilenet-v2", "cpu", 32)


@pytest.fixture(scope="module")
def crops(pipe, astronaut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops of the astronaut in two different photos (original, shifted and rescaled)."""
    a = pipe.process(astronaut).faces[0].crop
    other = np.asarray(Image.fromarray(astronaut[20:480, 10:500]).resize((400, 360)))
    b = pipe.process(other).faces[0].crop
    return a, b


def test_gradient_matches_finite_differences(pipe, crops) -> None:
    import torch

    from facepipe.explain_match import dot_from_features

    a, b = crops
    t = pipe.embedder.embed(b[None])[0]
    dot, _, feats, grad = dot_from_features(pipe.embedder, a, t)
    rng = np.random.default_rng(0)
    flat = np.argsort(-np.abs(grad.numpy()).ravel())[:3].tolist() + rng.integers(0, grad.numel(), 3).tolist()
    eps = 1e-2
    for k in flat:
        idx = np.unravel_index(k, tuple(feats.shape))
        delta = torch.zeros((1, *feats.shape))
        delta[(0, *idx)] = eps
        up = dot_from_features(pipe.embedder, a, t, delta)[0]
        down = dot_from_features(pipe.embedder, a, t, -delta)[0]
        fd = (up - down) / (2 * eps)
        assert fd == pytest.approx(float(grad[idx]), rel=0.05, abs=1e-4)


def test_gradcam_decomposes_the_similarity_exactly(pipe, crops) -> None:
    """For the GAP + linear head, the un-rectified map sums to s − s(A = 0)."""
    from facepipe.explain_match import dot_from_features, gradcam_terms

    a, b = crops
    t = pipe.embedder.embed(b[None])[0]
    cam, s = gradcam_terms(pipe.embedder, a, t)
    dot, norm, feats, _ = dot_from_features(pipe.embedder, a, t)
    dot0 = dot_from_features(pipe.embedder, a, t, -feats[None])[0]  # A = 0
    assert s == pytest.approx(dot / norm)
    assert float(cam.sum()) == pytest.approx((dot - dot0) / norm, rel=1e-3, abs=1e-5)
    # and s itself is the cosine similarity of the network without flip TTA
    import torch

    plain = type(pipe.embedder)(pipe.embedder.net, name="x", arch=pipe.embedder.arch,
                                preprocess={**pipe.embedder.preprocess, "flip_tta": False}, device="cpu",
                                flip_tta=False)
    assert s == pytest.approx(float(plain.embed(a[None])[0] @ t), abs=1e-4)
    del torch


def test_occlusion_map_matches_brute_force(pipe, crops) -> None:
    from facepipe.explain_match import occlusion_map

    a, b = crops
    emb = pipe.embedder
    t = emb.embed(b[None])[0]
    patch, stride = 28, 28
    heat = occlusion_map(emb, a, t, patch=patch, stride=stride)
    size = a.shape[0]
    base = float(emb.embed(a[None])[0] @ t)
    fill = a.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    ref = np.zeros((size, size))
    for y in range(0, size, stride):
        for x in range(0, size, stride):
            occ = a.copy()
            occ[y:y + patch, x:x + patch] = fill
            ref[y:y + patch, x:x + patch] = max(0.0, base - float(emb.embed(occ[None])[0] @ t))
    ref = ref / ref.max()
    assert np.allclose(heat, ref, atol=1e-4)


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_map_points_at_what_matters(pipe, crops, method: str) -> None:
    """Hiding the region the map ranks highest costs more similarity than hiding the lowest."""
    from facepipe.explain_match import match_map

    a, b = crops
    t = pipe.embedder.embed(b[None])[0]
    heat, used = match_map(pipe.embedder, a, t, method)
    assert used == method and heat.shape == a.shape[:2] and 0 <= heat.min() and heat.max() == pytest.approx(1)
    q = a.shape[0] // 4
    cells = [(y, x) for y in range(0, a.shape[0], q) for x in range(0, a.shape[0], q)]
    score = [heat[y:y + q, x:x + q].mean() for y, x in cells]
    fill = a.reshape(-1, 3).mean(axis=0).astype(np.uint8)

    def sim_without(cell: tuple[int, int]) -> float:
        y, x = cell
        occ = a.copy()
        occ[y:y + q, x:x + q] = fill
        return float(pipe.embedder.embed(occ[None])[0] @ t)

    assert sim_without(cells[int(np.argmax(score))]) < sim_without(cells[int(np.argmin(score))])


def test_dlib_family_falls_back_to_occlusion(astronaut: np.ndarray) -> None:
    from facepipe.embed import load_embedder
    from facepipe.explain_match import ExplainUnsupported, match_map

    emb = load_embedder("default", device="cpu")
    crop = np.ascontiguousarray(astronaut[30:180, 160:310])  # 150x150 around the face
    t = emb.embed(crop[None])[0]
    with pytest.raises(ExplainUnsupported, match="occlusion"):
        match_map(emb, crop, t, "gradcam")
    heat, used = match_map(emb, crop, t, "auto")
    assert used == "occlusion" and heat.shape == crop.shape[:2] and heat.max() == pytest.approx(1)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray, pipe) -> tuple[Path, Path]:
    """A gallery with the astronaut (two photos) and a second person (a coffee-cup photo has no
    face, so the second person is the astronaut mirrored: a near-duplicate, a real near-tie)."""
    import facepipe.commands.enroll as enroll_mod

    d = tmp_path_factory.mktemp("people")
    p1, p2 = d / "eileen1.jpg", d / "eileen2.jpg"
    Image.fromarray(astronaut).save(p1, quality=95)
    Image.fromarray(astronaut[10:500, 0:490]).save(p2, quality=90)
    g = d / "g"
    mp = pytest.MonkeyPatch()
    mp.setattr(enroll_mod, "build_pipeline", lambda *a, **k: _with_largest(pipe, k.get("largest_only", False)))
    r = run("enroll", "-g", g, "--device", "cpu", "eileen", p1, p2)
    mp.undo()
    assert r.exit_code == 0, r.output
    return g, d


def _with_largest(pipe, largest_only: bool):
    pipe.largest_only = largest_only
    return pipe


@pytest.fixture()
def explain_cli(pipe, monkeypatch: pytest.MonkeyPatch):
    import facepipe.builders as builders

    monkeypatch.setattr(builders, "build_pipeline", lambda *a, **k: _with_largest(pipe, False))
    return run


def test_explain_columns_are_labelled_and_boxes_clipped(explain_cli, astronaut: np.ndarray, tmp_path: Path) -> None:
    # the face touches the left border: detectors return boxes reaching past it
    img = tmp_path / "edge.png"
    Image.fromarray(np.ascontiguousarray(astronaut[:, 200:])).save(img)
    r = explain_cli("explain", "--detector", "cnn", "--device", "cpu", "--out", tmp_path / "o", "--header", img)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert rows and set(rows[0]) == {"path", "face", "top", "right", "bottom", "left", "det_score", "face_prob",
                                     "face_logit", "gradcam_image"}
    w, h = 312, 512
    for row in rows:
        assert 0 <= int(row["left"]) <= int(row["right"]) <= w and 0 <= int(row["top"]) <= int(row["bottom"]) <= h
        p, logit = float(row["face_prob"]), float(row["face_logit"])
        assert p == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-3)  # probability = sigmoid(logit)
    assert "face_logit = log(p / (1 − p))" in " ".join(run("explain", "--help").output.split())


def test_explain_with_gallery_answers_why(explain_cli, gallery, astronaut: np.ndarray, tmp_path: Path) -> None:
    g, d = gallery
    probe = tmp_path / "probe.jpg"
    Image.fromarray(np.asarray(Image.fromarray(astronaut).resize((300, 300)))).save(probe)
    out = tmp_path / "o"
    r = explain_cli("explain", "-g", g, "--device", "cpu", "--out", out, "--format", "json", probe)
    assert r.exit_code == 0, r.output
    (rec,) = json.loads(r.stdout)
    face = rec["faces"][0]
    m = face["match"]
    assert m["name"] == "eileen" and m["candidates"][0]["name"] == "eileen"
    assert m["distance"] == pytest.approx(1 - m["similarity"], abs=1e-5)
    assert m["tolerance"] == pytest.approx(1 - m["threshold"], abs=1e-5) and m["margin"] is None  # one person
    assert Path(m["reference"]["source"]).parent == d and m["method"] == "gradcam"
    png = np.asarray(Image.open(m["match_image"]))
    assert png.ndim == 3 and png.shape[0] >= 100 and png.std() > 10
    # CSV carries the decision columns too
    r = explain_cli("explain", "-g", g, "--device", "cpu", "--out", out, "--header", probe)
    row = next(csv.DictReader(io.StringIO(r.stdout)))
    assert row["name"] == "eileen" and float(row["tolerance"]) == pytest.approx(1 - m["threshold"], abs=1e-4)


def test_explain_with_missing_enrolled_photos(explain_cli, pipe, astronaut: np.ndarray, tmp_path: Path) -> None:
    import facepipe.commands.enroll as enroll_mod

    photo = tmp_path / "eileen.jpg"
    Image.fromarray(astronaut).save(photo)
    g = tmp_path / "g"
    mp = pytest.MonkeyPatch()
    mp.setattr(enroll_mod, "build_pipeline", lambda *a, **k: _with_largest(pipe, True))
    assert run("enroll", "-g", g, "--device", "cpu", "eileen", photo).exit_code == 0
    mp.undo()
    photo.unlink()  # the enrolled photo is gone; the gallery still works
    probe = tmp_path / "probe.png"
    Image.fromarray(astronaut[::2, ::2]).save(probe)
    r = explain_cli("explain", "-g", g, "--device", "cpu", "--out", tmp_path / "o", "--format", "jsonl", probe)
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["faces"][0]["match"]
    assert m["name"] == "eileen" and m["reference"] is None
    assert "enrolled photo is missing" in m["reference_problem"]
    assert (tmp_path / "o" / "probe_match.png").is_file()


def test_explain_faces_reports_missing_photos(pipe, astronaut: np.ndarray) -> None:
    """Library level: a gallery whose source photos are gone still explains the decision."""
    from facepipe.explain_match import explain_faces

    class FakeGallery:
        def rank(self, q, top_k):
            from facepipe.types import Match

            return [[Match("eileen", 0.9), Match("bob", 0.4)] for _ in range(len(q))]

        def sources(self, name):
            return ["/nonexistent/eileen1.jpg", None]

    (e,) = explain_faces(astronaut, pipe, FakeGallery(), threshold=0.5)
    assert e.verdict.name == "eileen" and e.verdict.margin == pytest.approx(0.5)
    assert e.reference is None and "missing" in e.problem and e.heat is None


def test_explain_usage_errors(tmp_path: Path) -> None:
    r = run("explain", "--out", tmp_path, "--tolerance", "0.4", "x.jpg")
    assert r.exit_code == 2 and "need(s) -g/--gallery" in r.stderr
    r = run("explain", "--out", tmp_path, "-g", tmp_path, "--tolerance", "nan", "x.jpg")
    assert r.exit_code == 2
