"""``facepipe detect``: find faces in images and print them as CSV or JSON."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from facepipe.commands._common import (
    BatchTally, RecordWriter, expand_inputs, fail, progress, report, setup_logging, verbosity_options,
)
from facepipe.errors import FacepipeError

CSV_HEADER = ["path", "top", "right", "bottom", "left", "score"]


def build_detector(
    name: str,
    cascade: str = "default",
    min_size: int | None = None,
    scale_factor: float | None = None,
    min_neighbors: int | None = None,
    device: str = "auto",
) -> Any:
    """Create the detector a command asked for, passing each detector only its options."""
    from facepipe.detect import create_detector
    from facepipe.device import validate_device_spec

    validate_device_spec(device)
    haar_based = name in ("haar", "haar+cnn")
    options: dict[str, Any] = {
        "cascade": cascade if haar_based else None,
        "device": device if name != "haar" else None,
        "min_size": min_size,
        # the CNN's pyramid step is its own option name; MTCNN has a fixed factor
        ("scale_step" if name == "cnn" else "scale_factor"): scale_factor if name != "mtcnn" else None,
        "min_neighbors": min_neighbors if haar_based else None,
    }
    kwargs = {k: v for k, v in options.items() if v is not None}
    return create_detector(name, **kwargs)


def _annotated_path(out_dir: Path, relative: Path, used: set[Path]) -> Path:
    """Output path mirroring the input's relative path; never overwrite a sibling's output."""
    target = out_dir / relative
    stem, suffix, n = target.stem, target.suffix or ".png", 1
    while target in used:
        target = target.with_name(f"{stem}_{n}{suffix}")
        n += 1
    used.add(target)
    return target


@click.command("detect")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--detector", "detector_name", default="mtcnn", show_default=True,
              help="Detector: mtcnn (default: most accurate at Haar's speed, see docs/detection.md), "
              "haar (Viola–Jones cascade), cnn (transfer-learned MobileNetV2), "
              "haar+cnn (Haar proposals verified by the CNN).")
@click.option("--cascade", default=None,
              help="Haar cascade (haar, haar+cnn): default, alt, alt2, alt_tree, profile, or a cascade XML path.")
@click.option("--min-size", type=click.IntRange(min=1), default=None,
              help="Smallest face side to find, in pixels [mtcnn: 20, haar and cnn: 24].")
@click.option("--scale-factor", type=click.FloatRange(min=1.0, min_open=True), default=None,
              help="Pyramid scale step (haar) [1.1].")
@click.option("--min-neighbors", type=click.IntRange(min=0), default=None,
              help="Overlapping raw hits a Haar face needs [3].")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "jsonl"]), default="csv",
              show_default=True, help="csv: path,top,right,bottom,left,score (face_recognition order); "
              "json/jsonl: x, y, w, h, score per face.")
@click.option("--header/--no-header", default=False, show_default=True, help="CSV header row.")
@click.option("--annotate", "annotate_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Write copies of the images with boxes drawn into this directory.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (CNN detectors).")
@verbosity_options
def detect(
    paths: tuple[str, ...],
    detector_name: str,
    cascade: str | None,
    min_size: int | None,
    scale_factor: float | None,
    min_neighbors: int | None,
    fmt: str,
    header: bool,
    annotate_dir: Path | None,
    device: str,
    quiet: bool,
    verbose: int,
) -> None:
    """Find faces in images.

    PATH is an image file, a directory (searched recursively for jpg, jpeg, png, gif,
    bmp, webp, pgm, ppm, tif, tiff) or a glob such as 'photos/*.jpg'. Bad files
    are reported on stderr and skipped; the exit code is 1 if any input failed.
    """
    from facepipe.draw import draw_detections
    from facepipe.io import ensure_output_dir, load_image, save_image

    setup_logging(quiet, verbose)
    haar_based = detector_name in ("haar", "haar+cnn")
    for flag, value in (("--cascade", cascade), ("--min-neighbors", min_neighbors)):
        if value is not None and not haar_based:
            raise fail(f"{flag} applies to --detector haar or haar+cnn, not {detector_name}")
    cascade = cascade or "default"
    try:
        if annotate_dir is not None:
            annotate_dir = ensure_output_dir(annotate_dir)
        detector = build_detector(detector_name, cascade, min_size, scale_factor, min_neighbors, device)
    except FacepipeError as exc:
        raise fail(exc) from exc
    except ValueError as exc:
        raise fail(str(exc)) from exc

    tally = BatchTally()
    files = expand_inputs(paths, tally)
    writer = RecordWriter(fmt, CSV_HEADER if header else None)
    used: set[Path] = set()
    t0 = time.perf_counter()
    for item in progress(files, total=len(files), desc="detect", quiet=quiet, unit="img"):
        path_str = os.fspath(item.path)
        try:
            image = load_image(item.path)
            faces = detector.detect(image)
            if annotate_dir is not None:
                save_image(_annotated_path(annotate_dir, item.relative, used),
                           draw_detections(image, faces))
        except FacepipeError as exc:
            tally.fail(str(exc))
            if fmt != "csv":
                writer.record({"path": path_str, "error": getattr(exc, "problem", str(exc))})
            continue
        tally.ok += 1
        tally.items += len(faces)
        if fmt == "csv":
            for f in faces:
                top, right, bottom, left = f.box.trbl()
                writer.csv_row([path_str, top, right, bottom, left, f"{f.score:.4f}"])
        else:
            writer.record({
                "path": path_str,
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "faces": [f.to_dict() for f in faces],
            })
    writer.close()
    elapsed = time.perf_counter() - t0
    if len(files) > 1 or tally.failed:
        report(
            f"facepipe: {tally.ok} image(s) processed, {tally.items} face(s) found, "
            f"{tally.failed} failed, {elapsed:.1f}s",
            quiet,
        )
    raise SystemExit(tally.exit_code)
