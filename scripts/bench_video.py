#!/usr/bin/env python
"""End-to-end video throughput: facepipe's batched pipeline vs a per-frame loop vs dlib.

For each resolution (720p, 1080p) the first ``--frames`` frames of a real clip
(default: ``videos/face_recognition_short_hamilton_clip.mp4`` from the dev data,
one performer on stage, 640x360, scaled up; ``--video`` takes another, e.g.
``facenet_pytorch_video.mp4``, 1080p pedestrians) are re-encoded once (MPEG-4
Part 2, so every resolution decodes the same codec) and then run through:

* ``facepipe``: :func:`facepipe.video.process_video` -- reader thread, frames
  batched through the detector, all faces of a batch aligned and embedded in one
  call, gallery search, tracking, per-frame JSONL (annotation pass timed apart);
* ``per-frame``: the same stages (:class:`facepipe.video.FrameAnalyzer`) called
  one frame at a time, decoding inline (no reader thread, no cross-frame batches);
* ``dlib``: dlib's per-frame pipeline as face_recognition users run it: HOG
  detector, 5-point shape predictor, ResNet descriptor per face, linear search.

All three identify against a gallery enrolled from
``identities/face_recognition_examples`` by the same pipeline. Minimum face size is
80 px for every detector, dlib HOG's fixed window without upsampling (the
fastest dlib setting; face_recognition's default upsamples once, 4x the work).

Example::

    python scripts/bench_video.py --frames 48 --detectors haar,cnn --out docs/video_bench.json
    python scripts/bench_video.py --device cuda --batch-size 32 --frames 300   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESOLUTIONS = {"720p": (1280, 720), "1080p": (1920, 1080)}


def transcode(src: Path, dst: Path, size: tuple[int, int], frames: int) -> tuple[int, float]:
    """First ``frames`` frames of ``src`` resized to ``size`` and encoded as MPEG-4 (mp4v)."""
    import cv2

    cap = cv2.VideoCapture(str(src))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    vw = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    n = 0
    while n < frames:
        ok, f = cap.read()
        if not ok:
            break
        if (f.shape[1], f.shape[0]) != size:
            f = cv2.resize(f, size, interpolation=cv2.INTER_AREA)
        vw.write(f)
        n += 1
    vw.release()
    cap.release()
    return n, fps


def build_gallery(directory: Path, people_root: Path, pipeline: Any) -> int:
    """Enrol every photo of ``people_root/<name>/`` (largest face) into a new gallery."""
    from facepipe.gallery import Gallery
    from facepipe.io import load_image

    vecs, names = [], []
    for person in sorted(p for p in people_root.iterdir() if p.is_dir()):
        for img in sorted(person.iterdir()):
            if img.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            res = pipeline.process(load_image(img))
            if res.faces:
                best = max(res.faces, key=lambda f: f.detection.box.area)
                vecs.append(best.embedding)
                names.append(person.name)
    emb = pipeline.embedder
    with Gallery.edit(directory, embedder_id=emb.embedder_id, dim=emb.dim) as g:
        g.add(np.stack(vecs).astype(np.float32), names)
    return len(names)


def make_detector(name: str, device: str, min_face: int) -> Any:
    from facepipe.detect import create_detector

    if name == "haar":
        return create_detector("haar", min_size=min_face)
    if name in ("cnn", "cnn-pyramid"):  # cnn: the single-pass detector; cnn-pyramid: the classifier over a pyramid
        return create_detector(name, min_size=float(min_face), device=device)
    if name == "haar+cnn":
        return create_detector("haar+cnn", min_size=min_face, device=device)
    return create_detector(name, device=device)


def run_facepipe(clip: Path, detector: Any, embedder: Any, gallery: Any, batch_size: int,
                 device: str, min_face: int, workdir: Path, warm: np.ndarray, stride: int = 1,
                 embed_every: int = 1) -> dict[str, Any]:
    """facepipe's batched, threaded pipeline (process_video), annotation timed apart."""
    from facepipe.video import FrameAnalyzer, output_paths, process_video

    analyzer = FrameAnalyzer(detector, embedder, gallery, min_face=min_face, device=device)
    analyzer.analyze([warm])   # model loads and first-call allocations stay out of the timing
    analyzer.faces = analyzer.embedded = 0
    outs = output_paths(workdir, f"{clip.stem}-{detector.name}.mp4")
    res = process_video(clip, outs, analyzer, batch_size=batch_size, annotate=True, stride=stride,
                        embed_every=embed_every, unknown_weight=float(gallery.threshold))
    t = res.timings
    frames = res.frames
    return {
        "frames": frames, "faces": res.faces, "embedded": analyzer.embedded, "tracks": len(res.tracks),
        "seconds": res.analysis_seconds, "fps": frames / res.analysis_seconds,
        "stage_ms_per_frame": {k: 1000 * t[k] / frames for k in
                               ("decode", "detect", "align", "embed", "search", "track", "write")},
        "annotate_ms_per_frame": 1000 * t["annotate"] / frames,
        "fps_with_annotation": frames / (res.analysis_seconds + t["annotate"]),
    }


def run_per_frame(clip: Path, detector: Any, embedder: Any, gallery: Any, min_face: int,
                  device: str, warm: np.ndarray) -> dict[str, Any]:
    """The same stages called one frame at a time, decoding inline (no reader thread)."""
    import cv2

    from facepipe.track import Tracker
    from facepipe.video import FrameAnalyzer

    analyzer = FrameAnalyzer(detector, embedder, gallery, min_face=min_face, device=device)
    analyzer.analyze([warm])
    analyzer.timings = dict.fromkeys(analyzer.timings, 0.0)
    analyzer.faces = analyzer.embedded = 0
    tracker = Tracker()
    st = {"decode": 0.0, "track": 0.0}
    cap = cv2.VideoCapture(str(clip))
    frames = 0
    t_all = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        ok, bgr = cap.read()
        if not ok:
            break
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        t = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        st["decode"] += time.perf_counter() - t0
        (obs,) = analyzer.analyze([img])
        t1 = time.perf_counter()
        tracker.update(frames, t, obs)
        st["track"] += time.perf_counter() - t1
        frames += 1
    cap.release()
    seconds = time.perf_counter() - t_all
    st.update(analyzer.timings)
    return {"frames": frames, "faces": analyzer.faces, "embedded": analyzer.embedded, "seconds": seconds,
            "fps": frames / seconds, "stage_ms_per_frame": {k: 1000 * v / frames for k, v in st.items()}}


class DlibPeer:
    """dlib HOG + 5-point shape predictor + ResNet descriptor, one frame at a time."""

    def __init__(self) -> None:
        import dlib

        from facepipe.embed.dlib_peer import RECOGNITION_FILE, SHAPE5_FILE, model_dir

        d = model_dir()
        self.dlib = dlib
        self.hog = dlib.get_frontal_face_detector()
        self.sp = dlib.shape_predictor(str(d / SHAPE5_FILE))
        self.fr = dlib.face_recognition_model_v1(str(d / RECOGNITION_FILE))
        self.known = np.zeros((0, 128))
        self.names: list[str] = []

    def encode(self, img: np.ndarray, upsample: int = 0) -> list[np.ndarray]:
        rects = self.hog(img, upsample)
        return [np.asarray(self.fr.compute_face_descriptor(img, self.sp(img, r))) for r in rects]

    def enroll(self, people_root: Path) -> int:
        from facepipe.io import load_image

        vecs = []
        for person in sorted(p for p in people_root.iterdir() if p.is_dir()):
            for img in sorted(person.iterdir()):
                if img.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                    continue
                enc = self.encode(load_image(img), upsample=1)
                if enc:
                    vecs.append(enc[0])
                    self.names.append(person.name)
        self.known = np.stack(vecs)
        return len(vecs)

    def run(self, clip: Path) -> dict[str, Any]:
        import cv2

        st = dict.fromkeys(("decode", "detect", "align", "embed", "search"), 0.0)
        cap = cv2.VideoCapture(str(clip))
        frames = faces = 0
        t_all = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            ok, bgr = cap.read()
            if not ok:
                break
            img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            t1 = time.perf_counter()
            rects = self.hog(img, 0)
            t2 = time.perf_counter()
            st["decode"] += t1 - t0
            st["detect"] += t2 - t1
            for r in rects:
                ta = time.perf_counter()
                shape = self.sp(img, r)
                tb = time.perf_counter()
                e = np.asarray(self.fr.compute_face_descriptor(img, shape))
                tc = time.perf_counter()
                dist = np.linalg.norm(self.known - e, axis=1)      # face_recognition.compare_faces
                _ = self.names[int(np.argmin(dist))] if dist.min() <= 0.6 else "unknown"
                st["align"] += tb - ta
                st["embed"] += tc - tb
                st["search"] += time.perf_counter() - tc
            frames += 1
            faces += len(rects)
        cap.release()
        seconds = time.perf_counter() - t_all
        return {"frames": frames, "faces": faces, "embedded": faces, "seconds": seconds,
                "fps": frames / seconds, "stage_ms_per_frame": {k: 1000 * v / frames for k, v in st.items()}}


def _row(res: str, method: str, det: str, r: dict[str, Any]) -> str:
    s = r["stage_ms_per_frame"]
    return (f"| {res} | {method} | {det} | {r['frames']} | {r['faces']} | {r['embedded']} | {r['fps']:.2f} | "
            + " | ".join(f"{s.get(k, 0.0):.1f}" for k in ("decode", "detect", "align", "embed", "search"))
            + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, default=None,
                    help="source clip [data/videos/face_recognition_short_hamilton_clip.mp4]")
    ap.add_argument("--frames", type=int, default=60, help="frames per run")
    ap.add_argument("--resolutions", default="720p,1080p")
    ap.add_argument("--detectors", default="haar,cnn")
    ap.add_argument("--embedder", default="default",
                    help="embedder name/checkpoint; falls back to 'untrained' (same network, same cost) "
                         "when the default checkpoint is not there")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-face", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenCV threads")
    ap.add_argument("--variants", default="1:1,1:5,3:5",
                    help="facepipe runs as stride:embed_every pairs (1:1 = every frame, every face)")
    ap.add_argument("--skip", default="", help="comma list of methods to skip: facepipe,per-frame,dlib")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import cv2
    import torch

    from facepipe.datasets import data_root
    from facepipe.errors import FacepipeError

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    root = data_root()
    src = args.video or root / "videos" / "face_recognition_short_hamilton_clip.mp4"
    people = root / "identities" / "face_recognition_examples"
    skip = {s for s in args.skip.split(",") if s}

    from facepipe.embed import load_embedder
    from facepipe.gallery import Gallery
    from facepipe.pipeline import FacePipeline

    try:
        embedder = load_embedder(args.embedder, device=args.device)
        embedder_note = args.embedder
    except FacepipeError as exc:
        print(f"embedder {args.embedder!r} unavailable ({exc}); using 'untrained' (same network and cost)",
              file=sys.stderr)
        embedder = load_embedder("untrained", device=args.device)
        embedder_note = "untrained (default checkpoint missing)"

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": args.device,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "load_avg_at_start": os.getloadavg()},
        "source": str(src), "frames_per_run": args.frames, "batch_size": args.batch_size,
        "min_face": args.min_face, "embedder": embedder_note, "command": " ".join(sys.argv),
        "runs": [],
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
        tmpd = Path(tmp)
        enrol_pipe = FacePipeline(make_detector("haar", args.device, 40), embedder, device=args.device)
        n_enrolled = build_gallery(tmpd / "gallery", people, enrol_pipe)
        gallery = Gallery.open(tmpd / "gallery", embedder_id=embedder.embedder_id)
        results["gallery_vectors"] = n_enrolled
        dlib_peer = None
        if "dlib" not in skip:
            try:
                dlib_peer = DlibPeer()
                results["dlib_gallery_vectors"] = dlib_peer.enroll(people)
            except (ImportError, FacepipeError) as exc:
                print(f"dlib peer unavailable: {exc}", file=sys.stderr)
        for res_name in [r for r in args.resolutions.split(",") if r]:
            size = RESOLUTIONS[res_name]
            clip = tmpd / f"{res_name}.mp4"
            n, fps = transcode(src, clip, size, args.frames)
            print(f"{res_name}: {n} frames at {fps:.2f} fps", file=sys.stderr)
            for det_name in [d for d in args.detectors.split(",") if d]:
                try:
                    det = make_detector(det_name, args.device, args.min_face)
                except FacepipeError as exc:
                    print(f"detector {det_name} unavailable: {exc}", file=sys.stderr)
                    results["runs"].append({"resolution": res_name, "detector": det_name,
                                            "unavailable": str(exc)})
                    continue
                warm = cv2.cvtColor(cv2.VideoCapture(str(clip)).read()[1], cv2.COLOR_BGR2RGB)
                plans: list[tuple[str, int, int]] = []
                if "per-frame" not in skip:
                    plans.append(("per-frame", 1, 1))
                if "facepipe" not in skip:
                    for v in [v for v in args.variants.split(",") if v]:
                        stride, every = (int(x) for x in v.split(":"))
                        plans.append(("facepipe", stride, every))
                for method, stride, every in plans:
                    t0 = time.perf_counter()
                    if method == "facepipe":
                        r = run_facepipe(clip, det, embedder, gallery, args.batch_size, args.device,
                                         args.min_face, tmpd / "out", warm, stride, every)
                        label = f"facepipe batched, stride {stride}, embed-every {every}"
                    else:
                        r = run_per_frame(clip, det, embedder, gallery, args.min_face, args.device, warm)
                        label = "per-frame (no batching, no reader thread)"
                    r.update({"resolution": res_name, "method": method, "detector": det_name,
                              "stride": stride, "embed_every": every, "load_avg": os.getloadavg()[0]})
                    results["runs"].append(r)
                    rows.append(_row(res_name, label, det_name, r))
                    print(rows[-1], f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
            if dlib_peer is not None:
                r = dlib_peer.run(clip)
                r.update({"resolution": res_name, "method": "dlib", "detector": "hog",
                          "load_avg": os.getloadavg()[0]})
                results["runs"].append(r)
                rows.append(_row(res_name, "dlib per-frame", "hog", r))
                print(rows[-1], file=sys.stderr)
    header = ("| res | method | detector | frames | faces | embedded | frames/s | decode | detect | align | embed | search |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(rows)
    results["table"] = table
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
