#!/usr/bin/env python
"""Summarise embedder training runs (their ``OUT.pt.json`` reports) on the people-disjoint early-stop split.

Every run of ``scripts/train_embedder.py dlib`` / ``distill`` writes ``OUT.pt.json`` with the
early-stop history (plain and flip-TTA verification metrics every ``--eval-every`` steps on
development people that are neither trained on nor part of the benchmark's held-out pairs).
This script collects, for each run, its configuration, the metrics at step 0 (the starting
network: the port, or the port's trunk with a freshly initialised head), the best trained step
by plain accuracy, and the step the run selected, into one JSON, and prints a markdown table.

Usage::

    python scripts/summarise_embedder_runs.py runs/embedder/*.pt.json --json docs/embedding_training.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

KEYS = ("accuracy", "accuracy_std", "auc", "tar@far=0.01", "tar@far=0.001")


def _metrics(m: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(m[k]), 5) for k in KEYS}


def summarise(path: Path) -> dict[str, Any]:
    """One run's summary (configuration from its checkpoint when it is still there)."""
    rep = json.loads(path.read_text())
    hist = rep["history"]
    trained = hist[1:] or hist
    best = max(trained, key=lambda m: m["plain"]["accuracy"])
    cfg: dict[str, Any] = {}
    ck_path = Path(rep.get("checkpoint", ""))
    if ck_path.is_file():
        import torch

        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        c = ck.get("training", {}).get("config", {})
        cfg = {k: c.get(k) for k in ("regime", "loss", "head", "cut", "lr", "steps", "batch_size", "data",
                                     "select_metric", "flip_tta", "seed", "layout", "input_size") if k in c}
    return {"run": path.name[: -len(".pt.json")], "config": cfg, "last_step": hist[-1]["step"],
            "step0": {"plain": _metrics(hist[0]["plain"])},
            "best_trained": {"step": best["step"], "plain": _metrics(best["plain"]),
                             **({"flip": _metrics(best["flip"])} if "flip" in best else {})},
            "selected_step": rep["best"]["step"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", type=Path, nargs="+")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = [summarise(p) for p in args.reports]
    print("| run | regime, head | loss | lr | step 0 acc | best trained step | acc ± std | AUC | TAR@1e-2 | "
          "TAR@1e-3 | selected step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, b = r["config"], r["best_trained"]["plain"]
        print(f"| {r['run']} | {c.get('regime', '?')}, {c.get('head', '')} | {c.get('loss', '?')} | {c.get('lr', '?')} | "
              f"{100 * r['step0']['plain']['accuracy']:.2f} % | {r['best_trained']['step']} | "
              f"{100 * b['accuracy']:.2f} ± {100 * b['accuracy_std']:.2f} % | {b['auc']:.4f} | {b['tar@far=0.01']:.3f} | "
              f"{b['tar@far=0.001']:.3f} | {r['selected_step']} |")
    if args.json:
        meta = {"command": "python scripts/summarise_embedder_runs.py " + " ".join(sys.argv[1:]),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "split": "early-stop people: DlibTrainConfig.val_fraction of the development people "
                         "(benchmark's held-out people removed first), people_split seed val_seed"}
        args.json.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
