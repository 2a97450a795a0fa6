#!/usr/bin/env python
"""Why do strangers from the same identity set pass a fresh gallery's automatic threshold?

A diagnosis of the miss that ``scripts/bench_openset_defaults.py`` measures on the Yale
faces (same splits, same enrolment picks, the default embedder's shipped impostor model),
from embeddings cached once under ``--cache``:

1. **Where the false matches come from**: by the stranger's Yale condition (lighting,
   glasses, expression), by stranger subject, and by (stranger, enrolled) pair.
2. **Concentration**: Yale's pairs of photos of different people above the model's 1e-3
   threshold, and how many person pairs carry them; the same rate on random 15-person
   subsets of the LFW development people (the model's own people).
3. **Candidate causes ruled in or out**: grayscale (the LFW development photos converted
   to grey, their impostor tail at the model's thresholds), the raw pre-normalisation
   embedding norm (distributions per set; AUC for telling the confused subjects apart),
   and each Yale subject's crowding among the development people (mean similarity of the
   10 most similar development people, one best photo each).
4. **A per-enrolled-vector ("crowding") threshold**, tested and not adopted: each enrolled
   vector's threshold raised by how much its crowding exceeds the q-quantile of the
   development photos' own (leave-own-person-out); FPIR and DIR on Yale, fr_examples and
   LFW galleries (model and development people from one half, galleries from the other).

Usage::

    python scripts/analyse_openset_misses.py --json docs/gallery_openset_misses.json
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

log = logging.getLogger("analyse_openset_misses")
CONFUSED_K = 10  # development people in a vector's crowding statistic


def embed(pipe: Any, items: list[tuple[str, Path]], largest: bool, grey: bool, cache: Path) -> dict[str, np.ndarray]:
    """Unit vectors plus raw head-output norm of every face (largest per photo when ``largest``)."""
    from facepipe.errors import FacepipeError
    from facepipe.io import load_image

    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if int(z["n_items"]) == len(items):
            return {k: z[k] for k in z.files}
    net = pipe.embedder.net
    norms: list[np.ndarray] = []
    plain = net.forward_unnormalised

    def forward(x: Any) -> Any:
        e = plain(x)
        norms.append(e.norm(dim=1).detach().cpu().numpy())
        return e

    net.forward_unnormalised = forward
    vec, lab, nrm, path, t0 = [], [], [], [], time.time()
    try:
        for k, (who, p) in enumerate(items):
            norms.clear()
            try:
                im = load_image(p)
            except FacepipeError as exc:
                log.warning("%s", exc)
                continue
            if grey:
                g = (im[..., 0] * 0.299 + im[..., 1] * 0.587 + im[..., 2] * 0.114).round().clip(0, 255)
                im = np.repeat(g.astype(np.uint8)[..., None], 3, axis=2)
            res = pipe.process(im)
            n = np.concatenate(norms) if norms else np.zeros(0)
            faces = list(enumerate(res.faces))
            if largest and faces:
                faces = [max(faces, key=lambda t: t[1].detection.box.area)]
            for i, f in faces:
                vec.append(np.asarray(f.embedding, np.float32))
                lab.append(who)
                nrm.append(float(n[i]) if i < len(n) else np.nan)
                path.append(str(p))
            if (k + 1) % 250 == 0:
                log.info("%s: %d/%d photos, %.0fs", cache.stem, k + 1, len(items), time.time() - t0)
    finally:
        net.forward_unnormalised = plain
    out = {"vectors": np.stack(vec), "labels": np.asarray(lab), "norm": np.asarray(nrm),
           "paths": np.asarray(path), "n_items": np.asarray(len(items))}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def splits(people: list[str], photo_rows: dict[str, list[int]], n_splits: int = 20, enrol_max: int = 3):
    """The benchmark's splits: (enrolled rows, their names, mated rows, mated names, stranger people)."""
    for seed in range(n_splits):
        rng = np.random.default_rng(seed)
        order = list(rng.permutation(sorted(people)))
        enrolled, others = sorted(order[: len(order) // 2]), sorted(order[len(order) // 2:])
        ev, en, mated, mated_names = [], [], [], []
        for p in enrolled:
            rows = photo_rows[p]
            k = min(enrol_max, max(1, len(rows) - 1))
            pick = list(rng.permutation(len(rows)))
            er = [rows[i] for i in pick[:k] if rows[i] >= 0]
            ev += er
            en += [p] * len(er)
            mated += [rows[i] for i in pick[k:]]
            mated_names += [p] * len(pick[k:])
        yield ev, np.asarray(en), mated, mated_names, others


def crowding(v: np.ndarray, dev: np.ndarray, dev_labels: np.ndarray, own: np.ndarray | None = None,
             k: int = CONFUSED_K) -> np.ndarray:
    """Mean cosine of each vector's ``k`` most similar development people (best photo each):
    the crowding of :class:`facepipe.gallery.cohort.Cohort` with nobody skipped; ``own``
    (labels) leaves each row's own person out."""
    from facepipe.gallery.cohort import Cohort

    people, code = np.unique(dev_labels, return_inverse=True)
    order = np.argsort(code, kind="stable")
    _, starts = np.unique(code[order], return_index=True)
    cohort = Cohort(np.asarray(dev, np.float32)[order], starts.astype(np.int64), k, 0, 0.0)
    if own is None:
        return cohort.crowding(v)
    pos = np.searchsorted(people, own)
    known = (pos < len(people)) & (people[np.minimum(pos, len(people) - 1)] == own)
    return cohort.crowding(v, own=np.where(known, pos, -1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "out" / "openset_analysis")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "gallery_openset_misses.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    import bench_openset_defaults as bench
    import calibrate_embedder as cal
    from facepipe import defaults
    from facepipe.builders import build_pipeline
    from facepipe.datasets import data_root
    from facepipe.gallery.openset import compute_impostor_model, impostor_model_for, impostor_scores

    torch.set_num_threads(args.threads)
    data = data_root()
    pipe = build_pipeline(defaults.DETECTOR, "default", "cpu", largest_only=False)
    model = impostor_model_for(pipe.embedder)
    if model is None:
        raise SystemExit("the default embedder ships no impostor model")
    tag = pipe.embedder.embedder_id.replace("@", "_").replace("+", "_")
    ids = data / "identities"
    folders = {"yale": bench.identity_set(ids / "yale_faces"),
               "fr_examples": bench.identity_set(ids / "face_recognition_examples")}
    emb = {name: embed(pipe, [(p, f) for p, fs in fo.items() for f in fs], True, False,
                       args.cache / f"{tag}_{name}.npz") for name, fo in folders.items()}
    caltech = sorted((data / "detection" / "caltech_webfaces_dev" / "images").iterdir())
    emb["caltech"] = embed(pipe, [("caltech", p) for p in caltech], False, False, args.cache / f"{tag}_caltech.npz")
    dev_people, _ = cal.dev_people(data, 0.2, 0)
    dev_items = [(p, f) for p, fs in dev_people.items() for f in fs]
    emb["lfw_dev"] = embed(pipe, dev_items, True, False, args.cache / f"{tag}_lfwdev.npz")
    emb["lfw_dev_grey"] = embed(pipe, dev_items, True, True, args.cache / f"{tag}_lfwdev_grey.npz")
    out: dict[str, Any] = {"embedder_id": pipe.embedder.embedder_id}

    # photo rows per person, as the benchmark builds them (every Yale/fr photo has a face here)
    sets: dict[str, dict[str, Any]] = {}
    for name, fo in folders.items():
        row_of = {str(p): i for i, p in enumerate(emb[name]["paths"])}
        sets[name] = {"people": sorted(fo), "rows": {p: [row_of.get(str(f), -1) for f in fs] for p, fs in fo.items()},
                      "v": emb[name]["vectors"]}
    yv, ylab = emb["yale"]["vectors"], emb["yale"]["labels"].astype(str)
    cond = np.asarray([Path(p).name.split(".")[-2] for p in emb["yale"]["paths"]])

    # 1. where the false matches come from
    by_cond, n_cond = collections.Counter(), collections.Counter()
    by_subject, n_subject, by_pair = collections.Counter(), collections.Counter(), collections.Counter()
    for ev, en, _, _, others in splits(sets["yale"]["people"], sets["yale"]["rows"]):
        gal = yv[ev]
        t = model.threshold_for_fpir(0.01, len(ev))
        for p in others:
            for r in sets["yale"]["rows"][p]:
                s = gal @ yv[r]
                j = int(np.argmax(s))
                n_cond[cond[r]] += 1
                n_subject[p] += 1
                if s[j] >= t:
                    by_cond[cond[r]] += 1
                    by_subject[p] += 1
                    by_pair[f"{p} as {en[j]}"] += 1
    out["yale_false_matches"] = {
        "total": int(sum(by_subject.values())), "stranger_probes": int(sum(n_subject.values())),
        "by_condition": {c: {"named": by_cond[c], "probes": n_cond[c], "rate": by_cond[c] / n_cond[c]}
                         for c in sorted(n_cond)},
        "by_stranger": {p: {"named": by_subject[p], "probes": n_subject[p]} for p in sorted(n_subject)},
        "top_pairs": dict(by_pair.most_common(8)),
    }

    # 2. concentration, and LFW subsets of the same size
    t3 = model.threshold_at_fmr(1e-3)
    s_all = yv @ yv.T
    people = sorted(set(ylab))
    pairs = []
    for i, a in enumerate(people):
        for b in people[i + 1:]:
            m = s_all[np.ix_(ylab == a, ylab == b)]
            pairs.append({"pair": f"{a}-{b}", "mean": float(m.mean()), "above": int((m >= t3).sum()), "pairs": int(m.size)})
    pairs.sort(key=lambda r: -r["above"])
    above = np.asarray([r["above"] for r in pairs])
    genuine = {p: float(s_all[np.ix_(ylab == p, ylab == p)][~np.eye(int((ylab == p).sum()), dtype=bool)].mean())
               for p in people}
    dv, dl = emb["lfw_dev"]["vectors"], emb["lfw_dev"]["labels"].astype(str)
    counts = collections.Counter(dl)
    pool = sorted(p for p, c in counts.items() if c >= 5)
    rng = np.random.default_rng(0)
    subset_rates = []
    for _ in range(20):
        m = np.isin(dl, rng.choice(pool, 15, replace=False))
        subset_rates.append(float((impostor_scores(dv[m], dl[m]) >= t3).mean()))
    out["concentration"] = {
        "threshold_fmr_1e-3": t3,
        "yale_share_above": float(above.sum() / sum(r["pairs"] for r in pairs)),
        "yale_person_pairs": len(pairs),
        "share_carried_by_top_3_person_pairs": float(above[:3].sum() / above.sum()),
        "top_person_pairs": pairs[:5],
        "median_person_pair_mean": float(np.median([r["mean"] for r in pairs])),
        "genuine_mean": genuine,
        "lfw_15_person_subsets": {"people_pool": len(pool), "subsets": 20, "mean_share_above": float(np.mean(subset_rates)),
                                  "max_share_above": float(np.max(subset_rates))},
    }

    # 3. grayscale, norm, crowding
    gv, gl = emb["lfw_dev_grey"]["vectors"], emb["lfw_dev_grey"]["labels"].astype(str)
    sc, sg = impostor_scores(dv, dl), impostor_scores(gv, gl)
    out["grayscale"] = {f"{f:g}": {"threshold": model.threshold_at_fmr(f), "fmr_colour": float((sc >= model.threshold_at_fmr(f)).mean()),
                                   "fmr_grey": float((sg >= model.threshold_at_fmr(f)).mean())} for f in (1e-2, 1e-3, 1e-4)}
    confused = np.isin(ylab, [r["pair"].split("-")[0] for r in pairs[:3]] + [r["pair"].split("-")[1] for r in pairs[:3]])
    s_dev = dv @ dv.T
    s_dev[dl[:, None] == dl[None, :]] = -1.0
    out["norm"] = {
        "percentiles_1_5_50_95": {k: np.percentile(emb[k]["norm"], [1, 5, 50, 95]).round(4).tolist()
                                  for k in ("lfw_dev", "yale", "fr_examples", "caltech")},
        "auc_low_norm_for_confused_subjects": float(roc_auc_score(confused, -emb["yale"]["norm"])),
        "spearman_norm_vs_best_impostor_lfw": float(spearmanr(emb["lfw_dev"]["norm"], s_dev.max(axis=1))[0]),
    }
    crowd = crowding(yv, dv, dl)
    out["crowding"] = {"k": CONFUSED_K, "confused_subjects": sorted(set(ylab[confused])),
                       "per_subject": {p: float(crowd[ylab == p].mean()) for p in people},
                       "lfw_dev_median": float(np.median(crowding(dv, dv, dl, dl)))}

    # 4. per-enrolled-vector crowding thresholds
    def crowd_rule(dev: np.ndarray, dev_lab: np.ndarray, q: float, m: Any) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
        ref = float(np.quantile(crowding(dev, dev, dev_lab, dev_lab), q))
        return lambda g: (m.threshold_for_fpir(0.01, len(g)), np.maximum(0.0, crowding(g, dev, dev_lab) - ref))

    def user(rule: Callable[[np.ndarray], tuple[float, np.ndarray]], name: str) -> dict[str, float]:
        s = sets[name]
        named = probes = right = mated_n = 0
        pools = [emb["caltech"]["vectors"]] + [sets[o]["v"] for o in sets if o != name]
        for ev, en, mated, mated_names, others in splits(s["people"], s["rows"]):
            gal = s["v"][ev]
            t, up = rule(gal)
            same = s["v"][[r for p in others for r in s["rows"][p] if r >= 0]]
            for v in [same] + pools:
                sim = v @ gal.T
                j = sim.argmax(axis=1)
                named += int((sim[np.arange(len(v)), j] >= t + up[j]).sum())
                probes += len(v)
            for r, truth in zip(mated, mated_names):
                mated_n += 1
                if r >= 0:
                    sim = gal @ s["v"][r]
                    j = int(np.argmax(sim))
                    right += bool(sim[j] >= t + up[j] and en[j] == truth)
        return {"fpir": named / probes, "dir": right / mated_n}

    in_a = np.asarray([int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) % 2 == 0 for p in dl])
    model_a = compute_impostor_model(dv[in_a], dl[in_a], model.embedder_id)
    vb, lb = dv[~in_a], dl[~in_a]

    def lfw(rule: Callable[[np.ndarray], tuple[float, np.ndarray]], n: int, per: int) -> dict[str, float]:
        eligible = [p for p in np.unique(lb) if (lb == p).sum() >= per + 1]
        named = probes = right = mated = 0
        for rep in range(20):
            enrolled = sorted(np.random.default_rng(rep).choice(eligible, n, replace=False).tolist())
            rows = np.concatenate([np.flatnonzero(lb == p)[:per] for p in enrolled])
            gal, names = vb[rows], lb[rows]
            t, up = rule(gal)
            sim = vb[~np.isin(lb, enrolled)] @ gal.T
            j = sim.argmax(axis=1)
            named += int((sim[np.arange(len(sim)), j] >= t + up[j]).sum())
            probes += len(sim)
            m_rows = np.setdiff1d(np.flatnonzero(np.isin(lb, enrolled)), rows)
            sim = vb[m_rows] @ gal.T
            j = sim.argmax(axis=1)
            right += int(((sim[np.arange(len(sim)), j] >= t + up[j]) & (names[j] == lb[m_rows])).sum())
            mated += len(m_rows)
        return {"fpir": named / probes, "dir": right / max(mated, 1)}

    rules: dict[str, tuple[Any, Any]] = {"automatic (shipped)": (lambda g: (model.threshold_for_fpir(0.01, len(g)), np.zeros(len(g))),
                                                                lambda g: (model_a.threshold_for_fpir(0.01, len(g)), np.zeros(len(g))))}
    for q in (0.5, 0.75, 0.9, 0.95):
        rules[f"crowding above the development q{q:g}"] = (crowd_rule(dv, dl, q, model), crowd_rule(dv[in_a], dl[in_a], q, model_a))
    out["crowding_thresholds"] = {}
    for label, (full, half) in rules.items():
        row = {"yale": user(full, "yale"), "fr_examples": user(full, "fr_examples"),
               "lfw_10x1": lfw(half, 10, 1), "lfw_30x1": lfw(half, 30, 1), "lfw_10x3": lfw(half, 10, 3)}
        out["crowding_thresholds"][label] = row
        log.info("%s: %s", label, "; ".join(f"{k} FPIR {v['fpir']:.4f} DIR {v['dir']:.3f}" for k, v in row.items()))
    meta = {"command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} CPU core(s), {platform.platform()}, shared with other jobs"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": out}, indent=1, default=float) + "\n")
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
