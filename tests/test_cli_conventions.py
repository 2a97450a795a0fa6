"""One command line: defaults from one place, one option vocabulary, usage errors exit 2.

Issue 11 items 1, 2 and 4 and issue 9 item 4 (options validated at the boundary).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from facepipe import defaults
from facepipe.cli import COMMANDS, cli
from facepipe.scores import decide
from facepipe.types import Match

ROOT = Path(__file__).resolve().parent.parent


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _command(name: str) -> click.Command:
    ctx = click.Context(cli)
    cmd = cli.get_command(ctx, name)
    assert cmd is not None
    return cmd


def _all_commands() -> dict[str, click.Command]:
    """Every leaf command, keyed 'gallery list', 'identify', ..."""
    out: dict[str, click.Command] = {}
    for name in COMMANDS:
        cmd = _command(name)
        if isinstance(cmd, click.Group):
            for sub, c in cmd.commands.items():
                if isinstance(c, click.Group):
                    continue
                out[f"{name} {sub}"] = c
        else:
            out[name] = cmd
    return out


def _option(cmd: click.Command, flag: str) -> click.Option | None:
    for p in cmd.params:
        if isinstance(p, click.Option) and flag in p.opts:
            return p
    return None


# --------------------------------------------------------------------------- defaults


def test_readme_defaults_table_is_generated_from_defaults_module() -> None:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- defaults:begin[^\n]*-->\n(.*?)\n<!-- defaults:end -->", readme, re.S)
    assert m, "README lost its generated defaults table"
    assert m.group(1) == defaults.markdown_table()


def test_top_level_help_lists_the_defaults() -> None:
    r = run("--help")
    assert r.exit_code == 0
    for d in defaults.table():
        assert re.search(rf"{re.escape(d.option)}\s+{re.escape(d.shown())}", r.output), d.option
    # the detect line names the detectors it really has, not "Haar cascade or CNN"
    (line,) = [ln for ln in r.output.splitlines() if ln.strip().startswith("detect ")]
    assert "MTCNN" in line and "Haar" in line


def test_no_command_hard_codes_a_model_default() -> None:
    """Detector/embedder/device defaults come from facepipe.defaults, never a literal in a command."""
    for path in sorted((ROOT / "facepipe" / "commands").glob("*.py")):
        src = path.read_text()
        for literal in ('default="mtcnn"', 'default="haar"', 'default="cnn"', 'default="haar+cnn"',
                        'default="default"', "default=32"):
            assert literal not in src, f"{path.name} hard-codes {literal}"
    for name, cmd in _all_commands().items():
        det = _option(cmd, "--detector")
        if det is not None:
            assert det.default is None, name  # None = facepipe.defaults.DETECTOR at run time
            assert f"[default: {defaults.DETECTOR}]" in (det.help or ""), name
        emb = _option(cmd, "--min-embed-size")
        if emb is not None:
            assert emb.default == defaults.MIN_EMBED_SIZE, name
        dev = _option(cmd, "--device")
        if dev is not None:
            assert dev.default is None and f"[default: {defaults.DEVICE}]" in (dev.help or ""), name
        sdev = _option(cmd, "--search-device")
        if sdev is not None:
            assert sdev.default == defaults.SEARCH_DEVICE, name


def test_changing_the_default_detector_changes_every_command(monkeypatch: pytest.MonkeyPatch,
                                                             astronaut_path: Path) -> None:
    """`detect` without --detector runs whatever facepipe.defaults names (here Haar)."""
    monkeypatch.setattr(defaults, "DETECTOR", "haar")
    r = run("detect", "--format", "json", astronaut_path)
    assert r.exit_code == 0, r.output
    faces = json.loads(r.stdout)[0]["faces"]
    assert faces and {f["detector"] for f in faces} == {"haar"}


def test_builders_use_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from facepipe.builders import build_detector

    monkeypatch.setattr(defaults, "DETECTOR", "haar")
    assert type(build_detector()).__name__ == "HaarDetector"


# --------------------------------------------------------------------------- vocabulary


def test_every_gallery_command_takes_dash_g() -> None:
    takes_gallery = {name: cmd for name, cmd in _all_commands().items() if _option(cmd, "--gallery")}
    assert {"identify", "enroll", "video", "gallery list", "gallery calibrate"} <= set(takes_gallery)
    for name, cmd in takes_gallery.items():
        assert "-g" in _option(cmd, "--gallery").opts, name


def test_size_options_have_one_name_per_meaning() -> None:
    for name, cmd in _all_commands().items():
        flags = {f for p in cmd.params if isinstance(p, click.Option) and not p.hidden for f in p.opts}
        assert "--min-size" not in flags and "--min-face" not in flags, name
    for name in ("detect", "identify", "enroll", "embed", "video", "explain"):
        assert _option(_command(name), "--min-detect-size") is not None, name
    for name in ("identify", "enroll", "embed", "video"):
        assert _option(_command(name), "--min-embed-size") is not None, name


def test_deprecated_min_size_alias_still_works_with_a_warning(astronaut_path: Path) -> None:
    # the astronaut's face is ~110 px: a 300-px detection minimum finds nothing
    r = run("detect", "--detector", "haar", "--min-size", "300", astronaut_path)
    assert r.exit_code == 0 and r.stdout == ""
    assert "--min-size is deprecated, use --min-detect-size" in r.stderr
    r = run("detect", "--detector", "haar", "--min-detect-size", "300", astronaut_path)
    assert r.exit_code == 0 and r.stdout == "" and "deprecated" not in r.stderr
    r = run("detect", "--detector", "haar", "--min-detect-size", "40", astronaut_path)
    assert r.stdout.count("\n") >= 1


def test_help_texts() -> None:
    emb = _option(_command("embed"), "--embedder")
    assert "gallery" not in (emb.help or "")  # embed has no gallery
    r = run("enroll", "--help")
    assert "enroll [OPTIONS] (NAME IMAGE... | --from-folders ROOT)" in r.output.splitlines()[0]


def test_detection_score_is_det_score_on_a_0_1_scale(astronaut_path: Path) -> None:
    """det_score is a face probability everywhere; Haar's cascade response has its own key."""
    r = run("detect", "--detector", "mtcnn", "--format", "jsonl", astronaut_path)
    face = json.loads(r.stdout.splitlines()[0])["faces"][0]
    assert "score" not in face and 0.0 <= face["det_score"] <= 1.0 and "det_response" not in face
    r = run("detect", "--detector", "haar", "--format", "jsonl", astronaut_path)
    face = json.loads(r.stdout.splitlines()[0])["faces"][0]
    assert face["det_score"] is None and face["det_response"] > 1.0  # a response, not a probability
    r = run("detect", "--detector", "haar", "--header", astronaut_path)
    assert r.stdout.splitlines()[0].endswith(",det_response")
    r = run("detect", "--detector", "mtcnn", "--header", astronaut_path)
    assert r.stdout.splitlines()[0].endswith(",det_score")


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("args, needle", [
    (["identify", "-g", "G", "--show-similarity", "--show-distance", "x.jpg"], "not both"),
    (["identify", "-g", "G", "--show-score", "--show-distance", "x.jpg"], "not both"),
    (["identify", "-g", "G", "--top-k", "3", "x.jpg"], "--top-k"),
    (["identify", "-g", "G", "--tolerance", "0.3", "--threshold", "0.7", "x.jpg"], "not both"),
    (["identify", "-g", "G", "--threshold", "nan", "x.jpg"], "not a finite number"),
    (["identify", "-g", "G", "--tolerance", "nan", "x.jpg"], "not a finite number"),
    (["identify", "-g", "G", "--tolerance", "inf", "x.jpg"], "not a finite number"),
    (["identify", "-g", "G", "--tolerance", "-0.1", "x.jpg"], "not in the range"),
    (["identify", "-g", "G", "--tolerance", "2.5", "x.jpg"], "not in the range"),
    (["identify", "-g", "G", "--threshold", "1.01", "x.jpg"], "not in the range"),
    (["identify", "-g", "G", "--min-margin", "-0.1", "x.jpg"], "not in the range"),
    (["identify", "-g", "G", "--min-margin", "nan", "x.jpg"], "not a finite number"),
    (["identify", "-g", "G", "--min-embed-size", "-3", "x.jpg"], "x>=1"),
    (["identify", "-g", "G", "--min-detect-size", "0", "x.jpg"], "x>=1"),
    (["identify", "x.jpg"], "Missing option '-g'"),
    (["enroll", "-g", "G", "--threshold", "nan", "ada", "x.jpg"], "not a finite number"),
    (["detect", "--detector", "mtcnn", "--cascade", "alt", "x.jpg"], "--cascade applies"),
    (["detect", "--min-size", "-5", "x.jpg"], "x>=1"),
    (["video", "--out", "o", "--detector", "haar", "--det-threshold", "0.5", "x.mp4"], "--det-threshold"),
    (["video", "--out", "o", "--det-threshold", "nan", "x.mp4"], "not a finite number"),
    (["enroll", "-g", "G"], "NAME"),
])
def test_usage_errors_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, [a if a not in ("G", "o") else str(tmp_path / a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.output


# --------------------------------------------------------------------------- decision rule


def _brute_force(scores: dict[str, float], threshold: float, min_margin: float) -> tuple[str, float | None]:
    order = sorted(scores.items(), key=lambda kv: -kv[1])
    if not order:
        return "unknown", None
    margin = order[0][1] - order[1][1] if len(order) > 1 else None
    ok = order[0][1] >= threshold and (margin is None or margin >= min_margin)
    return (order[0][0] if ok else "unknown"), margin


def test_decide_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(0, 5))
        scores = {f"p{i}": float(rng.uniform(-1, 1)) for i in range(n)}
        thr, mm = float(rng.uniform(-0.2, 0.9)), float(rng.choice([0.0, 0.02, 0.1]))
        cands = [Match(k, v) for k, v in sorted(scores.items(), key=lambda kv: -kv[1])]
        v = decide(cands, thr, mm)
        name, margin = _brute_force(scores, thr, mm)
        assert v.name == name
        assert (v.margin is None) == (margin is None) and (margin is None or math.isclose(v.margin, margin))
        if v.similarity is not None:
            assert math.isclose(v.distance, 1 - v.similarity) and math.isclose(v.tolerance, 1 - thr)
            # the same rule in both units
            assert (v.distance <= v.tolerance + 1e-12) == (v.similarity >= thr - 1e-12)
        assert v.ambiguous == (bool(cands) and cands[0].score >= thr and v.name == "unknown")


def test_near_tie_is_unknown_and_flagged() -> None:
    v = decide([Match("ada", 0.724), Match("bob", 0.722)], threshold=0.5, min_margin=0.01)
    assert v.name == "unknown" and v.ambiguous and v.best == "ada"
    assert math.isclose(v.margin, 0.002)
    d = v.to_dict()
    assert d["margin"] == 0.002 and d["ambiguous"] is True and d["tolerance"] == 0.5
    assert decide([Match("ada", 0.724), Match("bob", 0.722)], 0.5).name == "ada"  # rule off by default
    lone = decide([Match("ada", 0.6)], 0.5, min_margin=0.5)
    assert lone.name == "ada" and lone.margin is None  # no runner-up: the rule does not apply


def test_every_float_option_refuses_nan_and_infinity() -> None:
    """Issue 9 item 4: no float option of any command takes NaN (click's FloatRange would)."""
    from facepipe.commands._common import FiniteFloat

    seen = 0
    for name, cmd in _all_commands().items():
        for p in cmd.params:
            if isinstance(p.type, (click.types.FloatParamType, click.FloatRange)) or p.type is click.FLOAT:
                raise AssertionError(f"{name} {p.opts}: plain float type lets NaN through; use FiniteFloat")
            if isinstance(p.type, FiniteFloat):
                seen += 1
                for bad in ("nan", "inf", "-inf"):
                    with pytest.raises(click.BadParameter):
                        p.type.convert(bad, p, None)
    assert seen >= 10
