#!/usr/bin/env python
"""Collect the face/non-face classifier regimes' figures from their checkpoints into one JSON.

``facepipe train classifier`` stores in each ``<regime>.pt`` its validation figures,
steps, training time and detection threshold (``meta``). This script reads the
checkpoints of the runs that make docs/detection.md's regimes table and writes them,
with the commands that made them, to ``docs/results/classifier_regimes.json``.

The runs (seeded; on the CPU, one thread per run)::

    facepipe train classifier --out runs/classifier_rerun --threads 1 --device cpu \\
        --regime transfer --regime finetune --steps-per-epoch 60 --epochs-transfer 3 \\
        --epochs-finetune 3 --epochs-bootstrap 1
    facepipe train classifier --out runs/classifier_rerun_scratch --threads 1 --device cpu \\
        --regime scratch --steps-per-epoch 60 --epochs-scratch 6 --epochs-bootstrap 1
    facepipe train classifier --out runs/classifier_rerun_r2 --threads 2 --device cpu \\
        --regime finetune --init finetune=runs/classifier_rerun/finetune.pt --epochs-finetune 0 \\
        --bootstrap-rounds 1 --epochs-bootstrap 2 --hard-negatives 4000 --mine-lfw 800 \\
        --steps-per-epoch 60
    python scripts/classifier_regimes.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

RUNS = (
    ("transfer", "runs/classifier_rerun/transfer.pt",
     "facepipe train classifier --out runs/classifier_rerun --threads 1 --device cpu --regime transfer "
     "--regime finetune --steps-per-epoch 60 --epochs-transfer 3 --epochs-finetune 3 --epochs-bootstrap 1"),
    ("finetune, 1 bootstrapping round", "runs/classifier_rerun/finetune.pt", "(same command)"),
    ("finetune, 2 bootstrapping rounds", "runs/classifier_rerun_r2/finetune.pt",
     "facepipe train classifier --out runs/classifier_rerun_r2 --threads 2 --device cpu --regime finetune "
     "--init finetune=runs/classifier_rerun/finetune.pt --epochs-finetune 0 --bootstrap-rounds 1 "
     "--epochs-bootstrap 2 --hard-negatives 4000 --mine-lfw 800 --steps-per-epoch 60"),
    ("scratch", "runs/classifier_rerun_scratch/scratch.pt",
     "facepipe train classifier --out runs/classifier_rerun_scratch --threads 1 --device cpu --regime scratch "
     "--steps-per-epoch 60 --epochs-scratch 6 --epochs-bootstrap 1"),
)


def row(label: str, path: Path, command: str) -> dict[str, Any]:
    """One regime's figures from its checkpoint's ``meta``."""
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=False)
    meta = ck["meta"]

    def count(prefix: str = "") -> int:
        return int(sum(v.numel() for k, v in ck["state_dict"].items()
                       if k.startswith(prefix) and "running_" not in k and "num_batches" not in k))

    return {"parameters": count(), "head_parameters": count("head."),"regime": label, "checkpoint": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
            "command": command, "init": meta.get("init"), "steps": meta.get("steps"),
            "train_seconds": meta.get("train_seconds"), "continued_from": meta.get("continued_from"),
            "hard_negatives": meta.get("hard_negatives"), "validation": meta.get("validation"),
            "detection_calibration": meta.get("detection_calibration")}


def main(argv: list[str] | None = None) -> int:
    """Read every run's checkpoint and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "classifier_regimes.json")
    a = ap.parse_args(argv)
    missing = [p for _, p, _ in RUNS if not (ROOT / p).is_file()]
    if missing:
        raise SystemExit(f"missing checkpoints (run the commands in this script's docstring): {missing}")
    doc = {"meta": {"command": "python scripts/classifier_regimes.py",
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()} {os.cpu_count()} CPU core(s), {platform.python_version()}",
                    "note": "train_seconds: wall-clock of each run on the 2-core development machine"},
           "rows": [row(label, ROOT / p, cmd) for label, p, cmd in RUNS]}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    for r in doc["rows"]:
        v, d = r["validation"], r["detection_calibration"] or {}
        print(f"{r['regime']}: steps {r['steps']} {r['train_seconds']} s acc {v['accuracy']:.3f} "
              f"AUC {v['roc_auc']:.4f} P {v['precision']:.3f} R {v['recall']:.3f} @ {v['threshold']:.3f}; "
              f"detector recall {d.get('recall_iou0.3', float('nan')):.3f} ({d.get('threshold')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
