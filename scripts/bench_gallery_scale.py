#!/usr/bin/env python
"""Gallery scale benchmark: Flat, IVF and HNSW on clustered synthetic unit vectors.

For each gallery size the script draws ``size // per_id`` random identity centres on the
unit sphere and ``per_id`` noisy unit vectors around each (within-identity cosine about
0.7, like face embeddings), plus fresh probes of random enrolled identities. For each
index type, built by :func:`facepipe.gallery.build_index` exactly as a gallery builds it,
it measures:

* add time (including IVF k-means training),
* single-probe latency p50/p99 (one query per ``search`` call, top-1),
* batched throughput (all probes in one call),
* recall@1 against exact search (numpy matmul, independent of FAISS), and identity
  recall@1 (the returned vector belongs to the same identity as the exact nearest one,
  which is what the gallery's per-person decision needs),

sweeping IVF ``nprobe`` and HNSW ``efSearch``. It also times a whole gallery commit and
open (labels, sha256, atomic rename) with the exact Flat index.

Usage::

    python scripts/bench_gallery_scale.py --sizes 10000 100000 1000000 \
        --out docs/gallery_scale.json --plot docs/img/gallery_scale.png

``--device cuda`` runs the searches on the GPU (needs faiss-gpu): Flat and IVF are
cloned with ``index_cpu_to_gpu``; HNSW has no FAISS GPU version and is skipped there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facepipe.gallery import Gallery, build_index  # noqa: E402


def clustered(n: int, dim: int, per_id: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors in clusters of ``per_id`` and their identity centres."""
    rng = np.random.default_rng(seed)
    n_id = max(1, n // per_id)
    centres = rng.standard_normal((n_id, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    step = 200_000
    for s in range(0, n, step):
        e = min(n, s + step)
        x[s:e] = centres[np.arange(s, e) % n_id]
        x[s:e] += (noise / np.sqrt(dim)) * rng.standard_normal((e - s, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, centres


def probes(centres: np.ndarray, nq: int, noise: float, seed: int) -> np.ndarray:
    """Fresh noisy samples of random enrolled identities."""
    rng = np.random.default_rng(seed + 1)
    dim = centres.shape[1]
    q = centres[rng.integers(0, len(centres), nq)] + (noise / np.sqrt(dim)) * rng.standard_normal(
        (nq, dim), dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_top1(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact nearest neighbour by numpy matmul in chunks (the reference)."""
    best = np.full(len(q), -np.inf, np.float32)
    arg = np.zeros(len(q), np.int64)
    for s in range(0, len(x), 100_000):
        sc = q @ x[s:s + 100_000].T
        j = sc.argmax(1)
        v = sc[np.arange(len(q)), j]
        better = v > best
        best[better], arg[better] = v[better], j[better] + s
    return arg


def time_search(index: Any, q: np.ndarray, n_single: int, single_threads: int = 1) -> dict[str, float]:
    """Single-probe latency percentiles (``single_threads`` OpenMP threads) and batched throughput."""
    import faiss

    lat = []
    batch_threads = faiss.omp_get_max_threads()
    if single_threads:
        faiss.omp_set_num_threads(single_threads)
    index.search(q[:1], 1)  # warm-up
    for i in range(n_single):
        t = time.perf_counter()
        index.search(q[i:i + 1], 1)
        lat.append(time.perf_counter() - t)
    faiss.omp_set_num_threads(batch_threads)
    t = time.perf_counter()
    _, ids = index.search(q, 1)
    batch_s = time.perf_counter() - t
    lat_ms = np.asarray(lat) * 1e3
    return {
        "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
        "batch_ms": batch_s * 1e3, "batch_qps": len(q) / batch_s, "_ids": ids[:, 0],
    }


def to_gpu(index: Any, kind: str, x: np.ndarray, res: Any) -> Any:
    """A GPU copy of a CPU index (IVF cloned; Flat as a GpuIndexFlatIP)."""
    import faiss

    if kind == "ivf":
        return faiss.index_cpu_to_gpu(res, 0, faiss.extract_index_ivf(index))
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    return faiss.index_cpu_to_gpu(res, 0, flat)


def run_size(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """All index types at one gallery size."""
    import faiss

    x, centres = clustered(n, args.dim, args.per_id, args.noise, args.seed)
    q = probes(centres, args.queries, args.noise, args.seed)
    t = time.perf_counter()
    gt = exact_top1(x, q)
    exact_s = time.perf_counter() - t
    ids = np.arange(n, dtype=np.int64)
    rows: list[dict[str, Any]] = []
    n_single = min(args.queries, args.single)
    res = faiss.StandardGpuResources() if args.device == "cuda" else None
    for kind in args.kinds:
        if args.device == "cuda" and kind == "hnsw":
            continue
        params = {"ivf": {"nlist_requested": 0, "nprobe": 1}, "hnsw": {"M": args.hnsw_m,
                  "efConstruction": args.ef_construction, "efSearch": 16}}.get(kind, {})
        gc.collect()
        t = time.perf_counter()
        index, used = build_index(kind, args.dim, x, ids, params)
        add_s = time.perf_counter() - t
        if kind == "flat":
            sweep: list[tuple[str, int | None]] = [("", None)]
        elif kind == "ivf":
            sweep = [("nprobe", v) for v in (1, 4, 16, 64, 256) if v <= used["nlist"]]
        else:
            sweep = [("efSearch", v) for v in (16, 32, 64, 128, 256, 512)]
        for pname, pval in sweep:
            if pname == "nprobe":
                faiss.extract_index_ivf(index).nprobe = pval
            elif pname == "efSearch":
                faiss.downcast_index(index.index).hnsw.efSearch = pval
            target = index if res is None else to_gpu(index, kind, x, res)
            if res is not None and kind == "ivf":
                target.nprobe = pval
            m = time_search(target, q, n_single, args.single_threads)
            found = m.pop("_ids")
            row = {
                "size": n, "index": kind, "param": f"{pname}={pval}" if pname else "",
                "add_s": add_s, **m, "recall_at_1": float((found == gt).mean()),
                # same *identity* as the exact nearest neighbour: what the open-set decision needs
                "identity_recall_at_1": float((found % len(centres) == gt % len(centres)).mean()),
                "device": args.device,
            }
            if kind == "ivf":
                row["nlist"] = used["nlist"]
            rows.append(row)
            print(f"{n:>8} {kind:5} {row['param']:12} add {add_s:7.2f}s  p50 {m['p50_ms']:8.3f}ms  "
                  f"p99 {m['p99_ms']:8.3f}ms  batch {m['batch_qps']:9.0f} q/s  "
                  f"R@1 {row['recall_at_1']:.4f}  id-R@1 {row['identity_recall_at_1']:.4f}", flush=True)
        del index
    # end-to-end gallery commit + open (exact flat, labels, sha256, atomic rename)
    if args.device == "cpu" and not args.skip_gallery:
        tmp = Path(tempfile.mkdtemp(prefix="facepipe-bench-"))
        try:
            names = [f"id{i % len(centres)}" for i in range(n)]
            t = time.perf_counter()
            with Gallery.edit(tmp, embedder_id="synthetic@bench", dim=args.dim, index_type="flat") as g:
                g.add(x, names)
            commit_s = time.perf_counter() - t
            t = time.perf_counter()
            g2 = Gallery.open(tmp)
            open_s = time.perf_counter() - t
            t = time.perf_counter()
            dec = g2.identify(q[:100], top_k=1, threshold=-1.0)
            ident_ms = (time.perf_counter() - t) * 1e3 / 100
            ok = float(np.mean([d.name == names[j] for d, j in zip(dec, gt[:100])]))
            rows.append({"size": n, "index": "gallery-flat", "param": "", "commit_s": commit_s,
                         "open_s": open_s, "identify_ms_per_probe_batched": ident_ms,
                         "identify_agrees_with_exact": ok, "device": "cpu"})
            print(f"{n:>8} gallery commit {commit_s:.2f}s open {open_s:.2f}s identify "
                  f"{ident_ms:.3f} ms/probe (batch of 100), agrees {ok:.3f}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{n:>8} exact numpy reference for {len(q)} probes: {exact_s:.2f}s", flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Recall@1 vs single-probe p50 latency, one panel per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for kind, mk in (("flat", "s"), ("ivf", "o"), ("hnsw", "^")):
            rr = [r for r in rows if r["size"] == n and r["index"] == kind]
            if not rr:
                continue
            ax.plot([r["p50_ms"] for r in rr], [r["recall_at_1"] for r in rr], marker=mk, label=kind)
            for r in rr:
                if r["param"]:
                    ax.annotate(r["param"].split("=")[1], (r["p50_ms"], r["recall_at_1"]),
                                fontsize=7, xytext=(3, -8), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("single-probe latency p50 (ms, log)")
        ax.set_ylabel("recall@1 vs exact")
        ax.set_title(f"{n:,} vectors")
        ax.axhline(0.99, color="grey", lw=0.5, ls="--")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    """Parse options, run every size, write JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--per-id", type=int, default=10, help="vectors per synthetic identity")
    ap.add_argument("--noise", type=float, default=1.0, help="per-vector noise norm (1.0: cos to centre ~0.7)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=300, help="probes timed one at a time")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=64)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads for building and "
                    "batched search (0: all cores)")
    ap.add_argument("--single-threads", type=int, default=1, help="OpenMP threads while timing single "
                    "probes (1: one request per core, as a server would run them; 0: same as --threads)")
    ap.add_argument("--skip-gallery", action="store_true", help="skip the end-to-end gallery commit/open")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/gallery_scale.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/img/gallery_scale.png"))
    args = ap.parse_args()

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args.device == "cuda" and not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        sys.exit("--device cuda needs faiss with GPU support (faiss-gpu) and a visible GPU")
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for n in args.sizes:
        rows.extend(run_size(n, args))
        write(rows, args, t0)  # after every size, so a long run keeps what it measured
    print(f"wrote {args.out} and {args.plot} in {time.time() - t0:.0f}s")


def write(rows: list[dict[str, Any]], args: argparse.Namespace, t0: float) -> None:
    """Write the JSON results (with the command, machine and date) and the plot."""
    import faiss

    meta = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU core(s), {platform.platform()}",
        "faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads(),
        "single_probe_threads": args.single_threads or faiss.omp_get_max_threads(),
        "load_average_at_end": os.getloadavg(), "total_s": time.time() - t0,
        "data": {"dim": args.dim, "per_id": args.per_id, "noise": args.noise, "queries": args.queries,
                 "single_probe_timed": args.single, "seed": args.seed},
        "hnsw": {"M": args.hnsw_m, "efConstruction": args.ef_construction},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    plot([r for r in rows if "p50_ms" in r], args.plot)


if __name__ == "__main__":
    main()
