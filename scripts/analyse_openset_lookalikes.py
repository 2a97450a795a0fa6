#!/usr/bin/env python
"""Is the Yale open-set miss facepipe's or inherited from dlib's network?

``scripts/analyse_openset_misses.py`` found that the default embedder's false matches
on the Yale faces come from three look-alike subjects. This script asks whether the
project's training (the transfer head on dlib's frozen trunk) caused that, by putting
each embedder through the same test:

* its own impostor thresholds at false-match rates 1e-2, 1e-3, 1e-4 from every pair of
  different people among the cached, aligned LFW chips (``scripts/align_dataset.py``'s
  output, ``--chips``) of the people held out of every embedder's training (the impostor
  models' and the verification benchmark's people);
* the share of Yale pairs of *different* subjects above each threshold (against the
  rate itself on LFW), the share of Yale pairs of the *same* subject above it, and
  the mean similarity of the look-alike subject pairs with its percentile among the
  LFW impostor pairs.

``dlib-port`` is dlib's own face descriptor network (facepipe's port reproduces
dlib's output to ~1e-5), so its row is dlib's behaviour.

Usage::

    python scripts/analyse_openset_lookalikes.py --chips out/aligned/lfw_multi_tmpl150.npz \
        --json docs/gallery_openset_lookalikes.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOOKALIKES = (("subject04", "subject14"), ("subject06", "subject14"), ("subject04", "subject06"),
              ("subject07", "subject10"))
RATES = (1e-2, 1e-3, 1e-4)


def _genuine_scores(v: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cosine similarities of every pair of photos of the same person."""
    out = []
    for p in np.unique(labels):
        x = v[labels == p]
        out.append((x @ x.T)[np.triu_indices(len(x), 1)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def measure(name: str, crops: np.ndarray, labels: np.ndarray, yale: list[Path]) -> dict[str, Any]:
    """One embedder's LFW impostor thresholds and what they let through on Yale."""
    from facepipe.builders import build_pipeline
    from facepipe.embed import load_embedder
    from facepipe.gallery.openset import impostor_scores
    from facepipe.io import load_image

    t0 = time.time()
    emb = load_embedder(name, device="cpu")
    v = np.concatenate([emb.embed(crops[i:i + 128]) for i in range(0, len(crops), 128)])
    pipe = build_pipeline("mtcnn", name, "cpu", largest_only=True)
    yv, yl = [], []
    for f in yale:
        r = pipe.process(load_image(f))
        if r.faces:
            yv.append(np.asarray(r.faces[0].embedding, np.float32))
            yl.append(f.parent.name)
    y, ylab = np.stack(yv), np.asarray(yl)
    imp, gen = impostor_scores(v, labels), _genuine_scores(v, labels)
    thr = {r: float(np.quantile(imp, 1 - r)) for r in RATES}
    yimp, ygen = impostor_scores(y, ylab), _genuine_scores(y, ylab)
    full = y @ y.T
    pairs = {}
    for a, b in LOOKALIKES:
        m = float(full[np.ix_(ylab == a, ylab == b)].mean())
        pairs[f"{a}-{b}"] = {"mean": round(m, 4), "lfw_impostor_percentile": round(float((imp < m).mean()) * 100, 3)}
    return {
        "embedder_id": emb.embedder_id,
        "lfw": {"chips": int(len(v)), "people": int(len(np.unique(labels))), "impostor_pairs": int(len(imp)),
                "genuine_pairs": int(len(gen)), "impostor_median": round(float(np.median(imp)), 4),
                "genuine_median": round(float(np.median(gen)), 4)},
        "thresholds": {f"{r:g}": round(t, 4) for r, t in thr.items()},
        "yale": {"faces": int(len(y)), "impostor_pairs": int(len(yimp)), "genuine_pairs": int(len(ygen)),
                 "impostor_median": round(float(np.median(yimp)), 4),
                 "impostor_share_above": {f"{r:g}": round(float((yimp >= t).mean()), 5) for r, t in thr.items()},
                 "impostor_excess_over_lfw": {f"{r:g}": round(float((yimp >= t).mean()) / r, 1)
                                              for r, t in thr.items()},
                 "genuine_share_above": {f"{r:g}": round(float((ygen >= t).mean()), 4) for r, t in thr.items()}},
        "lookalike_pairs": pairs,
        "seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure each embedder and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chips", type=Path, default=ROOT / "out" / "aligned" / "lfw_multi_tmpl150.npz",
                    help="aligned 150-px LFW development chips with labels (scripts/align_dataset.py)")
    ap.add_argument("--embedders", nargs="+", default=["default", "dlib-port"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "gallery_openset_lookalikes.json")
    a = ap.parse_args(argv)
    import torch

    from facepipe.datasets import data_root

    torch.set_num_threads(a.threads)
    if not a.chips.is_file():
        raise SystemExit(f"{a.chips}: no such chip cache (make it with scripts/align_dataset.py)")
    sys.path.insert(0, str(ROOT / "scripts"))
    from calibrate_embedder import dev_people

    z = np.load(a.chips)
    held, how = dev_people(data_root(), 0.2, 0)
    keep = np.isin(z["labels"].astype(str), sorted(held))
    crops, labels = z["crops"][keep], z["labels"].astype(str)[keep]
    yale = sorted((data_root() / "identities" / "yale_faces").glob("subject*/*.gif"))
    res = {name: measure(name, crops, labels, yale) for name in a.embedders}
    doc = {"meta": {"command": "python scripts/analyse_openset_lookalikes.py " + " ".join(argv or sys.argv[1:]),
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()} {os.cpu_count()} CPU core(s), shared with other jobs",
                    "chips": str(a.chips), "chip_alignment": str(z["alignment"]),
                    "lfw_people": f"held out of training ({how})"},
           "results": res}
    a.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: {"yale_impostor_share_above": v["yale"]["impostor_share_above"],
                          "lookalikes": v["lookalike_pairs"]} for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
