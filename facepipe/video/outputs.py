"""Per-video output files: their paths, atomic publishing, completion markers, and the
annotated video (see :mod:`facepipe.video` for the layout)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from facepipe.errors import OutputError
from facepipe.types import Box, Detection
from facepipe.video.reading import VideoInfo, VideoReader

log = logging.getLogger(__name__)

#: Version of the output layout recorded in the completion marker (2: NAME without the
#: video's extension, det_score on a 0..1 scale, identities never empty with a gallery).
OUTPUT_VERSION = 2

@dataclass(frozen=True)
class VideoOutputs:
    """Where one video's results go (see the module docstring)."""

    frames: Path
    tracks_csv: Path
    tracks_json: Path
    annotated: Path
    marker: Path

    def partial(self, p: Path) -> Path:
        """The hidden temporary name a file is written under before its rename."""
        if p.suffix == ".mp4":  # the muxer is chosen from the extension
            return p.with_name(f".{p.stem}.partial.mp4")
        return p.with_name(f".{p.name}.partial")

    def files(self, annotate: bool) -> list[Path]:
        """The result files (without the marker)."""
        out = [self.frames, self.tracks_csv, self.tracks_json]
        return out + [self.annotated] if annotate else out


def output_paths(out_dir: str | os.PathLike[str], relative: str | os.PathLike[str]) -> VideoOutputs:
    """Output files for a video: ``out_dir/<relative path without extension>.<kind>``, mirroring
    input folders (``day1/clip.mp4`` -> ``day1/clip.tracks.csv``, ...)."""
    rel = Path(relative)
    base = Path(out_dir) / rel.parent
    name = rel.stem if rel.suffix else rel.name
    return VideoOutputs(
        frames=base / f"{name}.frames.jsonl",
        tracks_csv=base / f"{name}.tracks.csv",
        tracks_json=base / f"{name}.tracks.json",
        annotated=base / f"{name}.annotated.mp4",
        marker=base / f"{name}.done.json",
    )


def _source_fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_complete(outputs: VideoOutputs, source: str | os.PathLike[str], settings: dict[str, Any]) -> bool:
    """Whether a finished run with the same settings and source file left all outputs."""
    try:
        marker = json.loads(outputs.marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("version") != OUTPUT_VERSION:
        return False
    try:
        if marker.get("source") != _source_fingerprint(Path(source)):
            return False
    except OSError:
        return False
    if marker.get("settings") != json.loads(json.dumps(settings)):
        return False
    return all((outputs.marker.parent / f).is_file() for f in marker.get("files", []))


@dataclass
class TrackSummary:
    """One row of the per-track summary (``NAME.tracks.csv`` / ``.json``).

    ``identity``: with a gallery, the track's one name, a person or ``"unknown"`` (never
    empty); without a gallery ``None``. ``confidence``: the share of the track's
    similarity-weighted frame votes that went to ``identity`` (0..1; 0 when no frame could
    be identified). ``identified_frames``: frames that were embedded and looked up.
    ``similarity``/``distance``: mean similarity (1 − distance) of the frames that voted for
    ``identity`` to their best person. ``mean_det_score``: mean detector probability
    (0..1); for Haar, whose score is not a probability, ``mean_det_response`` instead.
    """

    track: int
    first_frame: int
    last_frame: int
    first_time: float
    last_time: float
    frames: int
    identity: str | None
    confidence: float | None
    identified_frames: int
    similarity: float | None
    distance: float | None
    mean_det_score: float | None
    mean_det_response: float | None


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not remove %s: %s", p, exc)


ProgressFn = Callable[[str, int, int], None]

def _label(face: dict[str, Any]) -> str:
    name = face.get("name")
    return f"#{face['track']} {name}" if name else f"#{face['track']}"


def _det_value(face: dict[str, Any]) -> float:
    v = face.get("det_score")
    if v is None:
        v = face.get("det_response")
    return float(v) if v is not None else 0.0


def _annotate(src: Path, frames_jsonl: Path, out: Path, info: VideoInfo, batch_size: int,
              n_frames: int, on_progress: ProgressFn | None) -> None:
    """Second pass: re-decode the video and draw the final per-frame records on it."""
    import cv2

    from facepipe.draw import color_for, draw_detections

    writer = None
    try:
        with VideoReader(src, batch_size=batch_size, stride=1) as reader, frames_jsonl.open() as recs:
            fps = info.fps if info.fps > 0 else 25.0
            for batch in reader:
                for fr in batch:
                    line = recs.readline()
                    faces = json.loads(line)["faces"] if line else []
                    if fr.image is None:  # stride 1 decodes every frame
                        continue
                    if writer is None:
                        h, w = fr.image.shape[:2]
                        writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                        if not writer.isOpened():
                            raise OutputError(out, "cannot open an MP4 writer (mp4v)")
                    dets = [Detection(Box(f["x"], f["y"], f["w"], f["h"]), _det_value(f), "track")
                            for f in faces]
                    img = draw_detections(fr.image, dets, labels=[_label(f) for f in faces],
                                          colors=[color_for(f["track"]) for f in faces])
                    writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                if on_progress is not None:
                    on_progress("annotate", batch[-1].index + 1, max(n_frames, batch[-1].index + 1))
    finally:
        if writer is not None:
            writer.release()
