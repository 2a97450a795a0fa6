"""``facepipe train embedder``: reproduce the shipped metric-learning face embedder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from facepipe.commands._common import FiniteFloat, fail, report, setup_logging, verbosity_options
from facepipe.errors import FacepipeError

LOSS_CHOICES = ["triplet-semihard", "triplet-hard", "contrastive", "multisimilarity", "supcon"]


@click.command("embedder")
@click.option("--data", "data", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              default=[Path("out/aligned/lfw_devtrain_112.npz")], show_default=True,
              help="Aligned caches from scripts/align_dataset.py (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("runs/embedder/embedder.pt"), show_default=True, help="Checkpoint to write.")
@click.option("--loss", type=click.Choice(LOSS_CHOICES), default="multisimilarity", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=600, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=8), default=96, show_default=True)
@click.option("--m-per-class", type=click.IntRange(min=2), default=4, show_default=True)
@click.option("--crop-size", type=click.IntRange(min=64, max=160), default=112, show_default=True)
@click.option("--dim", type=click.IntRange(min=128, max=512), default=128, show_default=True)
@click.option("--lr", type=FiniteFloat(min=0.0), default=1e-3, show_default=True)
@click.option("--teacher", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="dlib descriptor cache (scripts/train_embedder.py teacher) to distil from.")
@click.option("--extra", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Unlabelled aligned caches used for distillation only (repeatable).")
@click.option("--distill-weight", type=FiniteFloat(min=0.0), default=1.0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (bf16 on CUDA).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--freeze-blocks", type=click.IntRange(min=0, max=18), default=0, show_default=True,
              help="Freeze MobileNetV2 features[:k], train the rest from cached trunk features (CPU).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--install", is_flag=True, help="Copy the checkpoint to facepipe/weights/embedder_mobilenet_v2.pt (the shipped "
              "`mobilenet-v2` embedder this command trains; the default is `dlib-transfer`).")
@verbosity_options
def embedder(data: tuple[Path, ...], out: Path, loss: str, steps: int, batch_size: int, m_per_class: int,
             crop_size: int, dim: int, lr: float, teacher: Path | None, extra: tuple[Path, ...],
             distill_weight: float, device: str, seed: int, freeze_blocks: int, threads: int, install: bool,
             quiet: bool, verbose: int) -> None:
    """Train the face embedder from aligned caches (people-disjoint validation, seeded).

    Prints the held-out verification metrics and writes OUT plus OUT.json.
    """
    setup_logging(quiet, verbose)
    try:
        from facepipe.device import validate_device_spec
        from facepipe.train.embedder import EmbedderTrainConfig, train_embedder

        validate_device_spec(device)
        cfg = EmbedderTrainConfig(
            data=[str(p) for p in data], loss=loss, dim=dim, crop_size=crop_size, steps=steps,
            batch_size=batch_size, m_per_class=m_per_class, lr=lr, seed=seed, device=device,
            threads=threads, teacher=str(teacher) if teacher else None,
            extra_unlabelled=[str(p) for p in extra], distill_weight=distill_weight,
            freeze_blocks=freeze_blocks)
        result = train_embedder(cfg, out)
        Path(str(out) + ".json").write_text(json.dumps(result, indent=2))
    except FacepipeError as exc:
        raise fail(exc) from exc
    except ValueError as exc:
        raise fail(str(exc)) from exc
    click.echo(json.dumps(result["metrics"], indent=2))
    if install:
        from facepipe.embed import SHIPPED

        shutil.copyfile(out, SHIPPED["mobilenet-v2"])
        report(f"facepipe: installed {out} as {SHIPPED['mobilenet-v2']}", quiet)
