"""The gallery's open-set bookkeeping, where the mutation run (docs/testing.md) found it untested.

``calibrate_threshold`` must report the FPIR and DIR that ``identify`` delivers (ties at the
threshold count, float32 scores), validate its target, and say what it was given;
``dir_fpir_curve`` must equal a brute-force count at every threshold; ``rank`` and
``identify`` answer one candidate unless asked for more; ``set_threshold`` stores the mode,
target and aggregation it is given; ``calibration_scores`` rejects probes that do not fit
and names what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facepipe.errors import GalleryError, ShapeError
from facepipe.gallery import Gallery, calibrate_threshold, dir_fpir_curve

DIM = 8


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def gallery(tmp_path: Path) -> Path:
    """Six people, two vectors each."""
    rng = np.random.default_rng(11)
    d = tmp_path / "g"
    with Gallery.edit(d, embedder_id="test@0", dim=DIM) as g:
        g.add(_unit(rng.normal(size=(12, DIM))), [f"p{k // 2}" for k in range(12)])
    return d


# --------------------------------------------------------------------------- calibrate_threshold


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5])
def test_target_fpir_outside_0_1_is_refused(target: float) -> None:
    with pytest.raises(ValueError, match="target FPIR"):
        calibrate_threshold([0.1, 0.2, 0.3], target)


def test_bad_impostor_scores_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="^calibration needs at least one impostor score$"):
        calibrate_threshold([], 0.1)
    with pytest.raises(ValueError, match="^impostor scores contain NaN or infinite values$"):
        calibrate_threshold([0.1, float("nan")], 0.1)
    with pytest.raises(ValueError, match="^genuine_scores and genuine_correct differ in length$"):
        calibrate_threshold([0.1, 0.2], 0.1, genuine_scores=[0.5, 0.6], genuine_correct=[True])


def test_reported_fpir_and_dir_count_scores_equal_to_the_threshold() -> None:
    """Scores are float32: an impostor one float32 step above another lands exactly on the
    threshold chosen between them, and a genuine score may equal it too; both count."""
    a = np.float32(0.6)
    b = np.nextafter(a, np.float32(1.0))             # the next float32 above a
    cal = calibrate_threshold(np.array([a, b], np.float32), 0.5,
                              genuine_scores=np.array([b, a], np.float32), genuine_correct=[True, True])
    assert cal.threshold == float(b)
    assert cal.fpir == 0.5                            # b passes (>=), a does not
    assert cal.dir == 0.5                             # the genuine score equal to it is detected
    assert (cal.n_impostor, cal.n_genuine) == (2, 2)


def test_genuine_scores_without_correctness_all_count_as_right() -> None:
    cal = calibrate_threshold([0.1, 0.2, 0.3, 0.4], 0.25, genuine_scores=[0.2, 0.5, 0.9])
    assert cal.threshold > 0.3 and cal.fpir == 0.25
    assert cal.dir == pytest.approx(2 / 3) and cal.n_genuine == 3
    wrong = calibrate_threshold([0.1, 0.2, 0.3, 0.4], 0.25, genuine_scores=[0.2, 0.5, 0.9],
                                genuine_correct=[True, False, True])
    assert wrong.dir == pytest.approx(1 / 3)


def test_no_genuine_scores_means_no_dir() -> None:
    for kwargs in ({}, {"genuine_scores": []}):
        cal = calibrate_threshold([0.1, 0.2, 0.3], 0.0, **kwargs)  # type: ignore[arg-type]
        assert cal.dir is None and cal.n_genuine == 0 and cal.n_impostor == 3
        assert cal.fpir == 0.0 and cal.threshold > 0.3


def test_a_target_just_below_one_lets_every_impostor_pass() -> None:
    """floor(target × N) reaches N: the threshold goes just below the lowest impostor."""
    imp = [0.3, 0.1, 0.2]
    cal = calibrate_threshold(imp, 1.0 - 1e-12)
    assert cal.fpir == 1.0
    assert cal.threshold < 0.1 and cal.threshold == float(np.nextafter(0.1, -np.inf))


# --------------------------------------------------------------------------- dir_fpir_curve


@pytest.mark.parametrize("n_gen, n_imp", [(1, 1), (7, 5), (40, 60)])
def test_dir_fpir_curve_matches_brute_force_at_every_threshold(n_gen: int, n_imp: int) -> None:
    rng = np.random.default_rng(n_gen + n_imp)
    gen = np.round(rng.uniform(0.3, 1.0, n_gen), 2)     # rounded: ties within and across the sets
    ok = rng.uniform(size=n_gen) < 0.7
    imp = np.round(rng.uniform(0.0, 0.8, n_imp), 2)
    thr, fpir, dir_ = dir_fpir_curve(gen, ok, imp)
    expected = np.unique(np.concatenate([gen, imp]))[::-1]
    assert np.array_equal(thr, expected)
    for t, f, d in zip(thr, fpir, dir_):
        assert f == pytest.approx((imp >= t).mean())
        assert d == pytest.approx(((gen >= t) & ok).mean())


def test_dir_fpir_curve_with_one_score_each() -> None:
    thr, fpir, dir_ = dir_fpir_curve(np.array([0.9]), np.array([True]), np.array([0.2]))
    assert thr.tolist() == [0.9, 0.2] and fpir.tolist() == [0.0, 1.0] and dir_.tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------- rank / identify


def test_rank_and_identify_answer_one_candidate_unless_asked(gallery: Path) -> None:
    g = Gallery.open(gallery)
    probes = _unit(np.random.default_rng(2).normal(size=(3, DIM)))
    assert [len(c) for c in g.rank(probes)] == [1, 1, 1]
    assert [len(c) for c in g.rank(probes, 1)] == [1, 1, 1]
    assert [len(c) for c in g.rank(probes, 3)] == [3, 3, 3]
    for dec, cands in zip(g.identify(probes), g.rank(probes)):
        assert dec.candidates == tuple(cands) and len(dec.candidates) == 1
    for dec, cands in zip(g.identify(probes, top_k=4), g.rank(probes, 4)):
        assert dec.candidates == tuple(cands) and len(dec.candidates) == 4


def test_rank_refuses_probes_of_another_dimension(gallery: Path) -> None:
    g = Gallery.open(gallery)
    with pytest.raises(ShapeError, match="^queries have dimension 4, the gallery expects 8$"):
        g.rank(_unit(np.ones((2, 4))))
    with pytest.raises(ShapeError, match="^queries have dimension 4, the gallery expects 8$"):
        g.identify(_unit(np.ones((2, 4))))


def test_an_empty_gallery_answers_unknown_without_candidates(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    with Gallery.edit(d, embedder_id="test@0", dim=DIM):
        pass
    (dec,) = Gallery.open(d).identify(_unit(np.ones((1, DIM))))
    assert dec.name == "unknown" and np.isnan(dec.score) and dec.candidates == ()


# --------------------------------------------------------------------------- set_threshold


@pytest.mark.parametrize("mode, target", [("manual", None), ("calibrated", 0.05)])
def test_set_threshold_stores_mode_target_and_aggregation(gallery: Path, mode: str, target: float | None) -> None:
    with Gallery.edit(gallery) as g:
        g.set_threshold(0.7, {"method": "test"}, aggregation="mean", aggregation_n=2, mode=mode,
                        target_fpir=target)
    g = Gallery.open(gallery)
    assert (g.threshold, g.mode, g.target_fpir, g.aggregation) == (0.7, mode, target, ("mean", 2))


def test_set_threshold_refuses_other_modes(gallery: Path) -> None:
    with Gallery.edit(gallery) as g:
        with pytest.raises(GalleryError) as err:
            g.set_threshold(0.7, {}, mode="auto")
    assert err.value.path == str(gallery) and "'auto'" in err.value.problem


# --------------------------------------------------------------------------- calibration_scores


def test_calibration_scores_are_the_best_match_per_probe(gallery: Path) -> None:
    g = Gallery.open(gallery)
    rng = np.random.default_rng(5)
    gen = _unit(rng.normal(size=(4, DIM)))
    names = ["p0", "p1", "p2", "p3"]
    imp = _unit(rng.normal(size=(3, DIM)))
    gs, gc, isc = g.calibration_scores(gen, names, imp)
    best_g = [c[0] for c in g.rank(gen, 1)]
    assert gs.tolist() == [m.score for m in best_g]
    assert gc.tolist() == [m.name == n for m, n in zip(best_g, names)]
    assert isc.tolist() == [c[0].score for c in g.rank(imp, 1)]
    # either side may be empty (a list or an empty array)
    for empty in ([], np.zeros((0, DIM), np.float32)):
        gs, gc, isc = g.calibration_scores(empty, [], imp)
        assert gs.shape == (0,) and gc.shape == (0,) and isc.shape == (3,)
        gs, gc, isc = g.calibration_scores(gen, names, empty)
        assert gs.shape == (4,) and isc.shape == (0,)


def test_calibration_scores_name_what_is_wrong(gallery: Path) -> None:
    g = Gallery.open(gallery)
    rng = np.random.default_rng(6)
    gen = _unit(rng.normal(size=(2, DIM)))
    imp = _unit(rng.normal(size=(2, DIM)))
    with pytest.raises(ShapeError, match="genuine probes have dimension 4"):
        g.calibration_scores(gen[:, :4], ["p0", "p1"], imp)
    with pytest.raises(ShapeError, match="impostor probes have dimension 4"):
        g.calibration_scores(gen, ["p0", "p1"], imp[:, :4])
    with pytest.raises(ShapeError, match="2 genuine probes but 1 names"):
        g.calibration_scores(gen, ["p0"], imp)
    with pytest.raises(GalleryError) as err:
        g.calibration_scores(gen, ["p0", "zoe"], imp)
    assert err.value.path == str(gallery)
    assert err.value.problem == "genuine probes of people who are not enrolled: zoe"
    many = _unit(rng.normal(size=(7, DIM)))
    strangers = [f"s{k}" for k in range(7)]
    with pytest.raises(GalleryError) as err:
        g.calibration_scores(many, strangers, imp)
    assert err.value.problem == ("genuine probes of people who are not enrolled: "
                                 "s0, s1, s2, s3, s4 ...")
    with pytest.raises(GalleryError) as err:
        g.calibration_scores(many[:6], strangers[:6], imp)
    assert err.value.problem.endswith("s0, s1, s2, s3, s4 ...")
    with pytest.raises(GalleryError) as err:
        g.calibration_scores(many[:5], strangers[:5], imp)
    assert err.value.problem.endswith("s0, s1, s2, s3, s4")
