"""Long videos in time segments (facepipe.video.segments): planning, seeking, joining.

The joined outputs must be the single pass's, byte for byte: the clip has a face
moving back and forth across every segment boundary and a camera cut, and a gallery
names it, so track joining, identity votes and cuts are all exercised. Seeking is
checked against a sequential decode (pixels and timestamps), and a clip with a
dropped frame (a gap in its timestamps) must fall back to decoding from the start.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from facepipe.engine import LocalEngine, WorkerFactory
from facepipe.engine.work import JoinJob, SegmentJob, VideoJob, map_videos
from facepipe.video import build_analyzer, output_paths
from facepipe.video.reading import SeekMismatch, VideoReader
from facepipe.video.segments import Segment, SegmentResult, plan_segments, redo_without_seeking
from test_video import H, W, face_patch, write_clip

#: Segment options of the tests: 2-s segments (20 frames at 10 fps), 1.5 s of warm-up.
SEGMENTS = {"segment_seconds": 2.0, "overlap_seconds": 1.5}


def crossing_frames(astronaut: np.ndarray, n: int = 70, cut: int = 45) -> list[np.ndarray]:
    """A face sliding back and forth (6 px per frame), then a camera cut at frame ``cut``
    (other background, face lower): one track before the cut, one after."""
    patch = face_patch(astronaut, 120)
    rng = np.random.default_rng(1)
    ramp = np.tile(np.linspace(60, 190, W)[None, :, None], (H, 1, 3))
    bg1 = np.clip(ramp + rng.integers(-20, 20, (H, W, 3)), 0, 255).astype(np.uint8)
    bg2 = bg1.copy()
    bg2[..., 0] = 255 - bg2[..., 0]
    bg2[..., 2] //= 3
    span = W - 120 - 20
    frames = []
    for i in range(n):
        f = (bg1 if i < cut else bg2).copy()
        phase = (6 * i) % (2 * span)
        x = 10 + (phase if phase <= span else 2 * span - phase)
        y = 60 if i < cut else 100
        f[y:y + 120, x:x + 120] = patch
        frames.append(f)
    return frames


def crossing_clip(path: Path, astronaut: np.ndarray) -> Path:
    """The clip of :func:`crossing_frames`: 70 frames at 10 fps, 4 segments of 2 s."""
    return write_clip(path, crossing_frames(astronaut))


def astronaut_gallery(path: Path, astronaut: np.ndarray) -> Path:
    """A gallery with the astronaut enrolled by the untrained embedder (no download)."""
    from facepipe.detect import create_detector
    from facepipe.embed import load_embedder
    from facepipe.gallery import Gallery
    from facepipe.pipeline import FacePipeline

    emb = load_embedder("untrained", device="cpu")
    face = FacePipeline(create_detector("haar", min_size=40), emb, device="cpu").process(astronaut).faces[0]
    with Gallery.edit(path, embedder_id=emb.embedder_id, dim=emb.dim, threshold=0.5) as g:
        g.add(face.embedding[None, :], ["eileen_collins"])
    return path


def output_files(out: Path) -> dict[str, object]:
    """Every output file's bytes (completion markers without their timings)."""
    files: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            if p.name.endswith(".done.json"):
                files[p.name] = {k: v for k, v in json.loads(p.read_text()).items()
                                 if k not in ("timings", "wall_seconds", "finished_at")}
            else:
                files[p.name] = p.read_bytes()
    return files


# --------------------------------------------------------------------------- planning


def test_plan_segments_aligns_boundaries_and_keeps_short_videos_whole() -> None:
    segs = plan_segments(70, 10.0, 2.0, 1.5, align=4)
    assert [(s.warm, s.start, s.stop) for s in segs] == [(0, 0, 20), (4, 20, 40), (24, 40, 60), (44, 60, None)]
    assert all(s.count == 4 and s.seek for s in segs)
    # boundaries and warm-ups on multiples of stride x batch (8), the overlap rounded up
    segs = plan_segments(100, 10.0, 2.0, 1.5, align=8)
    assert all(s.start % 8 == 0 and s.warm % 8 == 0 for s in segs)
    assert all(s.start - s.warm >= 15 for s in segs[1:])
    # a last piece shorter than half a segment joins the one before
    assert [s.stop for s in plan_segments(65, 10.0, 2.0, 1.0)] == [20, 40, None]
    # short, unknown-length or unsegmented videos are one piece
    for n, fps, secs in ((29, 10.0, 2.0), (0, 10.0, 2.0), (100, 0.0, 2.0), (100, 10.0, 0.0)):
        assert plan_segments(n, fps, secs, 1.0) == [Segment(0, 1, 0, 0, None)]
    with pytest.raises(ValueError, match="overlap"):
        plan_segments(100, 10.0, 1.0, 2.0)


# --------------------------------------------------------------------------- seeking


def _read(path: Path, **kw: object) -> tuple[list[tuple[int, float, bytes | None]], VideoReader]:
    with VideoReader(path, batch_size=4, **kw) as r:  # type: ignore[arg-type]
        frames = [(f.index, f.time, None if f.image is None else f.image.tobytes()) for b in r for f in b]
    return frames, r


@pytest.mark.parametrize("shared", [False, pytest.param(True, marks=pytest.mark.data)])
def test_segment_reads_equal_a_sequential_read(tmp_path: Path, astronaut: np.ndarray, shared: bool,
                                               request: pytest.FixtureRequest) -> None:
    if shared:
        root = request.getfixturevalue("shared_data")
        path = root / "videos" / "face_recognition_short_hamilton_clip.mp4"        # H.264 with B-frames
        ranges = [(40, 96), (120, 200), (248, None)]
    else:
        path = crossing_clip(tmp_path / "c.mp4", astronaut)                     # MPEG-4 part 2
        ranges = [(4, 40), (24, 60), (44, None)]
    whole, _ = _read(path, stride=2)
    for start, stop in ranges:
        for seek in (True, False):
            got, r = _read(path, stride=2, start=start, stop=stop, seek=seek)
            assert got == whole[start:stop], (start, stop, seek)     # same indices, times, pixels
            assert r.seek == seek and r.irregular_at is None
            assert r.reached_stop == (stop is not None)


def _gap_clip(path: Path, n: int = 60, gap_at: int = 30) -> Path:
    """A 10-fps clip whose frame ``gap_at`` is missing (its timestamps jump by 200 ms there),
    each frame a different grey so frames can be told apart."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.time_base = Fraction(1, 1000)
        s.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            t = 100 * (i + (i >= gap_at))
            fr = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 3 * i, np.uint8), format="rgb24")
            fr.pts, fr.time_base = t, Fraction(1, 1000)
            for pkt in s.encode(fr):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def test_irregular_timestamps_refuse_a_seek_and_the_job_decodes_from_the_start(tmp_path: Path) -> None:
    path = _gap_clip(tmp_path / "gap.mp4")
    whole, r = _read(path)
    assert len(whole) == 60 and r.irregular_at == 30
    # a segment spanning the gap sees a timestamp that does not fit its index
    with pytest.raises(SeekMismatch):
        _read(path, start=20, stop=40)
    got, r = _read(path, start=20, stop=40, seek=False)
    assert got == whole[20:40] and r.irregular_at == 30
    # past the gap a seek lands one frame off and cannot tell: the earlier segment's report decides
    results = [SegmentResult(Segment(k, 3, 0, 20 * k, None), r.info, [], [], {}, [], 0, True,
                             30 if k == 1 else None, k > 0, 0) for k in range(3)]
    assert [s.index for s in redo_without_seeking(results)] == [2]
    assert not redo_without_seeking([results[0], results[2]])
    # end to end: a segmented job writes what the single pass writes
    factory = WorkerFactory(build_analyzer, "haar", None, None, "cpu", {"min_size": 40})
    opts = {"annotate": False, "batch_size": 4, "settings": {}}
    pieces: list[object] = []
    for name, segments in (("whole", {}), ("seg", SEGMENTS)):
        job = VideoJob(path, output_paths(tmp_path / name, path.name), {"max_gap_s": 1.0}, opts)
        [o] = map_videos(LocalEngine(), factory, [job], on_piece=pieces.append, **segments)  # type: ignore[arg-type]
        assert o.ok, o.error
    [join] = [p.item for p in pieces if isinstance(p.item, JoinJob)]  # type: ignore[attr-defined]
    assert len(join.results) == 3
    assert [r.seeked for r in join.results] == [False] * 3           # the seeks were refused ...
    assert [r.irregular_at for r in join.results] == [None, 30, 30]  # ... where the gap is in range
    assert output_files(tmp_path / "whole") == output_files(tmp_path / "seg")


# --------------------------------------------------------------------------- joining


def test_segmented_video_writes_what_one_pass_writes(tmp_path: Path, astronaut: np.ndarray) -> None:
    clip = crossing_clip(tmp_path / "cross.mp4", astronaut)
    gallery = astronaut_gallery(tmp_path / "gallery", astronaut)
    factory = WorkerFactory(build_analyzer, "haar", "untrained", gallery, "cpu", {"min_size": 40})
    # --stride 2 and --embed-every 3: interpolation and the embedding rhythm cross boundaries too
    opts = {"stride": 2, "batch_size": 4, "embed_every": 3, "annotate": False, "unknown_weight": 0.5,
            "settings": {}}
    pieces: list[object] = []
    for name, segments in (("whole", {}), ("seg", SEGMENTS)):
        job = VideoJob(clip, output_paths(tmp_path / name, clip.name), {"max_gap_s": 1.0, "sim_min": 0.5}, opts)
        [o] = map_videos(LocalEngine(), factory, [job], on_piece=pieces.append, **segments)  # type: ignore[arg-type]
        assert o.ok, o.error
    kinds = [type(p.item).__name__ for p in pieces]  # type: ignore[attr-defined]
    # the whole pass; then the job, answered with its split, its four segments and their join
    assert kinds == ["VideoJob"] + ["VideoJob"] + ["SegmentJob"] * 4 + ["JoinJob"]
    a, b = output_files(tmp_path / "whole"), output_files(tmp_path / "seg")
    assert a == b
    tracks = json.loads(b["cross.tracks.json"])["tracks"]  # type: ignore[arg-type]
    # one track before the cut (frames 0-44, three segments), one after it
    assert [(t["first_frame"], t["last_frame"]) for t in tracks] == [(0, 44), (46, 68)]
    assert {t["identity"] for t in tracks} == {"eileen_collins"}

