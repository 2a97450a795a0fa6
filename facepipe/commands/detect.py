"""``facepipe detect``: find faces in images and print them as CSV or JSON."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from facepipe.builders import HAAR_BASED, build_detector
from facepipe.commands._common import (
    BatchTally, FiniteFloat, RecordWriter, annotated_path, detector_option, device_option, expand_inputs, fail,
    format_option, make_engine, min_detect_size_option, progress_bar, report, setup_logging, verbosity_options,
    workers_option,
)
from facepipe.errors import FacepipeError, ImageReadError

CSV_HEADER = ["path", "top", "right", "bottom", "left", "det_score"]


@click.command("detect")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@detector_option
@click.option("--cascade", default=None,
              help="Haar cascade (haar, haar+cnn): default, alt, alt2, alt_tree, profile, or a cascade XML path.")
@min_detect_size_option
@click.option("--scale-factor", type=FiniteFloat(min=1.0, min_open=True), default=None,
              help="Pyramid scale step (haar) [1.1].")
@click.option("--min-neighbors", type=click.IntRange(min=0), default=None,
              help="Overlapping raw hits a Haar face needs [3].")
@format_option("csv: path,top,right,bottom,left,det_score (face_recognition's order plus the detector's "
               "face probability; for haar the cascade's response, det_response); json/jsonl: x, y, w, h, "
               "det_score (0-1, null for haar), det_response (haar), detector per face "
               "(docs/schema/detect.json).")
@click.option("--header/--no-header", default=False, show_default=True, help="CSV header row.")
@click.option("--annotate", "annotate_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Write copies of the images with boxes drawn into this directory.")
@device_option
@workers_option
@verbosity_options
def detect(
    paths: tuple[str, ...],
    detector_name: str | None,
    cascade: str | None,
    min_detect_size: int | None,
    scale_factor: float | None,
    min_neighbors: int | None,
    fmt: str,
    header: bool,
    annotate_dir: Path | None,
    device: str | None,
    workers: int,
    quiet: bool,
    verbose: int,
) -> None:
    """Find faces in images.

    PATH is an image file, a directory (searched recursively for jpg, jpeg, png, gif,
    bmp, webp, pgm, ppm, tif, tiff) or a glob such as 'photos/*.jpg'. Bad files
    are reported on stderr and skipped; the exit code is 1 if any input failed.
    """
    from facepipe import defaults
    from facepipe.draw import draw_detections
    from facepipe.engine import WorkerFactory
    from facepipe.engine.work import detect_image
    from facepipe.io import ensure_output_dir, load_image, save_image

    setup_logging(quiet, verbose)
    detector_name = detector_name or defaults.DETECTOR
    for flag, value in (("--cascade", cascade), ("--min-neighbors", min_neighbors)):
        if value is not None and detector_name not in HAAR_BASED:
            raise click.UsageError(f"{flag} applies to --detector haar or haar+cnn, not {detector_name}")
    try:
        if annotate_dir is not None:
            annotate_dir = ensure_output_dir(annotate_dir)
        factory = WorkerFactory(build_detector, detector_name, cascade, min_detect_size, scale_factor,
                                min_neighbors, device)
        factory()  # build here first: a bad option is one line before any work starts
    except FacepipeError as exc:
        raise fail(exc) from exc
    except ValueError as exc:
        raise fail(str(exc)) from exc

    tally = BatchTally()
    files = expand_inputs(paths, tally)
    from facepipe.types import RESPONSE_SCORE_DETECTORS

    # Haar's score is its cascade's response, not a probability: the column says so
    csv_header = CSV_HEADER[:-1] + (["det_response"] if detector_name in RESPONSE_SCORE_DETECTORS else ["det_score"])
    writer = RecordWriter(fmt, csv_header if header else None)
    used: set[Path] = set()
    t0 = time.perf_counter()
    bar = progress_bar(len(files), "detect", quiet, unit="img")
    engine = make_engine("local", None, 0, device or defaults.DEVICE, verbose, workers)
    try:
        outcomes = engine.map(factory, detect_image, [f.path for f in files], ordered=True,
                              on_done=lambda _o: bar.update(1))
        for item, outcome in zip(files, outcomes):
            path_str = os.fspath(item.path)
            rec = outcome.value
            try:
                if not outcome.ok or rec is None or rec.error is not None:
                    problem = outcome.error if not outcome.ok else (rec.problem or rec.error)
                    raise ImageReadError(item.path, str(problem))
                faces = list(rec.faces)
                if annotate_dir is not None:
                    save_image(annotated_path(annotate_dir, item.relative, used),
                               draw_detections(load_image(item.path), faces))
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
                writer.record({"path": path_str, "width": rec.width, "height": rec.height,
                               "faces": [f.to_dict() for f in faces]})
    finally:
        bar.close()
        engine.close()
    writer.close()
    elapsed = time.perf_counter() - t0
    if len(files) > 1 or tally.failed:
        report(
            f"facepipe: {tally.ok} image(s) processed, {tally.items} face(s) found, "
            f"{tally.failed} failed, {elapsed:.1f}s",
            quiet,
        )
    raise tally.done(quiet)
