"""Tracks per person on real clips: how often the video tracker breaks one face into several tracks.

Each (clip, detector) is analysed once, exactly as ``facepipe video`` analyses it
(every frame: detection, landmarks, alignment, embedding, gallery decision; cached under
``--cache``), then the tracking configurations are replayed on those observations with the
same code ``process_video`` uses (:class:`facepipe.track.Tracker`, shot cuts,
:func:`facepipe.video.process.finish_tracks`). Reported per configuration: tracks, tracks
seen in at least 10 frames, tracks shorter than 3 frames, tracks per shot, and tracks per
person where ``--people`` gives the number of people visible per clip (counted by eye;
no ground truth ships with the clips).

    python scripts/bench_tracking.py --gallery G --json docs/tracking.json \\
        --people face_recognition_short_hamilton_clip.mp4=6 facenet_pytorch_video.mp4=6
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: (label, detector, max_gap_s, reid_gap_s, min_track_frames, suppress duplicates);
#: "before" = the old defaults (Haar, none of the fixes)
CONFIGS = [
    ("before: haar, as it was", "haar", 1.0, 0.0, 1, False),
    ("haar + dedupe", "haar", 1.0, 0.0, 1, True),
    ("haar + dedupe + re-id", "haar", 1.0, 5.0, 1, True),
    ("haar + dedupe + re-id + min 3 frames", "haar", 1.0, 5.0, 3, True),
    ("mtcnn, as it was", "mtcnn", 1.0, 0.0, 1, False),
    ("after: mtcnn + dedupe + re-id + min 3 frames (defaults)", "mtcnn", 1.0, 5.0, 3, True),
]


def analyse(clip: Path, detector: str, gallery: Path | None, cache: Path) -> dict[str, Any]:
    """Per-frame observations of one clip (cached)."""
    from facepipe.builders import gallery_embedder
    from facepipe.gallery import Gallery
    from facepipe.video import build_analyzer, frame_signature
    from facepipe.video.reading import VideoReader

    path = cache / f"{clip.stem}.{detector}.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    embedder = gallery_embedder(Gallery.open(gallery)) if gallery else None
    analyzer = build_analyzer(detector, embedder, gallery, "cpu")
    frames = []
    t0 = time.perf_counter()
    with VideoReader(clip, batch_size=8, stride=1) as reader:
        for batch in reader:
            images = [f.image for f in batch]
            obs = analyzer.observe(images, analyzer.detect(images))
            for f, o in zip(batch, obs):
                frames.append({"index": f.index, "time": f.time, "signature": frame_signature(f.image),
                               "observations": o})
    data = {"clip": str(clip), "detector": detector, "frames": frames,
            "threshold": float(analyzer.gallery.threshold) if analyzer.gallery is not None else 0.5,
            "analysis_seconds": time.perf_counter() - t0}
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data))
    return data


def replay(data: dict[str, Any], max_gap: float, reid_gap: float, min_frames: int,
           dedupe: bool = True) -> dict[str, Any]:
    """Track the cached observations as process_video does and summarise the tracks."""
    from facepipe.track import Tracker, suppress_duplicates
    from facepipe.video import SHOT_CUT_DISTANCE
    from facepipe.video.analysis import shot_distance
    from facepipe.video.process import finish_tracks

    tracker = Tracker(max_gap_s=max_gap, sim_min=data["threshold"])
    cuts: list[float] = []
    shot_of_time: list[tuple[float, int]] = []
    prev = None
    for fr in data["frames"]:
        if prev is not None and shot_distance(prev, fr["signature"]) > SHOT_CUT_DISTANCE:
            tracker.cut()
            cuts.append(fr["time"])
        prev = fr["signature"]
        shot_of_time.append((fr["time"], len(cuts)))
        tracker.update(fr["index"], fr["time"], suppress_duplicates(fr["observations"]) if dedupe
                       else fr["observations"])
    tracks, _, _, dropped = finish_tracks(tracker, cuts, reid_gap, min_frames)
    per_shot: dict[int, int] = {}
    for t in tracks:
        shot = sum(1 for c in cuts if c <= t.first_time)
        per_shot[shot] = per_shot.get(shot, 0) + 1
    return {
        "tracks": len(tracks),
        "tracks_10_frames": sum(t.hits >= 10 for t in tracks),
        "tracks_under_3_frames": sum(t.hits < 3 for t in tracks),
        "dropped_short": dropped,
        "shots": len(cuts) + 1,
        "tracks_per_shot": [per_shot.get(k, 0) for k in range(len(cuts) + 1)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="+", type=Path,
                    default=sorted((ROOT.parent / "shared" / "data" / "videos").glob("*.mp4")))
    ap.add_argument("--gallery", type=Path, default=None, help="identify against this gallery (as -g)")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "tracking")
    ap.add_argument("--people", nargs="*", default=[], metavar="CLIP=N",
                    help="people visible in a clip (by eye), for tracks per person")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from facepipe.device import describe_machine

    torch.set_num_threads(1)
    people = {k: int(v) for k, v in (p.split("=", 1) for p in args.people)}
    rows = []
    for clip in args.clips:
        for label, det, max_gap, reid, min_frames, dedupe in CONFIGS:
            data = analyse(clip, det, args.gallery, args.cache)
            r = replay(data, max_gap, reid, min_frames, dedupe)
            n = people.get(clip.name)
            r.update({"clip": clip.name, "config": label, "detector": det, "max_gap": max_gap, "reid_gap": reid,
                      "min_track_frames": min_frames, "suppress_duplicates": dedupe, "people": n,
                      "tracks_per_person": round(r["tracks"] / n, 2) if n else None,
                      "substantive_tracks_per_person": round(r["tracks_10_frames"] / n, 2) if n else None,
                      "analysis_seconds": round(data["analysis_seconds"], 1)})
            rows.append(r)
            print(f"{clip.name:45s} {label:48s} tracks {r['tracks']:3d}  >=10f {r['tracks_10_frames']:3d}  "
                  f"<3f {r['tracks_under_3_frames']:3d}  per shot {r['tracks_per_shot']}"
                  + (f"  per person {r['tracks_per_person']}" if n else ""), flush=True)
    report = {"command": "python " + " ".join(sys.argv), "machine": describe_machine(),
              "date": time.strftime("%Y-%m-%d"), "gallery": str(args.gallery) if args.gallery else None,
              "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
