"""`facepipe detect` through click's CliRunner: formats, annotation and every bad-input case."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from facepipe.cli import cli
from facepipe.io import load_image
from facepipe.types import Box

ASTRONAUT_FACE = Box(181.0, 62.0, 87.0, 110.0)


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_help_lists_commands() -> None:
    r = run("--help")
    assert r.exit_code == 0
    assert "detect" in r.output and "Find faces" in r.output


def test_csv_output_matches_face_recognition_order(astronaut_path: Path) -> None:
    r = run("detect", str(astronaut_path))
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert len(rows) >= 1
    path, top, right, bottom, left, score = rows[0]
    assert path == str(astronaut_path)
    box = Box.from_xyxy(int(left), int(top), int(right), int(bottom))
    assert box.iou(ASTRONAUT_FACE) > 0.5
    assert float(score) > 0


def test_default_detector_is_the_benchmark_winner(astronaut_path: Path) -> None:
    r = run("detect", "--format", "json", str(astronaut_path))
    faces = json.loads(r.stdout)[0]["faces"]
    assert {f["detector"] for f in faces} == {"mtcnn"} and len(faces[0]["landmarks"]) == 5


def test_haar_still_available(astronaut_path: Path) -> None:
    r = run("detect", "--detector", "haar", "--format", "json", str(astronaut_path))
    faces = json.loads(r.stdout)[0]["faces"]
    assert faces[0]["detector"] == "haar"
    assert Box(faces[0]["x"], faces[0]["y"], faces[0]["w"], faces[0]["h"]).iou(ASTRONAUT_FACE) > 0.5


def test_csv_header_option(astronaut_path: Path) -> None:
    r = run("detect", "--header", str(astronaut_path))
    assert r.stdout.splitlines()[0] == "path,top,right,bottom,left,det_score"


def test_json_and_jsonl(astronaut_path: Path) -> None:
    r = run("detect", "--format", "json", str(astronaut_path))
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc[0]["width"] == 512 and doc[0]["height"] == 512
    face = doc[0]["faces"][0]
    assert set(face) >= {"x", "y", "w", "h", "det_score", "detector"}
    assert Box(face["x"], face["y"], face["w"], face["h"]).iou(ASTRONAUT_FACE) > 0.5
    r2 = run("detect", "--format", "jsonl", str(astronaut_path), str(astronaut_path.parent))
    lines = [json.loads(x) for x in r2.stdout.splitlines()]
    assert len(lines) == 1  # the directory only holds the same file: deduplicated


def test_annotate_writes_copies(tmp_path: Path, astronaut: np.ndarray) -> None:
    src = tmp_path / "in" / "sub"
    src.mkdir(parents=True)
    Image.fromarray(astronaut).save(src / "a.png")
    out = tmp_path / "out"
    r = run("detect", "-q", "--annotate", str(out), str(tmp_path / "in"))
    assert r.exit_code == 0, r.output
    written = out / "sub" / "a.png"
    assert written.is_file()
    drawn = load_image(written)
    assert drawn.shape == astronaut.shape and not np.array_equal(drawn, astronaut)


def test_bad_files_are_reported_and_skipped(tmp_path: Path, astronaut: np.ndarray) -> None:
    d = tmp_path / "batch"
    d.mkdir()
    Image.fromarray(astronaut).save(d / "good.jpg")
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, format="JPEG")
    (d / "cut.jpg").write_bytes(buf.getvalue()[:3000])
    r = run("detect", str(d), str(tmp_path / "missing.jpg"))
    _no_traceback(r)
    assert r.exit_code == 1
    assert "good.jpg" in r.stdout
    err_lines = [l for l in r.stderr.splitlines() if l.startswith("facepipe: error:")]
    assert len(err_lines) == 4
    for name, problem in [("empty.jpg", "empty"), ("text.png", "not a recognised image"),
                          ("cut.jpg", "truncated"), ("missing.jpg", "no such file")]:
        assert any(name in l and problem in l for l in err_lines), (name, err_lines)
    assert "1 image(s) processed" in r.stderr and "4 failed" in r.stderr


def test_directory_without_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    r = run("detect", str(tmp_path))
    _no_traceback(r)
    assert r.exit_code == 1
    assert "contains no files of type" in r.stderr and str(tmp_path) in r.stderr


def test_unwritable_annotate_dir(tmp_path: Path, astronaut_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = run("detect", "--annotate", str(blocker / "out"), str(astronaut_path))
    _no_traceback(r)
    assert r.exit_code != 0
    assert str(blocker / "out") in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.strip()]) == 1
    assert r.stdout == ""  # nothing processed: the problem is found before any work


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_odd_modes_are_processed(tmp_path: Path, astronaut: np.ndarray, mode: str) -> None:
    if mode == "I;16":
        img = Image.fromarray((astronaut.mean(axis=2) * 257).astype(np.uint16))
    else:
        img = Image.fromarray(astronaut).convert(mode)
    p = tmp_path / "m.png"
    img.save(p)
    r = run("detect", "--format", "json", str(p))
    assert r.exit_code == 0, r.stderr
    faces = json.loads(r.stdout)[0]["faces"]
    assert any(Box(f["x"], f["y"], f["w"], f["h"]).iou(ASTRONAUT_FACE) > 0.5 for f in faces)


def test_option_errors_are_one_line(astronaut_path: Path) -> None:
    r = run("detect", "--detector", "haar", "--cascade", "nonexistent", str(astronaut_path))
    _no_traceback(r)
    assert r.exit_code != 0 and "unknown cascade" in r.stderr
    r = run("detect", "--detector", "nope", str(astronaut_path))
    assert r.exit_code != 0 and "unknown detector" in r.stderr
    r = run("detect", "--cascade", "alt", str(astronaut_path))  # default detector is MTCNN
    assert r.exit_code != 0 and "--cascade applies to --detector haar" in r.stderr
    r = run("detect", "--device", "tpu", str(astronaut_path))
    assert r.exit_code != 0 and "invalid device" in r.stderr
