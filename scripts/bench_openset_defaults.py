#!/usr/bin/env python
"""Does a fresh gallery with default settings keep the FPIR it promises? Measured as a user would.

**User check** (sets no facepipe model is trained on): for the Yale faces (15 people) and
face_recognition's examples (6 people), half the people — a seeded random half, repeated
over ``--splits`` splits — are enrolled with up to 3 photos each (always leaving at least
one photo to probe with), exactly as ``facepipe enroll`` does it: a new gallery with the
embedder's shipped impostor model and the default target FPIR, threshold derived for the
gallery's size. Probes: the remaining photos of enrolled people (mated; DIR = share named
correctly) and strangers (FPIR = share of stranger faces named as anyone): the other half
of the same set, the other identity set, and every face in the Caltech WebFaces detection
images (web photos of other people; used for evaluation only). Faces go through the
default pipeline (MTCNN, the embedder's alignment); identity photos contribute their
largest face.

**Calibration check**: on the same halves, galleries of 10 or 30 people (1 or 3 photos)
calibrated with ``gallery calibrate``'s code and no extra photos: with no domain shift the
threshold should stay where the model puts it (FPIR and DIR before and after).

**Approximation check** (``FPIR = 1 − (1 − FMR)^(N^a)``): the LFW DevTrain people held
out of training (cached by ``scripts/calibrate_embedder.py``) are split into two
people-disjoint halves; an impostor model (with its exponent ``a``) is fitted on half A,
galleries of N people (1 or 3 photos each) are built from half B and probed with B's
other people. The FPIR obtained is compared with the target when N counts vectors with
the fitted exponent (what facepipe does), vectors as independent comparisons (a = 1), and
people, without any domain shift.

Usage::

    python scripts/bench_openset_defaults.py --embedders default \
        --json docs/gallery_openset_defaults.json

``--embedders NAME=RECORD.json`` uses an impostor model from a JSON file instead of the
checkpoint's (to evaluate a record before writing it).
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

log = logging.getLogger("bench_openset_defaults")


# ----------------------------------------------------------------------------- embedding


def _files(folder: Path) -> list[Path]:
    from facepipe.io import IMAGE_EXTENSIONS

    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def identity_set(root: Path) -> dict[str, list[Path]]:
    return {p.name: fs for p in sorted(root.iterdir()) if p.is_dir() and (fs := _files(p))}


def embed_all(get_pipe: Any, paths: list[Path], largest: bool, cache: Path) -> dict[str, Any]:
    """Embeddings of the largest face (``largest``) or of every face of each photo; cached."""
    from facepipe.errors import FacepipeError
    from facepipe.io import load_image

    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if int(z["n_paths"]) == len(paths):
            return {k: z[k] for k in z.files}
    pipe = get_pipe()
    vecs, owner, t0 = [], [], time.time()
    for k, p in enumerate(paths):
        try:
            res = pipe.process(load_image(p))
        except FacepipeError as exc:
            log.warning("%s", exc)
            continue
        faces = res.faces
        if largest and faces:
            faces = [max(faces, key=lambda f: f.detection.box.area)]
        for f in faces:
            vecs.append(np.asarray(f.embedding, np.float32))
            owner.append(k)
        if (k + 1) % 100 == 0:
            log.info("%s: %d/%d photos, %.0fs", cache.stem, k + 1, len(paths), time.time() - t0)
    out = {"vectors": np.stack(vecs) if vecs else np.zeros((0, pipe.embedder.dim), np.float32),
           "owner": np.asarray(owner, np.int64), "n_paths": np.asarray(len(paths))}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


# ----------------------------------------------------------------------------- user check


def best_matches(g: Any, probes: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Top-1 person and score per probe (what ``identify`` decides on)."""
    if len(probes) == 0:
        return [], np.zeros(0)
    ranked = g.rank(probes, 1)
    return [r[0].name for r in ranked], np.asarray([r[0].score for r in ranked])


SETTINGS = ("fixed 0.5", "default", "default without cohort", "calibrated")


def dir_at_fpir(stranger_scores: np.ndarray, mated_scores: np.ndarray, mated_right: np.ndarray,
                n_mated: int, fpir: float) -> dict[str, float]:
    """DIR at the one threshold (shared by every split) where the pooled strangers' FPIR is
    ``fpir`` (:func:`facepipe.gallery.calibrate_threshold`): compares decision rules at an
    equal false-identification rate. Mated probes without a face (``n_mated`` counts them)
    are misses."""
    from facepipe.gallery import calibrate_threshold

    missing = n_mated - len(mated_scores)
    cal = calibrate_threshold(stranger_scores, fpir, np.append(mated_scores, np.full(missing, -np.inf)),
                              np.append(np.asarray(mated_right, bool), np.zeros(missing, bool)))
    return {"threshold": cal.threshold, "fpir": cal.fpir, "dir": float(cal.dir)}


def user_check(emb_id: str, dim: int, model: Any, sets: dict[str, dict[str, Any]], strangers: dict[str, np.ndarray],
               splits: int, enrol_max: int) -> dict[str, Any]:
    """Per identity set: FPIR and DIR with the fresh gallery's automatic threshold ("default"),
    after ``gallery calibrate`` from the enrolled photos alone ("calibrated"), and with the
    constant 0.5 every gallery had before impostor models ("fixed 0.5"). With a cohort in
    the model, "default without cohort" is the same gallery ranked and decided by plain
    cosine similarity (the rule before cohort penalties), and ``dir_at_fpir_1pct`` compares
    both rules at one shared threshold giving an observed FPIR of 1 %."""
    from dataclasses import replace

    from facepipe.gallery import DEFAULT_TARGET_FPIR, Gallery
    from facepipe.gallery.evidence import calibrate_gallery

    plain_model = replace(model, cohort=None)

    out: dict[str, Any] = {}
    for name, s in sets.items():
        people = s["people"]
        settings = SETTINGS if model.cohort is not None else tuple(x for x in SETTINGS if "cohort" not in x)
        acc = {k: {"mated": 0, "right": 0, "wrong": 0, "thresholds": [], "strangers": {}} for k in settings}
        pooled: dict[str, dict[str, list[Any]]] = {r: {"strangers": [], "mated": [], "right": []}
                                                   for r in ("cohort", "plain")}
        n_mated_total = 0
        sizes = []
        for seed in range(splits):
            rng = np.random.default_rng(seed)
            order = list(rng.permutation(sorted(people)))
            enrolled = sorted(order[: len(order) // 2])
            others = sorted(order[len(order) // 2:])
            ev, en, mated, mated_names = [], [], [], []
            for p in enrolled:
                rows = s["photo_rows"][p]  # per photo: vector row or -1 (no face)
                k = min(enrol_max, max(1, len(rows) - 1))
                pick = list(rng.permutation(len(rows)))
                enrol_rows = [rows[i] for i in pick[:k] if rows[i] >= 0]
                ev += [s["vectors"][r] for r in enrol_rows]
                en += [p] * len(enrol_rows)
                for i in pick[k:]:
                    mated.append(rows[i])
                    mated_names.append(p)
            galleries = {}
            for rule, m in (("cohort", model), ("plain", plain_model)):
                with tempfile.TemporaryDirectory(prefix="facepipe-bench-") as tmp:
                    # exactly what `facepipe enroll` does
                    with Gallery.edit(tmp, embedder_id=emb_id, dim=dim, impostor_model=m,
                                      target_fpir=DEFAULT_TARGET_FPIR) as g:
                        g.add(np.stack(ev), en)
                    galleries[rule] = Gallery.open(tmp)
            g = galleries["cohort"]
            sizes.append((len(enrolled), len(g)))
            thr = {"fixed 0.5": ("plain", 0.5), "default": ("cohort", g.threshold),
                   "default without cohort": ("plain", galleries["plain"].threshold),
                   "calibrated": ("cohort", calibrate_gallery(g, DEFAULT_TARGET_FPIR, model).threshold)}
            have = [i for i, r in enumerate(mated) if r >= 0]
            same_set = [s["vectors"][r] for p in others for r in s["photo_rows"][p] if r >= 0]
            pools = {"same set, other half": np.asarray(same_set).reshape(-1, dim),
                     **{k: v for k, v in strangers.items() if k != name}}
            got, pool_scores = {}, {}
            for rule, gr in galleries.items():
                m_names, m_scores = best_matches(gr, s["vectors"][[mated[i] for i in have]])
                got[rule] = {i: (n, sc) for i, n, sc in zip(have, m_names, m_scores)}
                pool_scores[rule] = {src: best_matches(gr, v)[1] for src, v in pools.items()}
                pooled[rule]["strangers"] += list(pool_scores[rule].values())
                pooled[rule]["mated"].append(np.asarray(m_scores, dtype=np.float64))
                pooled[rule]["right"].append(np.asarray([n == mated_names[i] for i, n in zip(have, m_names)], bool))
            n_mated_total += len(mated)
            for setting in settings:
                rule, t = thr[setting]
                a = acc[setting]
                a["thresholds"].append(t)
                for i, truth in enumerate(mated_names):
                    n, sc = got[rule].get(i, ("unknown", -np.inf))
                    a["mated"] += 1
                    a["right"] += bool(sc >= t and n == truth)
                    a["wrong"] += bool(sc >= t and n != truth)
                for src, sc in pool_scores[rule].items():
                    b = a["strangers"].setdefault(src, {"probes": 0, "named": 0})
                    b["probes"] += int(sc.size)
                    b["named"] += int((sc >= t).sum())
        res: dict[str, Any] = {"splits": splits, "target_fpir": DEFAULT_TARGET_FPIR, "people": len(people),
                               "enrolled_people_per_split": float(np.mean([x[0] for x in sizes])),
                               "enrolled_vectors_per_split": float(np.mean([x[1] for x in sizes]))}
        for setting, a in acc.items():
            total = {"probes": sum(b["probes"] for b in a["strangers"].values()),
                     "named": sum(b["named"] for b in a["strangers"].values())}
            for b in list(a["strangers"].values()) + [total]:
                b["fpir"] = b["named"] / b["probes"] if b["probes"] else None
            res[setting] = {"threshold_mean": float(np.mean(a["thresholds"])),
                            "threshold_min": float(np.min(a["thresholds"])),
                            "threshold_max": float(np.max(a["thresholds"])),
                            "mated_probes": a["mated"], "dir": a["right"] / max(a["mated"], 1),
                            "mated_named_wrong": a["wrong"] / max(a["mated"], 1),
                            "fpir": total["fpir"], "stranger_probes": total["probes"], "strangers": a["strangers"]}
            r = res[setting]
            log.info("%s %s %s: threshold %.3f over %.1f vectors, FPIR %.4f (same set %.4f; target %.2f), DIR %.3f",
                     emb_id, name, setting, r["threshold_mean"], res["enrolled_vectors_per_split"], r["fpir"],
                     a["strangers"]["same set, other half"]["fpir"], DEFAULT_TARGET_FPIR, r["dir"])
        if model.cohort is not None:
            res["dir_at_fpir_1pct"] = {
                rule: dir_at_fpir(np.concatenate(p["strangers"]), np.concatenate(p["mated"]),
                                  np.concatenate(p["right"]), n_mated_total, 0.01) for rule, p in pooled.items()}
            log.info("%s %s DIR at observed FPIR 1%%: %.3f with cohort, %.3f without", emb_id, name,
                     res["dir_at_fpir_1pct"]["cohort"]["dir"], res["dir_at_fpir_1pct"]["plain"]["dir"])
        out[name] = res
    return out


# ----------------------------------------------------------------------------- approximation


def approximation_check(vectors: np.ndarray, labels: np.ndarray, emb_id: str, reps: int = 20) -> dict[str, Any]:
    """FPIR obtained vs target on LFW held-out people, model and galleries people-disjoint."""
    import hashlib

    from facepipe.gallery.openset import compute_impostor_model, per_comparison_fmr

    people = np.unique(labels)
    in_a = {p for p in people if int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) % 2 == 0}
    a = np.asarray([lab in in_a for lab in labels])
    model = compute_impostor_model(vectors[a], labels[a], emb_id)
    vb, lb = vectors[~a], labels[~a]
    b_people = np.unique(lb)
    rows: list[dict[str, Any]] = []
    for per in (1, 3):
        eligible = [p for p in b_people if (lb == p).sum() >= per]
        for n_people in (10, 30, 100, 300):
            if n_people > len(eligible) - 20:
                continue
            for target in (0.1, 0.01):
                named = {"vectors": 0, "people": 0, "independent": 0}
                probes = 0
                for rep in range(reps):
                    rng = np.random.default_rng(rep)
                    enrolled = set(rng.choice(eligible, n_people, replace=False).tolist())
                    gal = np.concatenate([vb[np.flatnonzero(lb == p)[:per]] for p in sorted(enrolled)])
                    strangers = vb[~np.isin(lb, list(enrolled))]
                    best = (strangers @ gal.T).max(axis=1)
                    probes += len(best)
                    for count, n in (("vectors", len(gal)), ("people", n_people)):
                        named[count] += int((best >= model.threshold_for_fpir(target, n)).sum())
                    t_ind = model.threshold_at_fmr(per_comparison_fmr(target, len(gal)))
                    named["independent"] += int((best >= t_ind).sum())
                rows.append({"photos_per_person": per, "people": n_people, "target_fpir": target,
                             "stranger_probes": probes,
                             "fpir_counting_vectors": named["vectors"] / probes,
                             "fpir_counting_people": named["people"] / probes,
                             "fpir_independent_vectors": named["independent"] / probes})
                log.info("approx %d x %d, target %.2f: FPIR %.4f (N=vectors^a) %.4f (N=vectors, a=1) "
                         "%.4f (N=people^a)", n_people, per, target, rows[-1]["fpir_counting_vectors"],
                         rows[-1]["fpir_independent_vectors"], rows[-1]["fpir_counting_people"])
    return {"model_people": int(len(in_a)), "model_pairs": model.n_pairs, "gallery_side_people": int(len(b_people)),
            "model_exponents": {f"{f:g}": a for f, a in model.exponents}, "repetitions": reps, "rows": rows}


def calibration_check(vectors: np.ndarray, labels: np.ndarray, emb_id: str, reps: int = 20) -> dict[str, Any]:
    """Does ``gallery calibrate`` (enrolled photos left out one at a time + the impostor model)
    keep a gallery's threshold where the model puts it when there is no domain shift?

    Same halves as :func:`approximation_check`: the model from half A, galleries of N people
    (1 or 3 photos each, people with at least one more photo) built from half B through
    ``Gallery.edit`` and calibrated with ``calibrate_gallery`` (no extra photos); strangers:
    half B's other people; mated probes: the enrolled people's other photos. FPIR and DIR
    with the automatic threshold and after calibration, scored through the gallery as
    ``identify`` scores (with the model's cohort penalties); ``dir_at_fpir_1pct`` compares
    DIR with and without the cohort at one threshold giving an observed FPIR of 1 %."""
    import hashlib

    from dataclasses import replace

    from facepipe.gallery import Gallery
    from facepipe.gallery.evidence import calibrate_gallery
    from facepipe.gallery.openset import compute_impostor_model

    people = np.unique(labels)
    in_a = {p for p in people if int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) % 2 == 0}
    a = np.asarray([lab in in_a for lab in labels])
    model = compute_impostor_model(vectors[a], labels[a], emb_id)
    vb, lb = vectors[~a], labels[~a]
    rows: list[dict[str, Any]] = []
    for per in (1, 3):
        eligible = [p for p in np.unique(lb) if (lb == p).sum() >= per + 1]
        for n_people in (10, 30):
            if n_people > len(eligible):  # strangers are all of half B's other people
                continue
            acc = {k: {"named": 0, "right": 0} for k in ("auto", "calibrated")}
            probes = mated = raised = 0
            pooled: dict[str, dict[str, list[Any]]] = {r: {"strangers": [], "mated": [], "right": []}
                                                       for r in ("cohort", "plain")}
            for rep in range(reps):
                rng = np.random.default_rng(rep)
                enrolled = sorted(rng.choice(eligible, n_people, replace=False).tolist())
                rows_g = np.concatenate([np.flatnonzero(lb == p)[:per] for p in enrolled])
                gal, names = vb[rows_g], lb[rows_g]
                with tempfile.TemporaryDirectory(prefix="facepipe-bench-") as tmp:
                    with Gallery.edit(tmp, embedder_id=emb_id, dim=int(vb.shape[1]), impostor_model=model,
                                      target_fpir=0.01) as g:
                        g.add(gal, [str(x) for x in names])
                    g = Gallery.open(tmp)
                    cal = calibrate_gallery(g, 0.01, model)
                    thr = {"auto": g.threshold, "calibrated": cal.threshold}
                    # scores as identify sees them (similarity less cohort penalty)
                    best = best_matches(g, vb[~np.isin(lb, enrolled)])[1]
                    m_rows = np.setdiff1d(np.flatnonzero(np.isin(lb, enrolled)), rows_g)
                    m_names, m_best = best_matches(g, vb[m_rows])
                    if model.cohort is not None:  # the same gallery decided by plain cosine, for DIR at equal FPIR
                        with Gallery.edit(tmp) as ge:
                            ge.use_impostor_model(replace(model, cohort=None))
                        gp = Gallery.open(tmp)
                        for rule, gr in (("cohort", g), ("plain", gp)):
                            pn, ps = best_matches(gr, vb[m_rows])
                            pooled[rule]["strangers"].append(best_matches(gr, vb[~np.isin(lb, enrolled)])[1])
                            pooled[rule]["mated"].append(ps)
                            pooled[rule]["right"].append(np.asarray(pn) == lb[m_rows])
                raised += cal.record["domain_shift"] is not None
                right_name = np.asarray(m_names) == lb[m_rows]
                probes += best.size
                mated += m_rows.size
                for k, t in thr.items():
                    acc[k]["named"] += int((best >= t).sum())
                    acc[k]["right"] += int(((m_best >= t) & right_name).sum())
            rows.append({"photos_per_person": per, "people": n_people, "target_fpir": 0.01,
                         "stranger_probes": probes, "mated_probes": mated, "galleries_shifted_up": raised,
                         **{f"fpir_{k}": v["named"] / probes for k, v in acc.items()},
                         **{f"dir_{k}": v["right"] / max(mated, 1) for k, v in acc.items()}})
            if model.cohort is not None:
                rows[-1]["dir_at_fpir_1pct"] = {
                    rule: dir_at_fpir(np.concatenate(p["strangers"]), np.concatenate(p["mated"]),
                                      np.concatenate(p["right"]), mated, 0.01) for rule, p in pooled.items()}
            r = rows[-1]
            log.info("calibration %d x %d: FPIR %.4f auto, %.4f calibrated; DIR %.3f -> %.3f; shifted up in %d/%d",
                     n_people, per, r["fpir_auto"], r["fpir_calibrated"], r["dir_auto"], r["dir_calibrated"],
                     raised, reps)
    return {"repetitions": reps, "rows": rows}


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embedders", nargs="+", default=["default"], metavar="NAME[=RECORD.json]")
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--enrol-max", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=ROOT / "out" / "openset_defaults")
    ap.add_argument("--calibration-cache", type=Path, default=ROOT / "out" / "calibration")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "gallery_openset_defaults.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from facepipe import defaults
    from facepipe.builders import build_pipeline
    from facepipe.datasets import data_root
    from facepipe.gallery.openset import ImpostorModel, impostor_model_for

    torch.set_num_threads(args.threads)
    data = data_root()
    ids = data / "identities"
    id_sets = {"yale": identity_set(ids / "yale_faces"), "fr_examples": identity_set(ids / "face_recognition_examples")}
    caltech = sorted((data / "detection" / "caltech_webfaces_dev" / "images").iterdir())
    results: dict[str, Any] = {}
    for spec in args.embedders:
        name, _, record = spec.partition("=")
        pipes: list[Any] = []

        def pipe_once(name: str = name) -> Any:  # models are loaded only when a cache is missing
            if not pipes:
                pipes.append(build_pipeline(defaults.DETECTOR, name, args.device, largest_only=False))
            return pipes[0]

        if record:
            model = ImpostorModel.from_dict(json.loads(Path(record).read_text()))
        else:
            model = impostor_model_for(pipe_once().embedder)
        if model is None:
            log.error("%s ships no impostor model; run scripts/calibrate_embedder.py first", name)
            continue
        emb_id = model.embedder_id
        tag = emb_id.replace("@", "_").replace("+", "_")
        sets: dict[str, dict[str, Any]] = {}
        for set_name, folders in id_sets.items():
            paths = [f for fs in folders.values() for f in fs]
            e = embed_all(pipe_once, paths, True, args.cache / f"{tag}_{set_name}.npz")
            row_of = {int(k): i for i, k in enumerate(e["owner"])}
            photo_rows, k = {}, 0
            for p, fs in folders.items():
                photo_rows[p] = [row_of.get(k + i, -1) for i in range(len(fs))]
                k += len(fs)
            sets[set_name] = {"people": sorted(folders), "photo_rows": photo_rows, "vectors": e["vectors"]}
        cal = embed_all(pipe_once, caltech, False, args.cache / f"{tag}_caltech.npz")
        strangers = {"caltech webfaces": cal["vectors"], **{k: v["vectors"] for k, v in sets.items()}}
        dim = int(sets["yale"]["vectors"].shape[1])
        res: dict[str, Any] = {"embedder_id": emb_id,
                               "impostor_model": {"people": model.n_people, "pairs": model.n_pairs,
                                                  "created_at": model.created_at},
                               "user_check": user_check(emb_id, dim, model, sets, strangers,
                                                        args.splits, args.enrol_max)}
        lfw = list(args.calibration_cache.glob(f"{tag}_*lfwval*.npz"))
        if lfw:
            z = np.load(lfw[0], allow_pickle=False)
            res["approximation_check"] = approximation_check(z["vectors"], z["labels"].astype(str), emb_id)
            res["calibration_check"] = calibration_check(z["vectors"], z["labels"].astype(str), emb_id)
        else:
            log.warning("no LFW held-out embeddings for %s in %s: approximation check skipped",
                        emb_id, args.calibration_cache)
        results[name] = res
    meta = {
        "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU core(s), {platform.platform()}, shared with other jobs",
        "detector": defaults.DETECTOR, "target_fpir": None,
    }
    from facepipe.gallery import DEFAULT_TARGET_FPIR

    meta["target_fpir"] = DEFAULT_TARGET_FPIR
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
