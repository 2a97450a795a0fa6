"""Attentional-cascade training with bootstrapped negatives, resumable between stages.

Stage ``k`` is trained on

* up to ``num_pos`` positives that the first ``k`` stages still accept (positives
  the cascade has already lost are not asked for again, as in OpenCV's
  ``traincascade``), and
* up to ``num_neg`` negative windows that the first ``k`` stages accept, mined from
  the negative images at random positions and scales (:class:`NegativeSource`).

With ``calibration_fraction`` > 0 that fraction of the positives' groups (a face
with its jittered and mirrored copies is one group) is held out of boosting, and
every stage's threshold is set to keep ``min_hit_rate`` of the held-out positives
the cascade still accepts (:func:`facepipe.vj.boost.train_stage`): the per-stage
hit rate then holds for faces the stumps were not fitted to.

The fraction of scanned negative windows the first ``k`` stages accept is the
cascade's false-alarm estimate; training stops when it falls below
``max_false_alarm ** stages`` (the target) or when too few negatives remain.

After every stage the cascade is written to ``out`` (a usable OpenCV XML file)
and everything needed to continue — parameters, the stages with global feature
ids, per-stage figures and the random generator's state — to
``<out stem>.train.json``. A killed run resumed with ``resume=True`` continues from
the last finished stage and ends with the same cascade as an uninterrupted run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from facepipe.errors import InputError, OutputError
from facepipe.vj.boost import BOOST_TYPES, StageSettings, train_stage
from facepipe.vj.features import MODES, HaarFeatures, generate_features, integral_images, window_norm
from facepipe.vj.model import Cascade, Stage, Stump
from facepipe.vj.samples import NegativeSource
from facepipe.vj.xmlio import write_cascade

log = logging.getLogger(__name__)

STATE_FORMAT = "facepipe-cascade-train-v1"


@dataclass
class TrainParams:
    """Everything that determines a trained cascade (besides the data)."""

    width: int = 24
    height: int = 24
    stages: int = 20
    min_hit_rate: float = 0.995
    max_false_alarm: float = 0.5
    num_pos: int = 2000
    num_neg: int = 2000
    max_weak: int = 100
    boost: str = "gentle"
    mode: str = "basic"
    features_per_stage: int = 8000
    bins: int = 64
    seed: int = 0
    calibration_fraction: float = 0.0

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work."""
        if self.width < 6 or self.height < 6:
            raise ValueError(f"window must be at least 6x6, got {self.width}x{self.height}")
        if not 0.5 < self.min_hit_rate <= 1.0:
            raise ValueError(f"min_hit_rate must be in (0.5, 1], got {self.min_hit_rate}")
        if not 0.0 < self.max_false_alarm < 1.0:
            raise ValueError(f"max_false_alarm must be in (0, 1), got {self.max_false_alarm}")
        if self.stages < 1 or self.num_pos < 1 or self.num_neg < 1 or self.max_weak < 1:
            raise ValueError("stages, num_pos, num_neg and max_weak must be >= 1")
        if self.boost not in BOOST_TYPES:
            raise ValueError(f"boost must be one of {', '.join(BOOST_TYPES)}, got {self.boost!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 4 <= self.bins <= 256:
            raise ValueError(f"bins must be in [4, 256], got {self.bins}")
        if self.features_per_stage < 1:
            raise ValueError("features_per_stage must be >= 1")
        if not 0.0 <= self.calibration_fraction <= 0.5:
            raise ValueError(f"calibration_fraction must be in [0, 0.5], got {self.calibration_fraction}")

    def stage_settings(self) -> StageSettings:
        """The per-stage part of the parameters."""
        return StageSettings(self.min_hit_rate, self.max_false_alarm, self.max_weak, self.boost, self.bins)


@dataclass
class TrainResult:
    """A finished (or stopped) training run."""

    cascade: Cascade
    stages: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""
    seconds: float = 0.0


def calibration_split(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the windows held out for stage thresholds: whole groups, ``fraction`` of them.

    Drawn with its own generator (seeded by ``seed``), so the split does not depend on
    the training's random stream and a resumed run gets the same one.
    """
    groups = np.asarray(groups)
    uniq = np.unique(groups)
    n_cal = int(round(fraction * len(uniq)))
    if fraction > 0 and (n_cal < 1 or n_cal >= len(uniq)):
        raise ValueError(f"calibration_fraction {fraction} of {len(uniq)} positive groups leaves one side empty")
    chosen = np.random.default_rng([seed, 0x5EED]).choice(uniq, n_cal, replace=False)
    return np.isin(groups, chosen)


def state_path(out: str | Path) -> Path:
    """Where the resumable training state of cascade ``out`` lives: ``<stem>.train.json``."""
    p = Path(out)
    return p.with_name(p.stem + ".train.json")


def fingerprint(windows: np.ndarray) -> str:
    """SHA-1 of an array's shape and bytes."""
    h = hashlib.sha1(str(windows.shape).encode())
    h.update(np.ascontiguousarray(windows).tobytes())
    return h.hexdigest()


def _valid(windows: np.ndarray) -> np.ndarray:
    ii, sq = integral_images(windows)
    return window_norm(ii, sq)[1]


def _stage_to_json(st: Stage) -> dict[str, Any]:
    return {"threshold": st.threshold, "stumps": [[s.feature, s.threshold, s.left, s.right] for s in st.stumps]}


def _stage_from_json(d: dict[str, Any]) -> Stage:
    return Stage([Stump(int(f), float(t), float(lv), float(rv)) for f, t, lv, rv in d["stumps"]], float(d["threshold"]))


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(path, f"cannot write training state ({exc.strerror or exc})") from exc


def cascade_comment(params: TrainParams, stats: list[dict[str, Any]], extra: str = "") -> str:
    """The XML header comment: what trained the cascade, how, and with what result."""
    import facepipe

    version = getattr(facepipe, "__version__", "")
    lines = [f"Viola-Jones Haar cascade trained by facepipe {version} (facepipe.vj, 'facepipe train cascade').",
             f"Parameters: {json.dumps(asdict(params))}",
             f"Stages: {len(stats)}; weak classifiers (stumps): {sum(s['n_weak'] for s in stats)}."]
    if stats:
        last = stats[-1]
        lines.append(f"Last stage on its training samples: hit rate {last['hit_rate']:.4f}, false alarm "
                     f"{last['false_alarm']:.4f}; the cascade before it accepted "
                     f"{last['neg_acceptance_before']:.3g} of the negative windows.")
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def load_state(out: Path) -> dict[str, Any] | None:
    """The training state next to ``out``, or None if there is none."""
    sp = state_path(out)
    if not sp.is_file():
        return None
    try:
        doc = json.loads(sp.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(sp, f"unreadable training state ({exc})") from exc
    if doc.get("format") != STATE_FORMAT:
        raise InputError(sp, "not a facepipe cascade training state")
    return doc


def validation_figures(cascade: Cascade, val_pos: np.ndarray | None, val_neg: NegativeSource | None,
                       max_windows: int) -> dict[str, float]:
    """Hit rate on held-out positives and false-alarm rate on held-out negative windows."""
    out: dict[str, float] = {}
    if val_pos is not None and len(val_pos):
        out["val_hit_rate"] = float(cascade.accepts(val_pos).mean())
    if val_neg is not None:
        scanned, accepted = val_neg.false_alarm(cascade, max_windows)
        out["val_false_alarm"] = accepted / scanned if scanned else float("nan")
        out["val_windows"] = scanned
    return out


def train_cascade(positives: np.ndarray, negatives: NegativeSource, params: TrainParams, out: str | Path,
                  resume: bool = False, overwrite: bool = False,
                  validation: tuple[np.ndarray | None, NegativeSource | None] | None = None,
                  val_windows: int = 300_000, info: dict[str, Any] | None = None, comment: str = "",
                  on_stage: Callable[[dict[str, Any]], None] | None = None,
                  on_round: Callable[[int, int, float, float], None] | None = None,
                  groups: np.ndarray | None = None) -> TrainResult:
    """Train (or continue training) a cascade and write it to ``out`` after every stage.

    ``positives`` are ``(N, height, width)`` uint8 windows; ``negatives`` draws the
    negative windows. ``validation`` optionally gives held-out positives and a
    held-out negative source, measured after every stage (never used for training).
    ``info`` is stored in the state file (data provenance) and ``comment`` in the XML
    header (e.g. the command line). ``on_stage`` receives
    each stage's figures; ``on_round(stage, weak, hit, fa)`` each boosting round.
    ``groups`` labels positives that are copies of one object (jittered, mirrored):
    the calibration split (``params.calibration_fraction``) keeps groups whole;
    without it every window is its own group.
    """
    params.validate()
    out = Path(out)
    t_start = time.perf_counter()
    if positives.ndim != 3 or positives.shape[1:] != (params.height, params.width) or positives.dtype != np.uint8:
        raise ValueError(f"positives must be (N, {params.height}, {params.width}) uint8, "
                         f"got {positives.dtype} {positives.shape}")
    if (negatives.width, negatives.height) != (params.width, params.height):
        raise ValueError("negative source and parameters disagree on the window size")
    if groups is not None and len(groups) != len(positives):
        raise ValueError(f"groups has {len(groups)} labels for {len(positives)} positives")
    inputs = {"positives": fingerprint(positives), "negatives": negatives.fingerprint()}
    if params.calibration_fraction > 0 and groups is not None:
        inputs["groups"] = fingerprint(np.asarray(groups, np.int64))
    features = generate_features(params.width, params.height, params.mode)
    cascade = Cascade(params.width, params.height, features, [], asdict(params))
    rng = np.random.default_rng(params.seed)
    stats: list[dict[str, Any]] = []
    elapsed_before = 0.0
    sp = state_path(out)
    state = load_state(out) if (resume or not overwrite) else None
    if state is not None and not resume and not overwrite:
        raise OutputError(sp, "a training state exists: resume it (--resume) or overwrite it (--force)")
    if state is not None:
        old = TrainParams(**state["params"])
        diff = [k for k, v in asdict(params).items() if k != "stages" and asdict(old)[k] != v]
        if diff:
            raise InputError(sp, f"cannot resume: parameters differ ({', '.join(diff)})")
        if state.get("inputs") != inputs:
            raise InputError(sp, "cannot resume: the positives or negatives differ from the run being resumed")
        cascade.stages = [_stage_from_json(d) for d in state["stages"]]
        stats = list(state["stage_stats"])
        rng.bit_generator.state = state["rng"]
        elapsed_before = float(state.get("seconds", 0.0))
        log.info("resuming after stage %d of %d", len(cascade.stages), params.stages)
    elif resume:
        log.info("no training state at %s: starting from scratch", sp)

    valid = _valid(positives)
    pool = positives[valid]
    if len(pool) == 0:
        raise ValueError("no usable positives: every window is flat (grey-level std <= 10)")
    dropped_flat = int((~valid).sum())
    cal_pool = pool[:0]
    if params.calibration_fraction > 0:
        g = np.arange(len(positives)) if groups is None else np.asarray(groups)
        held = calibration_split(g, params.calibration_fraction, params.seed)[valid]
        pool, cal_pool = pool[~held], pool[held]
    settings = params.stage_settings()
    val_pos, val_neg = validation if validation is not None else (None, None)
    stop_reason = ""

    def save(finished: bool) -> None:
        doc = {"format": STATE_FORMAT, "params": asdict(params), "inputs": inputs, "info": info or {},
               "positives": {"given": int(len(positives)), "flat_dropped": dropped_flat,
                             "calibration": int(len(cal_pool))},
               "stages": [_stage_to_json(s) for s in cascade.stages], "stage_stats": stats,
               "rng": rng.bit_generator.state, "finished": finished, "stop_reason": stop_reason,
               "seconds": elapsed_before + time.perf_counter() - t_start,
               "updated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        write_cascade(cascade, out, cascade_comment(params, stats, comment))
        _write_json(sp, doc)

    acceptance = float(stats[-1]["neg_acceptance_before"]) if stats else 1.0
    while len(cascade.stages) < params.stages:
        k = len(cascade.stages)
        t0 = time.perf_counter()
        # positives the cascade still accepts
        if k:
            cand = np.flatnonzero(cascade.accepts(pool))
        else:
            cand = np.arange(len(pool))
        if len(cand) < 2:
            stop_reason = f"stage {k}: fewer than 2 positives left"
            break
        if len(cand) > params.num_pos:
            cand = np.sort(rng.choice(cand, params.num_pos, replace=False))
        pos = pool[cand]
        # negatives the cascade still accepts (bootstrapping)
        neg, rep = negatives.mine(cascade if k else None, params.num_neg, rng,
                                  prior_acceptance=acceptance * params.max_false_alarm if k else 1.0)
        acceptance = rep.acceptance
        target = params.max_false_alarm ** params.stages
        if k and acceptance <= target:
            stop_reason = f"false-alarm target {target:.3g} reached after {k} stages (estimate {acceptance:.3g})"
            break
        if len(neg) < max(10, params.num_neg // 10):
            stop_reason = (f"stage {k}: negatives exhausted ({len(neg)} of {params.num_neg} found in "
                           f"{rep.scanned} windows; false-alarm estimate {acceptance:.3g})")
            break
        t_mine = time.perf_counter() - t0
        # candidate features: a fresh random subset plus every feature used so far
        used = {s.feature for st in cascade.stages for s in st.stumps}
        n_new = min(params.features_per_stage, len(features))
        ids = np.union1d(rng.choice(len(features), n_new, replace=False), np.array(sorted(used), np.int64))
        samples = np.concatenate([pos, neg])
        y = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))])
        ii, sq = integral_images(samples)
        vnf, _ = window_norm(ii, sq)
        flat = ii.reshape(len(samples), -1).astype(np.float64)
        del ii, sq
        calibration = None
        if len(cal_pool):
            cal = cal_pool[cascade.accepts(cal_pool)] if k else cal_pool
            if len(cal) < 2:
                stop_reason = f"stage {k}: fewer than 2 calibration positives left"
                break
            cii, csq = integral_images(cal)
            calibration = (cii.reshape(len(cal), -1).astype(np.float64), window_norm(cii, csq)[0])
            del cii, csq
        stage, rep_stage = train_stage(flat, vnf, y, features, ids, settings, rng,
                                       on_round=(lambda j, h, f: on_round(k, j, h, f)) if on_round else None,
                                       calibration=calibration)
        del flat, calibration
        cascade.stages.append(stage)
        st = {"stage": k, "n_weak": rep_stage.n_weak, "hit_rate": rep_stage.hit_rate,
              "false_alarm": rep_stage.false_alarm, "n_pos": rep_stage.n_pos, "n_neg": rep_stage.n_neg,
              "neg_acceptance_before": acceptance, "neg_windows_scanned": rep.scanned,
              "neg_pages_visited": rep.pages_visited, "features_considered": int(len(ids)),
              "seconds_mining": round(t_mine, 2), "seconds_boosting": round(rep_stage.seconds, 2)}
        if rep_stage.train_hit_rate is not None:
            st.update({"train_hit_rate": rep_stage.train_hit_rate, "n_calibration": rep_stage.n_calibration})
        if val_pos is not None or val_neg is not None:
            st.update(validation_figures(cascade, val_pos, val_neg, val_windows))
        st["seconds"] = round(time.perf_counter() - t0, 2)
        stats.append(st)
        save(False)
        if on_stage is not None:
            on_stage(st)
    if not stop_reason:
        stop_reason = f"{params.stages} stages trained"
    if not cascade.stages:
        raise ValueError(f"no stage could be trained: {stop_reason}")
    save(True)
    return TrainResult(cascade, stats, stop_reason, elapsed_before + time.perf_counter() - t_start)
