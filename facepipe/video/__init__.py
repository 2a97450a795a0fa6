"""Batch video processing: decoding, batched face analysis, tracking and outputs.

The package is split by concern:

* :mod:`facepipe.video.reading` -- finding videos, probing them, and decoding
  frames in a reader thread (:class:`VideoReader`);
* :mod:`facepipe.video.analysis` -- detection, landmarks, alignment, embedding and
  identification of a batch of frames (:class:`FrameAnalyzer`), shot changes;
* :mod:`facepipe.video.outputs` -- output paths, completion markers, the annotated video;
* :mod:`facepipe.video.process` -- the per-video loop, :func:`process_video`.

Per video, :func:`process_video` writes next to each other in the output folder
(``NAME`` is the input's file name without its extension: ``clip.mp4`` -> ``clip``; two
inputs with one name get their folders prefixed)::

    NAME.frames.jsonl     one record per frame: index, time, faces with box, det_score, track,
                          the frame's own decision and the track's name
    NAME.tracks.csv       one row per track: first/last time, frame count, identity, confidence
    NAME.tracks.json      the same as JSON, plus the video's metadata
    NAME.annotated.mp4    boxes, names and track ids drawn (unless annotate=False)
    NAME.done.json        completion marker, written last

Every file is written under a hidden temporary name and renamed when the whole
video has been processed; the completion marker is removed before and written
after the renames, so an interrupted run never leaves outputs that look
complete, and ``resume`` skips exactly the videos whose marker is present.
"""

from __future__ import annotations

from facepipe.video.analysis import (
    SHOT_CUT_DISTANCE, STAGES, FrameAnalyzer, OnetLandmarker, build_analyzer, frame_signature,
    gallery_description, identify_embeddings, shot_distance,
)
from facepipe.video.outputs import OUTPUT_VERSION, ProgressFn, TrackSummary, VideoOutputs, is_complete, output_paths
from facepipe.video.process import VideoResult, process_video
from facepipe.video.reading import (
    TRUNCATION_TOLERANCE, VIDEO_EXTENSIONS, Frame, VideoInfo, VideoReader, iter_videos, probe_video,
    read_frames,
)

__all__ = [
    "OUTPUT_VERSION", "SHOT_CUT_DISTANCE", "STAGES", "TRUNCATION_TOLERANCE", "VIDEO_EXTENSIONS",
    "Frame", "FrameAnalyzer", "OnetLandmarker", "ProgressFn", "TrackSummary", "VideoInfo",
    "VideoOutputs", "VideoReader", "VideoResult", "build_analyzer", "frame_signature",
    "gallery_description", "identify_embeddings", "is_complete", "iter_videos", "output_paths",
    "probe_video", "process_video", "read_frames", "shot_distance",
]
