"""Video decoding, timestamps, rotation, truncation and the per-video outputs.

Clips are written inside the tests with cv2.VideoWriter (PyAV for a variable
frame rate clip): a real face photo (scikit-image's astronaut) moving across a
plain background, so the Haar detector really finds it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from facepipe.errors import VideoReadError
from facepipe.video import (
    FrameAnalyzer, VideoReader, is_complete, iter_videos, output_paths, probe_video, process_video,
    read_frames,
)

W, H, FPS = 320, 240, 10.0


def face_patch(astronaut: np.ndarray, size: int = 120) -> np.ndarray:
    """The astronaut's head and shoulders (her face is at x 177..270, y 67..160), resized."""
    import cv2

    crop = astronaut[20:210, 130:320]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def clip_frames(astronaut: np.ndarray, n: int, step: int = 8, size: int = 120) -> list[np.ndarray]:
    """RGB frames with the face moving right by ``step`` pixels per frame."""
    patch = face_patch(astronaut, size)
    # A noisy horizontal gradient: a flat background skews histogram equalisation and
    # blurred blobs give Haar false positives; this gives neither, with or without equalising.
    ramp = np.tile(np.linspace(60, 190, W)[None, :, None], (H, 1, 3))
    noise = np.random.default_rng(1).integers(-20, 20, (H, W, 3))
    bg = np.clip(ramp + noise, 0, 255).astype(np.uint8)
    frames = []
    for i in range(n):
        f = bg.copy()
        x, y = 10 + (step * i) % (W - size - 10), 60
        f[y:y + size, x:x + size] = patch
        frames.append(f)
    return frames


def write_clip(path: Path, frames: list[np.ndarray], fps: float = FPS, fourcc: str = "mp4v") -> Path:
    """Encode RGB frames with OpenCV."""
    import cv2

    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert vw.isOpened(), f"cannot open writer for {path}"
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()
    return path


def face_clip(path: Path, astronaut: np.ndarray, n: int = 12, **kw: object) -> Path:
    return write_clip(path, clip_frames(astronaut, n), **kw)  # type: ignore[arg-type]


def set_mp4_rotation(path: Path, degrees: int) -> None:
    """Write a display rotation into an MP4's track header matrix (as phones do)."""
    data = bytearray(path.read_bytes())
    i = data.find(b"tkhd")
    assert i > 0
    version = data[i + 4]
    # tkhd: version/flags, times, track id, reserved, duration, reserved, layer, group, volume, reserved
    off = i + 8 + (32 if version == 1 else 20) + 8 + 8
    one = 1 << 16
    a, b = {90: (0, one), 180: (-one, 0), 270: (0, -one)}[degrees]
    c, d = -b, a
    data[off:off + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def haar_analyzer() -> FrameAnalyzer:
    from facepipe.detect import create_detector

    return FrameAnalyzer(create_detector("haar", min_size=40, min_neighbors=5))


# --------------------------------------------------------------------------- discovery & decoding


def test_iter_videos_walks_directories(tmp_path: Path, astronaut: np.ndarray) -> None:
    (tmp_path / "sub").mkdir()
    frames = clip_frames(astronaut, 3)
    write_clip(tmp_path / "a.mp4", frames)
    write_clip(tmp_path / "sub" / "b.avi", frames, fourcc="MJPG")
    write_clip(tmp_path / "sub" / "c.mkv", frames, fourcc="XVID")
    (tmp_path / "notes.txt").write_text("not a video")
    found = [f.relative.as_posix() for f in iter_videos([tmp_path])]
    assert found == ["a.mp4", "sub/b.avi", "sub/c.mkv"]


def test_reader_frames_timestamps_and_batches(tmp_path: Path, astronaut: np.ndarray) -> None:
    src = clip_frames(astronaut, 10)
    p = write_clip(tmp_path / "clip.avi", src, fourcc="MJPG")
    info = probe_video(p)
    assert (info.width, info.height, info.frame_count) == (W, H, 10)
    assert info.fps == pytest.approx(FPS)
    with VideoReader(p, batch_size=4) as reader:
        batches = list(reader)
    assert [len(b) for b in batches] == [4, 4, 2]
    frames = [f for b in batches for f in b]
    assert [f.index for f in frames] == list(range(10))
    np.testing.assert_allclose([f.time for f in frames], np.arange(10) / FPS, atol=1e-3)
    # decoded pixels are the RGB frames we wrote (MJPEG is lossy: compare loosely)
    diff = np.abs(frames[3].image.astype(int) - src[3].astype(int)).mean()
    assert diff < 12
    assert frames[3].image[:, :, 0].mean() == pytest.approx(src[3][:, :, 0].mean(), abs=3)


def test_reader_stride_decodes_every_nth_frame_and_keeps_all_timestamps(tmp_path: Path,
                                                                         astronaut: np.ndarray) -> None:
    p = face_clip(tmp_path / "clip.mp4", astronaut, n=11)
    with VideoReader(p, batch_size=2, stride=3) as reader:
        batches = list(reader)
        assert reader.frames_decoded == 4 and reader.frames_read == 11
    frames = [f for b in batches for f in b]
    assert [f.index for f in frames] == list(range(11))
    assert [f.index for f in frames if f.image is not None] == [0, 3, 6, 9]
    np.testing.assert_allclose([f.time for f in frames], np.arange(11) / FPS, atol=1e-3)
    # at most batch_size decoded frames per batch, skipped frames travel with them
    assert all(sum(f.image is not None for f in b) <= 2 for b in batches)


def test_reader_stops_cleanly_when_consumer_stops_early(tmp_path: Path, astronaut: np.ndarray) -> None:
    p = face_clip(tmp_path / "clip.mp4", astronaut, n=30)
    with VideoReader(p, batch_size=1, queue_batches=1) as reader:
        it = iter(reader)
        next(it)
        it.close()
    assert reader._thread is not None and not reader._thread.is_alive()


def test_variable_frame_rate_timestamps(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    from fractions import Fraction

    times_ms = [0, 40, 80, 300, 340, 1000, 1040, 1500]
    p = tmp_path / "vfr.mp4"
    with av.open(str(p), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.time_base = Fraction(1, 1000)
        s.codec_context.time_base = Fraction(1, 1000)
        for t in times_ms:
            fr = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 100, np.uint8), format="rgb24")
            fr.pts, fr.time_base = t, Fraction(1, 1000)
            for pkt in s.encode(fr):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    frames = list(read_frames(p))
    assert [round(f.time * 1000) for f in frames] == times_ms
    # the same holds for frames skipped by the stride
    frames = list(read_frames(p, stride=3))
    assert [round(f.time * 1000) for f in frames] == times_ms
    # index / average fps would be wrong here: the rate is not constant
    info = probe_video(p)
    assert abs(7 / info.fps - 1.5) > 0.1


@pytest.mark.parametrize("degrees", [90, 270])
def test_rotation_metadata_is_applied(tmp_path: Path, degrees: int) -> None:
    import cv2

    f = np.full((48, 64, 3), 0, np.uint8)
    f[:10, :20] = 255   # white block in the top-left corner of the stored frame
    p = write_clip(tmp_path / "phone.mp4", [f] * 5)
    set_mp4_rotation(p, degrees)
    info = probe_video(p)
    assert info.rotation == degrees
    assert (info.width, info.height) == (48, 64)
    frames = list(read_frames(p))
    assert len(frames) == 5 and frames[0].image.shape == (64, 48, 3)
    expected = cv2.rotate(f, cv2.ROTATE_90_CLOCKWISE if degrees == 90 else cv2.ROTATE_90_COUNTERCLOCKWISE)
    assert np.abs(frames[0].image.astype(int) - expected.astype(int)).mean() < 8
    np.testing.assert_allclose([fr.time for fr in frames], np.arange(5) / FPS, atol=1e-3)


def test_unreadable_files_raise_video_read_error(tmp_path: Path, astronaut: np.ndarray) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    good = face_clip(tmp_path / "good.mp4", astronaut, n=10)
    cut = tmp_path / "cut.mp4"          # an MP4 without its index (moov at the end)
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for p, words in [(empty, "empty"), (junk, "cannot open"), (cut, "cannot open"),
                     (tmp_path / "missing.mp4", "no such file")]:
        with pytest.raises(VideoReadError, match=words) as ei:
            probe_video(p)
        assert ei.value.path == str(p)


def test_truncated_stream_is_reported_after_decoding_what_is_there(tmp_path: Path,
                                                                   astronaut: np.ndarray) -> None:
    good = face_clip(tmp_path / "good.avi", astronaut, n=20, fourcc="MJPG")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    got = []
    with pytest.raises(VideoReadError, match=r"truncated or corrupt: decoded \d+ of 20 frames"):
        for f in read_frames(cut):
            got.append(f.index)
    assert 0 < len(got) < 20


# --------------------------------------------------------------------------- process_video


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_process_video_tracks_a_moving_face(tmp_path: Path, astronaut: np.ndarray,
                                            haar_analyzer: FrameAnalyzer) -> None:
    import cv2

    n = 12
    (tmp_path / "in").mkdir()
    src = face_clip(tmp_path / "in" / "clip.mp4", astronaut, n=n)
    outs = output_paths(tmp_path / "out", "clip.mp4")
    seen = []
    res = process_video(src, outs, haar_analyzer, batch_size=5, settings={"k": 1},
                        on_progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert res.frames == n and res.analysed_frames == n
    assert ("analyse", n, n) in seen and ("annotate", n, n) in seen
    recs = _records(outs.frames)
    assert [r["frame"] for r in recs] == list(range(n))
    np.testing.assert_allclose([r["time"] for r in recs], np.arange(n) / FPS, atol=1e-3)
    assert all(len(r["faces"]) == 1 for r in recs), [len(r["faces"]) for r in recs]
    assert {r["faces"][0]["track"] for r in recs} == {1}
    xs = np.array([r["faces"][0]["x"] for r in recs])
    # the face moves 8 px per frame to the right; its box follows
    assert np.polyfit(np.arange(n), xs, 1)[0] == pytest.approx(8, abs=1.5)
    # tracks: one, spanning the clip
    (tr,) = res.tracks
    assert (tr.first_frame, tr.last_frame, tr.frames) == (0, n - 1, n)
    assert tr.last_time == pytest.approx((n - 1) / FPS, abs=1e-3)
    csv_lines = outs.tracks_csv.read_text().splitlines()
    assert csv_lines[0].startswith("track,first_frame,last_frame,first_time,last_time,frames,identity")
    assert len(csv_lines) == 2
    summary = json.loads(outs.tracks_json.read_text())
    assert summary["frames"] == n and summary["tracks"][0]["frames"] == n
    # annotated video: same size and frame count, boxes drawn where the face is
    cap = cv2.VideoCapture(str(outs.annotated))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == n
    ok, first = cap.read()
    assert ok and first.shape == (H, W, 3)
    # boxes are drawn where the face is: the annotated frame differs from the source
    # along the box's left edge, and hardly inside the box
    source = cv2.VideoCapture(str(src))
    ok, plain = source.read()
    assert ok
    diff = np.abs(first.astype(float) - plain.astype(float)).mean(axis=2)
    f0 = recs[0]["faces"][0]
    x, y, w, h = (int(round(f0[k])) for k in ("x", "y", "w", "h"))
    edge = diff[y + 5:y + h - 5, x].mean()
    inside = diff[y + h // 3:y + h - 5, x + w // 3:x + w - w // 3].mean()
    assert edge > 30 and inside < 8, (edge, inside)
    marker = json.loads(outs.marker.read_text())
    assert marker["settings"] == {"k": 1} and marker["frames"] == n
    assert is_complete(outs, src, {"k": 1})
    assert not is_complete(outs, src, {"k": 2})
    assert sorted(p.name for p in outs.marker.parent.iterdir()) == sorted(
        p.name for p in [outs.frames, outs.tracks_csv, outs.tracks_json, outs.annotated, outs.marker])


def test_stride_interpolates_between_analysed_frames(tmp_path: Path, astronaut: np.ndarray,
                                                     haar_analyzer: FrameAnalyzer) -> None:
    n = 11
    src = face_clip(tmp_path / "clip.mp4", astronaut, n=n)
    outs = output_paths(tmp_path / "out", "clip.mp4")
    res = process_video(src, outs, haar_analyzer, stride=3, batch_size=2, annotate=False)
    assert res.analysed_frames == 4 and res.frames == n
    recs = _records(outs.frames)
    assert len(recs) == n
    assert [r["frame"] for r in recs if r["analysed"]] == [0, 3, 6, 9]
    assert all(len(r["faces"]) == 1 and r["faces"][0]["track"] == 1 for r in recs)
    # frames 1, 2 lie between 0 and 3 (interpolated); frame 10 holds frame 9's box
    x = [r["faces"][0]["x"] for r in recs]
    assert x[0] < x[1] < x[2] < x[3]
    assert recs[1]["faces"][0]["interpolated"] and "interpolated" not in recs[3]["faces"][0]
    assert x[10] == x[9]
    assert not outs.annotated.exists()
    assert json.loads(outs.marker.read_text())["files"] == [
        outs.frames.name, outs.tracks_csv.name, outs.tracks_json.name]


def test_interrupted_video_never_looks_complete(tmp_path: Path, astronaut: np.ndarray,
                                                haar_analyzer: FrameAnalyzer) -> None:
    src = face_clip(tmp_path / "clip.mp4", astronaut, n=12)
    outs = output_paths(tmp_path / "out", "clip.mp4")
    process_video(src, outs, haar_analyzer, batch_size=4, annotate=False, settings={})
    assert is_complete(outs, src, {})
    before = outs.frames.read_text()

    def interrupt(phase: str, done: int, total: int) -> None:
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        process_video(src, outs, haar_analyzer, batch_size=4, annotate=False, settings={},
                      on_progress=interrupt)
    # the old marker is gone, no partial files remain, old results untouched
    assert not outs.marker.exists() and not is_complete(outs, src, {})
    assert outs.frames.read_text() == before
    assert not [p for p in outs.marker.parent.iterdir() if p.name.startswith(".")]


def test_truncated_video_leaves_no_outputs(tmp_path: Path, astronaut: np.ndarray,
                                           haar_analyzer: FrameAnalyzer) -> None:
    good = face_clip(tmp_path / "good.avi", astronaut, n=20, fourcc="MJPG")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    outs = output_paths(tmp_path / "out", "cut.avi")
    with pytest.raises(VideoReadError, match="truncated"):
        process_video(cut, outs, haar_analyzer, batch_size=4)
    assert list((tmp_path / "out").iterdir()) == []


def test_tracks_end_at_a_camera_cut(tmp_path: Path, astronaut: np.ndarray,
                                    haar_analyzer: FrameAnalyzer) -> None:
    """Same face, same place, but the shot changes (another background): a new track."""
    frames = clip_frames(astronaut, 10, step=2)
    for f in frames[5:]:
        mask = np.ones(f.shape[:2], bool)
        mask[60:180, :] = False                       # keep the face's rows
        f[mask] = (30, 90, 200)                      # a blue stage instead of grey
        f[60:180, 200:] = (30, 90, 200)
    src = write_clip(tmp_path / "cut.mp4", frames)
    outs = output_paths(tmp_path / "out", "cut.mp4")
    res = process_video(src, outs, haar_analyzer, batch_size=4, annotate=False)
    recs = _records(outs.frames)
    assert [r["frame"] for r in recs if r.get("cut")] == [5]
    ids = [r["faces"][0]["track"] for r in recs]
    assert ids[:5] == [1] * 5 and ids[5:] == [2] * 5
    assert [(t.first_frame, t.last_frame) for t in res.tracks] == [(0, 4), (5, 9)]
    assert json.loads(outs.tracks_json.read_text())["shot_cuts"] == 1
    # without cut detection the face stays on one track
    res = process_video(src, outs, haar_analyzer, batch_size=4, annotate=False, shot_cut=None)
    assert len(res.tracks) == 1
