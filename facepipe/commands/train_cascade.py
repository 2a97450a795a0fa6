"""``facepipe train cascade``: train a Viola–Jones Haar cascade and write OpenCV cascade XML."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from facepipe.commands._common import FiniteFloat, fail, report, setup_logging, verbosity_options
from facepipe.errors import FacepipeError


def _parse_size(value: str) -> tuple[int, int]:
    w, sep, h = value.lower().partition("x")
    try:
        width = int(w)
        height = int(h) if sep else width
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected N or WxH", param_hint="--size") from None
    if not (6 <= width <= 64 and 6 <= height <= 64):
        raise click.BadParameter(f"{value!r}: window sides must be 6..64 pixels", param_hint="--size")
    return width, height


@click.command("cascade")
@click.option("--positives", type=click.Path(path_type=Path), default=None,
              help="Cropped object images: a folder of images or an .npz with a uint8 'images' (N, H, W) array.")
@click.option("--negatives", type=click.Path(path_type=Path), default=None,
              help="Folder of images that contain no object; negative windows are drawn from them.")
@click.option("--dev-faces", is_flag=True,
              help="Train a face cascade on facepipe's development data (the CNN classifier's train split) "
                   "instead of --positives/--negatives; reports held-out figures on its validation split.")
@click.option("--packaged-scenes", is_flag=True,
              help="--dev-faces: add the people-free sample images shipped inside scikit-image, scikit-learn "
                   "and matplotlib to the negatives (split by name like the scenes: training ones are "
                   "mined, held-out ones count validation false alarms).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Development data root for --dev-faces [$FACEPIPE_DATA or ../shared/data].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Cascade XML to write (rewritten after every stage); the resumable state goes "
                   "next to it as <name>.train.json.")
@click.option("--size", "size", default="24", show_default=True, help="Window size: N or WxH pixels.")
@click.option("--stages", type=click.IntRange(min=1, max=100), default=20, show_default=True)
@click.option("--min-hit-rate", type=FiniteFloat(0.5, 1.0, min_open=True), default=0.995, show_default=True,
              help="Fraction of positives every stage must keep.")
@click.option("--max-false-alarm", type=FiniteFloat(0.0, 1.0, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Fraction of negatives a stage may still accept.")
@click.option("--num-pos", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Positives per stage (drawn from those the cascade still accepts).")
@click.option("--num-neg", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Negative windows per stage (mined: windows the cascade still accepts).")
@click.option("--max-weak", type=click.IntRange(min=1), default=100, show_default=True,
              help="Most stumps per stage.")
@click.option("--boost", type=click.Choice(["gentle", "real", "discrete"]), default="gentle", show_default=True,
              help="AdaBoost variant (OpenCV's default is gentle).")
@click.option("--mode", type=click.Choice(["basic", "core"]), default="basic", show_default=True,
              help="Feature set: Viola–Jones' upright features, or with Lienhart's 4-wide and centre-surround.")
@click.option("--features-per-stage", type=click.IntRange(min=100), default=8000, show_default=True,
              help="Random features considered per stage (plus every feature already used); bounds memory.")
@click.option("--bins", type=click.IntRange(4, 256), default=64, show_default=True,
              help="Quantile bins per feature for the stump search.")
@click.option("--mirror/--no-mirror", default=None,
              help="Add mirrored copies of the positives [on with --dev-faces, else off].")
@click.option("--jitter", type=click.IntRange(min=0), default=1, show_default=True,
              help="--dev-faces: randomly shifted/scaled/rotated copies per face.")
@click.option("--scale-step", type=FiniteFloat(1.05, 4.0), default=1.25, show_default=True,
              help="Pyramid step between the scales negatives are drawn at.")
@click.option("--calibration-fraction", type=FiniteFloat(0.0, 0.5), default=0.0, show_default=True,
              help="Hold this fraction of the positives (whole objects: a face with its jittered and mirrored "
                   "copies) out of boosting and set every stage's threshold to keep --min-hit-rate of them, "
                   "so the hit rate holds for unseen objects (0: thresholds on the boosting positives, "
                   "as OpenCV's traincascade does).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run whose state sits next to --out.")
@click.option("--force", is_flag=True, help="Start over even if a training state exists next to --out.")
@verbosity_options
def cascade(positives: Path | None, negatives: Path | None, dev_faces: bool, packaged_scenes: bool, data_dir: Path | None, out: Path,
            size: str, stages: int, min_hit_rate: float, max_false_alarm: float, num_pos: int, num_neg: int,
            max_weak: int, boost: str, mode: str, features_per_stage: int, bins: int, mirror: bool | None,
            jitter: int, scale_step: float, calibration_fraction: float, seed: int, resume: bool, force: bool, quiet: bool, verbose: int) -> None:
    """Train a Viola–Jones cascade (Haar features, boosted stumps, bootstrapped negatives).

    Writes OpenCV's cascade XML, loadable by cv2.CascadeClassifier and by
    `facepipe detect --detector haar --cascade OUT`. Prints one line per stage
    (hit rate and false-alarm rate on its training samples, stumps, time) and a
    JSON summary at the end. A killed run continues with --resume from the last
    finished stage.
    """
    setup_logging(quiet, verbose)
    width, height = _parse_size(size)
    if resume and force:
        raise click.UsageError("--resume and --force exclude each other")
    if dev_faces and (positives is not None or negatives is not None):
        raise click.UsageError("--dev-faces replaces --positives/--negatives; give one or the other")
    if not dev_faces and (positives is None or negatives is None):
        raise click.UsageError("give --positives and --negatives (or --dev-faces)")
    if packaged_scenes and not dev_faces:
        raise click.UsageError("--packaged-scenes adds negatives to --dev-faces; with --negatives, copy the "
                               "images into that folder instead")
    if out.suffix.lower() != ".xml":
        raise click.BadParameter(f"{out}: the cascade file must end in .xml", param_hint="--out")
    if dev_faces and width != height:
        raise click.BadParameter("--dev-faces needs a square window", param_hint="--size")
    try:
        import numpy as np

        from facepipe.vj.samples import NegativeSource, load_positives, mirrored
        from facepipe.vj.train import TrainParams, train_cascade

        params = TrainParams(width=width, height=height, stages=stages, min_hit_rate=min_hit_rate,
                             max_false_alarm=max_false_alarm, num_pos=num_pos, num_neg=num_neg,
                             max_weak=max_weak, boost=boost, mode=mode, features_per_stage=features_per_stage,
                             bins=bins, seed=seed, calibration_fraction=calibration_fraction)
        params.validate()
        validation = None
        info: dict = {}
        groups = None
        if dev_faces:
            from facepipe.datasets import data_root
            from facepipe.vj.facedata import load_face_cascade_data

            root = Path(data_dir) if data_dir is not None else data_root()
            report(f"facepipe: loading the development face data from {root}", quiet)
            d = load_face_cascade_data(root, out.parent / "cache", size=width, seed=seed, jitter=jitter,
                                       mirror=True if mirror is None else mirror, scale_step=scale_step,
                                       packaged_scenes=packaged_scenes)
            pos, neg, validation, info = d.train_pos, d.train_neg, (d.val_pos, d.val_neg), d.info
            groups = d.train_groups
            info["data"] = str(root)
        else:
            pos = load_positives(positives, width, height)
            if mirror:
                groups = np.tile(np.arange(len(pos)), 2)
                pos = mirrored(pos)
            neg = NegativeSource.from_folder(negatives, width, height, scale_step=scale_step)
            info = {"positives": str(positives), "negatives": str(negatives), "mirrored": bool(mirror)}
        report(f"facepipe: {len(pos)} positive windows, {len(neg.images)} negative images "
               f"({neg.n_windows():.3g} windows)", quiet)
        bar = None
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(total=max_weak, file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)

        def on_round(stage: int, weak: int, hit: float, fa: float) -> None:
            if bar is not None:
                if weak == 1:
                    bar.reset(total=max_weak)
                    bar.set_description(f"stage {stage}")
                bar.update(1)
                bar.set_postfix_str(f"hit {hit:.4f} fa {fa:.3f}")

        def on_stage(st: dict) -> None:
            extra = ""
            if "val_hit_rate" in st:
                extra = f" | val hit {st['val_hit_rate']:.4f} fa {st['val_false_alarm']:.2e}"
            held = " (held-out calibration positives)" if "train_hit_rate" in st else ""
            report(f"facepipe: stage {st['stage'] + 1}/{stages}: {st['n_weak']} stumps, hit {st['hit_rate']:.4f}{held}, "
                   f"false alarm {st['false_alarm']:.3f} on {st['n_pos']}+{st['n_neg']} samples | cascade "
                   f"accepted {st['neg_acceptance_before']:.2e} of negatives before it{extra} | {st['seconds']:.0f} s",
                   quiet)

        if sys.argv[1:3] == ["train", "cascade"]:
            info["command"] = "facepipe train cascade " + " ".join(shlex.quote(a) for a in sys.argv[3:])
        note = f"Data: {json.dumps({k: v for k, v in info.items() if k not in ('data', 'command')})}\n" \
            f"Command line and per-stage figures: {out.stem}.train.json"
        result = train_cascade(np.ascontiguousarray(pos), neg, params, out, resume=resume, overwrite=force,
                               validation=validation, info=info, comment=note, on_stage=on_stage,
                               on_round=on_round, groups=groups)
        if bar is not None:
            bar.close()
    except (FacepipeError, ValueError) as exc:
        raise fail(str(exc)) from exc
    c = result.cascade
    report(f"facepipe: {result.stop_reason}", quiet)
    click.echo(json.dumps({"cascade": str(out), "stages": len(c.stages), "weak_classifiers": c.n_weak,
                           "stop_reason": result.stop_reason, "seconds": round(result.seconds, 1),
                           "last_stage": result.stages[-1] if result.stages else None}))
