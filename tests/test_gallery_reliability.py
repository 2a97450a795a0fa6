"""Crash safety and concurrency with real processes: SIGKILL mid-enrolment, two writers at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from facepipe.gallery import Gallery

REPO = Path(__file__).resolve().parents[1]
EMB = "synthetic@0000"

# Enrols BATCHES batches of PER vectors, one committed edit per batch. The library's
# own file writes are wrapped only to announce them on stdout ("writing labels-000002.json",
# "writing index", "writing manifest.json") so the parent can SIGKILL it at each stage
# of writing a new generation.
ENROLLER = textwrap.dedent("""
    import sys, numpy as np, faiss
    import facepipe.gallery as G
    import facepipe.gallery.storage as S
    directory, tag, batches, per, dim = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    _wa, _wi = S._write_atomic, faiss.write_index
    def announce_wa(path, data):
        print("writing", path.name, flush=True)
        _wa(path, data)
    def announce_wi(index, path):
        print("writing", "index", flush=True)
        _wi(index, path)
    S._write_atomic, faiss.write_index = announce_wa, announce_wi
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    for b in range(batches):
        x = rng.normal(size=(per, dim)).astype("float32")
        print("batch", b, flush=True)
        with G.Gallery.edit(directory, embedder_id="synthetic@0000", dim=dim) as g:
            g.add(x, [f"{tag}-{b:03d}"] * per, sources=[f"{tag}/{b}/{i}.jpg" for i in range(per)])
        print("committed", b, flush=True)
""")


def _spawn(directory: Path, tag: str, batches: int, per: int, dim: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", ENROLLER, str(directory), tag, str(batches), str(per), str(dim)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _check_consistent(directory: Path, per: int) -> Gallery:
    """The gallery opens (sha256 verified) and holds only whole batches."""
    g = Gallery.open(directory, embedder_id=EMB)
    people = g.people()
    assert all(c == per for c in people.values()), people
    assert len(g) == per * len(people)
    # every stored vector is searchable and maps back to its own person
    probe = g.vectors(g._ids[:: max(1, len(g) // 50)])
    assert all(d.name != "unknown" for d in g.identify(probe, threshold=0.99))
    return g


@pytest.mark.parametrize("stage", ["labels", "index", "manifest.json", "random"])
def test_sigkill_during_enrolment_keeps_previous_gallery(tmp_path: Path, stage: str) -> None:
    per, dim = 40_000, 64  # ~10 MB per generation
    kill_after = 2
    proc = _spawn(tmp_path, "k", 50, per, dim)
    committed, batch, t_batch = -1, -1, 0.0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            word, what = line.split()
            if word == "committed":
                committed = int(what)
            elif word == "batch":
                batch, t_batch = int(what), time.monotonic()
                if stage == "random" and batch == kill_after:
                    time.sleep(0.05 + 0.4 * np.random.default_rng().random())
                    proc.send_signal(signal.SIGKILL)
                    break
            elif word == "writing" and batch == kill_after and what.startswith(stage):
                proc.send_signal(signal.SIGKILL)  # as it starts writing this file
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    g = _check_consistent(tmp_path, per)
    # the gallery holds the batches committed before the kill, plus at most the one being written
    assert committed in (kill_after - 1, kill_after)
    assert len(g.people()) in (kill_after, kill_after + 1)
    if stage in ("labels", "index"):
        assert len(g.people()) == kill_after  # the new generation was never published
    # a later writer works normally and sweeps the killed writer's leftovers
    with Gallery.edit(tmp_path, embedder_id=EMB) as g2:
        g2.add(np.ones((1, dim), np.float32), ["after"])
    g3 = Gallery.open(tmp_path, embedder_id=EMB)
    assert g3.people()["after"] == 1 and len(g3.people()) == len(g.people()) + 1
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("index-")]) == 1


def test_two_concurrent_enrollers_lose_nothing(tmp_path: Path) -> None:
    batches, per, dim = 12, 200, 32
    procs = [_spawn(tmp_path, tag, batches, per, dim) for tag in ("a", "b")]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out)
    g = _check_consistent(tmp_path, per)
    expected = {f"{t}-{b:03d}" for t in ("a", "b") for b in range(batches)}
    assert set(g.people()) == expected
    assert g.generation == 2 * batches


# ----------------------------------------------------------------- gallery remove / calibrate

# Runs `facepipe gallery remove` or `facepipe gallery calibrate` (the real commands,
# in-process) once per step, announcing each file write on stdout as "@@ writing ...".
# calibrate's detector+embedder is replaced by a synthetic embedder (a fixed random
# vector per photo path), so the command's own code path (open, score, commit) runs
# without loading a network.
MAINTAINER = textwrap.dedent("""
    import sys, zlib, numpy as np, faiss
    import facepipe.gallery.storage as S
    import facepipe.commands.gallery as C
    from facepipe.cli import cli
    directory, op, steps, dim = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    _wa, _wi = S._write_atomic, faiss.write_index
    def announce_wa(path, data):
        print("@@ writing", path.name, flush=True)
        sys.stdin.readline()  # the test answers (go on) or kills: no race with the write
        _wa(path, data)
    def announce_wi(index, path):
        print("@@ writing", "index", flush=True)
        sys.stdin.readline()
        _wi(index, path)
    S._write_atomic, faiss.write_index = announce_wa, announce_wi
    class Emb:
        embedder_id, dim = "synthetic@0000", dim
    class Pipe:
        embedder = Emb()
    C.build_pipeline = lambda *a, **k: Pipe()
    C.gallery_embedder = lambda g: "synthetic"
    C.embed_one_face = lambda pipe, path: np.random.default_rng(zlib.crc32(str(path).encode())).normal(
        size=dim).astype("float32")
    for s in range(steps):
        print("@@ step", s, flush=True)
        if op == "remove":
            args = ["gallery", "remove", "-q", "-g", directory, f"r-{s:03d}"]
        else:
            args = ["gallery", "calibrate", "-q", "-g", directory, "--impostors", sys.argv[5],
                    "--fpir", str(round(0.5 - 0.04 * s, 2))]
        cli(args, standalone_mode=False)
        print("@@ committed", s, flush=True)
""")


def _spawn_maintainer(directory: Path, op: str, steps: int, dim: int, impostors: Path | None = None,
                      gated: bool = False) -> subprocess.Popen:
    """``gated``: every write waits for a line on stdin (see ``_kill_at``); otherwise stdin is
    empty and writes go straight on."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    args = [sys.executable, "-c", MAINTAINER, str(directory), op, str(steps), str(dim)]
    if impostors is not None:
        args.append(str(impostors))
    return subprocess.Popen(args, stdin=subprocess.PIPE if gated else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _seed_gallery(directory: Path, people: list[str], per: int, dim: int) -> None:
    rng = np.random.default_rng(1)
    with Gallery.edit(directory, embedder_id=EMB, dim=dim) as g:
        for p in people:
            g.add(rng.normal(size=(per, dim)).astype(np.float32), [p] * per,
                  sources=[f"{p}/{i}.jpg" for i in range(per)])


def _impostor_folder(root: Path, n: int) -> Path:
    for i in range(n):
        (root / f"stranger{i:02d}").mkdir(parents=True)
        (root / f"stranger{i:02d}" / "a.jpg").write_bytes(b"synthetic")
    return root


def _kill_at(proc: subprocess.Popen, step: int, stage: str) -> int:
    """SIGKILL ``proc`` as step ``step`` starts writing ``stage``; returns the last committed step."""
    committed, current = -1, -1
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("@@ "):
                continue
            word, what = line.split()[1:3]
            if word == "committed":
                committed = int(what)
            elif word == "step":
                current = int(what)
            elif word == "writing" and current == step and what.startswith(stage):
                proc.send_signal(signal.SIGKILL)  # the child waits for our answer before writing
                break
            elif word == "writing":
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    return committed


@pytest.mark.parametrize("stage", ["labels", "index", "manifest.json"])
def test_sigkill_during_gallery_remove_keeps_previous_gallery(tmp_path: Path, stage: str) -> None:
    per, dim = 3000, 64
    people = [f"r-{i:03d}" for i in range(6)] + ["keep"]
    _seed_gallery(tmp_path, people, per, dim)
    committed = _kill_at(_spawn_maintainer(tmp_path, "remove", 5, dim, gated=True), 2, stage)
    assert committed == 1
    g = _check_consistent(tmp_path, per)
    # the removal being written when killed was never published
    assert sorted(g.people()) == sorted(people[2:])
    with Gallery.edit(tmp_path, embedder_id=EMB) as g2:
        g2.remove(["r-002"])
    assert sorted(Gallery.open(tmp_path).people()) == sorted(people[3:])
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("index-")]) == 1


@pytest.mark.parametrize("stage", ["labels", "index", "manifest.json"])
def test_sigkill_during_gallery_calibrate_keeps_previous_threshold(tmp_path: Path, stage: str) -> None:
    per, dim = 2000, 64
    g_dir, imp = tmp_path / "g", _impostor_folder(tmp_path / "strangers", 20)
    _seed_gallery(g_dir, ["ada", "bob"], per, dim)
    committed = _kill_at(_spawn_maintainer(g_dir, "calibrate", 4, dim, imp, gated=True), 2, stage)
    assert committed == 1
    g = _check_consistent(g_dir, per)
    cal = g.manifest["decision"]["calibration"]
    assert cal["method"] == "fpir" and cal["target_fpir"] == pytest.approx(0.46)  # step 1's, not step 2's
    assert sorted(g.people()) == ["ada", "bob"]
    # the next calibration commits normally and sweeps the killed run's leftovers
    p = _spawn_maintainer(g_dir, "calibrate", 1, dim, imp)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    g = _check_consistent(g_dir, per)
    assert g.manifest["decision"]["calibration"]["target_fpir"] == pytest.approx(0.5)
    assert [p.name for p in g_dir.iterdir() if ".tmp-" in p.name] == []
    assert len([p for p in g_dir.iterdir() if p.name.startswith("index-")]) == 1


def test_enrol_remove_and_calibrate_at_once_lose_nothing(tmp_path: Path) -> None:
    """An enroller, a remover and a calibrator on one gallery at the same time."""
    batches, per, dim, steps = 8, 200, 32, 6
    g_dir, imp = tmp_path / "g", _impostor_folder(tmp_path / "strangers", 10)
    _seed_gallery(g_dir, [f"r-{i:03d}" for i in range(steps)] + ["keep"], per, dim)
    start = Gallery.open(g_dir).generation
    procs = [_spawn(g_dir, "a", batches, per, dim), _spawn_maintainer(g_dir, "remove", steps, dim),
             _spawn_maintainer(g_dir, "calibrate", steps, dim, imp)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    g = _check_consistent(g_dir, per)
    assert set(g.people()) == {f"a-{b:03d}" for b in range(batches)} | {"keep"}
    assert g.generation == start + batches + 2 * steps  # every commit of every writer landed
    assert g.manifest["decision"]["calibration"]["target_fpir"] == pytest.approx(0.5 - 0.04 * (steps - 1))
