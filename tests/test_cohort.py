"""Cohort penalties: crowding against brute force, the record, and a gallery that ranks and
decides by similarity minus penalty exactly as a brute-force search would."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from facepipe.gallery import Gallery
from facepipe.gallery.cohort import Cohort, build_cohort
from facepipe.gallery.openset import ImpostorModel, fit_impostor_model

EMB = "synthetic@0000"
DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def crowded_people(rng: np.random.Generator, n_people: int, photos: tuple[int, int] = (1, 4),
                   prefix: str = "c") -> tuple[np.ndarray, np.ndarray]:
    """Half the people cluster around a few shared directions (crowded), half are isolated."""
    centres = unit(rng.normal(size=(4, DIM)))
    vecs, labels = [], []
    for i in range(n_people):
        if i % 2 == 0:
            base = centres[i % 4] + 0.35 * rng.normal(size=DIM) / np.sqrt(DIM) * 4
        else:
            base = rng.normal(size=DIM)
        base = unit(base[None])[0]
        n = int(rng.integers(photos[0], photos[1] + 1))
        vecs.append(unit(base + 0.25 * rng.normal(size=(n, DIM)) / np.sqrt(DIM) * 4))
        labels += [f"{prefix}{i}"] * n
    return np.concatenate(vecs), np.asarray(labels)


def brute_crowding(cohort: Cohort, v: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
    ends = np.append(cohort.starts[1:], len(cohort.vectors))
    out = []
    for i, x in enumerate(v.astype(np.float64)):
        per = [max(float(x @ cohort.vectors[a].astype(np.float64)) for a in range(s, e))
               for p, (s, e) in enumerate(zip(cohort.starts, ends)) if own is None or p != own[i]]
        per.sort(reverse=True)
        out.append(np.mean(per[cohort.skip:cohort.skip + cohort.k]))
    return np.asarray(out)


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    vecs, labels = crowded_people(np.random.default_rng(0), 60)
    return build_cohort(vecs, labels, k=5, skip=1)


@pytest.fixture(scope="module")
def model(cohort: Cohort) -> ImpostorModel:
    scores = np.random.default_rng(1).normal(0.0, 0.18, 200_000)
    return replace(fit_impostor_model(scores, EMB, 1000, 3000), cohort=cohort)


def test_crowding_and_reference_match_brute_force(cohort: Cohort) -> None:
    rng = np.random.default_rng(2)
    q = unit(rng.normal(size=(25, DIM)))
    assert cohort.crowding(q) == pytest.approx(brute_crowding(cohort, q), abs=1e-5)
    # the reference is the median crowding of the cohort's own photos, each without its person
    own = np.repeat(np.arange(cohort.n_people), np.diff(np.append(cohort.starts, len(cohort.vectors))))
    ref = np.median(brute_crowding(cohort, cohort.vectors, own))
    assert cohort.reference == pytest.approx(ref, abs=1e-5)
    pen = cohort.penalties(q)
    assert pen == pytest.approx(np.maximum(brute_crowding(cohort, q) - ref, 0), abs=1e-5)
    assert (pen >= 0).all() and cohort.penalties(q[:0]).shape == (0,)
    # crowded photos (near the shared directions) are penalised far more often than isolated ones
    own_pen = np.maximum(brute_crowding(cohort, cohort.vectors, own) - ref, 0)
    people = np.unique(crowded_people(np.random.default_rng(0), 60)[1])  # the fixture's, in cohort order
    crowded = np.asarray([int(people[p][1:]) % 2 == 0 for p in own])
    assert (own_pen[crowded] > 0).mean() > 2 * (own_pen[~crowded] > 0).mean(), ((own_pen[crowded] > 0).mean(), (own_pen[~crowded] > 0).mean())


def test_record_round_trip_and_validation(cohort: Cohort, model: ImpostorModel) -> None:
    rec = json.loads(json.dumps(cohort.to_dict()))
    again = Cohort.from_dict(rec)
    np.testing.assert_array_equal(again.vectors, cohort.vectors)
    np.testing.assert_array_equal(again.starts, cohort.starts)
    assert (again.k, again.skip) == (5, 1) and again.reference == pytest.approx(cohort.reference, abs=1e-6)
    m2 = ImpostorModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert m2.cohort is not None and m2.cohort.n_people == 60
    assert ImpostorModel.from_dict({k: v for k, v in model.to_dict().items() if k != "cohort"}).cohort is None
    for bad in ({**rec, "format": "x"}, {**rec, "photos": rec["photos"] + 1}, {**rec, "k": 60},
                {**rec, "vectors_f16": "not base64!"}, {k: v for k, v in rec.items() if k != "sizes_u16"}):
        with pytest.raises(ValueError):
            Cohort.from_dict(bad)
    with pytest.raises(ValueError, match="impostor model record"):
        ImpostorModel.from_dict({**model.to_dict(), "cohort": {**rec, "people": 3}})
    with pytest.raises(ValueError, match="too few"):
        build_cohort(cohort.vectors[:5], ["a", "b", "c", "d", "e"], k=5, skip=1)


def test_cohort_limits_and_validation(cohort: Cohort) -> None:
    """The smallest valid cohorts are accepted, one person fewer or a bad setting refused;
    a record with an empty person, a non-finite vector or non-base64 text is refused."""
    v, lab = cohort.vectors[:7], [str(i) for i in range(7)]
    assert build_cohort(v, lab, k=5, skip=1).n_people == 7  # k + skip + 1 people: enough
    assert build_cohort(v[:6], lab[:6], k=5, skip=0).skip == 0
    assert build_cohort(v, lab, k=1, skip=0).k == 1
    for kw in ({"k": 0, "skip": 0}, {"k": 5, "skip": -1}):
        with pytest.raises(ValueError):
            build_cohort(v, lab, **kw)
    with pytest.raises(ValueError, match="too few"):
        build_cohort(v[:6], lab[:6], k=5, skip=1)
    for bad_v, bad_lab in ((v, lab[:6]), (v[0], lab[:1]), (v[:, :, None], lab)):
        with pytest.raises(ValueError, match="do not match"):
            build_cohort(bad_v, bad_lab)
    rec = cohort.to_dict()
    assert Cohort.from_dict({**rec, "k": 59, "skip": 1}).k == 59  # k + skip == people: allowed
    assert Cohort.from_dict({**rec, "skip": 0}).skip == 0
    assert Cohort.from_dict({**rec, "k": 1}).k == 1
    for bad in ({**rec, "k": 0}, {**rec, "skip": -1}, {**rec, "k": 59, "skip": 2}):
        with pytest.raises(ValueError, match="do not fit"):
            Cohort.from_dict(bad)
    sizes = np.diff(np.append(cohort.starts, len(cohort.vectors))).astype("<u2")
    sizes[0], sizes[1] = sizes[0] + sizes[1], 0  # same total, one empty person
    import base64
    with pytest.raises(ValueError, match="sizes"):
        Cohort.from_dict({**rec, "sizes_u16": base64.b64encode(sizes.tobytes()).decode()})
    nan_v = cohort.vectors.astype("<f2")
    nan_v[3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        Cohort.from_dict({**rec, "vectors_f16": base64.b64encode(nan_v.tobytes()).decode()})
    with pytest.raises(ValueError):  # '*' is not base64: refused, not skipped
        Cohort.from_dict({**rec, "sizes_u16": rec["sizes_u16"][:-4] + "**" + rec["sizes_u16"][-4:]})


def test_crowding_in_blocks_matches_one_block(cohort: Cohort, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many more rows than a block (and more rows than dimensions) give the same crowding."""
    import facepipe.gallery.cohort as cohort_mod

    rng = np.random.default_rng(7)
    q = unit(rng.normal(size=(3 * DIM, DIM)))
    own = rng.integers(-1, cohort.n_people, size=len(q))
    whole, whole_own = cohort.crowding(q), cohort.crowding(q, own=own)
    monkeypatch.setattr(cohort_mod, "BLOCK", 7)
    np.testing.assert_allclose(cohort.crowding(q), whole, atol=1e-6)
    np.testing.assert_allclose(cohort.crowding(q, own=own), whole_own, atol=1e-6)
    np.testing.assert_allclose(whole_own, brute_crowding(cohort, q, own), atol=1e-5)


def brute_rank(vecs: np.ndarray, names: np.ndarray, pen: np.ndarray, q: np.ndarray, k: int,
               method: str, agg_n: int) -> list[list[tuple[str, float]]]:
    out = []
    for x in q:
        adj = vecs @ x - pen
        scored = []
        for p in np.unique(names):
            a = np.sort(adj[names == p])[::-1]
            scored.append((p, float(a[0] if method == "max" else a[:agg_n].mean())))
        scored.sort(key=lambda t: -t[1])
        out.append(scored[:k])
    return out


@pytest.mark.parametrize("method", ["max", "mean"])
def test_rank_by_similarity_minus_penalty_matches_brute_force(tmp_path: Path, cohort: Cohort,
                                                              model: ImpostorModel, method: str) -> None:
    rng = np.random.default_rng(3)
    vecs, names = crowded_people(rng, 80, (1, 3), prefix="e")
    g_dir = tmp_path / "g"
    Gallery.create(g_dir, DIM, EMB, impostor_model=model, aggregation=method, aggregation_n=2)
    with Gallery.edit(g_dir) as g:
        g.add(vecs[:100], names[:100])
        assert g.penalties() == pytest.approx(cohort.penalties(vecs[:100]), abs=1e-6)
        g.add(vecs[100:], names[100:])  # penalties of added vectors appended to the computed ones
        assert g.penalties() == pytest.approx(cohort.penalties(vecs), abs=1e-6)
    g = Gallery.open(g_dir)
    pen = cohort.penalties(vecs)
    assert g.penalties() == pytest.approx(pen, abs=1e-6) and (pen > 0).sum() > 10
    # probes near enrolled faces, and random ones
    q = unit(np.concatenate([vecs[rng.choice(len(vecs), 40)] + 0.1 * rng.normal(size=(40, DIM)),
                             rng.normal(size=(20, DIM))]))
    got = g.rank(q, 3)
    want = brute_rank(vecs, names, pen, q, 3, method, 2)
    for row_got, row_want in zip(got, want):
        assert [m.name for m in row_got] == [n for n, _ in row_want]
        assert [m.score for m in row_got] == pytest.approx([s for _, s in row_want], abs=1e-5)
        assert all(m.penalty >= 0 for m in row_got)
    # the best match's penalty is the one subtracted: score + penalty is a cosine similarity
    if method == "max":
        for x, row in zip(q, got):
            best = row[0]
            assert best.score + best.penalty == pytest.approx((vecs[names == best.name] @ x).max(), abs=1e-5)
    # removing people keeps the remaining penalties aligned
    with Gallery.edit(g_dir) as ge:
        ge.penalties()
        ge.remove(["e0", "e3", "e10"])
        keep = ~np.isin(names, ["e0", "e3", "e10"])
        assert ge.penalties() == pytest.approx(pen[keep], abs=1e-6)


def test_a_crowded_face_needs_a_closer_match(tmp_path: Path, cohort: Cohort, model: ImpostorModel) -> None:
    """The same probe, the same similarity: named by a gallery without a cohort, unknown with
    one, when the enrolled face sits in a crowded part of face space."""
    own = np.repeat(np.arange(cohort.n_people), np.diff(np.append(cohort.starts, len(cohort.vectors))))
    crowded = cohort.vectors[int(np.argmax(cohort.penalties(cohort.vectors)))]
    assert cohort.penalties(crowded[None])[0] > 0.05
    assert own.size == len(cohort.vectors)
    plain = replace(model, cohort=None)
    probes = []
    for g_dir, m in ((tmp_path / "plain", plain), (tmp_path / "cohort", model)):
        Gallery.create(g_dir, DIM, EMB, impostor_model=m, target_fpir=0.01)
        with Gallery.edit(g_dir) as g:
            g.add(crowded[None], ["ada"])
        g = Gallery.open(g_dir)
        # a probe just above the (shared) threshold
        t = g.threshold
        rng = np.random.default_rng(4)
        ortho = rng.normal(size=DIM)
        ortho -= (ortho @ crowded) * crowded
        ortho /= np.linalg.norm(ortho)
        s = min(t + 0.02, 0.999)
        probes.append(g.identify((s * crowded + np.sqrt(1 - s * s) * ortho)[None].astype(np.float32))[0])
    assert probes[0].name == "ada" and probes[1].name == "unknown"
    assert probes[1].score == pytest.approx(probes[0].score - cohort.penalties(crowded[None])[0], abs=1e-4)


def test_the_shipped_embedders_carry_a_cohort() -> None:
    """The default embedder's impostor model holds its development people as the cohort
    (the LFW people held out of training), and typical faces get no penalty."""
    from facepipe.embed import load_embedder
    from facepipe.gallery.openset import impostor_model_for

    m = impostor_model_for(load_embedder("default", device="cpu"))
    assert m is not None and m.cohort is not None
    c = m.cohort
    assert c.n_people == m.n_people and len(c.vectors) == m.n_images and (c.k, c.skip) == (10, 1)
    assert np.linalg.norm(c.vectors, axis=1) == pytest.approx(1.0, abs=2e-3)
    own = np.repeat(np.arange(c.n_people), np.diff(np.append(c.starts, len(c.vectors))))
    share = float((c.crowding(c.vectors, own=own) > c.reference).mean())
    assert share == pytest.approx(0.5, abs=0.01)


def test_penalties_are_stored_with_the_gallery(tmp_path: Path, cohort: Cohort, model: ImpostorModel,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a gallery reads its penalties from the label file (no cohort search), unless
    they were computed with another cohort; the record round-trips the cohort exactly."""
    again = ImpostorModel.from_dict(json.loads(json.dumps(model.to_dict()))).cohort
    assert again is not None and again.fingerprint == cohort.fingerprint
    rng = np.random.default_rng(5)
    vecs, names = crowded_people(rng, 30, (1, 2), prefix="s")
    g_dir = tmp_path / "g"
    Gallery.create(g_dir, DIM, EMB, impostor_model=model)
    with Gallery.edit(g_dir) as g:
        g.add(vecs, names)
    labels = json.loads(next(g_dir.glob("labels-*.json")).read_text())
    assert labels["penalties"]["cohort"] == cohort.fingerprint
    assert labels["penalties"]["values"] == pytest.approx(cohort.penalties(vecs).tolist(), abs=1e-7)
    calls = []
    monkeypatch.setattr(Cohort, "penalties", lambda self, v: calls.append(len(v)) or np.zeros(len(v), np.float32))
    g = Gallery.open(g_dir)
    assert any(v > 0 for v in labels["penalties"]["values"])
    assert g.penalties().tolist() == pytest.approx(labels["penalties"]["values"], abs=1e-7)
    assert calls == []  # read, not recomputed
    # another cohort (another embedder record): recomputed
    other = build_cohort(*crowded_people(np.random.default_rng(6), 40), k=5, skip=1)
    with Gallery.edit(g_dir) as ge:
        ge.use_impostor_model(replace(model, cohort=other))
    assert calls and sum(calls) == len(vecs)


@pytest.mark.parametrize("method", ["max", "mean"])
def test_rank_fetches_deeper_when_penalties_reorder(tmp_path: Path, model: ImpostorModel,
                                                   monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """20 penalised decoys are the probe's nearest raw neighbours (more than the first k-NN
    fetch holds); the unpenalised person behind them must still rank first."""
    monkeypatch.setattr(Cohort, "penalties",
                        lambda self, v: np.where(np.asarray(v)[:, 1] > 0.1, 0.3, 0.0).astype(np.float32))
    eye = np.eye(DIM, dtype=np.float32)

    def at(sim: float, axis: int, marker: float = 0.0) -> np.ndarray:
        return sim * eye[0] + marker * eye[1] + np.sqrt(1 - sim * sim - marker * marker) * eye[axis]

    decoys = [at(0.9, 2 + i, 0.2) for i in range(20)]  # cosine 0.9, penalty 0.3
    # target: two plain photos at 0.8 and a penalised one at 0.85 (its mean of the best 2 is 0.8)
    vecs = unit(np.stack(decoys + [at(0.8, 24), at(0.8, 25), at(0.85, 26, 0.2)]))
    names = [f"decoy{i}" for i in range(20)] + ["target"] * 3
    g_dir = tmp_path / "g"
    Gallery.create(g_dir, DIM, EMB, impostor_model=model, aggregation=method, aggregation_n=2)
    with Gallery.edit(g_dir) as g:
        g.add(vecs, names)
    g = Gallery.open(g_dir)
    assert len(g.rank(eye[:1])[0]) == 1  # top_k defaults to 1
    best = g.rank(eye[:1], 2)[0]
    assert best[0].name == "target" and best[0].score == pytest.approx(0.8, abs=1e-5) and best[0].penalty == 0
    assert best[1].name.startswith("decoy") and best[1].score == pytest.approx(0.6, abs=1e-5)
    assert best[1].penalty == pytest.approx(0.3)
    # the first person is settled by the first fetch, the second is not: both must be right
    with Gallery.edit(g_dir) as ge:
        ge.add(unit(at(0.95, 27)[None]), ["first"])
    g = Gallery.open(g_dir)
    # a batch: queries after one that needs a deeper fetch are answered too
    q = np.stack([eye[0], eye[27], eye[24]])
    ranked = g.rank(q, 2)
    assert [m.name for m in ranked[0]] == ["first", "target"]
    assert [m.score for m in ranked[0]] == pytest.approx([0.95, 0.8], abs=1e-5)
    assert ranked[1][0].name == "first" and ranked[2][0].name == "target"


@pytest.mark.parametrize("method", ["max", "mean"])
def test_rank_fetches_deeper_for_enough_people(tmp_path: Path, model: ImpostorModel,
                                               monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """One person's 30 photos fill the first fetch: the search goes deeper until two people
    appear (for every query of a batch), and three people in the fetch are enough for two."""
    monkeypatch.setattr(Cohort, "penalties", lambda self, v: np.zeros(len(v), np.float32))
    rng = np.random.default_rng(8)
    eye = np.eye(DIM, dtype=np.float32)

    def near(sim: float, n: int) -> np.ndarray:
        noise = rng.normal(size=(n, DIM)).astype(np.float32)
        noise[:, 0] = 0
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        return unit(sim * eye[0] + np.sqrt(1 - sim * sim) * noise)

    vecs = np.concatenate([near(0.95, 30), near(0.8, 30), near(0.5, 40)])
    names = ["a"] * 30 + ["b"] * 30 + ["c"] * 40
    g_dir = tmp_path / "g"
    Gallery.create(g_dir, DIM, EMB, impostor_model=model, aggregation=method, aggregation_n=2)
    with Gallery.edit(g_dir) as g:
        g.add(vecs, names)
    g = Gallery.open(g_dir)
    q = np.stack([eye[0], eye[0], unit(vecs[70:71])[0]])
    ranked = g.rank(q, 2)
    want = brute_rank(vecs, np.asarray(names), np.zeros(len(vecs), np.float32), q, 2, method, 2)
    for got, exp in zip(ranked, want):
        assert [m.name for m in got] == [n for n, _ in exp]
        assert [m.score for m in got] == pytest.approx([x for _, x in exp], abs=1e-5)
