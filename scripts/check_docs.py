#!/usr/bin/env python
"""Check that every number in the results tables of README.md and docs/*.md comes from a
committed JSON result file, and that each results table names the command that made it.

Convention (write it on the line(s) just above a table; blank lines may separate them)::

    <!-- source: docs/embedding_bench.json -->
    <!-- source: docs/a.json, docs/b.json; command: python scripts/bench_x.py --flag -->
    <!-- not-results: option defaults, not measurements -->

* ``source:`` one or more JSON files (paths from the repository root). Every number in
  the table's body (header row and `code spans` excluded) must be found in one of them:
  equal to a JSON number at the precision the table prints it (``0.952`` matches
  0.95212), or as a percentage of it (``89.2 %`` matches 0.8917), or as a token inside a
  JSON string (``720p``). ``1,184`` is 1184; ``1M`` / ``200k`` are 1e6 / 2e5; ``3.2e-01``
  is 0.32 at two decimals.
* ``command:`` the command that produced the table. It may be omitted when the JSON
  files record their own ``command`` (top level or under ``meta``), or when the paragraph
  right above the table shows one in a code span (`` `python scripts/...` `` or
  `` `facepipe ...` ``).
* ``not-results:`` the table has numbers that are not measurements (defaults, sizes).

A table with numbers and no marker is reported ("no source marker"); it fails the check
only with ``--strict`` (the final docs pass). A marked table whose numbers are not all
found, whose JSON is missing or invalid, or that names no command always fails.

    python scripts/check_docs.py              # report; exit 1 on marked tables that disagree
    python scripts/check_docs.py --strict     # also fail on unmarked results tables
    python scripts/check_docs.py --json       # machine-readable report
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent

MARKER_RE = re.compile(r"<!--\s*(source|not-results)\s*:(.*?)-->", re.S)
CODE_RE = re.compile(r"`[^`]*`")
LINK_RE = re.compile(r"\]\([^)]*\)")
NUMBER_RE = re.compile(r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+−]?\d+|[kM](?![A-Za-z]))?")
COMMAND_RE = re.compile(r"`\s*(python\d?\s+scripts/|facepipe\s+|\.ci/run)[^`]*`")


@dataclass
class Table:
    file: str
    line: int                      # 1-based line of the table's header row
    header: list[str]
    rows: list[list[str]]
    marker: dict[str, str] | None = None
    context: str = ""              # the paragraph just above the table (and its marker)


@dataclass
class Finding:
    file: str
    line: int
    kind: str                      # ok | unmarked | not-results | error
    message: str
    sources: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    numbers: int = 0


def split_row(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|"):
        s = s[:-1]
    cells, cur, code = [], "", False
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "`":
            code = not code
        if ch == "\\" and i + 1 < len(s) and s[i + 1] == "|":
            cur += "|"
            i += 2
            continue
        if ch == "|" and not code:
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
        i += 1
    cells.append(cur.strip())
    return cells


def parse_marker(text: str) -> dict[str, str]:
    m = MARKER_RE.search(text)
    if not m:
        return {}
    out: dict[str, str] = {}
    body = f"{m.group(1)}:{m.group(2)}"
    for part in body.split(";"):
        if ":" in part:
            k, v = part.split(":", 1)
            out[k.strip().lower()] = v.strip()
    return out


def iter_tables(path: Path, rel: str) -> Iterator[Table]:
    lines = path.read_text(encoding="utf-8").splitlines()
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            i += 1
            continue
        if (not in_fence and line.lstrip().startswith("|") and i + 1 < len(lines)
                and re.match(r"^\s*\|?\s*:?-{2,}", lines[i + 1])):
            start = i
            header = split_row(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(split_row(lines[i]))
                i += 1
            # the marker: comment lines right above (blank lines allowed in between)
            j = start - 1
            marker_text = []
            while j >= 0 and (not lines[j].strip() or lines[j].strip().startswith("<!--")):
                if lines[j].strip():
                    marker_text.insert(0, lines[j])
                j -= 1
            # the paragraph above the marker
            para = []
            while j >= 0 and lines[j].strip() and not lines[j].lstrip().startswith(("|", "#")):
                para.insert(0, lines[j])
                j -= 1
            marker = {}
            for mt in marker_text:
                marker.update(parse_marker(mt))
            yield Table(rel, start + 1, header, rows, marker or None, "\n".join(para))
            continue
        i += 1


def numbers_in(cell: str) -> list[str]:
    text = LINK_RE.sub("]", CODE_RE.sub(" ", cell))
    text = re.sub(r"<[^>]+>", " ", text)          # html tags
    return [m.group(0) for m in NUMBER_RE.finditer(text)]


def parse_number(tok: str) -> tuple[float, int]:
    """(value, decimals printed) of a table token."""
    t = tok.replace("−", "-").replace(",", "")
    mult = 1.0
    if t.endswith("k"):
        mult, t = 1e3, t[:-1]
    elif t.endswith("M"):
        mult, t = 1e6, t[:-1]
    exp = 0
    m = re.match(r"^(.*?)[eE]([-+]?\d+)$", t)
    if m:                                  # 3.2e-01: two decimals of 0.32
        t, exp = m.group(1), int(m.group(2))
    decimals = (len(t.split(".")[1]) if "." in t else 0) - exp
    return float(t) * 10.0 ** exp * mult, (decimals if mult == 1.0 else -1)


def json_values(obj: Any, nums: list[float], strings: list[str]) -> None:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        if math.isfinite(obj):
            nums.append(float(obj))
    elif isinstance(obj, str):
        strings.append(obj)
        try:
            v = float(obj)
            if math.isfinite(v):
                nums.append(v)
        except ValueError:
            pass
    elif isinstance(obj, dict):
        for k, v in obj.items():
            strings.append(str(k))
            json_values(v, nums, strings)
    elif isinstance(obj, list):
        for v in obj:
            json_values(v, nums, strings)


def _rounds_to(v: float, value: float, decimals: int) -> bool:
    if decimals < 0:                       # 1M, 200k: order of magnitude as printed
        return v != 0 and abs(v - value) / abs(value) < 0.05
    q = 10.0 ** -decimals
    # half a unit in the last printed place, plus float noise
    return abs(v - value) <= q / 2 + 1e-9 * max(1.0, abs(value))


def number_found(tok: str, nums: list[float], strings: list[str]) -> bool:
    value, decimals = parse_number(tok)
    for v in nums:
        for cand in (v, v * 100.0):
            if _rounds_to(cand, value, decimals) or _rounds_to(cand, -value, decimals):
                return True
    bare = tok.replace("−", "-").lstrip("+")
    pat = re.compile(rf"(?<![\d.]){re.escape(bare)}(?![\d])")
    return any(pat.search(s) for s in strings)


def json_command(doc: Any) -> str | None:
    if isinstance(doc, dict):
        for key in ("command", "commands"):
            if isinstance(doc.get(key), (str, list)) and doc[key]:
                return str(doc[key])
        meta = doc.get("meta")
        if isinstance(meta, dict):
            return json_command(meta)
    return None


def check_table(t: Table, root: Path) -> Finding:
    body_numbers = [tok for row in t.rows for cell in row for tok in numbers_in(cell)]
    if t.marker is None:
        if not body_numbers:
            return Finding(t.file, t.line, "ok", "no numbers", numbers=0)
        return Finding(t.file, t.line, "unmarked",
                       f"results table without a source marker ({len(body_numbers)} numbers)",
                       numbers=len(body_numbers))
    if "not-results" in t.marker:
        return Finding(t.file, t.line, "not-results", t.marker["not-results"], numbers=len(body_numbers))
    srcs = [s.strip() for s in t.marker.get("source", "").split(",") if s.strip()]
    if not srcs:
        return Finding(t.file, t.line, "error", "source marker names no JSON file")
    nums: list[float] = []
    strings: list[str] = []
    commands = []
    for s in srcs:
        p = root / s
        if not p.is_file():
            return Finding(t.file, t.line, "error", f"source {s} does not exist", srcs)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return Finding(t.file, t.line, "error", f"source {s} is not valid JSON ({exc})", srcs)
        json_values(doc, nums, strings)
        commands.append(json_command(doc))
    has_command = bool(t.marker.get("command")) or all(commands) or bool(COMMAND_RE.search(t.context))
    unmatched = [tok for tok in body_numbers if not number_found(tok, nums, strings)]
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} of {len(body_numbers)} numbers not in {', '.join(srcs)}: "
                        + ", ".join(unmatched[:12]) + (" ..." if len(unmatched) > 12 else ""))
    if not has_command:
        problems.append("names no command (marker `command:`, a JSON `command` field, or a "
                        "`python scripts/...` / `facepipe ...` code span just above the table)")
    if problems:
        return Finding(t.file, t.line, "error", "; ".join(problems), srcs, unmatched, len(body_numbers))
    return Finding(t.file, t.line, "ok", f"{len(body_numbers)} numbers found", srcs, [], len(body_numbers))


def doc_files(root: Path) -> list[Path]:
    files = [root / "README.md"] + sorted((root / "docs").glob("*.md"))
    return [f for f in files if f.is_file()]


def check(root: Path = ROOT, files: list[Path] | None = None) -> list[Finding]:
    out = []
    for f in files or doc_files(root):
        rel = str(f.relative_to(root)) if f.is_relative_to(root) else str(f)
        for t in iter_tables(f, rel):
            out.append(check_table(t, root))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="markdown files [README.md docs/*.md]")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (JSON paths are relative to it)")
    ap.add_argument("--strict", action="store_true", help="fail on results tables without a source marker")
    ap.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    findings = check(root, [f.resolve() for f in args.files] or None)
    errors = [f for f in findings if f.kind == "error"]
    unmarked = [f for f in findings if f.kind == "unmarked"]
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for f in findings:
            if f.kind in ("error", "unmarked"):
                print(f"{f.file}:{f.line}: {'ERROR' if f.kind == 'error' else 'no source marker'}: {f.message}")
        ok = sum(f.kind == "ok" and f.numbers > 0 for f in findings)
        print(f"check_docs: {ok} results tables agree with their JSON, {len(errors)} disagree or lack a "
              f"command, {len(unmarked)} have no source marker"
              + ("" if args.strict else " (reported, not failed: --strict fails them)"), file=sys.stderr)
    return 1 if errors or (args.strict and unmarked) else 0


if __name__ == "__main__":
    raise SystemExit(main())
