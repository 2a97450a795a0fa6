"""Gallery search engines: exact torch search (fp32, fp16, bf16) against numpy brute force and
FAISS, the tie order, the Gallery's engine choice, and the GPU planning (memory, fallbacks).

The torch engine runs here on the CPU (``engine="torch"``, ``device="cpu"``): the same code
as on a GPU. ``test_torch_search_on_cuda`` runs it on CUDA where a GPU exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.errors import DeviceUnavailableError
from facepipe.gallery import Gallery
from facepipe.gallery import search as gsearch
from facepipe.gallery.search import TorchSearcher, plan_search, searcher_from_array, time_search

EMB = "synthetic@0000"
PRECISIONS = ["fp32", "fp16", "bf16"]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(q: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k in float64, equal scores by ascending id (the defined tie order)."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(ids, s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), ids[order]


def assert_same_topk(D: np.ndarray, I: np.ndarray, Dr: np.ndarray, Ir: np.ndarray, tol: float = 2e-5) -> None:
    """Scores equal within ``tol``; ids equal wherever the reference scores are not within
    ``tol`` of a neighbour (a near-tie may be ordered either way by float rounding)."""
    np.testing.assert_allclose(D, Dr, atol=tol, rtol=0)
    gap = np.full(Dr.shape, np.inf)
    d = np.abs(np.diff(Dr, axis=1))
    gap[:, 1:] = np.minimum(gap[:, 1:], d)
    gap[:, :-1] = np.minimum(gap[:, :-1], d)
    clear = gap > tol
    assert clear.mean() > 0.5  # the comparison is not vacuous
    np.testing.assert_array_equal(I[clear], Ir[clear])


def tie_data(rng: np.random.Generator, n: int, nq: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors with four ±0.5 entries: every score is a multiple of 1/4, computed
    exactly in any precision and summation order, so many vectors tie exactly."""
    def draw(m: int) -> np.ndarray:
        v = np.zeros((m, dim), np.float32)
        for row in v:
            row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return v
    return draw(n), draw(nq)


# ---------------------------------------------------------------------------------- torch engine

@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("k", [1, 7, 60])
def test_torch_search_equals_bruteforce_and_faiss(precision: str, k: int) -> None:
    rng = np.random.default_rng(1)
    x = unit(rng.normal(size=(3000, 64)))
    q = unit(rng.normal(size=(120, 64)))
    ids = rng.permutation(10 * len(x))[:len(x)].astype(np.int64)  # arbitrary, unsorted ids
    torch_s = searcher_from_array(x, ids, device="cpu", engine="torch", precision=precision)
    assert torch_s.plan.engine == "torch" and torch_s.plan.exact and torch_s.plan.precision == precision
    D, I = torch_s.search(q, k)
    Dr, Ir = brute(q, x, ids, k)
    assert_same_topk(D, I, Dr, Ir)
    faiss_s = searcher_from_array(x, ids, device="cpu")
    assert faiss_s.plan.engine == "faiss-cpu"
    Df, If = faiss_s.search(q, k)
    assert_same_topk(D, I, Df.astype(np.float64), If)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_exact_ties_are_ordered_by_id(precision: str) -> None:
    rng = np.random.default_rng(2)
    x, q = tie_data(rng, 2000, 80)
    ids = np.arange(len(x), dtype=np.int64)[::-1].copy()  # reversed: position order is not id order
    s = TorchSearcher(ids, x, "cpu", precision, work_bytes=4 << 20)  # small steps: several probe chunks
    for k in (1, 5, 40):
        D, I = s.search_unit(q, k)
        Dr, Ir = brute(q, x, ids, k)
        np.testing.assert_array_equal(D, Dr.astype(np.float32))
        np.testing.assert_array_equal(I, Ir)  # exactly, ties included
    # FAISS finds the same scores (its order among equal scores is its own)
    Df, _ = searcher_from_array(x, ids, device="cpu").search(q, 40)
    np.testing.assert_array_equal(Df, brute(q, x, ids, 40)[0].astype(np.float32))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_near_ties_fall_back_to_exact(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Vectors closer together than the first pass can tell apart: the re-rank's bound
    fails, the wider pass and then the exact pass must still give the exact ranking."""
    rng = np.random.default_rng(3)
    centre = unit(rng.normal(size=(1, 32)))
    x = unit(centre + 2e-4 * rng.normal(size=(1500, 32)))
    x = np.concatenate([x, unit(rng.normal(size=(1500, 32)))])
    q = unit(centre + 0.2 * rng.normal(size=(40, 32)))
    calls = {"exact_all": 0}
    real = TorchSearcher._exact_all

    def spy(self: TorchSearcher, Q: object) -> object:
        calls["exact_all"] += 1
        return real(self, Q)

    monkeypatch.setattr(TorchSearcher, "_exact_all", spy)
    ids = np.arange(len(x), dtype=np.int64)
    s = TorchSearcher(ids, x, "cpu", precision)
    D, I = s.search_unit(q, 10)
    assert calls["exact_all"] > 0  # the exact fallback ran
    Dr, Ir = brute(q, x, ids, 10)
    assert_same_topk(D, I, Dr, Ir, tol=1e-6)
    D32, I32 = TorchSearcher(ids, x, "cpu", "fp32").search_unit(q, 10)
    np.testing.assert_allclose(D, D32, atol=1e-6)


def test_torch_search_edge_cases() -> None:
    rng = np.random.default_rng(4)
    x = unit(rng.normal(size=(5, 8)))
    s = TorchSearcher(np.arange(5), x, "cpu", "fp16")
    D, I = s.search_unit(unit(rng.normal(size=(3, 8))), 8)  # k beyond the vectors: padded
    assert (I[:, 5:] == -1).all() and np.isinf(D[:, 5:]).all() and (I[:, :5] >= 0).all()
    assert sorted(I[0, :5].tolist()) == list(range(5))
    empty = TorchSearcher(np.zeros(0, np.int64), np.zeros((0, 8), np.float32), "cpu")
    D, I = empty.search_unit(unit(rng.normal(size=(2, 8))), 3)
    assert (I == -1).all()
    with pytest.raises(ValueError):
        s.search_unit(x, 0)


def test_time_search_reports_the_plan() -> None:
    rng = np.random.default_rng(5)
    s = searcher_from_array(rng.normal(size=(500, 16)), device="cpu", engine="torch")
    r = time_search(s, unit(rng.normal(size=(50, 16))), k=3, repeats=2)
    assert r["plan"]["engine"] == "torch" and r["n_probes"] == 50 and len(r["ms_all"]) == 2
    assert r["ids"].shape == (50, 3) and r["ms_median"] > 0


# ---------------------------------------------------------------------------------- Gallery

def _gallery(tmp: Path, kind: str, rng: np.random.Generator) -> tuple[Gallery, np.ndarray, list[str]]:
    centres = unit(rng.normal(size=(60, 24)))
    x = unit(np.repeat(centres, 5, 0) + 0.35 * rng.normal(size=(300, 24)) / np.sqrt(24))
    names = [f"p{i:03d}" for i in range(60) for _ in range(5)]
    with Gallery.edit(tmp, embedder_id=EMB, dim=24, index_type=kind,
                      params={"ivf": {"nlist": 4, "nprobe": 1}, "hnsw": {"efSearch": 16}}) as g:
        g.add(x, names)
    return Gallery.open(tmp), x, names


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_gallery_torch_engine_is_exact_for_every_index_type(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(6)
    g, x, names = _gallery(tmp_path, kind, rng)
    q = unit(rng.normal(size=(70, 24)))
    assert g.to_device("cpu", engine="torch") == "cpu"
    plan = g.search_plan
    assert plan.engine == "torch" and plan.exact and plan.index == kind
    assert g.search_plan.summary() == "cpu (torch, exact, fp32)"
    D, I = g.search(q, 10)
    ids = np.arange(len(x), dtype=np.int64)  # ids are assigned in enrolment order
    assert_same_topk(D, I, *brute(q, x, ids, 10))
    # rank/identify go through the same search
    best = [r[0].name for r in g.rank(q, 1)]
    assert best == [names[i] for i in brute(q, x, ids, 1)[1][:, 0]]
    g.to_device("cpu")
    assert g.search_plan.engine == "faiss-cpu" and g.search_plan.exact == (kind == "flat")


def test_gallery_searcher_follows_changes(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    x = unit(rng.normal(size=(20, 8)))
    with Gallery.edit(tmp_path, embedder_id=EMB, dim=8) as g:
        g.add(x[:10], ["a"] * 10)
        g.to_device("cpu", engine="torch")
        assert g.search(x[15:16], 1)[1][0, 0] != 15
        g.add(x[10:], ["b"] * 10)  # the torch copy is rebuilt on the next search
        assert g.search(x[15:16], 1)[1][0, 0] == 15 and g.search_plan.engine == "torch"
        g.remove(["b"])
        assert g.search(x[15:16], 1)[1][0, 0] != 15


def test_refused_device_keeps_the_previous_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(8)
    g, _, _ = _gallery(tmp_path, "flat", rng)
    g.to_device("cpu", engine="torch")
    monkeypatch.setattr(gsearch, "faiss_gpus", lambda: 0)
    monkeypatch.setattr(gsearch, "cuda_devices", lambda: 0)
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        g.to_device("cuda")
    assert g.search_plan.engine == "torch"
    assert g.to_device("auto") == "cpu" and g.search_plan.reason == "no CUDA GPU"


# ---------------------------------------------------------------------------------- planning

@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A machine with one CUDA GPU (free/total memory set by the test) and faiss-cpu."""
    machine = {"faiss_gpus": 0, "cuda": 1, "free": 8 << 30, "total": 16 << 30}
    monkeypatch.setattr(gsearch, "faiss_gpus", lambda: machine["faiss_gpus"])
    monkeypatch.setattr(gsearch, "cuda_devices", lambda: machine["cuda"])
    monkeypatch.setattr(gsearch, "cuda_memory", lambda gpu: (machine["free"], machine["total"]))
    return machine


def test_plan_prefers_faiss_gpu_then_torch(fake_gpu: dict[str, int]) -> None:
    p = plan_search("auto", "flat", 1_000_000, 512)
    assert (p.engine, p.device, p.exact, p.precision) == ("torch", "cuda:0", True, "fp32")
    assert "faiss has no GPU support" in p.reason and p.device_bytes == 1_000_000 * 512 * 4
    assert plan_search("cuda", "hnsw", 1000, 128).engine == "torch"  # exact vectors, not the graph
    fake_gpu["faiss_gpus"] = 1
    assert plan_search("auto", "flat", 1000, 128).engine == "faiss-gpu"
    assert not plan_search("cuda", "ivf", 1000, 128).exact
    assert plan_search("cuda", "flat", 1000, 128, precision="fp16").engine == "torch"
    assert plan_search("cuda", "flat", 1000, 128, engine="torch").engine == "torch"
    assert plan_search("cpu", "flat", 1000, 128).engine == "faiss-cpu"


def test_plan_refuses_or_falls_back_when_vectors_do_not_fit(fake_gpu: dict[str, int]) -> None:
    fake_gpu["free"] = 1 << 30
    with pytest.raises(DeviceUnavailableError) as err:
        plan_search("cuda", "flat", 1_000_000, 512)
    msg = str(err.value)
    assert "1,000,000 vectors need 1.91 GiB" in msg and "only 1.00 GiB of cuda:0's 16.00 GiB is free" in msg
    assert "--search-device cpu" in msg and "fp16" in msg
    auto = plan_search("auto", "flat", 1_000_000, 512)
    assert auto.engine == "faiss-cpu" and "is free" in auto.reason
    # fp16 fits (0.76 GiB) but not its fp32 re-rank copy as well: that stays in host memory
    half = plan_search("cuda", "flat", 800_000, 512, precision="fp16")
    assert half.rerank_on == "cpu" and half.device_bytes == 800_000 * 512 * 2
    fake_gpu["free"] = 16 << 30
    assert plan_search("cuda", "flat", 800_000, 512, precision="fp16").rerank_on == "cuda:0"


def test_plan_errors(fake_gpu: dict[str, int]) -> None:
    with pytest.raises(DeviceUnavailableError, match="only 1 CUDA device"):
        plan_search("cuda:2", "flat", 10, 8)
    with pytest.raises(DeviceUnavailableError, match="invalid device"):
        plan_search("tpu", "flat", 10, 8)
    with pytest.raises(DeviceUnavailableError, match="unknown search precision"):
        plan_search("cpu", "flat", 10, 8, precision="int8")
    with pytest.raises(DeviceUnavailableError, match="no GPU support"):
        plan_search("cuda", "flat", 10, 8, engine="faiss")
    fake_gpu["cuda"] = 0
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        plan_search("cuda", "flat", 10, 8)
    assert plan_search("auto", "flat", 10, 8).engine == "faiss-cpu"


def test_gallery_info_reports_the_search_engine(tmp_path: Path) -> None:
    from facepipe.cli import cli as main

    rng = np.random.default_rng(9)
    _gallery(tmp_path / "g", "hnsw", rng)
    runner = CliRunner()
    r = runner.invoke(main, ["gallery", "info", "-g", str(tmp_path / "g"), "--search", "--search-device", "cpu"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)["search"]
    assert s == {"engine": "faiss-cpu", "device": "cpu", "exact": False, "precision": "fp32",
                 "reason": "asked for the CPU", "index": "hnsw"}
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).resolve().parents[1] / "docs/schema/gallery-info.json").read_text())
    torch_plan = plan_search("cpu", "flat", 10, 8, engine="torch").to_dict()
    for rec in (json.loads(r.output), {**json.loads(r.output), "search": torch_plan}):
        jsonschema.validators.validator_for(schema)(schema).validate(rec)
    r = runner.invoke(main, ["gallery", "info", "-g", str(tmp_path / "g")])
    assert "search" not in json.loads(r.output)
    r = runner.invoke(main, ["gallery", "info", "-g", str(tmp_path / "g"), "--search", "--search-device", "tpu"])
    assert r.exit_code != 0 and "invalid device" in r.output


# ---------------------------------------------------------------------------------- CUDA

def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_torch_search_on_cuda(tmp_path: Path, precision: str) -> None:
    rng = np.random.default_rng(10)
    x = unit(rng.normal(size=(20000, 128)))
    q = unit(rng.normal(size=(300, 128)))
    ids = np.arange(len(x), dtype=np.int64)
    s = searcher_from_array(x, ids, device="cuda", engine="torch", precision=precision)
    assert s.plan.device == "cuda:0" and s.plan.engine == "torch"
    D, I = s.search(q, 25)
    assert_same_topk(D, I, *brute(q, x, ids, 25))
    tx, tq = tie_data(rng, 5000, 100)
    t = TorchSearcher(np.arange(5000), tx, "cuda", precision)
    D, I = t.search_unit(tq, 30)
    Dr, Ir = brute(tq, tx, np.arange(5000), 30)
    np.testing.assert_array_equal(I, Ir)
    # a gallery on a GPU: faiss-gpu when installed, else torch; ranking as on the CPU
    g, gx, names = _gallery(tmp_path, "hnsw", rng)
    probes = unit(rng.normal(size=(50, 24)))
    assert g.to_device("cuda", precision=precision) == "cuda:0"
    assert g.search_plan.exact
    Dg, Ig = g.search(probes, 5)
    assert_same_topk(Dg, Ig, *brute(probes, gx, np.arange(len(gx)), 5))
    with pytest.raises(DeviceUnavailableError, match="vectors need"):
        plan_search("cuda", "flat", 10 ** 12, 512)
