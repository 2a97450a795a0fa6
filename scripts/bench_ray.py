"""Throughput of the local engine vs the Ray engine (1 and 2 workers) on a folder of clips
and a folder of photos, Ray's start-up and per-item overhead, and per-stage costs for the
scaling estimate in docs/scaling.md.

Every run goes through the same library calls the commands make
(:func:`facepipe.engine.work.run_video_job`, :func:`facepipe.engine.work.analyze_images`)
with the engines of :mod:`facepipe.engine`, so the figures are the commands' minus
argument parsing. The Ray instance is started once (its start-up is measured
separately), then every configuration runs in one process, one after the other, so
the ratios come from one run on one machine.

    python scripts/bench_ray.py --out docs/scaling_bench.json

GPU machine (the lead's scripts/bench_gpu.py): call :func:`gpu_video_throughput`,
or run ``python scripts/bench_ray.py --device cuda --videos-only --out ray_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _noop(state: Any, item: Any, progress: Any = None) -> Any:
    """Work that does nothing: what is left is the engine's own cost per item."""
    return item


def _none() -> None:
    return None


def _sleep(state: Any, item: float, progress: Any = None) -> float:
    """Work that waits ``item`` seconds without using a core (the engine's parallelism alone)."""
    time.sleep(item)
    return item


def engine_scaling(workers: list[int], items: int = 48, seconds: float = 0.5) -> list[dict[str, Any]]:
    """Items/s of work that only waits, for each worker count: what the engine's scheduling
    gives when cores are not the limit (a Ray instance must be running with enough CPUs).
    ``startup_s``: until every worker has returned its first item (actor processes start);
    ``steady_items_per_s``: the items after those, over the time after."""
    from facepipe.engine import WorkerFactory, create_engine

    rows = []
    for w in workers:
        eng = create_engine("ray", workers=w)
        t0 = time.perf_counter()
        done = [time.perf_counter() - t0 for o in eng.map(WorkerFactory(_none), _sleep, [seconds] * items)
                if o.ok]
        wall = done[-1]
        start = done[w - 1]
        rows.append({"workers": w, "items": len(done), "item_s": seconds, "wall_s": round(wall, 3),
                     "startup_s": round(start, 3),
                     "steady_items_per_s": round((len(done) - w) / (wall - start), 3),
                     "ideal_items_per_s": round(w / seconds, 3)})
    return rows


def make_clips(dest: Path, copies: int, frames: int) -> list[Path]:
    """``copies`` copies of each shared clip (the first ``frames`` frames, re-encoded at 640x360)."""
    import cv2

    from facepipe.datasets import data_root

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sorted((data_root() / "videos").glob("*.mp4")):
        first = dest / f"{src.stem}_0.mp4"
        cap = cv2.VideoCapture(str(src))
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        vw = cv2.VideoWriter(str(first), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 360))
        n = 0
        while n < frames:
            ok, img = cap.read()
            if not ok:
                break
            vw.write(cv2.resize(img, (640, 360), interpolation=cv2.INTER_AREA))
            n += 1
        vw.release()
        cap.release()
        out.append(first)
        for k in range(1, copies):
            p = dest / f"{src.stem}_{k}.mp4"
            shutil.copy(first, p)
            out.append(p)
    return out


def list_photos(n: int) -> list[Path]:
    """The first ``n`` photos of LFW's DevTrain people (real faces, 250x250)."""
    from facepipe.datasets import data_root

    root = data_root() / "identities" / "lfw_devtrain"
    photos = sorted(p for p in root.rglob("*.jpg"))
    return photos[:n]


def run_videos(engine: Any, clips: list[Path], out: Path, detector: str, embedder: str | None,
               device: str, min_size: int) -> dict[str, Any]:
    """All clips through ``engine``: wall time, frames/s, summed per-stage seconds."""
    from facepipe.engine import WorkerFactory
    from facepipe.engine.work import VideoJob, run_video_job
    from facepipe.video import build_analyzer, output_paths

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    factory = WorkerFactory(build_analyzer, detector, embedder, None, device, {"min_size": min_size})
    jobs = [VideoJob(p, output_paths(out, p.name), {"max_gap_s": 1.0}, {"annotate": False, "settings": {}})
            for p in clips]
    t0 = time.perf_counter()
    outcomes = list(engine.map(factory, run_video_job, jobs))
    wall = time.perf_counter() - t0
    bad = [o.error for o in outcomes if not o.ok]
    if bad:
        raise RuntimeError(f"video runs failed: {bad}")
    frames = sum(o.value.frames for o in outcomes)
    stages: dict[str, float] = {}
    for o in outcomes:
        for k, v in o.value.timings.items():
            stages[k] = stages.get(k, 0.0) + v
    return {"items": len(jobs), "frames": frames, "faces": sum(o.value.faces for o in outcomes),
            "wall_s": round(wall, 3), "frames_per_s": round(frames / wall, 2),
            "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
            "stage_ms_per_frame": {k: round(1000 * v / frames, 3) for k, v in stages.items()}}


def run_photos(engine: Any, photos: list[Path], detector: str, embedder: str, device: str,
               shard: int) -> dict[str, Any]:
    """All photos through ``engine`` in shards of ``shard``: wall time, images/s, faces."""
    from facepipe.builders import build_pipeline
    from facepipe.engine import WorkerFactory
    from facepipe.engine.work import map_images

    factory = WorkerFactory(build_pipeline, detector, embedder, device, None)
    t0 = time.perf_counter()
    results = list(map_images(engine, factory, photos, shard))
    wall = time.perf_counter() - t0
    faces = sum(len(r.faces) for r in results)
    return {"items": len(photos), "faces": faces, "failed": sum(r.error is not None for r in results),
            "wall_s": round(wall, 3), "images_per_s": round(len(photos) / wall, 2)}


def gpu_video_throughput(clips: list[Path] | None = None, workers: int = 0, detector: str = "mtcnn",
                         embedder: str | None = "default", copies: int = 4, frames: int = 120,
                         gpus_per_worker: float | None = None) -> dict[str, Any]:
    """Video frames/s through the Ray engine on this machine's GPUs (for scripts/bench_gpu.py).

    Starts (or joins, with ``RAY_ADDRESS``) a Ray instance, runs ``clips`` (default: the
    shared clips, ``copies`` copies of their first ``frames`` frames at 640x360) with
    one worker per GPU (``workers`` 0) or ``workers`` workers sharing the GPUs
    (``gpus_per_worker`` e.g. 0.5 for two workers per GPU), and returns frames/s,
    per-stage ms per frame, the worker layout and the GPU name. Models load once per
    worker before the clock starts (a warm-up item per worker).
    """
    import torch

    from facepipe.engine import create_engine

    with tempfile.TemporaryDirectory(prefix="bench_ray_gpu_") as tmp:
        tmpd = Path(tmp)
        clips = clips or make_clips(tmpd / "clips", copies, frames)
        engine = create_engine("ray", os.environ.get("RAY_ADDRESS"), workers, device="cuda",
                               gpus_per_worker=gpus_per_worker, keep_workers=True)
        try:
            run_videos(engine, clips[: max(1, engine.workers)], tmpd / "warm", detector, embedder, "cuda", 40)
            res = run_videos(engine, clips, tmpd / "out", detector, embedder, "cuda", 40)
        finally:
            engine.close()
        res.update(engine=engine.describe(), detector=detector, embedder=embedder,
                   gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=3, help="copies of each shared clip")
    ap.add_argument("--frames", type=int, default=60, help="frames kept of each shared clip")
    ap.add_argument("--photos", type=int, default=96, help="LFW photos")
    ap.add_argument("--detector", default="haar")
    ap.add_argument("--embedder", default="untrained",
                    help="embedder for the photos (and the videos, unless --no-video-embedder); "
                         "'untrained' has the default network's cost without needing its checkpoint")
    ap.add_argument("--no-video-embedder", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to run")
    ap.add_argument("--videos-only", action="store_true")
    ap.add_argument("--noop-items", type=int, default=200)
    ap.add_argument("--local-threads", type=int, default=1)
    ap.add_argument("--engine-only", action="store_true",
                    help="only Ray's overheads and the scaling of waiting work over 1, 2, 4, 8 workers")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import cv2
    import torch

    from facepipe.device import describe_machine
    from facepipe.engine import LocalEngine, WorkerFactory, create_engine

    # Each Ray worker runs one core's worth of threads (the engine's default); the local
    # engine gets --local-threads (1 by default: the same per process, and on a busy machine
    # what `facepipe --threads 1` recommends; 0 = PyTorch's default, all cores).
    if args.local_threads:
        torch.set_num_threads(args.local_threads)
        cv2.setNumThreads(args.local_threads)
    emb_video = None if args.no_video_embedder else args.embedder
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "machine": describe_machine(), "load_avg_at_start": os.getloadavg(),
                           "command": "python " + " ".join(sys.argv), "detector": args.detector,
                           "local_threads": torch.get_num_threads(),
                           "embedder": args.embedder, "video_embedder": emb_video, "device": args.device,
                           "runs": []}
    if args.engine_only:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=8, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
        res["ray_init_s"] = round(time.perf_counter() - t0, 3)
        res["ray_num_cpus"] = 8
        try:
            res["engine_scaling"] = engine_scaling([1, 2, 4, 8])
        finally:
            ray.shutdown()
        text = json.dumps(res, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        tmpd = Path(tmp)
        clips = make_clips(tmpd / "clips", args.copies, args.frames)
        photos = [] if args.videos_only else list_photos(args.photos)
        res["clips"] = {"count": len(clips), "frames_each_max": args.frames, "size": "640x360"}
        res["photos"] = len(photos)

        def one(engine: Any, label: str) -> None:
            row: dict[str, Any] = {"engine": label}
            print(f"{label}: videos ...", file=sys.stderr)
            row["videos"] = run_videos(engine, clips, tmpd / "out", args.detector, emb_video, args.device, 40)
            if photos:
                print(f"{label}: photos ...", file=sys.stderr)
                row["photos"] = run_photos(engine, photos, args.detector, args.embedder, args.device, 16)
            res["runs"].append(row)
            print(json.dumps(row), file=sys.stderr)

        one(LocalEngine(), "local")
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), object_store_memory=256 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
        res["ray_init_s"] = round(time.perf_counter() - t0, 3)
        try:
            # Engine overhead: actor start-up (first item) and per item, with work that does nothing.
            eng = create_engine("ray", workers=1)
            items = list(range(args.noop_items))
            t0 = time.perf_counter()
            first = None
            for _ in eng.map(WorkerFactory(_none), _noop, items):
                if first is None:
                    first = time.perf_counter() - t0
            total = time.perf_counter() - t0
            res["ray_overhead"] = {"first_item_s": round(first or 0.0, 3),
                                   "per_item_ms": round(1000 * (total - (first or 0.0)) / max(1, len(items) - 1), 3),
                                   "items": len(items)}
            for w in [int(x) for x in args.workers.split(",") if x]:
                one(create_engine("ray", workers=w, device=args.device), f"ray-{w}")
        finally:
            ray.shutdown()
    local = res["runs"][0]
    for row in res["runs"]:
        row["videos"]["speedup_vs_local"] = round(local["videos"]["wall_s"] / row["videos"]["wall_s"], 3)
        if "photos" in row:
            row["photos"]["speedup_vs_local"] = round(local["photos"]["wall_s"] / row["photos"]["wall_s"], 3)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
