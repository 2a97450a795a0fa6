"""``facepipe train classifier``: reproduce the shipped face/non-face CNN weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from facepipe.commands._common import fail, report, setup_logging, verbosity_options
from facepipe.errors import FacepipeError


@click.command("classifier")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Development data root [$FACEPIPE_DATA or ../shared/data].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("runs/classifier"), show_default=True,
              help="Where checkpoints, metrics.json and the LFW box cache go.")
@click.option("--regime", "regimes", multiple=True, type=click.Choice(["transfer", "finetune", "scratch"]),
              help="Regime(s) to train (repeatable) [all three]; finetune also trains transfer.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=60, show_default=True)
@click.option("--epochs-transfer", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--epochs-finetune", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--epochs-scratch", type=click.IntRange(min=0), default=6, show_default=True)
@click.option("--epochs-bootstrap", type=click.IntRange(min=0), default=1, show_default=True,
              help="Epochs after adding the model's own false positives as hard negatives.")
@click.option("--bootstrap-rounds", type=click.IntRange(min=0), default=1, show_default=True,
              help="Rounds of hard-negative mining (each followed by --epochs-bootstrap epochs).")
@click.option("--hard-negatives", type=click.IntRange(min=0), default=3000, show_default=True,
              help="Hard negatives mined per round.")
@click.option("--mine-lfw", type=click.IntRange(min=0), default=400, show_default=True,
              help="LFW training photos searched for false positives per round (plus all training scenes).")
@click.option("--init", "inits", multiple=True, metavar="REGIME=CHECKPOINT",
              help="Continue a regime from a checkpoint instead of its usual start (repeatable).")
@click.option("--lfw-people", type=click.IntRange(min=0), default=2400, show_default=True,
              help="LFW people (one photo each) used as face sources.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
@click.option("--install", is_flag=True,
              help="Copy finetune.pt / transfer.pt into facepipe/weights/ as the shipped weights.")
@verbosity_options
def classifier(data_dir: Path | None, out_dir: Path, regimes: tuple[str, ...], device: str, seed: int,
               batch_size: int, steps_per_epoch: int, epochs_transfer: int, epochs_finetune: int,
               epochs_scratch: int, epochs_bootstrap: int, bootstrap_rounds: int, hard_negatives: int,
               mine_lfw: int, inits: tuple[str, ...], lfw_people: int, threads: int | None,
               install: bool, quiet: bool, verbose: int) -> None:
    """Train the face/non-face classifier (transfer, fine-tune and from-scratch regimes).

    Reads the development data in place, trains seeded on the GPU when there is one
    (AMP) or on the CPU, and writes <regime>.pt checkpoints and metrics.json to --out.
    """
    setup_logging(quiet, verbose)
    try:
        import torch

        from facepipe.datasets import data_root
        from facepipe.device import validate_device_spec
        from facepipe.detect.cnn import SHIPPED_WEIGHTS, resolve_weights
        from facepipe.io import ensure_output_dir
        from facepipe.train.classifier import TrainSettings, train_classifiers
        from facepipe.train.classifier_data import load_sources

        validate_device_spec(device)
        init: dict[str, str] = {}
        for spec in inits:
            regime, sep, ckpt = spec.partition("=")
            if not sep or regime not in ("transfer", "finetune", "scratch"):
                raise click.BadParameter(f"{spec!r}: expected REGIME=CHECKPOINT", param_hint="--init")
            init[regime] = ckpt
        if threads:
            torch.set_num_threads(threads)
        root = data_dir if data_dir is not None else data_root()
        out = ensure_output_dir(out_dir)
        report(f"facepipe: loading training sources from {root}", quiet)
        train, val, info = load_sources(Path(root), out / "cache", max_lfw_people=lfw_people)
        report(f"facepipe: train {train.summary()} / val {val.summary()}", quiet)
        settings = TrainSettings(seed=seed, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                                 epochs_transfer=epochs_transfer, epochs_finetune=epochs_finetune,
                                 epochs_scratch=epochs_scratch, epochs_bootstrap=epochs_bootstrap,
                                 bootstrap_rounds=bootstrap_rounds, hard_negatives=hard_negatives,
                                 mine_lfw=mine_lfw, init=init, device=device)
        results = train_classifiers(train, val, out, settings, tuple(regimes) or ("transfer", "finetune", "scratch"),
                                    info, report=lambda m: report(f"facepipe: {m}", quiet))
        if install:
            for name, fname in SHIPPED_WEIGHTS.items():
                if name in results:
                    dst = resolve_weights(name)
                    shutil.copyfile(out / f"{name}.pt", dst)
                    report(f"facepipe: installed {dst}", quiet)
    except FacepipeError as exc:
        raise fail(exc) from exc
    for name, r in results.items():
        m = r.metrics
        click.echo(f"{name}\tauc={m['roc_auc']:.4f}\tacc={m['accuracy']:.4f}\tprecision={m['precision']:.4f}"
                   f"\trecall={m['recall']:.4f}\tthreshold={m['threshold']:.3f}\tseconds={r.train_seconds:.0f}")
