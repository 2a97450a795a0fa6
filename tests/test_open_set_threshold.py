"""The open-set rule at its boundary: a probe whose score *equals* the threshold is named.

Documented in the README ("named when the score reaches the threshold") and relied on
by calibration: :func:`calibrate_threshold` counts an impostor as a false positive
when its score is >= the threshold, so the FPIR it reports is the FPIR that
``identify`` delivers only if ``identify`` accepts at equality too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facepipe.gallery import Gallery, calibrate_threshold

DIM = 8


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def _setup(tmp_path: Path, aggregation: str) -> tuple[Path, np.ndarray, float]:
    """A gallery with two people; a probe; the probe's best score as the gallery computes it."""
    rng = np.random.default_rng(7)
    ada = np.stack([_unit(rng.normal(size=DIM)) for _ in range(3)])
    bob = np.stack([_unit(rng.normal(size=DIM)) for _ in range(2)])
    probe = _unit(ada[0] + 0.6 * rng.normal(size=DIM))[None]
    d = tmp_path / f"g-{aggregation}"
    with Gallery.edit(d, embedder_id="test@0", dim=DIM, aggregation=aggregation, aggregation_n=2) as g:
        g.add(np.concatenate([ada, bob]), ["ada"] * 3 + ["bob"] * 2)
    (best,) = Gallery.open(d).rank(probe, 1)
    assert best[0].name == "ada"
    return d, probe, best[0].score


@pytest.mark.parametrize("aggregation", ["max", "mean"])
def test_score_equal_to_the_threshold_is_named(tmp_path: Path, aggregation: str) -> None:
    d, probe, score = _setup(tmp_path, aggregation)
    g = Gallery.open(d)
    (at,) = g.identify(probe, threshold=score)
    assert at.name == "ada" and at.known and at.score == score
    above = float(np.nextafter(score, np.inf))
    (over,) = g.identify(probe, threshold=above)
    assert over.name == "unknown" and not over.known
    below = float(np.nextafter(score, -np.inf))
    assert g.identify(probe, threshold=below)[0].name == "ada"


@pytest.mark.parametrize("aggregation", ["max", "mean"])
def test_stored_threshold_equal_to_the_score_is_named(tmp_path: Path, aggregation: str) -> None:
    """The same rule through the threshold saved in the gallery's manifest (JSON round trip)."""
    d, probe, score = _setup(tmp_path, aggregation)
    with Gallery.edit(d) as g:
        g.set_threshold(score, {"method": "test: the probe's own score"})
    g = Gallery.open(d)
    assert g.threshold == score
    assert g.identify(probe)[0].name == "ada"


def test_identify_delivers_the_fpir_calibration_reports(tmp_path: Path) -> None:
    """Impostors tied at the calibrated threshold's boundary are counted the same way by both."""
    rng = np.random.default_rng(3)
    people = np.stack([_unit(rng.normal(size=DIM)) for _ in range(5)])
    d = tmp_path / "g"
    with Gallery.edit(d, embedder_id="test@0", dim=DIM) as g:
        g.add(people, [f"p{k}" for k in range(5)])
    g = Gallery.open(d)
    impostors = np.stack([_unit(rng.normal(size=DIM)) for _ in range(40)])
    # duplicate impostors so that several share one score exactly
    impostors = np.concatenate([impostors, impostors[:10], impostors[:10]])
    _, _, isc = g.calibration_scores(np.zeros((0, DIM), np.float32), [], impostors)
    for target in (0.05, 0.1, 0.25, 0.5):
        cal = calibrate_threshold(isc, target)
        accepted = np.mean([dec.known for dec in g.identify(impostors, threshold=cal.threshold)])
        assert accepted == pytest.approx(cal.fpir) and cal.fpir <= target
    # and exactly at an impostor's own score: that impostor and its duplicates are accepted
    t = float(np.sort(isc)[-5])
    accepted = np.mean([dec.known for dec in g.identify(impostors, threshold=t)])
    assert accepted == pytest.approx(np.mean(isc >= t)) and np.mean(isc >= t) > np.mean(isc > t)
