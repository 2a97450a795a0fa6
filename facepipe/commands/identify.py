"""``facepipe identify``: name every face in every image, or call it ``unknown``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from facepipe import defaults
from facepipe.builders import build_pipeline, gallery_embedder
from facepipe.commands._common import (
    BatchTally, FiniteFloat, RecordWriter, annotated_path, expand_inputs, fail, format_option,
    engine_options, gallery_option, make_engine, model_options, progress_bar, report, setup_logging,
    verbosity_options,
)
from facepipe.errors import FacepipeError, ImageReadError

#: face_recognition's CLI words for a rejected face and for an image without faces
CSV_UNKNOWN = "unknown_person"
CSV_NO_FACES = "no_persons_found"

#: box colours of --annotate: named, unknown, ambiguous (near-tie) faces
COLOUR_KNOWN = (46, 204, 113)
COLOUR_UNKNOWN = (231, 76, 60)
COLOUR_AMBIGUOUS = (241, 196, 15)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _label(v: Any) -> str:
    """``name d=0.412`` (``?`` marks a near-tie called unknown)."""
    if v.similarity is None:
        return "unknown"
    who = v.name if v.known else (f"unknown ({v.best}?)" if v.ambiguous else "unknown")
    return f"{who} d={v.distance:.2f}"


def _colour(v: Any) -> tuple[int, int, int]:
    return COLOUR_KNOWN if v.known else (COLOUR_AMBIGUOUS if v.ambiguous else COLOUR_UNKNOWN)


@click.command("identify")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@gallery_option()
@click.option("--tolerance", type=FiniteFloat(0.0, 2.0), default=None, metavar="DIST",
              help="Name a face when its distance (1 − cosine similarity) to the best person is at most "
                   "this [default: the gallery's calibrated tolerance, `facepipe gallery info`].")
@click.option("--threshold", type=FiniteFloat(-1.0, 1.0), default=None, hidden=True,
              help="Deprecated: the acceptance rule as a cosine similarity (= 1 − tolerance).")
@click.option("--min-margin", type=FiniteFloat(0.0, 2.0), default=defaults.MIN_MARGIN, show_default=True,
              metavar="M", help="Ambiguity rule: call a face unknown (flagged ambiguous) when the best person "
                                "leads the runner-up by less than M (similarity, = distance difference). "
                                "0 disables the rule.")
@click.option("--top-k", type=click.IntRange(min=1), default=defaults.TOP_K, show_default=True,
              help="Candidates listed per face (json/jsonl only).")
@format_option("csv: path,name[,distance|similarity][,margin] per face as face_recognition prints it "
               "(unknown_person, no_persons_found); json/jsonl: boxes, det_score, name, similarity, "
               "distance, threshold, tolerance, margin and candidates (docs/schema/identify.json).")
@click.option("--show-distance", is_flag=True,
              help="CSV: append the best person's distance (1 − similarity, lower = closer), like face_recognition.")
@click.option("--show-similarity", "show_similarity", is_flag=True,
              help="CSV: append the best person's cosine similarity (higher = closer).")
@click.option("--show-score", "show_similarity_old", is_flag=True, hidden=True,
              help="Deprecated name of --show-similarity.")
@click.option("--show-margin", is_flag=True, help="CSV: append the margin to the runner-up person.")
@click.option("--header/--no-header", default=False, show_default=True, help="CSV header row.")
@click.option("--annotate", "annotate_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Write copies of the images with boxes, names and distances into DIR "
                                  "(green: named, red: unknown, yellow: near-tie called unknown).")
@click.option("--search-device", default=defaults.SEARCH_DEVICE, show_default=True,
              help="Where the gallery is searched: auto (a GPU when there is one: faiss-gpu if installed, "
                   "else exact torch search), cpu, cuda or cuda:N.")
@model_options(gallery_aware=True)
@engine_options
@verbosity_options
def identify(paths: tuple[str, ...], gallery_dir: Path, tolerance: float | None, threshold: float | None,
             min_margin: float, top_k: int, fmt: str, show_distance: bool, show_similarity: bool,
             show_similarity_old: bool, show_margin: bool, header: bool, annotate_dir: Path | None,
             search_device: str, detector_name: str | None, embedder_name: str | None, device: str | None,
             min_detect_size: int | None, min_embed_size: int, engine_name: str, ray_address: str | None,
             ray_workers: int, workers: int, quiet: bool, verbose: int) -> None:
    """Identify the faces in images against a gallery.

    Every face gets the best enrolled person's name when its distance
    (1 − cosine similarity) is at most the tolerance (the gallery's calibrated one,
    see `facepipe gallery calibrate`, or --tolerance) and, with --min-margin, when it
    leads the runner-up clearly; otherwise `unknown` (`unknown_person` in CSV).
    Without --embedder the gallery's own embedder is used. PATH is an image file, a
    directory (searched recursively) or a glob. Bad files are reported on stderr and
    skipped; the exit code is 1 if any input failed, 2 for a usage error.
    """
    from facepipe.engine import WorkerFactory
    from facepipe.engine.work import map_images
    from facepipe.gallery import Gallery
    from facepipe.io import ensure_output_dir, load_image
    from facepipe.scores import decide, resolve_threshold

    setup_logging(quiet, verbose)
    if show_similarity_old:
        click.echo("facepipe: warning: --show-score is deprecated, use --show-similarity", err=True)
        show_similarity = True
    if show_similarity and show_distance:
        raise click.UsageError("choose --show-similarity or --show-distance, not both")
    if tolerance is not None and threshold is not None:
        raise click.UsageError("give --tolerance or --threshold, not both")
    if threshold is not None:
        click.echo(f"facepipe: warning: --threshold is deprecated, use --tolerance {1.0 - threshold:g} "
                   "(distance = 1 − similarity)", err=True)
    if fmt == "csv" and top_k > 1:
        raise click.UsageError("--top-k lists candidates in json/jsonl output; CSV has one row per face "
                               "(use --format json or jsonl)")
    try:
        gallery = Gallery.open(gallery_dir)
        factory = WorkerFactory(build_pipeline, detector_name, embedder_name or gallery_embedder(gallery), device,
                                min_embed_size, min_detect_size=min_detect_size)
        pipe = factory()
        gallery.check_embedder(pipe.embedder.embedder_id)
        gallery.to_device(search_device)
        where = gallery.search_plan.summary()
        if annotate_dir is not None:
            annotate_dir = ensure_output_dir(annotate_dir)
    except FacepipeError as exc:
        raise fail(exc) from exc
    if not quiet and len(gallery) == 0:
        report(f"facepipe: warning: gallery {gallery_dir} is empty; every face will be unknown")
    thr = resolve_threshold(gallery.threshold, tolerance, threshold)
    try:
        op = gallery.operating_point(thr)
    except FacepipeError as exc:
        raise fail(exc) from exc
    rule = {"threshold_mode": op["mode"], "target_fpir": op["target_fpir"], "expected_fpir": op["expected_fpir"]}

    tally = BatchTally()
    files = expand_inputs(paths, tally)
    extra = ["similarity"] if show_similarity else (["distance"] if show_distance else [])
    extra += ["margin"] if show_margin else []
    writer = RecordWriter(fmt, ["path", "name"] + extra if header else None)
    known = unknown = ambiguous = 0
    used: set[Path] = set()
    t0 = time.perf_counter()
    bar = progress_bar(len(files), "identify", quiet, unit="img")
    engine = make_engine(engine_name, ray_address, ray_workers, device or "auto", verbose, workers)
    try:
        for item, result in zip(files, map_images(engine, factory, [f.path for f in files], on_images=bar.update)):
            path_str = os.fspath(item.path)
            try:
                if result.error is not None:
                    raise ImageReadError(item.path, result.problem or result.error)
                vecs = result.embeddings
                ranked = gallery.rank(vecs, top_k=max(top_k, 2)) if len(vecs) else []
                verdicts = [decide(c, thr, min_margin) for c in ranked]
                if annotate_dir is not None:
                    _annotate(annotate_dir, item.relative, used, load_image(item.path), result, verdicts)
            except FacepipeError as exc:
                tally.fail(str(exc))
                if fmt != "csv":
                    writer.record({"path": path_str, "error": getattr(exc, "problem", str(exc))})
                continue
            tally.ok += 1
            tally.items += len(verdicts)
            for v in verdicts:
                known += v.known
                unknown += not v.known
                ambiguous += v.ambiguous
            if fmt == "csv":
                if not verdicts:
                    # face_recognition prints the missing distance as None
                    writer.csv_row([path_str, CSV_NO_FACES] + ["None"] * len(extra))
                for v in verdicts:
                    row: list[Any] = [path_str, v.name if v.known else CSV_UNKNOWN]
                    if show_similarity:
                        row.append(_fmt(v.similarity))
                    elif show_distance:
                        row.append(_fmt(v.distance))
                    if show_margin:
                        row.append(_fmt(v.margin))
                    writer.csv_row(row)
                continue
            faces = []
            for face, v in zip(result.faces, verdicts):
                faces.append({**face.detection.to_dict(), **v.to_dict(top_k), **rule})
            writer.record({
                "path": path_str, "width": result.width, "height": result.height,
                "faces": faces,
                "skipped": [{**s.detection.to_dict(), "reason": s.reason.value, "detail": s.detail}
                            for s in result.skipped],
            })
    finally:
        bar.close()
        engine.close()
    writer.close()
    elapsed = time.perf_counter() - t0
    if len(files) > 1 or tally.failed:
        report(f"facepipe: {tally.ok} image(s), {tally.items} face(s): {known} identified, {unknown} unknown"
               + (f" ({ambiguous} near-ties)" if ambiguous else "")
               + f"; {tally.failed} failed; tolerance {1.0 - thr:.4f} (distance; similarity threshold "
               f"{thr:.4f}; {_rule_text(op)}); search on {where}; {elapsed:.1f}s", quiet)
    raise tally.done(quiet)


def _rule_text(op: dict[str, Any]) -> str:
    """How the threshold in force was set, in words: its mode, the FPIR it aims at and the
    FPIR the embedder's impostor model expects at it for this gallery's size."""
    words = f"{op['mode']}"
    if op["target_fpir"] is not None:
        words += f", target FPIR {100 * op['target_fpir']:g}%"
    if op["expected_fpir"] is not None:
        words += f", expected FPIR {100 * op['expected_fpir']:.2g}% over {op['n_comparisons']} comparisons"
    return words


def _annotate(out_dir: Path, relative: Path, used: set[Path], image: Any, result: Any, verdicts: list[Any]) -> None:
    """Write the image with each face's box, name and distance (skipped faces in grey)."""
    from facepipe.draw import draw_detections
    from facepipe.io import save_image

    dets = [f.detection for f in result.faces] + [s.detection for s in result.skipped]
    labels = [_label(v) for v in verdicts] + [f"not embedded: {s.reason.value}" for s in result.skipped]
    colours = [_colour(v) for v in verdicts] + [(160, 160, 160)] * len(result.skipped)
    save_image(annotated_path(out_dir, relative, used), draw_detections(image, dets, labels, colours))
