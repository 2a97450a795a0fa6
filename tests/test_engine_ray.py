"""``--engine ray``: the same outputs as ``--engine local``, a killed worker, a killed driver.

One local Ray instance (2 CPUs, a 200 MB object store) serves the whole module; the
commands run in-process find it already started and use it, and the resume test's
driver subprocess joins it with ``--ray-address``. Clips are the generated
astronaut clips of ``test_video``; photos are real (the astronaut, plus the shared
data's face_recognition examples when present).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import cli
from test_segments import astronaut_gallery, crossing_clip, output_files
from test_video import face_clip

ray = pytest.importorskip("ray")

#: Marker fields that differ between any two runs (timings) -- everything else must match.
VOLATILE = {"timings", "wall_seconds", "finished_at"}


@pytest.fixture(scope="module")
def ray_address() -> str:  # type: ignore[misc]
    """A local Ray instance limited to 2 CPUs, started once for the module."""
    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
                   log_to_driver=False, logging_level="ERROR")
    # The kill-on-first-attempt work below is defined here, in a module the workers cannot import.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> Path:
    """Four short clips of the moving astronaut, and one truncated file."""
    d = tmp_path_factory.mktemp("clips")
    for i, n in enumerate((8, 12, 6, 10)):
        face_clip(d / f"c{i}.mp4", astronaut, n=n)
    good = (d / "c1.mp4").read_bytes()
    (d / "broken.mp4").write_bytes(good[: len(good) // 3])
    return d


def _invoke(args: list[str]) -> "object":
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _outputs(out: Path) -> dict[str, object]:
    """Every output file's content (markers without their timings)."""
    files: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(out))
        if p.name.endswith(".done.json"):
            files[rel] = {k: v for k, v in json.loads(p.read_text()).items() if k not in VOLATILE}
        else:
            files[rel] = p.read_bytes()
    return files


def _gallery(path: Path, astronaut: np.ndarray) -> Path:
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


def test_video_on_ray_writes_what_local_writes(ray_address: str, clips: Path, tmp_path: Path,
                                               astronaut: np.ndarray) -> None:
    gal = _gallery(tmp_path / "gallery", astronaut)
    common = [str(clips), "--gallery", str(gal), "--embedder", "untrained", "--device", "cpu",
              "--min-detect-size", "40", "--batch-size", "4", "--stride", "2"]
    local = _invoke(["video", *common, "--out", str(tmp_path / "local")])
    on_ray = _invoke(["video", *common, "--out", str(tmp_path / "ray"), "--engine", "ray"])
    for r in (local, on_ray):
        assert r.exit_code == 1, r.output          # the truncated file fails, the rest is done
        assert "broken.mp4" in r.output and "truncated" in r.output
        assert "4 video(s) processed" in r.output and "1 failed" in r.output
        last = r.output.rstrip().splitlines()[-2:]          # the summary ends with the failures listed
        assert last[0] == "facepipe: 1 input(s) failed:" and last[1].startswith(f"  {clips / 'broken.mp4'}: ")
    a, b = _outputs(tmp_path / "local"), _outputs(tmp_path / "ray")
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith(".done.json")]) == 4
    for k in a:
        if k.endswith(".annotated.mp4"):
            continue    # re-encoded by the same encoder; compared through frames.jsonl
        assert a[k] == b[k], k
    recs = [json.loads(x) for x in (tmp_path / "ray" / "c1.frames.jsonl").read_text().splitlines()]
    assert {f["name"] for r in recs for f in r["faces"]} == {"eileen_collins"}


def _photos(root: Path, astronaut: np.ndarray, shared: Path | None) -> Path:
    """A folder of real photos (one per person folder), one unreadable file among them."""
    from PIL import Image

    (root / "eileen_collins").mkdir(parents=True)
    Image.fromarray(astronaut).save(root / "eileen_collins" / "a.jpg", quality=95)
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(root / "eileen_collins" / "b.png")
    (root / "eileen_collins" / "bad.jpg").write_bytes(b"not a jpeg")
    if shared is not None:
        src = shared / "identities" / "face_recognition_examples"
        for person in sorted(p for p in src.iterdir() if p.is_dir())[:3]:
            img = min(person.iterdir(), key=lambda p: p.stat().st_size)   # the smallest: a short test
            (root / person.name).mkdir()
            (root / person.name / img.name).write_bytes(img.read_bytes())
    return root


def test_image_commands_on_ray_match_local(ray_address: str, tmp_path: Path, astronaut: np.ndarray) -> None:
    from facepipe.datasets import data_root
    from facepipe.gallery import Gallery

    photos = _photos(tmp_path / "photos", astronaut, data_root(required=False))
    model = ["--detector", "haar", "--embedder", "untrained", "--device", "cpu"]
    res = {}
    for engine in ("local", "ray"):
        eng = ["--engine", engine]
        r = _invoke(["embed", str(photos), "--out", str(tmp_path / f"{engine}.npy"), "--batch-images", "2",
                     *model, *eng])
        assert r.exit_code == 1 and "bad.jpg" in r.output, r.output
        gal = tmp_path / f"gallery_{engine}"
        r = _invoke(["enroll", "-g", str(gal), "--from-folders", str(photos), *model, *eng])
        assert r.exit_code == 1 and "bad.jpg" in r.output, r.output
        r = _invoke(["identify", str(photos), "-g", str(gal), "--format", "json", *model, *eng])
        assert r.exit_code == 1, r.output
        ident = json.loads(r.stdout)
        g = Gallery.open(gal)
        res[engine] = (np.load(tmp_path / f"{engine}.npy"), json.loads((tmp_path / f"{engine}.json").read_text()),
                       ident, sorted(g.people()), len(g))
    (va, sa, ia, pa, na), (vb, sb, ib, pb, nb) = res["local"], res["ray"]
    assert va.shape == vb.shape and va.shape[0] >= 2
    np.testing.assert_allclose(va, vb, atol=1e-5)
    assert sa["faces"] == sb["faces"]                 # same sources, boxes, landmarks, alignment
    assert sa["failed"] == sb["failed"] and len(sa["failed"]) == 1
    assert pa == pb and na == nb and "eileen_collins" in pa
    names = lambda ident: [(r["path"], [f["name"] for f in r.get("faces", [])]) for r in ident]  # noqa: E731
    assert names(ia) == names(ib)
    assert any("eileen_collins" in n for _, n in names(ib))


def _kill_first_attempt(analyzer, job, progress=None):  # type: ignore[no-untyped-def]
    """Process a video, but kill this worker process the first time it gets c1.mp4."""
    from facepipe.engine.work import run_video_job

    flag = job.outputs.marker.parent / "killed-once"
    if job.path.name == "c1.mp4" and not flag.exists():
        flag.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return run_video_job(analyzer, job, progress)


def test_a_killed_worker_is_retried_and_every_video_appears_once(ray_address: str, clips: Path,
                                                                  tmp_path: Path) -> None:
    from facepipe.engine import WorkerFactory, create_engine
    from facepipe.engine.work import VideoJob
    from facepipe.video import build_analyzer, output_paths

    out = tmp_path / "out"
    out.mkdir()
    factory = WorkerFactory(build_analyzer, "haar", None, None, "cpu", {"min_size": 40})
    jobs = [VideoJob(p, output_paths(out, p.name), {"max_gap_s": 1.0},
                     {"annotate": False, "settings": {"test": 1}})
            for p in sorted(clips.glob("c*.mp4"))]
    engine = create_engine("ray", workers=2)
    outcomes = list(engine.map(factory, _kill_first_attempt, jobs))
    assert (out / "killed-once").is_file()                       # a worker really died mid-item
    assert sorted(o.index for o in outcomes) == [0, 1, 2, 3]     # ... and every item came back once
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    for job in jobs:
        assert job.outputs.marker.is_file()
        recs = job.outputs.frames.read_text().splitlines()
        assert len(recs) == len({json.loads(r)["frame"] for r in recs}) > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]   # no partial file left


def test_driver_killed_mid_run_then_resume_finishes_the_rest(ray_address: str, tmp_path: Path,
                                                              astronaut: np.ndarray) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        face_clip(src / f"v{i}.mp4", astronaut, n=30)
    out = tmp_path / "out"
    args = ["video", str(src), "--out", str(out), "--no-annotate", "--min-detect-size", "40", "--device", "cpu",
            "--batch-size", "4"]
    driver = subprocess.Popen([sys.executable, "-m", "facepipe.cli", *args, "--engine", "ray",
                               "--ray-address", ray_address, "--ray-workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.done.json")):
            assert driver.poll() is None, driver.stderr.read() if driver.stderr else ""
            assert time.monotonic() < deadline, "no video finished in time"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
    done_before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.done.json")}
    finished = [n[: -len(".done.json")] for n in done_before]
    assert 1 <= len(finished) < 6
    kept = {p.name: p.stat().st_mtime_ns for n in finished for p in out.glob(f"{n}.*")}
    r = _invoke([*args, "--engine", "ray", "--resume"])
    assert r.exit_code == 0, r.output
    assert r.output.count("already done, skipped (--resume)") == len(finished)
    for name, (mtime, content) in done_before.items():
        assert (out / name).stat().st_mtime_ns == mtime and (out / name).read_bytes() == content
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept      # finished outputs untouched
    assert sorted(p.name for p in out.glob("*.done.json")) == [f"v{i}.done.json" for i in range(6)]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def _pid(state, item, progress=None):  # type: ignore[no-untyped-def]
    return os.getpid()


def test_kept_workers_are_reused_until_close(ray_address: str) -> None:
    from facepipe.engine import WorkerFactory, create_engine

    engine = create_engine("ray", workers=2, keep_workers=True)
    try:
        first = {o.value for o in engine.map(WorkerFactory(dict), _pid, list(range(6)))}
        second = {o.value for o in engine.map(WorkerFactory(dict), _pid, list(range(6)))}
        assert second <= first and 1 <= len(first) <= 2     # the same worker processes, models kept
    finally:
        engine.close()
    assert not engine._kept


# --------------------------------------------------------------------------- long videos in segments


@pytest.fixture(scope="module")
def crossing(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> tuple[Path, Path, Path]:
    """The segment tests' clip (a face crossing every boundary of 2-s segments, a cut), a gallery
    naming it, and the single-pass outputs of ``facepipe video`` on the local engine."""
    d = tmp_path_factory.mktemp("crossing")
    (d / "in").mkdir()
    clip = crossing_clip(d / "in" / "cross.mp4", astronaut)
    gallery = astronaut_gallery(d / "gallery", astronaut)
    r = _invoke(["video", str(clip), *_CROSSING_ARGS, "--gallery", str(gallery), "--out", str(d / "local")])
    assert r.exit_code == 0, r.output
    return clip, gallery, d / "local"


_CROSSING_ARGS = ["--detector", "haar", "--embedder", "untrained", "--device", "cpu", "--min-detect-size", "40",
                  "--batch-size", "4"]


def test_long_video_in_segments_on_ray_writes_what_one_local_pass_writes(
        ray_address: str, crossing: tuple[Path, Path, Path], tmp_path: Path) -> None:
    clip, gallery, local = crossing
    r = _invoke(["video", str(clip), *_CROSSING_ARGS, "--gallery", str(gallery), "--out", str(tmp_path / "ray"),
                 "--engine", "ray", "--segment-seconds", "2", "--segment-overlap", "1.5"])
    assert r.exit_code == 0, r.output
    a, b = output_files(local), output_files(tmp_path / "ray")
    assert sorted(a) == sorted(b) and "cross.annotated.mp4" in b
    for k in a:
        if not k.endswith(".annotated.mp4"):        # re-encoded; compared through frames.jsonl
            assert a[k] == b[k], k
    summary = json.loads(b["cross.tracks.json"])  # type: ignore[arg-type]
    assert summary["shot_cuts"] == 1
    # one track across three segment boundaries up to the cut, one after it (re-identification
    # stays within a shot), both named
    assert [(t["first_frame"], t["last_frame"], t["identity"]) for t in summary["tracks"]] == [
        (0, 44, "eileen_collins"), (45, 69, "eileen_collins")]


def _kill_mid_segment(analyzer, piece, progress=None):  # type: ignore[no-untyped-def]
    """Run a piece of a video, but kill this worker half-way through segment 1, the first time."""
    from facepipe.engine.work import SegmentJob, run_video_piece

    flag = piece.job.outputs.marker.parent / "killed-once" if isinstance(piece, SegmentJob) else None
    if flag is not None and piece.segment.index == 1 and not flag.exists():
        middle = (piece.segment.start + piece.segment.stop) // 2

        def progress(phase: str, done: int, total: int) -> None:  # noqa: F811
            if done >= middle and not flag.exists():
                flag.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
    return run_video_piece(analyzer, piece, progress)


def test_a_worker_killed_mid_segment_still_gives_every_frame_once(
        ray_address: str, crossing: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from facepipe import defaults
    from facepipe.engine import WorkerFactory, create_engine
    from facepipe.engine.work import VideoJob, map_videos
    from facepipe.gallery import Gallery
    from facepipe.video import build_analyzer, output_paths

    clip, gallery, local = crossing
    out = tmp_path / "out"
    out.mkdir()
    thr = float(Gallery.open(gallery).threshold)
    factory = WorkerFactory(build_analyzer, "haar", "untrained", gallery, "cpu", {"min_size": 40})
    # the options `facepipe video` gives a job by default (the local run's)
    job = VideoJob(clip, output_paths(out, clip.name), {"max_gap_s": 1.0, "sim_min": thr},
                   {"batch_size": 4, "annotate": False, "unknown_weight": thr, "shot_cut": 0.3, "settings": {},
                    "reid_gap": defaults.VIDEO_REID_GAP, "min_track_frames": defaults.VIDEO_MIN_TRACK_FRAMES})
    pieces: list[object] = []
    engine = create_engine("ray", workers=2)
    outcomes = list(map_videos(engine, factory, [job], segment_seconds=2.0, overlap_seconds=1.5,
                               on_piece=pieces.append, work=_kill_mid_segment))
    assert (out / "killed-once").is_file()                        # a worker really died mid-segment
    assert [o.ok for o in outcomes] == [True], [o.error for o in outcomes]
    kinds = sorted(type(p.item).__name__ for p in pieces)  # type: ignore[attr-defined]
    assert kinds == ["JoinJob"] + ["SegmentJob"] * 4 + ["VideoJob"]   # each piece came back once
    recs = [json.loads(x) for x in job.outputs.frames.read_text().splitlines()]
    assert [r["frame"] for r in recs] == list(range(70))          # every frame exactly once
    for name in ("cross.frames.jsonl", "cross.tracks.csv", "cross.tracks.json"):
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]   # no partial file left
