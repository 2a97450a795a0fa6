"""FAISS indexes for a gallery: building each index type and its search parameters.

Vectors are compared by inner product on L2-normalised vectors (cosine similarity, higher
is more similar). Index types: ``flat`` (exact ``IndexFlatIP`` in an ``IndexIDMap2``),
``ivf`` (``IndexIVFFlat`` with its own ids, approximate, trained k-means cells) and
``hnsw`` (``IndexHNSWFlat`` in an ``IndexIDMap2``, approximate graph search). ``auto``
uses ``flat`` below :data:`AUTO_HNSW_FROM` vectors and ``hnsw`` from there on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from facepipe.errors import GalleryError, ShapeError

INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
#: ``auto`` switches from exact ``flat`` to ``hnsw`` at this many vectors.
AUTO_HNSW_FROM = 200_000
DEFAULT_PARAMS: dict[str, dict[str, int]] = {
    "flat": {},
    "ivf": {"nlist": 0, "nprobe": 16},  # nlist 0: chosen from the size when trained
    "hnsw": {"M": 32, "efConstruction": 64, "efSearch": 128},
}


def check_vectors(vectors: np.ndarray, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    """Validate and L2-normalise a ``(N, D)`` float array; returns a contiguous float32 copy.

    Raises :class:`ShapeError` for a wrong shape, non-finite values or zero rows.
    """
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise ShapeError(f"{what} must be a 2-D array (N, D), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ShapeError(f"{what} have dimension {arr.shape[1]}, the gallery expects {dim}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ShapeError(f"{what} must be floating point, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32).copy()
    if arr.size and not np.isfinite(arr).all():
        raise ShapeError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1)
    if arr.shape[0] and (norms < 1e-12).any():
        raise ShapeError(f"{what}: {int((norms < 1e-12).sum())} row(s) have zero length")
    if arr.shape[0]:
        arr /= norms[:, None]
    return arr


def faiss_module() -> Any:
    """The ``faiss`` module, imported on first use (it is slow to import)."""
    import faiss

    return faiss


def ivf_nlist(n: int, requested: int = 0) -> int:
    """IVF cell count: ``4*sqrt(n)`` (or the request), at most ``n // 39`` so k-means is fed."""
    want = requested if requested > 0 else int(round(4 * math.sqrt(max(n, 1))))
    return max(1, min(want, max(n // 39, 1)))


def build_index(kind: str, dim: int, vectors: np.ndarray, ids: np.ndarray,
                params: dict[str, int] | None = None) -> tuple[Any, dict[str, int]]:
    """Build a FAISS inner-product index of ``kind`` holding ``vectors`` under ``ids``.

    Returns the index and the parameters actually used (IVF records its ``nlist`` and
    how many vectors it was trained on). ``vectors`` must already be unit rows.
    """
    faiss = faiss_module()
    p = dict(DEFAULT_PARAMS[kind])
    p.update(params or {})
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(p["efConstruction"])
        inner.hnsw.efSearch = int(p["efSearch"])
        index = faiss.IndexIDMap2(inner)
    elif kind == "ivf":
        n = len(vectors)
        if n == 0:
            raise GalleryError("<gallery>", "an IVF index needs vectors to train on; enrol someone first")
        nlist = ivf_nlist(n, int(p.get("nlist_requested", 0)))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on at most 64 points per cell (a fixed random subset) for 10 iterations:
        # enough for well-placed cells, and trains 4,000 cells over 1M vectors in seconds
        cap = 64 * nlist
        train = vectors if n <= cap else vectors[np.random.default_rng(0).choice(n, cap, replace=False)]
        index.cp.niter = 10
        index.train(train)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = int(p["nprobe"])
        p["nlist"] = nlist
        p["trained_on"] = int(n)
        p.setdefault("nlist_requested", 0)
    else:
        raise GalleryError("<gallery>", f"unknown index type {kind!r}; valid: {', '.join(INDEX_TYPES)}")
    if len(vectors):
        index.add_with_ids(vectors, ids)
    return index, p


def apply_search_params(index: Any, kind: str, params: dict[str, int]) -> None:
    """Set the search-time parameters of a loaded index (IVF ``nprobe``, HNSW ``efSearch``)."""
    faiss = faiss_module()
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(params.get("nprobe", 16))
    elif kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = int(params.get("efSearch", 128))


def resolve_kind(requested: str, n: int) -> str:
    """The index type to use for ``n`` vectors when ``requested`` (``auto`` picks by size)."""
    if requested == "auto":
        return "hnsw" if n >= AUTO_HNSW_FROM else "flat"
    return requested
