#!/usr/bin/env python
"""GPU gallery search through the product's own path: 1,000 probes against N vectors.

For each size the script draws clustered unit vectors (identities of ``--per-id`` noisy
vectors around random centres, like face embeddings) and fresh probes, builds the
product's searcher with :func:`facepipe.gallery.search.searcher_from_array` (the engine a
gallery's ``to_device`` would pick: faiss-gpu when installed, else exact torch search) for
each ``--precisions``, and times with :func:`facepipe.gallery.search.time_search`:

* batched: all probes in one ``search`` call, results back on the host (median of repeats);
* single: one probe per call (what ``identify`` does per image), p50/p99;
* agreement with exact numpy search (float64 top-1 and the top-k ids wherever the
  reference has no near-tie), so a fast but wrong engine shows.

``--cpu-reference`` also times FAISS on the CPU (faiss-cpu flat, all cores) for the ratio.

Usage (the GPU benchmark, ~2 minutes on one GPU)::

    python scripts/bench_gallery_gpu.py --sizes 100000 1000000 --dim 512 --probes 1000 \\
        --out docs/gallery_gpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facepipe.gallery.search import searcher_from_array, time_search  # noqa: E402


def clustered(n: int, nq: int, dim: int, per_id: int, noise: float, seed: int,
              device: str) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clustered unit vectors and ``nq`` probes of random identities (drawn with torch,
    on the GPU when there is one: 1M x 512 in a second instead of a minute)."""
    import torch

    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator(device=dev).manual_seed(seed)
    n_id = max(1, n // per_id)
    centres = torch.randn(n_id, dim, generator=g, device=dev)
    centres /= centres.norm(dim=1, keepdim=True)
    x = centres[torch.arange(n, device=dev) % n_id] + (noise / dim ** 0.5) * torch.randn(n, dim, generator=g, device=dev)
    x /= x.norm(dim=1, keepdim=True)
    pick = torch.randint(0, n_id, (nq,), generator=g, device=dev)
    q = centres[pick] + (noise / dim ** 0.5) * torch.randn(nq, dim, generator=g, device=dev)
    q /= q.norm(dim=1, keepdim=True)
    return x.cpu().numpy(), q.cpu().numpy()


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by numpy (float32 matmul in chunks, scores re-checked in float64)."""
    best_s = np.full((len(q), 0), -np.inf)
    best_i = np.zeros((len(q), 0), np.int64)
    for s in range(0, len(x), 100_000):
        sc = q @ x[s:s + 100_000].T
        j = np.argpartition(-sc, min(k, sc.shape[1] - 1), axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(sc, j, 1)], 1)
        best_i = np.concatenate([best_i, j + s], 1)
        o = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, o, 1), np.take_along_axis(best_i, o, 1)
    exact = np.einsum("qd,qkd->qk", q.astype(np.float64), x[best_i].astype(np.float64))
    o = np.lexsort((best_i, -exact), axis=1)
    return np.take_along_axis(exact, o, 1), np.take_along_axis(best_i, o, 1)


def agreement(ids: np.ndarray, ref_s: np.ndarray, ref_i: np.ndarray, tol: float = 1e-5) -> dict[str, float]:
    """Top-1 agreement and top-k id agreement where the reference has no near-tie."""
    gap = np.full(ref_s.shape, np.inf)
    d = np.abs(np.diff(ref_s, axis=1))
    gap[:, 1:] = np.minimum(gap[:, 1:], d)
    gap[:, :-1] = np.minimum(gap[:, :-1], d)
    clear = gap > tol
    return {"top1_agrees": float((ids[:, 0] == ref_i[:, 0]).mean()),
            "topk_agrees_where_no_near_tie": float((ids[clear] == ref_i[clear]).mean()),
            "topk_positions_checked": float(clear.mean())}


def single_latency(searcher: Any, q: np.ndarray, k: int, n: int) -> dict[str, float]:
    """p50/p99 of one-probe calls."""
    searcher.search(q[:1], k)
    lat = []
    for i in range(min(n, len(q))):
        t = time.perf_counter()
        searcher.search(q[i:i + 1], k)
        lat.append((time.perf_counter() - t) * 1e3)
    return {"single_p50_ms": float(np.percentile(lat, 50)), "single_p99_ms": float(np.percentile(lat, 99))}


def main() -> None:
    """Parse options, run every size and precision, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--per-id", type=int, default=10)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--device", default="cuda", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--engine", default="auto", choices=["auto", "faiss", "torch"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "bf16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--single", type=int, default=200, help="probes timed one per call")
    ap.add_argument("--cpu-reference", action=argparse.BooleanOptionalAction, default=True,
                    help="also time faiss-cpu flat (all cores) on the same data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/gallery_gpu.json"))
    args = ap.parse_args()

    import faiss
    import torch

    from facepipe.device import describe_machine

    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for n in args.sizes:
        t = time.perf_counter()
        x, q = clustered(n, args.probes, args.dim, args.per_id, args.noise, args.seed, args.device)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        ref_s, ref_i = exact_topk(x, q, args.k)
        ref_time = time.perf_counter() - t
        print(f"{n:>9} vectors x {args.dim}: data {gen_s:.1f}s, numpy exact reference {ref_time:.1f}s", flush=True)
        runs: list[tuple[str, str, str]] = [(args.device, args.engine, p) for p in args.precisions]
        if args.cpu_reference:
            runs.append(("cpu", "faiss", "fp32"))
        for device, engine, precision in runs:
            t = time.perf_counter()
            s = searcher_from_array(x, device=device, engine=engine, precision=precision)
            build_s = time.perf_counter() - t
            r = time_search(s, q, args.k, repeats=args.repeats if device != "cpu" else 1)
            ids = r.pop("ids")
            r.pop("scores")
            row = {"size": n, "dim": args.dim, **r, "build_s": build_s, **agreement(ids, ref_s, ref_i),
                   **single_latency(s, q, args.k, args.single if device != "cpu" else 20)}
            rows.append(row)
            p = row["plan"]
            print(f"{n:>9} {p['engine']:9} {p['device']:7} {p['precision']:5} batch of {args.probes}: "
                  f"{row['ms_median']:9.2f} ms ({row['probes_per_s']:10.0f} probes/s)  single p50 "
                  f"{row['single_p50_ms']:.3f} ms  top-1 agrees {row['top1_agrees']:.4f}  top-k "
                  f"{row['topk_agrees_where_no_near_tie']:.4f}  build {build_s:.1f}s", flush=True)
            del s
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    gpu = None
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        gpu = {"name": torch.cuda.get_device_name(0), "total_gib": total / 2 ** 30,
               "cuda": torch.version.cuda}
    meta = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": describe_machine(), "platform": platform.platform(), "gpu": gpu,
            "torch": torch.__version__, "faiss": faiss.__version__,
            "faiss_gpus": int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0,
            "data": {"per_id": args.per_id, "noise": args.noise, "probes": args.probes, "k": args.k,
                     "seed": args.seed}, "total_s": time.time() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
