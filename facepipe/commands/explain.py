"""``facepipe explain``: why a face was found (detector Grad-CAM) and, with a gallery, why it got its name."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import click

from facepipe import defaults
from facepipe.commands._common import (
    BatchTally, FiniteFloat, RecordWriter, detector_option, device_option, embedder_option, expand_inputs, fail,
    format_option, gallery_option, min_detect_size_option, min_embed_size_option, progress, report, setup_logging,
    verbosity_options,
)
from facepipe.errors import FacepipeError

#: CSV columns, always
CSV_DETECTION = ["path", "face", "top", "right", "bottom", "left", "det_score", "face_prob", "face_logit",
                 "gradcam_image"]
#: CSV columns added with -g/--gallery
CSV_MATCH = ["name", "best", "distance", "tolerance", "margin", "reference", "match_image"]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -60 else 0.0


def _f(x: float | None, nd: int = 4) -> str:
    return "" if x is None else f"{x:.{nd}f}"


@click.command("explain")
@click.argument("paths", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Directory for NAME_gradcam.png, NAME_faces.png and, with -g, NAME_match.png.")
@gallery_option(required=False, help_text="Also explain each face's identification against this gallery: "
                                          "candidates, margin, threshold, and the regions that matched.")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="-g: candidates shown per face.")
@click.option("--tolerance", type=FiniteFloat(0.0, 2.0), default=None, metavar="DIST",
              help="-g: distance (1 − similarity) a name needs [default: the gallery's calibrated tolerance].")
@click.option("--min-margin", type=FiniteFloat(0.0, 2.0), default=defaults.MIN_MARGIN, show_default=True,
              metavar="M", help="-g: the ambiguity rule, as in identify.")
@click.option("--method", type=click.Choice(["auto", "gradcam", "occlusion"]), default="auto", show_default=True,
              help="-g: how the matching regions are found: Grad-CAM on the embedding similarity (network "
                   "embedders), occlusion (any embedder), auto: Grad-CAM where possible.")
@detector_option
@embedder_option(gallery_aware=True)
@min_detect_size_option
@min_embed_size_option
@click.option("--weights", default=defaults.EXPLAIN_WEIGHTS, show_default=True,
              help="Face-classifier weights whose evidence the Grad-CAM shows: finetune, transfer or a checkpoint.")
@format_option("csv: " + ",".join(CSV_DETECTION) + " (+ " + ",".join(CSV_MATCH) + " with -g); json/jsonl: one "
               "record per image (docs/schema/explain.json).")
@click.option("--header/--no-header", default=False, show_default=True, help="CSV header row.")
@device_option
@verbosity_options
def explain(paths: tuple[str, ...], out_dir: Path, gallery_dir: Path | None, top_k: int, tolerance: float | None,
            min_margin: float, method: str, detector_name: str | None, embedder_name: str | None,
            min_detect_size: int | None, min_embed_size: int, weights: str, fmt: str, header: bool,
            device: str | None, quiet: bool, verbose: int) -> None:
    """Explain detections with Grad-CAM and, with -g, identifications.

    For every face in IMAGE (a file, directory or glob), writes NAME_gradcam.png (the
    image with the face classifier's Grad-CAM over each detection, boxes clipped to the
    image) and NAME_faces.png (each face crop above its map). Per face it prints the
    detector's score (det_score), and the face classifier's probability (face_prob) and
    log-odds (face_logit = log(p / (1 − p))) for the same box: how face-like the CNN
    finds it, whatever detector found it.

    With -g GALLERY it also answers "why this name?": the top candidates with
    similarity and distance, the margin to the runner-up, the tolerance in force, the
    decision, and NAME_match.png with, per face, the aligned face, where it matched
    (heat map), the enrolled photo of the best person closest to it (found from the
    gallery's source paths; missing photos are reported) and where that photo matched.
    """
    from facepipe.explain import explain_detections, face_panels, overlay
    from facepipe.io import ensure_output_dir, load_image, save_image

    setup_logging(quiet, verbose)
    detector_name = detector_name or defaults.DETECTOR
    device = device or defaults.DEVICE
    if gallery_dir is None:
        given = [f for f, v in (("--tolerance", tolerance), ("--embedder", embedder_name)) if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} need(s) -g/--gallery")
    pipe = gallery = None
    try:
        out = ensure_output_dir(out_dir)
        from facepipe.detect.cnn import load_checkpoint

        load_checkpoint(weights)  # fail early on a bad checkpoint
        if gallery_dir is not None:
            from facepipe.builders import build_pipeline, gallery_embedder
            from facepipe.gallery import Gallery
            from facepipe.scores import resolve_threshold

            gallery = Gallery.open(gallery_dir)
            pipe = build_pipeline(detector_name, embedder_name or gallery_embedder(gallery), device,
                                  min_embed_size, min_detect_size=min_detect_size)
            gallery.check_embedder(pipe.embedder.embedder_id)
            threshold = resolve_threshold(gallery.threshold, tolerance)
            detector = pipe.detector
        else:
            from facepipe.builders import build_detector

            detector = build_detector(detector_name, min_size=min_detect_size, device=device,
                                      weights=weights if detector_name in ("cnn-pyramid", "haar+cnn") else None)
    except FacepipeError as exc:
        raise fail(exc) from exc

    tally = BatchTally()
    files = expand_inputs(paths, tally)
    writer = RecordWriter(fmt, (CSV_DETECTION + (CSV_MATCH if gallery is not None else [])) if header else None)
    used: set[str] = set()
    for item in progress(files, total=len(files), desc="explain", quiet=quiet, unit="img"):
        path_str = os.fspath(item.path)
        try:
            image = load_image(item.path)
            h, w = image.shape[:2]
            dets = [d.clipped(w, h) for d in detector.detect(image)]
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
            matches: list[Any] = []
            match_png = None
            if gallery is not None:
                from facepipe.explain_match import explain_faces, match_panels

                matches = explain_faces(image, pipe, gallery, threshold, min_margin, top_k, method,
                                        detections=dets)
                if matches:
                    match_png = out / f"{stem}_match.png"
                    save_image(match_png, match_panels(matches, top_k=top_k))
        except FacepipeError as exc:
            tally.fail(str(exc))
            if fmt != "csv":
                writer.record({"path": path_str, "error": getattr(exc, "problem", str(exc))})
            continue
        tally.ok += 1
        tally.items += len(cams)
        by_box = {_key(m.detection): m for m in matches}
        rows = []
        for k, c in enumerate(cams):
            det = c.detection
            m = by_box.get(_key(det))
            rec: dict[str, Any] = {"face": k, **det.to_dict(), "face_prob": round(_sigmoid(c.logit), 5),
                                   "face_logit": round(c.logit, 4), "gradcam_image": os.fspath(full)}
            if gallery is not None:
                rec["match"] = None if m is None else {**m.to_dict(top_k),
                                                       "match_image": os.fspath(match_png) if match_png else None}
            rows.append(rec)
            if fmt == "csv":
                top, right, bottom, left = det.box.trbl()
                row: list[Any] = [path_str, k, top, right, bottom, left, f"{det.score:.4f}",
                                  f"{_sigmoid(c.logit):.4f}", f"{c.logit:.3f}", os.fspath(full)]
                if gallery is not None:
                    if m is None:
                        row += ["", "", "", "", "", "", ""]  # detected but not embedded (too small, ...)
                    else:
                        v = m.verdict
                        row += [v.name, v.best or "", _f(v.distance), _f(v.tolerance), _f(v.margin),
                                m.reference.source if m.reference else "", os.fspath(match_png)]
                writer.csv_row(row)
        if fmt != "csv":
            writer.record({"path": path_str, "width": w, "height": h, "faces": rows})
    writer.close()
    report(f"facepipe: {tally.ok} image(s) explained, {tally.items} face(s), {tally.failed} failed", quiet)
    raise tally.done(quiet)


def _key(det: Any) -> tuple[float, float, float, float]:
    """Match a pipeline face to its detection (same detector, same clipped box)."""
    return tuple(round(v, 1) for v in det.box.xyxy())  # type: ignore[return-value]
