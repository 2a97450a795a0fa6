"""Open-set thresholds out of the box: impostor models, FPIR for N comparisons, auto galleries,
leave-one-out evidence; checked against exact numpy computations and simulations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from facepipe.errors import GalleryError
from facepipe.gallery import Gallery
from facepipe.gallery.evidence import choose_threshold, leave_one_out
from facepipe.gallery.openset import (
    ImpostorModel, compute_impostor_model, estimate_shift, fit_impostor_model, fpir_from_fmr,
    impostor_model_for, impostor_scores, per_comparison_fmr,
)

EMB = "synthetic@0000"
DIM = 64


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def gaussian_model() -> ImpostorModel:
    """A model fitted to 400k N(0.1, 0.1) scores, whose true quantiles are known."""
    rng = np.random.default_rng(0)
    scores = rng.normal(0.1, 0.1, 400_000)
    return fit_impostor_model(scores, EMB, n_people=1000, n_images=3000)


def test_per_comparison_rate_inverts_fpir() -> None:
    for fpir in (0.5, 0.1, 0.01, 1e-4):
        for n in (1, 7, 1000, 10**7):
            f = per_comparison_fmr(fpir, n)
            assert fpir_from_fmr(f, n) == pytest.approx(fpir, rel=1e-9)
            assert 0 < f <= fpir
    assert per_comparison_fmr(0.01, 1) == pytest.approx(0.01)
    assert per_comparison_fmr(0.01, 10**6) == pytest.approx(-math.log(0.99) / 1e6, rel=1e-6)
    with pytest.raises(ValueError):
        per_comparison_fmr(0.0, 3)


def test_model_thresholds_match_the_true_quantiles(gaussian_model: ImpostorModel) -> None:
    m = gaussian_model
    assert m.n_pairs == 400_000
    for f, t, emp in zip(m.fmr, m.thresholds, m.empirical):
        truth = norm.ppf(1 - f, 0.1, 0.1)
        assert emp == (f * 400_000 >= 50)
        # empirical points are sample quantiles; tail points extrapolate a GPD fit
        assert t == pytest.approx(truth, abs=0.006 if emp else 0.03), (f, t, truth)
    # interpolation between grid points and the inverse
    for f in (0.3, 0.013, 3e-4, 7e-6):
        t = m.threshold_at_fmr(f)
        assert t == pytest.approx(norm.ppf(1 - f, 0.1, 0.1), abs=0.03)
        assert m.fmr_at(t) == pytest.approx(f, rel=0.05)
    ts = [m.threshold_at_fmr(f) for f in np.geomspace(0.5, 1e-7, 40)]
    assert all(b >= a for a, b in zip(ts, ts[1:]))


def test_record_round_trip_and_validation(gaussian_model: ImpostorModel) -> None:
    rec = json.loads(json.dumps(gaussian_model.to_dict()))
    again = ImpostorModel.from_dict(rec)
    assert again.threshold_at_fmr(1e-3) == pytest.approx(gaussian_model.threshold_at_fmr(1e-3), abs=1e-6)
    for broken in ({**rec, "format": "x"}, {**rec, "thresholds": rec["thresholds"][::-1]},
                   {k: v for k, v in rec.items() if k != "tail"}):
        with pytest.raises(ValueError):
            ImpostorModel.from_dict(broken)
    with pytest.raises(ValueError, match="too few"):
        fit_impostor_model(np.zeros(100), EMB, 3, 10)


def test_impostor_scores_are_every_cross_person_pair() -> None:
    rng = np.random.default_rng(1)
    x = unit(rng.normal(size=(30, 8)))
    labels = [f"p{i % 7}" for i in range(30)]
    got = np.sort(impostor_scores(x, labels, block=7))
    want = np.sort([float(x[i] @ x[j]) for i in range(30) for j in range(i + 1, 30) if labels[i] != labels[j]])
    assert np.allclose(got, want, atol=1e-6)


def _people(rng: np.random.Generator, n: int, common: float) -> np.ndarray:
    """Unit vectors of ``n`` random people; with ``common > 0`` each has a random weight
    (mean ``common``) along one shared direction, so a stranger with a large weight
    scores high against everyone (correlated comparisons)."""
    w = common * (1.0 + 0.6 * rng.normal(size=(n, 1))) if common else np.zeros((n, 1))
    c = np.zeros((1, DIM))
    c[0, 0] = 1.0
    return unit(w * c + rng.normal(size=(n, DIM)) / np.sqrt(DIM))


@pytest.mark.parametrize("common", [0.0, 1.2])
def test_fpir_formula_holds_with_the_fitted_exponent(common: float) -> None:
    """Independent people (no common direction): exponent 1 and the plain formula. People
    sharing a direction: a stranger's scores against one gallery are correlated, the fitted
    exponent is below 1, and with it the derived threshold still gives the target FPIR."""
    rng = np.random.default_rng(2)
    dev = _people(rng, 3000, common)
    model = compute_impostor_model(dev, [str(i) for i in range(3000)], EMB)
    if common == 0.0:
        assert all(a > 0.95 for _, a in model.exponents)
    else:
        assert model.exponent(0.1) < 0.9
    again = ImpostorModel.from_dict(model.to_dict())
    assert [a for _, a in again.exponents] == pytest.approx([a for _, a in model.exponents])
    for n in (10, 300):
        # averaged over galleries: which people a small gallery holds matters when comparisons correlate
        best = np.concatenate([(_people(rng, 2000, common) @ _people(rng, n, common).T).max(axis=1)
                               for _ in range(20)])
        for target in (0.1, 0.01):
            got = float((best >= model.threshold_for_fpir(target, n)).mean())
            assert got == pytest.approx(target, rel=0.35), (n, target, got)


def test_auto_gallery_rederives_its_threshold(tmp_path: Path, gaussian_model: ImpostorModel) -> None:
    rng = np.random.default_rng(3)
    g_dir = tmp_path / "g"
    Gallery.create(g_dir, DIM, EMB, impostor_model=gaussian_model, target_fpir=0.01)
    g = Gallery.open(g_dir)
    assert g.mode == "auto" and g.target_fpir == 0.01
    t1 = g.threshold
    assert t1 == pytest.approx(gaussian_model.threshold_at_fmr(0.01))
    with Gallery.edit(g_dir) as ge:
        ge.add(unit(rng.normal(size=(100, DIM))), [f"p{i // 4}" for i in range(100)])
    g = Gallery.open(g_dir)
    assert g.n_comparisons == 100
    assert g.threshold == pytest.approx(gaussian_model.threshold_for_fpir(0.01, 100)) and g.threshold > t1
    op = g.operating_point()
    assert op["mode"] == "auto" and op["expected_fpir"] == pytest.approx(0.01, rel=0.02)
    assert json.loads((g_dir / "manifest.json").read_text())["decision"]["target_fpir"] == 0.01
    with Gallery.edit(g_dir) as ge:
        ge.remove([f"p{i}" for i in range(20)])
    assert Gallery.open(g_dir).threshold == pytest.approx(gaussian_model.threshold_for_fpir(0.01, 20))
    # mean aggregation counts people, not vectors
    with Gallery.edit(g_dir) as ge:
        ge.use_impostor_model(gaussian_model, aggregation="mean")
    g = Gallery.open(g_dir)
    assert g.n_comparisons == 5 and g.threshold == pytest.approx(gaussian_model.threshold_for_fpir(0.01, 5))
    # a calibrated threshold stays put when people are enrolled
    with Gallery.edit(g_dir) as ge:
        ge.set_threshold(0.42, {"method": "test"}, target_fpir=0.02)
    with Gallery.edit(g_dir) as ge:
        ge.add(unit(rng.normal(size=(10, DIM))), ["new"] * 10)
    g = Gallery.open(g_dir)
    assert g.mode == "calibrated" and g.threshold == 0.42 and g.target_fpir == 0.02


def test_galleries_without_a_model(tmp_path: Path, gaussian_model: ImpostorModel) -> None:
    g = Gallery.create(tmp_path / "a", DIM, EMB)
    assert g.mode == "default" and g.threshold == 0.5 and g.operating_point()["expected_fpir"] is None
    g = Gallery.create(tmp_path / "b", DIM, EMB, threshold=0.61, impostor_model=gaussian_model)
    assert g.mode == "manual" and g.threshold == 0.61
    other = ImpostorModel.from_dict({**gaussian_model.to_dict(), "embedder_id": "other@1"})
    with pytest.raises(GalleryError, match="does not describe"):
        Gallery.create(tmp_path / "c", DIM, EMB, impostor_model=other)
    # manifests written before modes existed still open
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    del m["decision"]["mode"]
    m["decision"]["calibration"] = {"method": "fpir"}
    g = Gallery(tmp_path / "a", m, None, np.zeros(0, np.int64), np.zeros(0, np.int32), [], [], [], 0)
    assert g.mode == "calibrated"


def test_impostor_model_read_from_a_checkpoint(tmp_path: Path, gaussian_model: ImpostorModel) -> None:
    import torch

    class Emb:
        embedder_id = EMB

        def __init__(self, source: str) -> None:
            self.source = source

    p = tmp_path / "e.pt"
    torch.save({"format": "x", "calibration": gaussian_model.to_dict()}, p)
    assert impostor_model_for(Emb(str(p))).n_pairs == gaussian_model.n_pairs
    torch.save({"format": "x", "calibration": {**gaussian_model.to_dict(), "embedder_id": "else@2"}}, p)
    assert impostor_model_for(Emb(str(p))) is None  # made for other weights
    torch.save({"format": "x"}, p)
    assert impostor_model_for(Emb(str(p))) is None


def _brute_loo(v: np.ndarray, person: np.ndarray, method: str, n: int,
               pen: np.ndarray | None = None) -> tuple[list, list, list]:
    pen = np.zeros(len(v)) if pen is None else pen
    gen, ok, imp = [], [], []
    for i in range(len(v)):
        scores = {}
        for p in np.unique(person):
            idx = [j for j in np.flatnonzero(person == p) if j != i]
            if not idx:
                continue
            s = np.sort(v[idx] @ v[i] - pen[idx])[::-1]
            scores[p] = s[0] if method == "max" else s[:n].mean()
        others = [s for p, s in scores.items() if p != person[i]]
        imp.append(max(others))
        if person[i] in scores:
            gen.append(scores[person[i]])
            ok.append(scores[person[i]] > max(others))
    return gen, ok, imp


@pytest.mark.parametrize("method", ["max", "mean"])
def test_leave_one_out_matches_brute_force(method: str) -> None:
    rng = np.random.default_rng(4)
    centres = unit(rng.normal(size=(9, 16)))
    person = np.asarray([0, 0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 6, 6, 7, 8, 8, 8, 8, 8])
    v = unit(centres[person] + 0.6 * rng.normal(size=(len(person), 16)))
    loo = leave_one_out(v, person, method, 3, chunk=6)
    gen, ok, imp = _brute_loo(v, person, method, 3)
    assert np.allclose(loo.genuine_scores, gen, atol=1e-5)
    assert list(loo.genuine_correct) == ok
    assert np.allclose(loo.impostor_scores, imp, atol=1e-5)
    assert loo.n_people_with_two == 5
    # with cohort penalties, scored as Gallery.rank scores
    pen = np.where(rng.random(len(v)) < 0.5, 0.0, rng.uniform(0, 0.3, len(v))).astype(np.float32)
    loo = leave_one_out(v, person, method, 3, chunk=6, penalties=pen)
    gen, ok, imp = _brute_loo(v, person, method, 3, pen)
    assert np.allclose(loo.genuine_scores, gen, atol=1e-5) and list(loo.genuine_correct) == ok
    assert np.allclose(loo.impostor_scores, imp, atol=1e-5)


def test_fmr_at_many_matches_fmr_at(gaussian_model: ImpostorModel) -> None:
    ts = np.linspace(-0.2, 1.0, 97)
    assert np.allclose(gaussian_model.fmr_at_many(ts), [gaussian_model.fmr_at(t) for t in ts], rtol=1e-6, atol=1e-12)


def _best_of(rng: np.random.Generator, n: int, probes: int, shift: float) -> np.ndarray:
    return (rng.normal(0.1, 0.1, (probes, n)) + shift).max(axis=1)


def test_domain_shift_is_estimated_from_best_scores(gaussian_model: ImpostorModel) -> None:
    rng = np.random.default_rng(5)
    for shift in (0.0, 0.08):
        best = _best_of(rng, 20, 60, shift)
        d, gain = estimate_shift(gaussian_model, best, np.full(60, 20))
        assert d == pytest.approx(shift, abs=0.03)
        assert (2 * gain > 3.84) == (shift > 0)


def test_choose_threshold_rules(gaussian_model: ImpostorModel) -> None:
    rng = np.random.default_rng(6)
    m = gaussian_model
    # few probes from the model's own distribution: the model's threshold
    c = choose_threshold(0.01, 20, m, _best_of(rng, 20, 30, 0.0), np.full(30, 20))
    assert c.rule == "impostor model" and c.threshold == pytest.approx(m.threshold_for_fpir(0.01, 20))
    # the same from a domain where impostors run 0.1 higher: raised, never lowered
    c = choose_threshold(0.01, 20, m, _best_of(rng, 20, 30, 0.1), np.full(30, 20))
    assert c.shift == pytest.approx(0.1, abs=0.04) and c.threshold > m.threshold_for_fpir(0.01, 20)
    c = choose_threshold(0.01, 20, m, _best_of(rng, 20, 30, -0.2), np.full(30, 20))
    assert c.shift is None and c.threshold == pytest.approx(m.threshold_for_fpir(0.01, 20))
    # plenty of the user's own probes: their threshold alone
    many = _best_of(rng, 20, 5000, -0.1)
    c = choose_threshold(0.01, 20, m, many, np.full(5000, 20))
    assert c.rule == "your impostor probes" and float((many >= c.threshold).mean()) <= 0.01
    # no model and no probes: nothing to go on
    with pytest.raises(ValueError, match="no impostor evidence"):
        choose_threshold(0.01, 20, None, np.zeros(0))


def test_domain_shift_ignores_the_tail_exponent_for_the_bulk(gaussian_model: ImpostorModel) -> None:
    # A model whose comparisons exponent at the 1% target is well below 1 (as fitted for
    # real embedders: ~0.7). Leave-one-out best scores span the whole best-of-N
    # distribution, where comparisons count about as independent ones; reading them with
    # the tail's N^0.7 predicts too low a bulk and finds a "shift" in data without one.
    from dataclasses import replace

    m = replace(gaussian_model, exponents=((0.1, 0.9), (0.01, 0.7)))
    rng = np.random.default_rng(7)
    raised = 0
    for _ in range(10):
        best = _best_of(rng, 60, 90, 0.0)  # 30 people x 3 photos, one left out: 60-87 entries
        c = choose_threshold(0.01, 90, m, best, np.full(90, 60))
        raised += c.shift is not None
    assert raised <= 1
    # a real shift is still found
    c = choose_threshold(0.01, 90, m, _best_of(rng, 60, 90, 0.08), np.full(90, 60))
    assert c.shift == pytest.approx(0.08, abs=0.03)
