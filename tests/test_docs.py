"""Docs that match their results: scripts/check_docs.py on the repository and on known cases.

Every results table in README.md and docs/*.md must carry a source marker (``--strict``),
agree with its committed JSON and name its command.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _checker():  # type: ignore[no-untyped-def]
    """scripts/check_docs.py as a module (registered first: its dataclasses look it up)."""
    if "check_docs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("check_docs", ROOT / "scripts" / "check_docs.py")
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["check_docs"] = mod
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return sys.modules["check_docs"]


def test_every_results_table_is_marked_and_agrees_with_its_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = _checker().main(["--strict"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err


def _doc(tmp_path: Path, table_marker: str, rows: str, result: dict, context: str = "") -> Path:
    (tmp_path / "docs").mkdir(exist_ok=True)
    (tmp_path / "docs" / "r.json").write_text(json.dumps(result))
    md = tmp_path / "docs" / "x.md"
    md.write_text(f"# X\n\n{context}\n\n{table_marker}\n| model | accuracy | AUC | faces/s |\n|---|---:|---:|---:|\n{rows}\n")
    return md


RESULT = {"command": "python scripts/bench.py --out docs/r.json",
          "rows": [{"name": "shipped-v2", "accuracy": 0.89171, "auc": 0.95682, "faces_per_s": 195.4}]}


@pytest.mark.parametrize("rows, ok", [
    ("| `shipped` | 89.17 % | 0.9568 | 195 |", True),        # percent, 4 decimals, integer rounding
    ("| shipped-v2 | 89.2 % | 0.957 | 195.4 |", True),        # fewer decimals; a token in a JSON string
    ("| `shipped` | 89.2 % | 0.9595 | 195 |", False),         # an AUC that is not in the JSON
    ("| `shipped` | 88.7 % | 0.957 | 195 |", False),          # a rounded figure of another run
    ("| `shipped` | 89.17 % | 0.9568 | 28× |", False),        # a derived ratio the JSON lacks
])
def test_numbers_must_be_in_the_json(tmp_path: Path, rows: str, ok: bool) -> None:
    cd = _checker()
    md = _doc(tmp_path, "<!-- source: docs/r.json -->", rows, RESULT)
    (f,) = cd.check(tmp_path, [md])
    assert (f.kind == "ok") == ok, f


@pytest.mark.parametrize("cell, ok", [
    ("1.7e-05", True),      # 1.6667e-05 at the printed precision
    ("1.6e-05", False),     # one unit off in the last printed place
    ("3.2e-01", True),      # 0.32 at two decimals
    ("3.3e-01", False),
])
def test_scientific_notation_is_read_as_one_number(tmp_path: Path, cell: str, ok: bool) -> None:
    cd = _checker()
    result = {"command": "python scripts/bench.py", "rows": [{"fa": 1.6666666666666667e-05, "p": 0.32012}]}
    md = _doc(tmp_path, "<!-- source: docs/r.json -->", f"| `x` | {cell} | | |", result)
    (f,) = cd.check(tmp_path, [md])
    assert (f.kind == "ok") == ok, f


def test_a_table_must_name_its_command(tmp_path: Path) -> None:
    cd = _checker()
    result = {k: v for k, v in RESULT.items() if k != "command"}
    row = "| `shipped` | 89.17 % | 0.9568 | 195 |"
    (f,) = cd.check(tmp_path, [_doc(tmp_path, "<!-- source: docs/r.json -->", row, result)])
    assert f.kind == "error" and "command" in f.message
    marker = "<!-- source: docs/r.json; command: python scripts/bench.py -->"
    (f,) = cd.check(tmp_path, [_doc(tmp_path, marker, row, result)])
    assert f.kind == "ok", f
    (f,) = cd.check(tmp_path, [_doc(tmp_path, "<!-- source: docs/r.json -->", row, result,
                                    context="Measured with `python scripts/bench.py --fast`:")])
    assert f.kind == "ok", f


def test_missing_json_fails_and_unmarked_tables_fail_only_when_strict(tmp_path: Path) -> None:
    cd = _checker()
    row = "| `shipped` | 89.17 % | 0.9568 | 195 |"
    (f,) = cd.check(tmp_path, [_doc(tmp_path, "<!-- source: docs/missing.json -->", row, RESULT)])
    assert f.kind == "error" and "does not exist" in f.message
    md = _doc(tmp_path, "", row, RESULT)
    (f,) = cd.check(tmp_path, [md])
    assert f.kind == "unmarked"
    assert cd.main(["--root", str(tmp_path), str(md)]) == 0
    assert cd.main(["--root", str(tmp_path), "--strict", str(md)]) == 1
    md = _doc(tmp_path, "<!-- not-results: defaults -->", row, RESULT)
    assert cd.main(["--root", str(tmp_path), "--strict", str(md)]) == 0
