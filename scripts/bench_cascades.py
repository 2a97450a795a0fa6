#!/usr/bin/env python
"""Benchmark facepipe's own Viola–Jones face cascade against OpenCV's stock cascades and the CNN.

Runs ``scripts/eval_detector.py`` (same metrics, same matching, one process so the
timings are comparable) on every development detection set with:

* ``haar`` with OpenCV's ``haarcascade_frontalface_default`` / ``alt`` / ``alt2``,
* ``haar`` with facepipe's cascade (``--cascade``, default the shipped one),
* ``haar`` with any other facepipe cascades to compare (``--also XML=LABEL``,
  e.g. a new training run next to the shipped cascade),
* ``cnn-pyramid`` and ``cnn``, facepipe's transfer-learned CNN detectors (the
  classifier slid over an image pyramid, and the single-pass detector seeded from it),

all at their default settings (scale factor 1.1, min_neighbors 3, min size 24).
Writes ``results.json`` (eval_detector's report plus the cascade's training
record from its ``.train.json``) and PR plots to ``--out`` and prints a table.

Example:
  python scripts/bench_cascades.py --out docs/results/cascades
  python scripts/bench_cascades.py --cascade runs/cascade2/facepipe_frontalface.xml --label new \
      --also cascades/facepipe_frontalface.xml=shipped --out runs/cascade2/bench
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "cascades" / "facepipe_frontalface.xml"


def _eval_detector():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("eval_detector", ROOT / "scripts" / "eval_detector.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _training_record(cascade: Path) -> dict | None:
    """Summary of the ``<name>.train.json`` next to a facepipe cascade, or None."""
    state = cascade.with_name(cascade.stem + ".train.json")
    if not state.is_file():
        return None
    st = json.loads(state.read_text())
    return {"file": str(cascade), "params": st["params"], "stop_reason": st.get("stop_reason"),
            "stages": len(st["stages"]), "weak_classifiers": sum(len(s["stumps"]) for s in st["stages"]),
            "training_seconds": st.get("seconds"), "info": st.get("info"),
            "last_stage": st["stage_stats"][-1] if st.get("stage_stats") else None}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cascade", type=Path, default=SHIPPED, help="facepipe cascade XML to benchmark")
    ap.add_argument("--label", default="facepipe-vj", help="report name of that cascade")
    ap.add_argument("--also", action="append", default=[], metavar="XML=LABEL",
                    help="another cascade to benchmark in the same run (repeatable)")
    ap.add_argument("--set", dest="sets", action="append", default=None,
                    help="detection set (default: every set under $FACEPIPE_DATA/detection)")
    ap.add_argument("--out", type=Path, required=True, help="output directory for results.json + PR plots")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images of each set")
    ap.add_argument("--no-cnn", action="store_true", help="leave the CNN detectors out")
    args = ap.parse_args(argv)
    if not args.cascade.is_file():
        ap.error(f"{args.cascade}: cascade not found")
    also: list[tuple[Path, str]] = []
    for item in args.also:
        path, sep, label = item.rpartition("=")
        if not sep or not path or not label:
            ap.error(f"--also {item!r}: expected XML=LABEL")
        if not Path(path).is_file():
            ap.error(f"--also {item!r}: {path}: cascade not found")
        if label in {args.label, "opencv-default", "opencv-alt", "opencv-alt2", "cnn", "cnn-pyramid"}:
            ap.error(f"--also {item!r}: label {label!r} is taken")
        also.append((Path(path), label))

    ev = ["--detector", "haar", "--opt", "cascade=default", "--label", "opencv-default",
          "--detector", "haar", "--opt", "cascade=alt", "--label", "opencv-alt",
          "--detector", "haar", "--opt", "cascade=alt2", "--label", "opencv-alt2",
          "--detector", "haar", "--opt", f"cascade={args.cascade}", "--label", args.label]
    for path, label in also:
        ev += ["--detector", "haar", "--opt", f"cascade={path}", "--label", label]
    if not args.no_cnn:
        ev += ["--detector", "cnn-pyramid", "--opt", "device=cpu", "--label", "cnn-pyramid",
               "--detector", "cnn", "--opt", "device=cpu", "--label", "cnn"]
    for s in args.sets or []:
        ev += ["--set", s]
    ev += ["--out", str(args.out)]
    if args.limit:
        ev += ["--limit", str(args.limit)]
    rc = _eval_detector().main(ev)
    if rc:
        return rc
    res_path = args.out / "results.json"
    report = json.loads(res_path.read_text())
    report["command"] = " ".join(["scripts/bench_cascades.py"] + (argv if argv is not None else sys.argv[1:]))
    record = _training_record(args.cascade)
    if record is not None:
        report["cascade_training"] = record
    if also:
        report["also_cascade_training"] = {label: _training_record(path) for path, label in also}
    res_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {res_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
