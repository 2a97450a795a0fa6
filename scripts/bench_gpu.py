#!/usr/bin/env python
"""Every stage's GPU figures in one prepared run (under 8 minutes on one H200-class GPU).

The project gets a GPU only now and then, for minutes at a time, so all GPU
measurements live in this one script: run it once on the GPU machine, bring its
JSON back, and record the figures in ``docs/gpu.md``. On the CPU it runs as a
dry run with tiny sizes (``--dry-run``), which is how CI-less changes to it are
checked before a GPU session.

Sections (each one timed, guarded and written to the JSON as soon as it ends, so
one failure or an exhausted time budget never loses the others):

* ``detectors``  -- images/s of each detector on batches of 640×480 photos (bf16 autocast);
* ``embedders``  -- faces/s of each embedder on batches of aligned crops (bf16, batch ≥ 256);
* ``training``   -- one optimiser step (forward + backward + update) of each trainable model;
* ``gallery``    -- 1,000 probes against 1M enrolled vectors: exact search on the GPU
  (torch matmul + top-k) next to FAISS on the host CPUs;
* ``video``      -- end-to-end ``process_video`` frames/s at 720p and 1080p.

Examples::

    python scripts/bench_gpu.py --dry-run --out /tmp/gpu_dry          # CPU, tiny sizes, ~1 min
    python scripts/bench_gpu.py --device cuda --out "$OUT" --budget-s 420

Input photos and clips come from ``$FACEPIPE_DATA`` (the layout of the shared
development data; a subset is enough: ``detection/caltech_webfaces_dev/images``,
``videos/``, ``identities/face_recognition_examples``); without it the script
falls back to scikit-image's astronaut photo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- helpers
class Budget:
    """Wall-clock budget shared by the sections."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = float(seconds)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_rate(fn: Callable[[], Any], items_per_call: int, device: str, min_seconds: float,
               max_calls: int = 1000, warmup: int = 2) -> dict[str, float]:
    """Items per second of ``fn`` after ``warmup`` calls, over at least ``min_seconds``."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    calls = 0
    while calls < max_calls:
        fn()
        calls += 1
        if time.perf_counter() - t0 >= min_seconds:
            break
    sync(device)
    dt = time.perf_counter() - t0
    return {"items_per_s": items_per_call * calls / dt, "calls": calls, "seconds": dt,
            "ms_per_call": 1000 * dt / calls}


def load_photos(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``n`` real photos resized to ``size`` (w, h), RGB uint8 (dev data, else the astronaut)."""
    import cv2

    from facepipe.datasets import data_root

    from facepipe.errors import InputError

    imgs: list[np.ndarray] = []
    try:
        d = data_root() / "detection" / "caltech_webfaces_dev" / "images"
    except InputError:
        d = Path("/nonexistent")
    if d.is_dir():
        from facepipe.io import load_image

        for p in sorted(d.iterdir())[: max(n, 1)]:
            try:
                imgs.append(cv2.resize(load_image(p), size, interpolation=cv2.INTER_AREA))
            except Exception as exc:  # noqa: BLE001 - a bad photo only shrinks the sample
                print(f"skip {p}: {exc}", file=sys.stderr)
    if not imgs:
        from skimage import data as skd

        imgs = [cv2.resize(skd.astronaut(), size, interpolation=cv2.INTER_AREA)]
    while len(imgs) < n:
        imgs.extend(imgs[: n - len(imgs)])
    return imgs[:n]


def machine(device: str) -> dict[str, Any]:
    import torch

    m: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                         "cpus": os.cpu_count(), "torch": torch.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        m.update({"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                  "sms": p.multi_processor_count})
    return m


# ----------------------------------------------------------------------------- sections
def bench_detectors(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    """Images/s per detector on same-size 640×480 batches."""
    from facepipe.detect import available_detectors, create_detector

    rows = []
    photos = load_photos(args.det_images, (640, 480))
    for name in args.detectors.split(","):
        if name not in available_detectors():
            rows.append({"detector": name, "skipped": "not registered"})
            continue
        if budget.left() < 20:
            rows.append({"detector": name, "skipped": "time budget"})
            continue
        kw: dict[str, Any] = {} if name == "haar" else {"device": args.device}
        det = create_detector(name, **kw)
        for bs in [int(b) for b in args.det_batches.split(",")]:
            batch = photos[:bs] if len(photos) >= bs else (photos * (bs // len(photos) + 1))[:bs]
            try:
                r = timed_rate(lambda: det.detect_batch(batch), bs, args.device, args.min_seconds)
                faces = sum(len(x) for x in det.detect_batch(batch[: min(8, bs)]))
                rows.append({"detector": name, "batch": bs, "size": "640x480",
                             "images_per_s": round(r["items_per_s"], 1),
                             "ms_per_batch": round(r["ms_per_call"], 2), "faces_in_first_8": faces})
            except Exception as exc:  # noqa: BLE001 - record and go on
                rows.append({"detector": name, "batch": bs, "error": f"{type(exc).__name__}: {exc}"})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def bench_embedders(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    """Faces/s per embedder on batches of crops (content does not change the cost)."""
    import cv2

    from facepipe.embed import available_embedders, load_embedder

    rows = []
    photos = load_photos(64, (256, 256))
    for name in args.embedders.split(","):
        if budget.left() < 20:
            rows.append({"embedder": name, "skipped": "time budget"})
            continue
        try:
            emb = load_embedder(name, device=args.device)
        except Exception as exc:  # noqa: BLE001 - optional embedders (peers) may be missing
            rows.append({"embedder": name, "skipped": f"{type(exc).__name__}: {exc}",
                         "available": available_embedders()})
            continue
        s = int(emb.crop_size)
        crops = np.stack([cv2.resize(p[40:216, 40:216], (s, s)) for p in photos])
        for bs in [int(b) for b in args.emb_batches.split(",")]:
            batch = np.concatenate([crops] * (bs // len(crops) + 1))[:bs]
            if hasattr(emb, "batch_size"):
                emb.batch_size = bs
            try:
                r = timed_rate(lambda: emb.embed(batch), bs, args.device, args.min_seconds)
                rows.append({"embedder": name, "id": emb.embedder_id, "crop": s, "batch": bs,
                             "flip_tta": bool(getattr(emb, "flip_tta", False)),
                             "faces_per_s": round(r["items_per_s"], 1), "ms_per_batch": round(r["ms_per_call"], 2)})
            except Exception as exc:  # noqa: BLE001
                rows.append({"embedder": name, "batch": bs, "error": f"{type(exc).__name__}: {exc}"})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def bench_gallery(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    """1,000 probes vs N vectors: exact GPU search (torch) and FAISS on the host CPUs."""
    import torch

    rows = []
    n, dim, nq = args.gallery_n, 128, args.gallery_queries
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n // 10 + 1, dim)).astype(np.float32)
    x = centres[np.arange(n) % len(centres)] + 0.4 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, nq, replace=False)] + 0.3 * rng.standard_normal((nq, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    # exact reference on a slice, to check the GPU answer
    k = 10
    dev = args.device
    xt = torch.from_numpy(x).to(dev)
    qt = torch.from_numpy(q).to(dev)
    for dtype in ([torch.float32, torch.bfloat16] if dev.startswith("cuda") else [torch.float32]):
        xd, qd = xt.to(dtype), qt.to(dtype)

        def search() -> Any:
            return torch.topk(qd @ xd.T, k, dim=1)

        r = timed_rate(search, nq, dev, args.min_seconds)
        ids = search().indices[:, 0].cpu().numpy()
        ref = np.argmax(q[:64] @ x.T, axis=1)
        rows.append({"engine": f"torch exact ({str(dtype).split('.')[-1]})", "n": n, "queries": nq,
                     "queries_per_s": round(r["items_per_s"], 1),
                     "ms_per_1000_queries": round(1000 * 1000 / r["items_per_s"], 3),
                     "top1_agrees_with_numpy_first_64": float(np.mean(ids[:64] == ref))})
        print(rows[-1], file=sys.stderr, flush=True)
    try:
        import faiss

        faiss.omp_set_num_threads(os.cpu_count() or 1)
        idx = faiss.IndexFlatIP(dim)
        idx.add(x)
        r = timed_rate(lambda: idx.search(q, k), nq, "cpu", args.min_seconds, warmup=1)
        rows.append({"engine": f"faiss IndexFlatIP, {os.cpu_count()} CPU threads", "n": n, "queries": nq,
                     "queries_per_s": round(r["items_per_s"], 1),
                     "ms_per_1000_queries": round(1000 * 1000 / r["items_per_s"], 3)})
        print(rows[-1], file=sys.stderr, flush=True)
        if budget.left() > 60:
            from facepipe.gallery import Gallery  # noqa: F401  (the product's index builder)
            from facepipe.gallery.index import build_index

            t0 = time.perf_counter()
            hnsw = build_index("hnsw", dim, x, np.arange(n, dtype=np.int64), {})
            build_s = time.perf_counter() - t0
            r = timed_rate(lambda: hnsw.search(q, k), nq, "cpu", args.min_seconds, warmup=1)
            rows.append({"engine": f"faiss HNSW (facepipe defaults), {os.cpu_count()} CPU threads", "n": n,
                         "queries": nq, "build_s": round(build_s, 1), "queries_per_s": round(r["items_per_s"], 1),
                         "ms_per_1000_queries": round(1000 * 1000 / r["items_per_s"], 3)})
            print(rows[-1], file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001
        rows.append({"engine": "faiss", "error": f"{type(exc).__name__}: {exc}"})
    return rows


def bench_training(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    """Seconds per optimiser step of each trainable model (forward + backward + update)."""
    rows: list[dict[str, Any]] = []
    for name, fn in TRAIN_STEPS.items():
        if budget.left() < 30:
            rows.append({"model": name, "skipped": "time budget"})
            continue
        try:
            rows.append({"model": name, **fn(args)})
        except Exception as exc:  # noqa: BLE001
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}",
                         "trace": traceback.format_exc(limit=3)})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _step_rate(step: Callable[[], Any], batch: int, args: argparse.Namespace) -> dict[str, Any]:
    r = timed_rate(step, batch, args.device, args.min_seconds, max_calls=200)
    return {"batch": batch, "ms_per_step": round(r["ms_per_call"], 2), "samples_per_s": round(r["items_per_s"], 1)}


def _embedder_step(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune step of the default embedder's network: multi-similarity loss on a labelled batch."""
    import torch
    from pytorch_metric_learning import losses

    from facepipe.embed import load_embedder

    emb = load_embedder("default", device=args.device)
    net = emb.net.train()
    for p in net.parameters():
        p.requires_grad_(True)
    bs = args.train_batch
    s = int(emb.crop_size)
    x = torch.randn(bs, 3, s, s, device=args.device)
    y = torch.arange(bs, device=args.device) // 4
    loss_fn = losses.MultiSimilarityLoss()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    fwd = getattr(net, "forward_unnormalised", net.forward)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            e = fwd(x)
        loss = loss_fn(torch.nn.functional.normalize(e.float(), dim=1), y)
        loss.backward()
        opt.step()

    out = _step_rate(step, bs, args)
    out["network"] = emb.embedder_id
    return out


#: Training-step benchmarks, filled in as models gain a step function.
TRAIN_STEPS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "embedder-finetune": _embedder_step,
}


def bench_video(args: argparse.Namespace, budget: Budget, out_dir: Path) -> dict[str, Any]:
    """``scripts/bench_video.py`` on this device (facepipe's batched pipeline only)."""
    import subprocess

    if budget.left() < 60:
        return {"skipped": "time budget"}
    js = out_dir / "video_gpu.json"
    cmd = [sys.executable, str(HERE / "bench_video.py"), "--device", args.device,
           "--batch-size", str(args.video_batch), "--frames", str(args.video_frames),
           "--detectors", args.video_detectors, "--skip", "per-frame,dlib", "--variants", "1:1",
           "--threads", str(min(8, os.cpu_count() or 1)), "--out", str(js)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, budget.left() - 15))
    res: dict[str, Any] = {"command": " ".join(cmd[1:]), "rc": p.returncode,
                           "seconds": round(time.perf_counter() - t0, 1), "stderr_tail": p.stderr[-3000:]}
    if js.is_file():
        res["result"] = json.loads(js.read_text())
    return res


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the point) or cpu (dry run)")
    ap.add_argument("--out", type=Path, required=True, help="folder for bench_gpu.json and logs")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting sections after this")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script end to end")
    ap.add_argument("--sections", default="detectors,embedders,gallery,training,video")
    ap.add_argument("--detectors", default="cnn,cnn-pyramid,mtcnn,haar")
    ap.add_argument("--det-images", type=int, default=64)
    ap.add_argument("--det-batches", default="1,32,64")
    ap.add_argument("--embedders", default="default,fast,dlib-port,mobilenet-v2")
    ap.add_argument("--emb-batches", default="256,1024")
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--gallery-n", type=int, default=1_000_000)
    ap.add_argument("--gallery-queries", type=int, default=1000)
    ap.add_argument("--video-frames", type=int, default=300)
    ap.add_argument("--video-batch", type=int, default=32)
    ap.add_argument("--video-detectors", default="cnn")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="timing window per measurement")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
        args.det_images, args.det_batches, args.emb_batches = 4, "1,4", "8"
        args.train_batch, args.gallery_n, args.gallery_queries = 8, 20_000, 50
        args.video_frames, args.video_batch, args.min_seconds = 8, 4, 0.3
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("bench_gpu: --device cuda but torch sees no GPU (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "command": "python scripts/bench_gpu.py " + " ".join(argv or sys.argv[1:]),
                              "machine": machine(args.device), "dry_run": args.dry_run, "sections": {}}
    js = args.out / "bench_gpu.json"

    def save() -> None:
        js.write_text(json.dumps(result, indent=2, default=str) + "\n")

    runners: dict[str, Callable[[], Any]] = {
        "detectors": lambda: bench_detectors(args, budget),
        "embedders": lambda: bench_embedders(args, budget),
        "gallery": lambda: bench_gallery(args, budget),
        "training": lambda: bench_training(args, budget),
        "video": lambda: bench_video(args, budget, args.out),
    }
    for sec in args.sections.split(","):
        t0 = time.perf_counter()
        print(f"== {sec} ({budget.left():.0f}s left)", file=sys.stderr, flush=True)
        try:
            result["sections"][sec] = runners[sec]()
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            result["sections"][sec] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            print(result["sections"][sec]["trace"], file=sys.stderr, flush=True)
        result.setdefault("section_seconds", {})[sec] = round(time.perf_counter() - t0, 1)
        save()
    result["total_seconds"] = round(time.perf_counter() - budget.t0, 1)
    save()
    print(json.dumps(result["section_seconds"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
