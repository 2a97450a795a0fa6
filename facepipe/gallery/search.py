"""Where and how a gallery is searched: FAISS on the CPU, faiss-gpu, or exact torch search on a GPU.

Three search engines, chosen by :func:`plan_search` from the device asked for
(``auto``, ``cpu``, ``cuda``, ``cuda:N``), the gallery's index type and size:

``faiss-cpu``
    The gallery's own FAISS index (exact for ``flat``, approximate for ``ivf``/``hnsw``).
``faiss-gpu``
    Preferred on a GPU when the installed faiss has GPU support (``faiss-gpu``): flat and
    HNSW galleries are searched exactly as a ``GpuIndexFlatIP``, IVF galleries as a GPU
    clone of their (approximate) IVF index.
``torch``
    Exact brute-force search with torch for GPUs without faiss-gpu (the PyPI faiss wheels
    with GPU support are CUDA-12 only, so a plain install has none): the gallery's unit
    vectors are held on the GPU, probes are scored in batches by one matrix product and
    the best ``k`` taken with ``torch.topk``. Used for every index type: HNSW and IVF
    galleries are searched over their exact vectors too, since exact search is both
    correct and fast once a GPU does it (1M vectors are a few GB). ``fp16``/``bf16``
    halve the GPU memory and speed the product up; their candidates are re-ranked in
    fp32 and the result is *proved* exact (a rounding-error bound, see
    :class:`TorchSearcher`), so every precision returns the fp32 results.

Ties: equal scores are ordered by ascending id (the torch engine guarantees it; FAISS
leaves the order of exactly equal scores unspecified). When the vectors do not fit in the
GPU's free memory, ``cuda`` is refused with the sizes in the message and ``auto`` searches
on the CPU instead (the plan's ``reason`` says why).

For benchmarks, :func:`searcher_from_array` builds the product's searcher over a plain
array and :func:`time_search` times batches of probes through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from facepipe.errors import DeviceUnavailableError, ShapeError

log = logging.getLogger(__name__)

ENGINES = ("auto", "faiss", "torch")
PRECISIONS = ("fp32", "fp16", "bf16")
#: Largest working memory (probe-by-vector score block and top-k) one search step uses.
WORK_BYTES = 2 << 30
#: Smallest working memory a GPU search is planned with.
MIN_WORK_BYTES = 64 << 20
#: Share of the GPU's free memory a search may take (the rest stays for the CNN models).
GPU_MEMORY_SHARE = 0.9
#: Extra candidates fetched beyond ``k``: exact fp32 (ties at the k-th place) and
#: reduced precision (the re-rank's margin).
PAD_EXACT = 8
PAD_REDUCED = 32
#: Unit roundoff of each reduced precision (TF32, used by fp32 matmuls when a program
#: enables it, rounds like fp16).
ROUNDOFF = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8, "tf32": 2.0 ** -11}
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class SearchPlan:
    """Which engine searches where, decided before anything is copied to a device."""

    engine: str                 #: faiss-cpu, faiss-gpu or torch
    device: str                 #: cpu or cuda:N
    exact: bool                 #: whether results equal brute-force search
    precision: str              #: fp32, fp16 or bf16 (the first-pass scores of torch)
    reason: str                 #: why this engine (and not a GPU one)
    index: str = "flat"         #: the gallery's index type
    device_bytes: int = 0       #: device memory the gallery's vectors take (torch)
    rerank_on: str = ""         #: torch fp16/bf16: where the fp32 copy for the re-rank lives
    work_bytes: int = 0         #: working memory per search step (torch)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for ``gallery info`` and benchmark records)."""
        d = asdict(self)
        if self.engine != "torch":
            for key in ("device_bytes", "rerank_on", "work_bytes"):
                d.pop(key)
        return d

    def summary(self) -> str:
        """One line for reports: ``cuda:0 (torch, exact, fp32)``."""
        how = "exact" if self.exact else f"approximate {self.index}"
        prec = f", {self.precision}" if self.engine == "torch" else ""
        return f"{self.device} ({self.engine}, {how}{prec})"


class Searcher(Protocol):
    """A built search engine: ``search_unit(q, k)`` gives ``(scores, ids)`` of shape ``(n, k)``."""

    plan: SearchPlan

    def search_unit(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


# ---------------------------------------------------------------------------------- planning

def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def faiss_gpus() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu)."""
    from facepipe.gallery.index import faiss_module

    faiss = faiss_module()
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


def cuda_devices() -> int:
    """CUDA GPUs torch can use; on Linux without an NVIDIA driver, 0 without importing torch."""
    if "torch" not in sys.modules and sys.platform.startswith("linux") and not (
            os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")):
        return 0
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def cuda_memory(gpu: int) -> tuple[int, int]:
    """``(free, total)`` bytes of CUDA device ``gpu``."""
    import torch

    free, total = torch.cuda.mem_get_info(gpu)
    return int(free), int(total)


def _check_choice(value: str, valid: tuple[str, ...], what: str) -> str:
    v = (value or "").strip().lower()
    if v not in valid:
        raise DeviceUnavailableError(f"unknown search {what} {value!r}; valid: {', '.join(valid)}")
    return v


def plan_search(device: str, kind: str, n: int, dim: int, engine: str = "auto",
                precision: str = "fp32") -> SearchPlan:
    """Decide how to search ``n`` vectors of ``dim`` held in a ``kind`` index on ``device``.

    ``device``: ``auto`` (a GPU when one is usable, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``. ``engine``: ``auto`` (faiss-gpu when installed, else torch on a GPU, FAISS on
    the CPU), ``faiss`` or ``torch`` (``torch`` on ``cpu`` runs the GPU code path on the CPU,
    for tests and for comparison). ``precision`` other than ``fp32`` is a torch feature and
    selects the torch engine. Raises :class:`DeviceUnavailableError` when an explicit
    ``cuda`` request cannot be met (no CUDA, no such GPU, not enough free memory).
    """
    from facepipe.device import validate_device_spec

    spec = validate_device_spec(device)
    engine = _check_choice(engine, ENGINES, "engine")
    precision = _check_choice(precision, PRECISIONS, "precision")
    if precision != "fp32":
        if engine == "faiss":
            raise DeviceUnavailableError(f"search precision {precision} needs the torch engine, not faiss")
        engine = "torch"
    approx = kind in ("ivf", "hnsw")

    def cpu(reason: str) -> SearchPlan:
        if engine == "torch":
            return SearchPlan("torch", "cpu", True, precision, reason, kind,
                              rerank_on="cpu" if precision != "fp32" else "", work_bytes=WORK_BYTES // 4)
        return SearchPlan("faiss-cpu", "cpu", not approx, "fp32", reason, kind)

    if spec == "cpu":
        return cpu("asked for the CPU")
    gpu = int(spec.split(":")[1]) if ":" in spec else 0
    n_faiss = faiss_gpus() if engine in ("auto", "faiss") else 0
    if n_faiss > 0:
        if gpu >= n_faiss:
            raise DeviceUnavailableError(f"device {spec!r} requested but faiss sees only {n_faiss} GPU(s)")
        return SearchPlan("faiss-gpu", f"cuda:{gpu}", kind != "ivf", "fp32",
                          "faiss has GPU support" + ("; HNSW searched exactly as a flat GPU index"
                                                     if kind == "hnsw" else ""), kind)
    if engine == "faiss":
        if spec == "auto":
            return cpu("faiss has no GPU support here")
        raise DeviceUnavailableError(f"device {spec!r} requested for gallery search with the faiss engine, but "
                                     "this faiss build has no GPU support (faiss-cpu); use the torch engine "
                                     "or install faiss-gpu, see docs/gallery.md")
    n_cuda = cuda_devices()
    if n_cuda == 0:
        if spec == "auto":
            return cpu("no CUDA GPU")
        raise DeviceUnavailableError(f"device {spec!r} requested for gallery search but CUDA is not available "
                                     "on this machine")
    if gpu >= n_cuda:
        raise DeviceUnavailableError(f"device {spec!r} requested but only {n_cuda} CUDA device(s) exist")
    free, total = cuda_memory(gpu)
    budget = int(free * GPU_MEMORY_SHARE)
    resident = n * dim * _BYTES[precision]
    need_work = max(MIN_WORK_BYTES, 2 * 4 * n)  # at least one probe's scores and its top-k
    if resident + need_work > budget:
        why = (f"the gallery's {n:,} vectors need {_gib(resident)} of GPU memory in {precision} plus "
               f"{_gib(need_work)} to search, but only {_gib(free)} of cuda:{gpu}'s {_gib(total)} is free")
        if spec == "auto":
            log.warning("gallery search on the CPU: %s", why)
            return cpu(why)
        hint = "search on the CPU (--search-device cpu)" + (
            " or in fp16 (half the memory)" if precision == "fp32" else "")
        raise DeviceUnavailableError(f"gallery search on {spec}: {why}; {hint}")
    rerank_on = ""
    if precision != "fp32":
        exact_copy = n * dim * 4
        if resident + exact_copy + need_work <= budget:
            rerank_on, resident = f"cuda:{gpu}", resident + exact_copy
        else:
            rerank_on = "cpu"
    reason = ("faiss has no GPU support here; exact torch search" if faiss_gpus() == 0 and engine == "auto"
              else "torch engine asked for")
    return SearchPlan("torch", f"cuda:{gpu}", True, precision, reason, kind, device_bytes=resident,
                      rerank_on=rerank_on, work_bytes=int(min(WORK_BYTES, budget - resident)))


# ---------------------------------------------------------------------------------- FAISS

class FaissSearcher:
    """Search a FAISS index (the gallery's own on the CPU, or a faiss-gpu copy)."""

    def __init__(self, plan: SearchPlan, index: Any, positions: np.ndarray | None = None,
                 resources: Any = None) -> None:
        self.plan = plan
        self.index = index
        self._positions = positions  # internal position -> external id (flat GPU copies)
        self._resources = resources  # faiss GPU resources live as long as the GPU index

    def search_unit(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` for unit-row queries; id -1 and score -inf pad missing results."""
        if self.index is None:  # an empty gallery (an IVF one is built with its first vectors)
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        D, I = self.index.search(np.ascontiguousarray(q, np.float32), int(k))
        if self._positions is not None:
            I = np.where(I >= 0, self._positions[np.clip(I, 0, None)], -1)
        return np.where(I >= 0, D, -np.inf).astype(np.float32), I.astype(np.int64)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Validate and L2-normalise ``queries``, then :meth:`search_unit`."""
        from facepipe.gallery.index import check_vectors

        return self.search_unit(check_vectors(queries, None, "queries"), k)


def faiss_gpu_searcher(plan: SearchPlan, index: Any, dim: int,
                       vectors: Callable[[], tuple[np.ndarray, np.ndarray]]) -> FaissSearcher:
    """A faiss-gpu copy of ``index`` (IVF cloned, flat/HNSW as an exact ``GpuIndexFlatIP``)."""
    from facepipe.gallery.index import faiss_module

    faiss = faiss_module()
    gpu = int(plan.device.split(":")[1])
    res = faiss.StandardGpuResources()
    if plan.index == "ivf":
        return FaissSearcher(plan, faiss.index_cpu_to_gpu(res, gpu, faiss.extract_index_ivf(index)), None, res)
    ids, rows = vectors()
    flat = faiss.IndexFlatIP(dim)
    flat.add(rows)
    return FaissSearcher(plan, faiss.index_cpu_to_gpu(res, gpu, flat), np.asarray(ids, np.int64), res)


# ---------------------------------------------------------------------------------- torch

@contextlib.contextmanager
def _full_precision_reductions() -> Iterator[None]:
    """fp16/bf16 GEMMs accumulate in fp32 throughout (no reduced-precision split-K sums),
    which the re-rank's error bound assumes; the previous settings are restored."""
    import torch

    m = torch.backends.cuda.matmul
    old = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = old


def _order(vals: Any, pos: Any) -> tuple[Any, Any]:
    """Sort each row by score descending, equal scores by position (= id) ascending."""
    import torch

    pos, perm = torch.sort(pos, dim=1)
    vals = vals.gather(1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, pos.gather(1, perm)


class TorchSearcher:
    """Exact inner-product search over unit vectors held as a torch tensor (GPU or CPU).

    fp32: one matrix product per batch of probes, then ``torch.topk`` of ``k + 8`` and a
    (score desc, id asc) ordering; a row whose ``k``-th score ties the last fetched one is
    searched again with more candidates, so the tie order is exact. fp16/bf16 (and fp32
    under TF32, when a program enables it): the first pass rounds probe and vectors to
    the lower precision; its top ``k + 32`` are re-scored in fp32 from an exact copy. With
    unit rows and fp32 accumulation the first-pass score differs from the exact one by at
    most ``eps ≈ 3u + D·2⁻²¹`` (input rounding of both factors by Cauchy–Schwarz,
    accumulation, output rounding; ``u`` the unit roundoff; see :meth:`_eps`), so every vector left out
    scores at most ``t + eps`` (``t`` the lowest first-pass score fetched). When the
    ``k``-th re-ranked score is above that, the result is exact; otherwise the row is
    tried with 8× the candidates and then scored exactly against every vector.
    """

    def __init__(self, ids: np.ndarray, rows: np.ndarray, device: str = "cpu", precision: str = "fp32",
                 work_bytes: int = WORK_BYTES, rerank_on: str | None = None,
                 plan: SearchPlan | None = None) -> None:
        import torch

        precision = _check_choice(precision, PRECISIONS, "precision")
        ids = np.asarray(ids, np.int64)
        rows = np.asarray(rows, np.float32)
        if rows.ndim != 2 or len(ids) != len(rows):
            raise ShapeError(f"{len(ids)} ids for vectors of shape {rows.shape}")
        order = np.argsort(ids, kind="stable")  # positions in id order: ties by position = by id
        self.ids = ids[order]
        self.n, self.dim = rows.shape
        self.device = torch.device(device)
        self.precision = precision
        self.work_bytes = max(int(work_bytes), 1 << 20)
        self.plan = plan or SearchPlan("torch", str(self.device), True, precision, "built directly", "flat")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        host = torch.from_numpy(np.ascontiguousarray(rows[order]))
        try:
            self._m = host.to(dtype).to(self.device)  # converted on the host: no fp32 copy on the GPU
            if precision == "fp32":
                self._exact = self._m
            else:
                where = torch.device(rerank_on) if rerank_on else self.device
                self._exact = host.to(where)
        except torch.OutOfMemoryError as exc:
            raise DeviceUnavailableError(
                f"gallery search on {self.device}: out of GPU memory copying {self.n:,} vectors "
                f"({_gib(self.n * self.dim * (4 if precision == 'fp32' else 6))}); search on the CPU "
                "(--search-device cpu)") from exc
        self._dtype = dtype

    # ------------------------------------------------------------------ helpers

    def _roundoff(self) -> float | None:
        """Unit roundoff of the first pass; ``None`` when it is plain fp32 (exact)."""
        import torch

        if self.precision != "fp32":
            return ROUNDOFF[self.precision]
        if self.device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                           or torch.get_float32_matmul_precision() != "highest"):
            return ROUNDOFF["tf32"]
        return None

    def _eps(self, u: float) -> float:
        """Bound on |first-pass score − exact score| for unit rows: both factors rounded
        (``(1+u)² − 1``), fp32 accumulation over ``D`` terms (``D·2⁻²⁴``, taken 8× for
        hardware that accumulates less carefully), the output rounded (``u``); every term
        scaled by ``Σ|q̂ᵢm̂ᵢ| ≤ (1+u)²`` (Cauchy–Schwarz) and the rows' norms (1 ± 2⁻²⁰)."""
        grow = (1 + u) ** 2
        return ((grow - 1) + u * grow + self.dim * 2.0 ** -21 * grow) * (1 + 2.0 ** -20)

    def _rerank(self, Q: Any, pos: Any) -> Any:
        """Exact fp32 scores of the candidates ``pos`` (b, c) for probes ``Q`` (b, D).

        Element-wise products and sums, not a matmul, so TF32 never applies."""
        import torch

        b, c = pos.shape
        out = torch.empty((b, c), dtype=torch.float32, device=Q.device)
        step = max(1, self.work_bytes // max(1, c * self.dim * 4 * 2))
        for s in range(0, b, step):
            p = pos[s:s + step]
            cand = self._exact.index_select(0, p.reshape(-1).to(self._exact.device))
            cand = cand.view(p.shape[0], c, self.dim).to(Q.device)
            out[s:s + step] = (cand * Q[s:s + step, None, :]).sum(-1)
        return out

    def _exact_all(self, Q: Any) -> Any:
        """Exact fp32 scores of probes ``Q`` against every vector, in chunks of vectors."""
        import torch

        b = Q.shape[0]
        out = torch.empty((b, self.n), dtype=torch.float32, device=Q.device)
        step = max(1, self.work_bytes // max(1, b * self.dim * 4 * 2))
        for s in range(0, self.n, step):
            chunk = self._exact[s:s + step].to(Q.device)
            out[:, s:s + step] = (chunk[None, :, :] * Q[:, None, :]).sum(-1)
        return out

    def _topk_tied(self, S: Any, k: int) -> tuple[Any, Any]:
        """Top ``k`` of exact scores ``S`` (b, n) ordered (score desc, id asc), ties exact."""
        import torch

        b, n = S.shape
        vals = torch.empty((b, k), dtype=torch.float32, device=S.device)
        pos = torch.empty((b, k), dtype=torch.int64, device=S.device)
        todo = torch.arange(b, device=S.device)
        kc = min(n, k + PAD_EXACT)
        sub = S
        while True:
            v, p = torch.topk(sub, kc, dim=1, largest=True, sorted=True)
            v, p = _order(v.float(), p)
            done = torch.ones(len(todo), dtype=torch.bool, device=S.device) if kc == n else v[:, k - 1] > v[:, -1]
            vals[todo[done]], pos[todo[done]] = v[done, :k], p[done, :k]
            todo = todo[~done]
            if todo.numel() == 0:
                return vals, pos
            kc = min(n, kc * 4)
            sub = S[todo]

    def _search_chunk(self, Q: Any, k: int) -> tuple[Any, Any]:
        import torch

        u = self._roundoff()
        S = Q.to(self._dtype) @ self._m.T
        if u is None:
            return self._topk_tied(S, k)
        eps = self._eps(u)
        b, n = S.shape
        vals = torch.empty((b, k), dtype=torch.float32, device=Q.device)
        pos = torch.empty((b, k), dtype=torch.int64, device=Q.device)
        todo = torch.arange(b, device=Q.device)
        sub = S
        kc = min(n, k + max(PAD_REDUCED, k))
        for _ in range(2):
            v_lp, p = torch.topk(sub, kc, dim=1, largest=True, sorted=True)
            ex, p = _order(self._rerank(Q[todo], p), p)
            if kc == n:
                done = torch.ones(len(todo), dtype=torch.bool, device=Q.device)
            else:
                done = ex[:, k - 1] > v_lp[:, -1].float() + eps
            vals[todo[done]], pos[todo[done]] = ex[done, :k], p[done, :k]
            todo = todo[~done]
            if todo.numel() == 0:
                return vals, pos
            kc = min(n, kc * 8)
            sub = S[todo]
        del S, sub
        log.debug("%d probe(s) scored exactly against all %d vectors", todo.numel(), n)
        v, p = self._topk_tied(self._exact_all(Q[todo]), k)
        vals[todo], pos[todo] = v, p
        return vals, pos

    # ------------------------------------------------------------------ public

    def search_unit(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of shape ``(len(q), k)`` for unit-row queries, best first, equal
        scores by ascending id; id -1 and score -inf pad when ``k`` exceeds the vectors."""
        import torch

        q = np.ascontiguousarray(q, np.float32)
        k = int(k)
        if k < 1:
            raise ValueError("k must be at least 1")
        B = q.shape[0]
        scores = np.full((B, k), -np.inf, np.float32)
        ids = np.full((B, k), -1, np.int64)
        if self.n == 0 or B == 0:
            return scores, ids
        kk = min(k, self.n)
        per_row = self.n * (4 if self.precision == "fp32" else 2) * 2  # scores + top-k workspace
        step = max(1, min(B, self.work_bytes // per_row))
        try:
            with torch.inference_mode(), _full_precision_reductions():
                for s in range(0, B, step):
                    Q = torch.from_numpy(q[s:s + step]).to(self.device)
                    v, p = self._search_chunk(Q, kk)
                    scores[s:s + step, :kk] = v.cpu().numpy()
                    ids[s:s + step, :kk] = self.ids[p.cpu().numpy()]
        except torch.OutOfMemoryError as exc:
            raise DeviceUnavailableError(f"gallery search on {self.device} ran out of GPU memory "
                                         f"({self.n:,} vectors, {step} probes per step); search on the CPU "
                                         "(--search-device cpu)") from exc
        return scores, ids

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Validate and L2-normalise ``queries``, then :meth:`search_unit`."""
        from facepipe.gallery.index import check_vectors

        return self.search_unit(check_vectors(queries, self.dim, "queries"), k)


# ---------------------------------------------------------------------------------- building

def build_searcher(plan: SearchPlan, index: Any, dim: int,
                   vectors: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Searcher:
    """Build the engine ``plan`` names over a gallery's ``index``; ``vectors()`` returns
    ``(ids, unit rows)`` when a copy must be made (faiss-gpu flat, torch)."""
    if plan.engine == "faiss-cpu":
        return FaissSearcher(plan, index)
    if plan.engine == "faiss-gpu":
        if index is None or index.ntotal == 0:
            return FaissSearcher(plan, None)
        return faiss_gpu_searcher(plan, index, dim, vectors)
    ids, rows = vectors()
    return TorchSearcher(ids, rows, plan.device, plan.precision, plan.work_bytes or WORK_BYTES,
                         plan.rerank_on or None, plan)


def searcher_from_array(vectors: np.ndarray, ids: np.ndarray | None = None, device: str = "auto",
                        engine: str = "auto", precision: str = "fp32") -> Searcher:
    """The product's gallery search over a plain ``(N, D)`` array, as an exact flat gallery.

    Rows are L2-normalised; ``ids`` default to ``0..N-1``. The engine is chosen exactly as
    for a gallery opened with ``Gallery.to_device(device, engine, precision)``; the result's
    ``plan`` says which. Its ``search(queries, k)`` returns ``(scores, ids)``.
    """
    from facepipe.gallery.index import build_index, check_vectors

    x = check_vectors(vectors)
    n, dim = x.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    if ids.shape != (n,):
        raise ShapeError(f"{n} vectors but ids of shape {ids.shape}")
    plan = plan_search(device, "flat", n, dim, engine, precision)
    index = build_index("flat", dim, x, ids)[0] if plan.engine.startswith("faiss") else None
    return build_searcher(plan, index, dim, lambda: (ids, x))


def time_search(searcher: Searcher, probes: np.ndarray, k: int = 10, repeats: int = 5,
                warmup: int = 1) -> dict[str, Any]:
    """Time ``searcher.search(probes, k)`` (all probes in one call, results back on the host).

    Returns the plan, ``ms`` per call (median, min, all repeats), probes per second and the
    last result's ``scores``/``ids`` (for checking against a reference).
    """
    for _ in range(max(0, warmup)):
        searcher.search(probes, k)
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        scores, ids = searcher.search(probes, k)
        times.append((time.perf_counter() - t) * 1e3)
    med = float(np.median(times))
    return {"plan": searcher.plan.to_dict(), "n_probes": int(len(probes)), "k": int(k),
            "ms_median": med, "ms_min": float(min(times)), "ms_all": [float(t) for t in times],
            "probes_per_s": float(len(probes) / (med / 1e3)) if med > 0 else float("inf"),
            "scores": scores, "ids": ids}
