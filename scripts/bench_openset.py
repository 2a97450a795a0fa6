#!/usr/bin/env python
"""Open-set identification quality of the gallery on the shared identity sets.

Metrics (ISO/IEC 19795-1 style, top-1 decisions through :class:`facepipe.gallery.Gallery`):

* rank-1 identification rate: share of mated probes (photos of enrolled people, not
  the enrolled photos) whose best gallery person is the right one (closed set);
* DIR at FPIR 1% and 10%: the threshold is set so that at most that share of
  non-mated probes (people who are not enrolled) is accepted; DIR is the share of
  mated probes that are then both right and accepted. Reported twice: with the
  threshold calibrated on the evaluation impostors themselves ("same-set") and
  2-fold cross-calibrated (threshold from half the impostor *people*, FPIR and DIR
  measured on the other half: what a user of `facepipe gallery calibrate` gets);
* a DIR-vs-FPIR curve (PNG).

Protocols:

* ``lfw_val``: LFW DevTrain people in the embedder's *validation* split (people the
  shipped embedder was not trained on; the split is read from its checkpoint). People
  with >= 2 photos are enrolled with their first photo, their other photos are mated
  probes; people with exactly one photo are the non-mated probes.
* ``lfw_val_3``: people with >= 4 photos enrolled with 3 photos each (``max`` vs ``mean``
  aggregation over the person's vectors), same non-mated probes.
* ``yale``: Yale faces, subjects 01-10 enrolled with their ``normal`` photo, their
  other photos as mated probes; subjects 11-15 as non-mated probes (55 photos:
  too few to resolve FPIR 1%).
* ``fr_examples``: face_recognition's 6 example people, first photo enrolled, the
  rest as mated probes; LFW validation singles as non-mated probes.

Faces are found with MTCNN and aligned with :func:`facepipe.align.align_face` (the
pipeline's alignment); crops are cached in ``out/openset/`` and shared by all embedders.

Usage::

    python scripts/bench_openset.py --embedders default untrained \
        --out docs/gallery_openset.json --plot docs/img/gallery_dir_fpir.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_openset")


# ----------------------------------------------------------------------------- crops


def _pick_face(faces: list, w: int, h: int) -> Any:
    """The confident face nearest the image centre (identity photos are centred)."""
    faces = [d for d in faces if d.landmarks is not None]
    faces = [d for d in faces if d.score >= 0.9] or faces
    if not faces:
        return None
    return min(faces, key=lambda d: (d.box.center[0] - w / 2) ** 2 + (d.box.center[1] - h / 2) ** 2)


def align_set(items: list[tuple[str, Path]], cache: Path, size: int = 112) -> dict[str, np.ndarray]:
    """Detect (MTCNN) and align one face per photo; cached as NPZ (crops, labels, sources)."""
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if z["crops"].shape[1] == size and len(z["sources"]) + len(z["skipped"]) == len(items):
            return {k: z[k] for k in z.files}
    from facepipe.align import align_face
    from facepipe.detect.mtcnn import MTCNNDetector
    from facepipe.io import load_image

    det = MTCNNDetector(min_size=40, device="cpu")
    fine = MTCNNDetector(min_size=20, device="cpu")
    crops, labels, sources, skipped = [], [], [], []
    t0 = time.time()
    for k, (label, path) in enumerate(items):
        image = load_image(path)
        h, w = image.shape[:2]
        face = _pick_face(det.detect(image), w, h) or _pick_face(fine.detect(image), w, h)
        if face is None:
            skipped.append(str(path))
            continue
        crops.append(align_face(image, face.landmarks_array(), size))
        labels.append(label)
        sources.append(str(path))
        if (k + 1) % 200 == 0:
            log.info("%s: %d/%d photos aligned, %.0fs", cache.name, k + 1, len(items), time.time() - t0)
    out = {"crops": np.stack(crops).astype(np.uint8), "labels": np.asarray(labels),
           "sources": np.asarray(sources), "skipped": np.asarray(skipped, dtype=str)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def _files(folder: Path) -> list[Path]:
    from facepipe.io import IMAGE_EXTENSIONS

    exts = set(IMAGE_EXTENSIONS) | {".gif"}
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in exts)


def identity_folders(root: Path) -> dict[str, list[Path]]:
    """``root/<person>/<photos>`` (GIF included, for Yale)."""
    return {p.name: fs for p in sorted(root.iterdir()) if p.is_dir() and (fs := _files(p))}


# ----------------------------------------------------------------------------- evaluation


def evaluate(emb_id: str, dim: int, enrol_vecs: np.ndarray, enrol_names: list[str], mated: np.ndarray,
             mated_names: list[str], nonmated: np.ndarray, nonmated_people: list[str],
             aggregation: str = "max") -> dict[str, Any]:
    """Enrol into a real (temporary) gallery and score mated / non-mated probes."""
    from facepipe.gallery import Gallery, calibrate_threshold, dir_fpir_curve

    with tempfile.TemporaryDirectory(prefix="facepipe-openset-") as tmp:
        with Gallery.edit(tmp, embedder_id=emb_id, dim=dim, index_type="flat", aggregation=aggregation) as g:
            g.add(enrol_vecs, enrol_names)
        g = Gallery.open(tmp, embedder_id=emb_id)
        gs, gc, isc = g.calibration_scores(mated, mated_names, nonmated)
    res: dict[str, Any] = {
        "enrolled_people": len(set(enrol_names)), "enrolled_vectors": len(enrol_names),
        "mated_probes": int(len(gs)), "nonmated_probes": int(len(isc)),
        "nonmated_people": len(set(nonmated_people)), "aggregation": aggregation,
        "rank1": float(gc.mean()),
    }
    people = np.asarray(nonmated_people)
    uniq = np.unique(people)
    rng = np.random.default_rng(0)
    half = set(rng.permutation(uniq)[: len(uniq) // 2].tolist())
    in_a = np.asarray([p in half for p in people])
    for target in (0.01, 0.1):
        c = calibrate_threshold(isc, target, gs, gc)
        key = f"fpir{int(target * 100)}"
        res[f"dir_at_{key}_sameset"] = c.dir
        res[f"threshold_{key}_sameset"] = c.threshold
        res[f"resolvable_{key}"] = bool(len(isc) * target >= 1)
        dirs, fpirs = [], []
        for cal_mask in (in_a, ~in_a):  # calibrate on one half of the impostor people, test on the other
            cc = calibrate_threshold(isc[cal_mask], target)
            fpirs.append(float((isc[~cal_mask] >= cc.threshold).mean()))
            dirs.append(float(((gs >= cc.threshold) & gc).mean()))
        res[f"dir_at_{key}_crossval"] = float(np.mean(dirs))
        res[f"fpir_measured_{key}_crossval"] = float(np.mean(fpirs))
    thr, fpir, dir_ = dir_fpir_curve(gs, gc, isc)
    keep = np.unique(np.searchsorted(fpir, np.geomspace(1e-3, 1.0, 200)).clip(0, len(fpir) - 1))
    res["curve"] = {"fpir": fpir[keep].round(5).tolist(), "dir": dir_[keep].round(5).tolist(),
                    "threshold": thr[keep].round(5).tolist()}
    return res


def split_protocol(vecs: np.ndarray, labels: np.ndarray, enrol_k: int, min_photos: int,
                   nonmated_mask: np.ndarray) -> tuple:
    """Enrol the first ``enrol_k`` photos of people with >= ``min_photos``; the rest are mated probes."""
    ev, en, mv, mn = [], [], [], []
    for p in sorted(set(labels[~nonmated_mask].tolist())):
        idx = np.flatnonzero((labels == p) & ~nonmated_mask)
        if len(idx) < min_photos:
            continue
        ev.append(vecs[idx[:enrol_k]])
        en += [p] * len(idx[:enrol_k])
        mv.append(vecs[idx[enrol_k:]])
        mn += [p] * len(idx[enrol_k:])
    return np.concatenate(ev), en, np.concatenate(mv), mn


def run_embedder(name: str, sets: dict[str, dict[str, np.ndarray]], lfw_single: set[str],
                 device: str) -> dict[str, Any]:
    """Every protocol for one embedder."""
    from facepipe.embed import load_embedder

    emb = load_embedder(name, device=device)
    t0 = time.time()
    vec = {k: emb.embed(s["crops"]) for k, s in sets.items()}
    log.info("%s: embedded %d crops in %.0fs", emb.embedder_id, sum(len(s["crops"]) for s in sets.values()),
             time.time() - t0)
    out: dict[str, Any] = {"embedder_id": emb.embedder_id}
    lv, ll = vec["lfw_val"], sets["lfw_val"]["labels"]
    single = np.asarray([p in lfw_single for p in ll])
    nm, nm_people = lv[single], ll[single].tolist()
    e = split_protocol(lv, ll, 1, 2, single)
    out["lfw_val"] = evaluate(emb.embedder_id, emb.dim, *e, nm, nm_people)
    e3 = split_protocol(lv, ll, 3, 4, single)
    for agg in ("max", "mean"):
        out[f"lfw_val_3_{agg}"] = evaluate(emb.embedder_id, emb.dim, *e3, nm, nm_people, aggregation=agg)
    yv, yl, ys = vec["yale"], sets["yale"]["labels"], sets["yale"]["sources"]
    enrolled = sorted(set(yl.tolist()))[:10]
    is_enr = np.asarray([p in enrolled for p in yl])
    is_normal = np.asarray([".normal." in Path(s).name for s in ys])
    out["yale"] = evaluate(emb.embedder_id, emb.dim, yv[is_enr & is_normal], yl[is_enr & is_normal].tolist(),
                           yv[is_enr & ~is_normal], yl[is_enr & ~is_normal].tolist(),
                           yv[~is_enr], yl[~is_enr].tolist())
    fv, fl = vec["fr_examples"], sets["fr_examples"]["labels"]
    e = split_protocol(fv, fl, 1, 2, np.zeros(len(fl), bool))
    out["fr_examples"] = evaluate(emb.embedder_id, emb.dim, *e, nm, nm_people)
    for k, r in out.items():
        if isinstance(r, dict):
            log.info("%-22s %-18s rank1 %.3f  DIR@1%% %.3f (xval %.3f)  DIR@10%% %.3f (xval %.3f)", name, k,
                     r["rank1"], r["dir_at_fpir1_sameset"], r["dir_at_fpir1_crossval"],
                     r["dir_at_fpir10_sameset"], r["dir_at_fpir10_crossval"])
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """DIR vs FPIR (log x) per embedder and protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"lfw_val": "-", "yale": ":", "lfw_val_3_max": "--"}
    for ei, (name, r) in enumerate(results.items()):
        for proto, ls in styles.items():
            c = r[proto]["curve"]
            ax.plot(c["fpir"], c["dir"], ls, color=f"C{ei}",
                    label=f"{name} {proto} (rank-1 {r[proto]['rank1']:.2f})")
    for x in (0.01, 0.1):
        ax.axvline(x, color="grey", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("FPIR (share of non-enrolled people accepted as someone)")
    ax.set_ylabel("DIR (enrolled people: right name and accepted)")
    ax.set_title("Open-set identification, facepipe gallery (top-1, flat index)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    """Align (cached), embed with each embedder, evaluate, write JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embedders", nargs="+", default=["default"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--val-fraction", type=float, default=None,
                    help="validation split of LFW people (default: from the first embedder's checkpoint, else 0.2)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=ROOT / "out" / "openset")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "gallery_openset.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "gallery_dir_fpir.png")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from facepipe.datasets import data_root
    from facepipe.train.embedder_data import people_split

    torch.set_num_threads(args.threads)
    data = data_root()
    vf, seed, split_from = 0.2, 0, "default (0.2, seed 0)"
    if args.val_fraction is None or args.seed is None:
        from facepipe.embed import load_embedder

        first = load_embedder(args.embedders[0], device="cpu")
        tr = getattr(first, "training", {}) or {}
        cfg = tr.get("config", tr)
        if "val_fraction" in cfg:
            vf, seed = float(cfg["val_fraction"]), int(cfg.get("seed", 0))
            split_from = f"{args.embedders[0]} checkpoint training config"
    vf = args.val_fraction if args.val_fraction is not None else vf
    seed = args.seed if args.seed is not None else seed

    lfw = identity_folders(data / "identities" / "lfw_devtrain")
    _, val_people = people_split(np.asarray(sorted(lfw)), vf, seed)
    lfw_single = {p for p in val_people if len(lfw[p]) == 1}
    items = {
        "lfw_val": [(p, f) for p in sorted(val_people) for f in lfw[p]],
        "yale": [(p, f) for p, fs in identity_folders(data / "identities" / "yale_faces").items() for f in fs],
        "fr_examples": [(p, f) for p, fs in identity_folders(data / "identities" / "face_recognition_examples").items()
                        for f in fs],
    }
    tag = f"v{vf}-s{seed}"
    sets = {k: align_set(v, args.cache / f"crops_{k}{'_' + tag if k == 'lfw_val' else ''}.npz")
            for k, v in items.items()}
    for k, s in sets.items():
        log.info("%s: %d photos, %d aligned, %d without a face", k, len(items[k]), len(s["crops"]), len(s["skipped"]))
    results = {name: run_embedder(name, sets, lfw_single, args.device) for name in args.embedders}
    meta = {
        "command": " ".join(["python"] + sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU core(s), {platform.platform()}",
        "lfw_split": {"val_fraction": vf, "seed": seed, "from": split_from, "val_people": len(val_people),
                      "val_single_photo_people": len(lfw_single)},
        "photos": {k: {"total": len(items[k]), "aligned": int(len(s["crops"])), "no_face": int(len(s["skipped"]))}
                   for k, s in sets.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    plot(results, args.plot)
    log.info("wrote %s and %s", args.out, args.plot)


if __name__ == "__main__":
    main()
