"""``facepipe explain``: Grad-CAM heat maps of the CNN's face evidence for each detection."""

from __future__ import annotations

import os
from pathlib import Path

import click

from facepipe import defaults
from facepipe.commands._common import (
    BatchTally, detector_option, device_option, expand_inputs, fail, min_detect_size_option, progress, report,
    setup_logging, verbosity_options,
)
from facepipe.errors import FacepipeError


@click.command("explain")
@click.argument("paths", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for <name>_gradcam.png (whole image) and <name>_faces.png (per face).")
@detector_option
@min_detect_size_option
@click.option("--weights", default=defaults.EXPLAIN_WEIGHTS, show_default=True,
              help="Face-classifier weights whose evidence is shown: finetune, transfer or a checkpoint path.")
@device_option
@verbosity_options
def explain(paths: tuple[str, ...], out_dir: Path, detector_name: str | None, min_detect_size: int | None,
            weights: str, device: str | None, quiet: bool, verbose: int) -> None:
    """Explain the CNN classifier's decisions with Grad-CAM.

    For every face found in IMAGE (a file, directory or glob) writes the image with
    the classifier's Grad-CAM heat map over each detection, and a strip of the
    face crops with their heat maps. Prints one CSV line per face:
    path,face,top,right,bottom,left,score,logit,output.
    """
    from facepipe.builders import build_detector
    from facepipe.explain import explain_detections, face_panels, overlay
    from facepipe.io import ensure_output_dir, load_image, save_image

    setup_logging(quiet, verbose)
    detector_name = detector_name or defaults.DETECTOR
    device = device or defaults.DEVICE
    try:
        out = ensure_output_dir(out_dir)
        detector = build_detector(detector_name, min_size=min_detect_size, device=device,
                                  weights=weights if detector_name in ("cnn", "haar+cnn") else None)
        from facepipe.detect.cnn import load_checkpoint

        load_checkpoint(weights)  # fail early on a bad checkpoint
    except FacepipeError as exc:
        raise fail(exc) from exc
    tally = BatchTally()
    files = expand_inputs(paths, tally)
    used: set[str] = set()
    for item in progress(files, total=len(files), desc="explain", quiet=quiet, unit="img"):
        try:
            image = load_image(item.path)
            dets = detector.detect(image)
            cams = explain_detections(image, dets, weights=weights, device=device)
            stem = item.relative.with_suffix("").as_posix().replace("/", "__")
            base, n = stem, 1
            while stem in used:
                stem, n = f"{base}_{n}", n + 1
            used.add(stem)
            full = out / f"{stem}_gradcam.png"
            save_image(full, overlay(image, cams))
            if cams:
                save_image(out / f"{stem}_faces.png", face_panels(cams))
        except FacepipeError as exc:
            tally.fail(str(exc))
            continue
        tally.ok += 1
        tally.items += len(cams)
        for k, c in enumerate(cams):
            top, right, bottom, left = c.detection.box.trbl()
            click.echo(f"{os.fspath(item.path)},{k},{top},{right},{bottom},{left},"
                       f"{c.detection.score:.4f},{c.logit:.3f},{full}")
    report(f"facepipe: {tally.ok} image(s) explained, {tally.items} face(s), {tally.failed} failed", quiet)
    raise SystemExit(tally.exit_code)
