"""``facepipe train detector``: reproduce the shipped single-pass detector (``--detector cnn``)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import click

from facepipe.commands._common import FiniteFloat, fail, report, setup_logging, verbosity_options
from facepipe.errors import FacepipeError


def _scales(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint="--mine-scales") from None
    if not out or not all(math.isfinite(s) and s > 0 for s in out):
        raise click.BadParameter(f"{text!r}: scales must be positive numbers", param_hint="--mine-scales")
    return out


@click.command("detector")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Development data root [$FACEPIPE_DATA or ../shared/data].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("runs/detector"), show_default=True,
              help="Where detector.pt, metrics.json, the resumable state and the MTCNN teacher cache go.")
@click.option("--teacher-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="MTCNN landmark cache for LFW [OUT/cache/lfw_teacher.npz]; built on first use (~20 min).")
@click.option("--steps", type=click.IntRange(min=1), default=3000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--canvas", type=click.IntRange(min=64), default=256, show_default=True,
              help="Side of the composite training images.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=2e-3, show_default=True,
              help="Learning rate of the new layers (pyramid, heads).")
@click.option("--lr-backbone", type=FiniteFloat(min=0, min_open=True), default=5e-4, show_default=True,
              help="Learning rate of the pretrained MobileNetV2 blocks.")
@click.option("--mine-at", "mine_at", multiple=True, type=click.IntRange(min=0),
              help="Steps at which hard negatives are mined (repeatable; 0 with --init) [1200, 2200].")
@click.option("--hard-negatives", type=click.IntRange(min=0), default=1500, show_default=True,
              help="Hard negatives mined per round.")
@click.option("--mine-threshold", type=FiniteFloat(0, 1), default=0.3, show_default=True,
              help="Score from which a box on a face-free region counts as a hard negative.")
@click.option("--mine-per-image", type=click.IntRange(min=1), default=15, show_default=True,
              help="Most hard negatives taken from one image and scale per round.")
@click.option("--mine-scales", default="0.5,1,2", show_default=True, callback=lambda ctx, param, v: _scales(v),
              help="Comma-separated scales at which the face-free scenes are searched for hard negatives.")
@click.option("--hard-fraction", type=FiniteFloat(0, 0.5), default=0.1, show_default=True,
              help="Share of training canvases built around mined hard negatives.")
@click.option("--style", type=FiniteFloat(0, 1), default=0.15, show_default=True,
              help="Share of training canvases re-rendered as a 1-bit print, halftone, poster, cartoon "
                   "or pencil sketch (faces that are drawn or printed, not photographed); 0 turns it off.")
@click.option("--text-decoys", type=FiniteFloat(0, 1), default=0.25, show_default=True,
              help="Share of training canvases given lines of printed text away from the faces, as "
                   "negatives (letters such as O, Q and 8 look like faces to a detector); 0 turns it off.")
@click.option("--blob-decoys", type=FiniteFloat(0, 1), default=0.0, show_default=True,
              help="Share of training canvases given 1-10 small round objects (buttons, coins, rings, "
                   "highlights) away from the faces, as negatives (a face under 20 px is a round blob "
                   "too). Tried, not in the shipped recipe: docs/detection.md.")
@click.option("--crowd", type=FiniteFloat(0, 1), default=0.0, show_default=True,
              help="Share of the composite canvases built as group photos: 4-12 faces bunched together, "
                   "nearer (larger) heads hiding parts of farther ones, scene patches covering some faces' "
                   "edges; a face less than half visible is ignored. Tried, not in the shipped recipe: "
                   "docs/detection.md.")
@click.option("--style-landmarks/--no-style-landmarks", default=True, show_default=True,
              help="Landmark targets on the stylised canvases too (--no-style-landmarks: boxes only there; "
                   "tried, docs/detection.md).")
@click.option("--min-anchors", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Positive anchors per face at least: its k best-overlapping anchors (IoU >= 0.15) are "
                   "faces too, so small faces between anchor sizes get more than one (S3FD's matching).")
@click.option("--target-precision", type=FiniteFloat(0, 1), default=0.97, show_default=True,
              help="Precision (IoU 0.3) on development images that sets the shipped threshold.")
@click.option("--lfw-per-person", type=click.IntRange(min=1), default=4, show_default=True,
              help="LFW photos per training person.")
@click.option("--lfw-people", type=click.IntRange(min=1), default=None,
              help="Only the first N LFW people in alphabetical order (all by default; a CPU budget).")
@click.option("--video-frames", type=click.IntRange(min=0), default=0, show_default=True, metavar="EVERY",
              help="Also train on every EVERY-th frame of the data's videos, labelled by the MTCNN teacher "
                   "(real scenes with several small faces; cached next to the LFW teacher cache); 0: off. "
                   "Tried, not in the shipped recipe: docs/detection.md.")
@click.option("--video-share", type=FiniteFloat(0, 1), default=0.2, show_default=True,
              help="With --video-frames: share of the photo draws that take a video frame instead of an LFW photo.")
@click.option("--train-from", type=click.IntRange(0, 7), default=7, show_default=True,
              help="First trainable MobileNetV2 block (7: the classifier's stride-8 trunk stays frozen; "
                   "4 fine-tunes its stride-8 blocks, measured in docs/detection.md).")
@click.option("--classifier", default="finetune", show_default=True,
              help="Face/non-face classifier that seeds the stride-8 trunk and head.")
@click.option("--init", "init", default=None, metavar="CHECKPOINT",
              help="Continue from a detector checkpoint (a second phase) instead of the classifier seeds.")
@click.option("--packaged-scenes/--no-packaged-scenes", default=True, show_default=True,
              help="Also use the face-free sample images shipped inside scikit-image, scikit-learn and "
                   "matplotlib (coins, cells, textures, ...) as scenes and hard-negative sources "
                   "(the shipped detector's recipe).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
@click.option("--install", is_flag=True, help="Copy detector.pt into facepipe/weights/ as the shipped detector.")
@verbosity_options
def detector(data_dir: Path | None, out_dir: Path, teacher_cache: Path | None, steps: int, batch_size: int,
             canvas: int, lr: float, lr_backbone: float, mine_at: tuple[int, ...], hard_negatives: int,
             mine_threshold: float, mine_per_image: int, mine_scales: tuple[float, ...], hard_fraction: float,
             style: float, text_decoys: float, blob_decoys: float, crowd: float, style_landmarks: bool,
             min_anchors: int,
             target_precision: float,
             lfw_per_person: int, lfw_people: int | None, video_frames: int, video_share: float,
             train_from: int, classifier: str, init: str | None,
             packaged_scenes: bool, device: str, seed: int,
             threads: int | None, install: bool, quiet: bool, verbose: int) -> None:
    """Train the single-pass face detector with five landmarks.

    Seeds its stride-8 path from the face/non-face classifier, trains on composites
    of LFW faces (MTCNN landmarks as the teacher) and Caltech crops pasted into
    face-free scenes, mines hard negatives, and sets the operating threshold on
    development images (never on the detection benchmark sets). Resumable: rerun the
    same command after an interruption.
    """
    setup_logging(quiet, verbose)
    try:
        import torch

        from facepipe.datasets import data_root
        from facepipe.detect.fpn import resolve_detector_weights
        from facepipe.device import validate_device_spec
        from facepipe.io import ensure_output_dir
        from facepipe.train.detector import DetTrainSettings, train_detector
        from facepipe.train.detector_data import load_detector_sources, teacher_files
        from facepipe.train.detector_teacher import build_teacher_cache, video_frame_files

        validate_device_spec(device)
        if threads:
            torch.set_num_threads(threads)
        root = Path(data_dir) if data_dir is not None else data_root()
        out = ensure_output_dir(out_dir)
        cache = teacher_cache or out / "cache" / "lfw_teacher.npz"
        report(f"facepipe: MTCNN teacher labels for LFW ({cache})", quiet)
        teacher = build_teacher_cache(root, teacher_files(root, lfw_per_person, max_people=lfw_people), cache)
        frames = None
        if video_frames:
            vcache = cache.with_name(f"video_teacher_every{video_frames}.npz")
            report(f"facepipe: MTCNN teacher labels for every {video_frames}th video frame ({vcache})", quiet)
            frames = build_teacher_cache(root, video_frame_files(root, video_frames), vcache)
        train, val, info = load_detector_sources(root, teacher, max_per_person=lfw_per_person,
                                                  packaged_scenes=packaged_scenes, frames=frames,
                                                  frame_share=video_share)
        info["lfw_people_considered"] = lfw_people or "all"
        info["video_frames_every"] = video_frames
        report(f"facepipe: train {train.summary()} / val {val.summary()}", quiet)
        settings = DetTrainSettings(seed=seed, steps=steps, batch_size=batch_size, canvas=canvas, lr=lr,
                                    lr_backbone=lr_backbone,
                                    mine_at=tuple(mine_at) or DetTrainSettings.mine_at,
                                    hard_per_round=hard_negatives, mine_threshold=mine_threshold,
                                    mine_per_image=mine_per_image, hard_fraction=hard_fraction,
                                    mine_scales=mine_scales, style=style, text=text_decoys, blobs=blob_decoys,
                                    crowd=crowd,
                                    min_anchors=min_anchors, style_landmarks=style_landmarks,
                                    target_precision=target_precision,
                                    train_from=train_from, classifier=classifier, init=init, device=device)
        path = train_detector(train, val, out, settings, info, report=lambda m: report(f"facepipe: {m}", quiet))
        if install:
            dst = resolve_detector_weights("default")
            shutil.copyfile(path, dst)
            report(f"facepipe: installed {dst}", quiet)
    except FacepipeError as exc:
        raise fail(exc) from exc
    click.echo(str(path))
