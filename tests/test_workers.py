"""`--workers/--cpus N` (issue 11 item 10): local worker processes give the single-process output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from facepipe.cli import cli


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> list[Path]:
    d = tmp_path_factory.mktemp("workers")
    out = []
    for k, (y, x, s) in enumerate([(0, 0, 1.0), (20, 10, 0.8), (0, 60, 0.6), (40, 0, 0.9)]):
        im = Image.fromarray(np.ascontiguousarray(astronaut[y:, x:])).resize((int(400 * s), int(380 * s)))
        p = d / f"a{k}.png"
        im.save(p)
        out.append(p)
    bad = d / "zz_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    return out + [bad]


def test_detect_workers_match_single_process(photos: list[Path]) -> None:
    one = run("detect", "--detector", "haar", "--format", "jsonl", *photos)
    two = run("detect", "--detector", "haar", "--format", "jsonl", "--workers", "2", *photos)
    assert one.exit_code == two.exit_code == 1  # the broken file
    assert one.stdout == two.stdout and len(one.stdout.splitlines()) == len(photos)
    errors = [ln for ln in two.stderr.splitlines() if ln.startswith("facepipe: error:")]
    assert len(errors) == 1 and "zz_broken.jpg" in errors[0]   # reported once (and listed at the end)
    cpus = run("detect", "--detector", "haar", "--cpus", "-1", *photos)  # face_recognition's spelling
    assert cpus.exit_code == 1 and cpus.stdout.count("\n") >= 4


def test_identify_workers_match_single_process(photos: list[Path], tmp_path: Path) -> None:
    g = tmp_path / "g"
    assert run("enroll", "-g", g, "--embedder", "untrained", "--device", "cpu", "eileen", photos[0]).exit_code == 0
    args = ("identify", "-g", g, "--device", "cpu", "--format", "jsonl", *photos[1:])
    one = run(*args)
    two = run(*args, "--workers", "2")
    assert one.exit_code == two.exit_code == 1
    a, b = ([json.loads(x) for x in r.stdout.splitlines()] for r in (one, two))
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for ra, rb in zip(a, b):
        assert [f.get("name") for f in ra.get("faces", [])] == [f.get("name") for f in rb.get("faces", [])]
        for fa, fb in zip(ra.get("faces", []), rb.get("faces", [])):
            assert fa["similarity"] == pytest.approx(fb["similarity"], abs=1e-4)


@pytest.mark.parametrize("args, needle", [
    (["--workers", "0"], "must be at least 1"),
    (["--workers", "2", "--engine", "ray"], "--workers applies to --engine local"),
    (["--workers", "-2"], "x>=-1"),
])
def test_workers_usage_errors(args: list[str], needle: str, tmp_path: Path) -> None:
    r = run("identify", "-g", tmp_path, *args, "x.jpg")
    assert r.exit_code == 2 and needle in r.stderr, r.output
