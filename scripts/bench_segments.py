"""How one long video parallelises in time segments: the single pass vs segments on 1 and
2 Ray workers, the warm-up's cost, and seeking vs decoding from the start.

The clip is generated from the two shared clips (facepipe's development data): their
frames, at 640x360, one after the other and again (camera cuts between them) until
``--seconds`` of video at 29.97 fps, written with OpenCV (MPEG-4 part 2). Every
configuration runs the library calls the ``video`` command makes
(:func:`facepipe.engine.work.map_videos`), one after the other in one process, and the
outputs of every configuration are compared with the single pass's (frames JSONL and
tracks CSV/JSON byte for byte).

    python scripts/bench_segments.py --out docs/scaling_segments.json
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

FPS = 30000 / 1001


def make_long_clip(path: Path, seconds: float) -> dict[str, Any]:
    """The shared clips' frames (640x360) one after the other until ``seconds`` of video."""
    import cv2

    from facepipe.datasets import data_root

    sources = []
    for src in sorted((data_root() / "videos").glob("*.mp4")):
        cap = cv2.VideoCapture(str(src))
        frames = []
        while True:
            ok, img = cap.read()
            if not ok:
                break
            frames.append(cv2.resize(img, (640, 360), interpolation=cv2.INTER_AREA))
        cap.release()
        sources.append(frames)
    want = int(round(seconds * FPS))
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (640, 360))
    n = cuts = 0
    while n < want:
        for frames in sources:
            cuts += 1
            for img in frames:
                if n == want:
                    break
                vw.write(img)
                n += 1
    vw.release()
    return {"frames": n, "fps": round(FPS, 3), "seconds": round(n / FPS, 2), "size": "640x360",
            "codec": "mp4v", "source_switches": cuts - 1}


def seek_cost(path: Path, fractions: tuple[float, ...] = (0.25, 0.5, 0.75)) -> list[dict[str, Any]]:
    """Seconds to reach a frame by seeking vs by decoding every frame before it (grab only),
    and the first frame reached either way compared (pixels and timestamp)."""
    from facepipe.video.reading import VideoReader, probe_video

    n = probe_video(path).frame_count
    rows = []
    for f in fractions:
        start = int(n * f)
        row: dict[str, Any] = {"start_frame": start}
        first = {}
        for seek in (True, False):
            t0 = time.perf_counter()
            with VideoReader(path, batch_size=1, start=start, stop=start + 1, seek=seek) as r:
                fr = next(iter(r))[0]
            row["seek_s" if seek else "decode_from_start_s"] = round(time.perf_counter() - t0, 3)
            first[seek] = (fr.index, fr.time, fr.image.tobytes() if fr.image is not None else None)
        row["same_frame"] = first[True] == first[False]
        rows.append(row)
    return rows


def _timed_piece(analyzer: Any, piece: Any, progress: Any = None) -> Any:
    """:func:`facepipe.engine.work.run_video_piece`, adding the CPU seconds its process spent
    on it (all threads: the decoder's too) to the result's timings as ``cpu``. A worker
    runs one piece at a time, so the process's usage over the call is the piece's."""
    import resource

    from facepipe.engine.work import Split, run_video_piece

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    c0 = cpu()
    value = run_video_piece(analyzer, piece, progress)
    if not isinstance(value, Split):
        value.timings["cpu"] = cpu() - c0
    return value


def run(engine: Any, clip: Path, out: Path, segment_seconds: float, overlap: float, stride: int,
        detector: str, embedder: str | None) -> dict[str, Any]:
    """The clip through ``engine``: wall time, frames/s, CPU seconds, pieces and their seconds."""
    from facepipe.engine import WorkerFactory
    from facepipe.engine.work import JoinJob, SegmentJob, VideoJob, map_videos
    from facepipe.video import build_analyzer, output_paths

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    factory = WorkerFactory(build_analyzer, detector, embedder, None, "cpu", {"min_size": 40})
    job = VideoJob(clip, output_paths(out, clip.name), {"max_gap_s": 1.0},
                   {"stride": stride, "batch_size": 16, "annotate": True, "settings": {}})
    pieces: list[Any] = []
    t0 = time.perf_counter()
    [o] = list(map_videos(engine, factory, [job], segment_seconds=segment_seconds, overlap_seconds=overlap,
                          on_piece=lambda p: pieces.append((time.perf_counter() - t0, p)), work=_timed_piece))
    wall = time.perf_counter() - t0
    if not o.ok:
        raise RuntimeError(o.error)
    segs = [p for _, p in pieces if isinstance(p.item, SegmentJob)]
    joins = [(t, p) for t, p in pieces if isinstance(p.item, JoinJob)]
    cpu = sum(p.value.timings.get("cpu", 0.0) for _, p in pieces if p.ok and hasattr(p.value, "timings"))
    row: dict[str, Any] = {"segments": len(segs), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                           "annotate_s": round(o.value.timings.get("annotate", 0.0), 2),
                           "frames_per_s": round(o.value.frames / wall, 2), "frames": o.value.frames,
                           "tracks": len(o.value.tracks)}
    if segs:
        warm = sum(p.item.segment.start - p.item.segment.warm for p in segs)
        row["segment_seconds_each"] = [round(p.value.seconds, 2) for p in segs]
        row["warm_up_frames"] = warm
        row["warm_up_share"] = round(warm / o.value.frames, 4)
        row["redone_without_seek"] = sum(not p.item.segment.seek for p in segs)
        row["decoded_from_start"] = sum(not p.value.seeked for p in segs if p.item.segment.warm > 0)
        if joins:
            t_last_seg = max(t for t, p in pieces if isinstance(p.item, SegmentJob))
            row["join_s"] = round(joins[0][0] - t_last_seg, 2)      # serial: join, write, annotate
            row["join_annotate_s"] = round(o.value.timings.get("annotate", 0.0), 2)
    return row


def same_outputs(a: Path, b: Path) -> bool:
    """Frames JSONL and tracks CSV/JSON byte-identical (the annotated MP4 is drawn from the JSONL)."""
    names = [p.name for p in a.iterdir() if p.suffix in (".jsonl", ".csv") or p.name.endswith(".tracks.json")]
    return bool(names) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the generated clip")
    ap.add_argument("--segment-seconds", type=float, default=15.0)
    ap.add_argument("--overlap", type=float, default=2.0)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--detector", default="haar")
    ap.add_argument("--embedder", default=None, help="e.g. 'untrained' (the default network's cost)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--rounds", type=int, default=2, help="repeat every configuration, interleaved")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import cv2
    import ray
    import torch

    from facepipe.device import describe_machine
    from facepipe.engine import LocalEngine, create_engine

    torch.set_num_threads(1)          # one core's worth per process: the Ray workers' setting too
    cv2.setNumThreads(1)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "machine": describe_machine(), "load_avg_at_start": os.getloadavg(),
                           "command": "python " + " ".join(sys.argv), "detector": args.detector,
                           "embedder": args.embedder, "stride": args.stride,
                           "segment_seconds": args.segment_seconds, "overlap_seconds": args.overlap, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_segments_") as tmp:
        tmpd = Path(tmp)
        clip = tmpd / "long.mp4"
        res["clip"] = make_long_clip(clip, args.seconds)
        res["seek"] = seek_cost(clip)
        print(json.dumps(res["seek"]), file=sys.stderr)
        common = (args.stride, args.detector, args.embedder)
        ray.init(num_cpus=os.cpu_count(), object_store_memory=256 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # _timed_piece, for the workers
        try:
            for k in range(args.rounds):
                row = {"engine": "local", "round": k, "load_avg": os.getloadavg()[0],
                       **run(LocalEngine(), clip, tmpd / "local", 0.0, args.overlap, *common)}
                res["runs"].append(row)
                local_wall = row["wall_s"]
                print(json.dumps(row), file=sys.stderr)
                for w in [int(x) for x in args.workers.split(",") if x]:
                    eng = create_engine("ray", workers=w, device="cpu")
                    out = tmpd / f"ray{w}"
                    row = {"engine": f"ray-{w}", "round": k, "load_avg": os.getloadavg()[0],
                           **run(eng, clip, out, args.segment_seconds, args.overlap, *common)}
                    row["same_outputs_as_local"] = same_outputs(tmpd / "local", out)
                    row["speedup_vs_local_same_round"] = round(local_wall / row["wall_s"], 3)
                    res["runs"].append(row)
                    print(json.dumps(row), file=sys.stderr)
        finally:
            ray.shutdown()
    res["load_avg_at_end"] = os.getloadavg()
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
