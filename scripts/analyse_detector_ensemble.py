#!/usr/bin/env python
"""Are the single-pass ``cnn`` detector's misses seed noise? Two seeds averaged, two ways.

Two checkpoints of the same recipe trained with different seeds (``--checkpoint``, twice)
are combined and scored on the detection sets next to each alone:

* ``ensemble``: both networks run on the image and their raw outputs (face logit, box
  and landmark offsets of every anchor; the anchors are the same) are averaged before
  decoding and NMS — an exact two-network ensemble at twice the head cost (the frozen
  stride-8 trunk is identical in both, so a shipped version would share it);
* ``soup``: the two networks' weights averaged into one (a "model soup"), which works
  only when both runs stayed in one basin of the loss.

Reported at IoU 0.3: AP, and the best recall at the precision of MTCNN's default
operating point on that set (``docs/detection_bench.json``) and at 0.95. If averaging two
seeds barely moves recall at MTCNN's precision, the faces the detector misses are
missed by every seed alike (systematic, a matter of training data), not by chance.
A diagnosis on the benchmark sets: nothing is chosen from it.

Example::

    python scripts/analyse_detector_ensemble.py --threads 2 \\
        --checkpoint runs/stpk0/detector.pt --checkpoint runs/stpk1/detector.pt \\
        --json docs/results/detector_ensemble.json
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def averaged_outputs(nets: list[Any]) -> Any:
    """A module whose outputs are the mean of ``nets``' per-level raw outputs (FaceFPN interface)."""
    from torch import nn

    class OutputMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.nets = nn.ModuleList(nets)
            self.config = nets[0].config

        def normalize(self, x: Any) -> Any:
            return self.nets[0].normalize(x)

        def forward(self, x: Any) -> list[Any]:
            outs = [n(x) for n in self.nets]
            return [sum(o[k] for o in outs) / len(outs) for k in range(len(outs[0]))]

    return OutputMean()


def averaged_weights(nets: list[Any]) -> Any:
    """One network whose every floating-point weight is the mean of ``nets``' (a model soup)."""
    soup = copy.deepcopy(nets[0])
    states = [n.state_dict() for n in nets]
    soup.load_state_dict({k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype)
                          if states[0][k].is_floating_point() else states[0][k] for k in states[0]})
    return soup


def main(argv: list[str] | None = None) -> int:
    """Score each checkpoint, their output ensemble and their weight soup on every set."""
    from bench_detectors import add_analysis_options

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, type=Path,
                    help="detector checkpoint of one seed (give exactly two)")
    add_analysis_options(ap, low_threshold=None)
    args = ap.parse_args(argv)
    if len(args.checkpoint) != 2:
        ap.error("give --checkpoint exactly twice (two seeds of one recipe)")
    for p in args.checkpoint:
        if not p.is_file():
            ap.error(f"--checkpoint {p} does not exist")

    import torch

    from bench_detectors import best_recall_at_precision, detection_sets, mtcnn_default_precision, run_record, write_json
    from facepipe.detect.fpn import FPNDetector, load_detector
    from facepipe.evaluate import load_annotations, precision_recall
    from facepipe.io import load_image

    torch.set_num_threads(args.threads)
    cks = [load_detector(p) for p in args.checkpoint]
    nets = [c.net for c in cks]
    variants = {"seed_a": nets[0], "seed_b": nets[1], "ensemble": averaged_outputs(nets),
                "soup": averaged_weights(nets)}
    shared = all(torch.equal(a, b) for a, b in zip(nets[0].stage3.state_dict().values(),
                                                    nets[1].stage3.state_dict().values()))
    mtcnn_p = mtcnn_default_precision(args.bench)
    root, sets = detection_sets()
    result: dict[str, Any] = {
        **run_record("analyse_detector_ensemble.py", argv), "checkpoints": [str(p) for p in args.checkpoint],
        "stride8_trunk_identical": shared, "sets": {}}
    for set_name in sets:
        gt = load_annotations(root / set_name)
        gtb = [list(g.boxes) for g in gt]
        images = [load_image(g.path) for g in gt]
        rows: dict[str, Any] = {}
        for name, net in variants.items():
            det = FPNDetector.from_network(net, threshold=0.05, device="cpu")  # the whole score range
            r = precision_recall([det.detect(im) for im in images], gtb, 0.3)
            rows[name] = {"ap_iou0.3": round(r.ap, 4),
                          "best_recall_at_mtcnn_precision": best_recall_at_precision(r, mtcnn_p[set_name])
                          if set_name in mtcnn_p else None,
                          "best_recall_at_precision_0.95": best_recall_at_precision(r, 0.95)}
            row = rows[name]
            print(f"{set_name:22s} {name:9s} AP@0.3 {row['ap_iou0.3']:.4f} best R at MTCNN's P "
                  f"{row['best_recall_at_mtcnn_precision']} at 0.95 {row['best_recall_at_precision_0.95']}", flush=True)
        result["sets"][set_name] = {"images": len(gt), "faces": sum(len(b) for b in gtb),
                                    "mtcnn_precision": mtcnn_p.get(set_name), "results": rows}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
