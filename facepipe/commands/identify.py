"""``facepipe identify``: name every face in every image, or call it ``unknown``."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import click

from facepipe.commands._common import (
    BatchTally, RecordWriter, expand_inputs, fail, progress, report, setup_logging, verbosity_options,
)
from facepipe.commands.enroll import build_pipeline, model_options
from facepipe.errors import FacepipeError

#: face_recognition's CLI words for a rejected face and for an image without faces
CSV_UNKNOWN = "unknown_person"
CSV_NO_FACES = "no_persons_found"


def _fmt(x: float) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.4f}"


@click.command("identify")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("-g", "--gallery", "gallery_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Gallery directory.")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Candidates listed per face (json/jsonl).")
@click.option("--threshold", type=float, default=None,
              help="Acceptance threshold (cosine similarity) instead of the gallery's calibrated one.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "jsonl"]), default="csv", show_default=True,
              help="csv: path,name[,score] per face as face_recognition prints it (unknown_person, "
                   "no_persons_found); json/jsonl: boxes, names, scores and candidates.")
@click.option("--show-score", is_flag=True, help="CSV: append the best person's similarity (higher = closer).")
@click.option("--show-distance", is_flag=True,
              help="CSV: append 1 - similarity (cosine distance, lower = closer), like face_recognition.")
@click.option("--header/--no-header", default=False, show_default=True, help="CSV header row.")
@click.option("--search-device", default="auto", show_default=True,
              help="Where FAISS searches: auto (GPU when faiss-gpu sees one), cpu, cuda or cuda:N.")
@model_options
@verbosity_options
def identify(paths: tuple[str, ...], gallery_dir: Path, top_k: int, threshold: float | None, fmt: str,
             show_score: bool, show_distance: bool, header: bool, search_device: str,
             detector_name: str, embedder_name: str, device: str, min_face: int,
             quiet: bool, verbose: int) -> None:
    """Identify the faces in images against a gallery.

    Every face gets an enrolled person's name when its score reaches the gallery's
    threshold (see `facepipe gallery calibrate`), else `unknown` (`unknown_person` in
    CSV). PATH is an image file, a directory (searched recursively) or a glob. Bad
    files are reported on stderr and skipped; the exit code is 1 if any input failed.
    """
    from facepipe.gallery import UNKNOWN, Gallery
    from facepipe.io import load_image

    setup_logging(quiet, verbose)
    if show_score and show_distance:
        raise fail("choose --show-score or --show-distance, not both")
    try:
        gallery = Gallery.open(gallery_dir)
        pipe = build_pipeline(detector_name, embedder_name, device, min_face)
        gallery.check_embedder(pipe.embedder.embedder_id)
        where = gallery.to_device(search_device)
    except FacepipeError as exc:
        raise fail(exc) from exc
    if not quiet and len(gallery) == 0:
        report(f"facepipe: warning: gallery {gallery_dir} is empty; every face will be unknown")

    tally = BatchTally()
    files = expand_inputs(paths, tally)
    extra = ["score"] if show_score else (["distance"] if show_distance else [])
    writer = RecordWriter(fmt, ["path", "name"] + extra if header else None)
    known = unknown = 0
    t0 = time.perf_counter()
    for item in progress(files, total=len(files), desc="identify", quiet=quiet, unit="img"):
        path_str = os.fspath(item.path)
        try:
            image = load_image(item.path)
            result = pipe.process(image)
        except FacepipeError as exc:
            tally.fail(str(exc))
            if fmt != "csv":
                writer.record({"path": path_str, "error": getattr(exc, "problem", str(exc))})
            continue
        tally.ok += 1
        vecs = result.embeddings
        decisions = gallery.identify(vecs, top_k=top_k, threshold=threshold) if len(vecs) else []
        tally.items += len(decisions)
        for d in decisions:
            if d.known:
                known += 1
            else:
                unknown += 1
        if fmt == "csv":
            if not decisions:
                # face_recognition prints the missing distance as None
                writer.csv_row([path_str, CSV_NO_FACES] + (["None"] if extra else []))
            for d in decisions:
                row: list[Any] = [path_str, d.name if d.name != UNKNOWN else CSV_UNKNOWN]
                if show_score:
                    row.append(_fmt(d.score))
                elif show_distance:
                    row.append(_fmt(1.0 - d.score))
                writer.csv_row(row)
            continue
        faces = []
        for face, d in zip(result.faces, decisions):
            rec = face.detection.to_dict()
            rec.update({"name": d.name, "score": None if math.isnan(d.score) else round(d.score, 5),
                        "candidates": [{"name": m.name, "score": round(m.score, 5)} for m in d.candidates]})
            faces.append(rec)
        writer.record({
            "path": path_str, "width": int(image.shape[1]), "height": int(image.shape[0]),
            "faces": faces,
            "skipped": [{**s.detection.to_dict(), "reason": s.reason.value, "detail": s.detail}
                        for s in result.skipped],
        })
    writer.close()
    elapsed = time.perf_counter() - t0
    if len(files) > 1 or tally.failed:
        report(f"facepipe: {tally.ok} image(s), {tally.items} face(s): {known} identified, {unknown} unknown; "
               f"{tally.failed} failed; threshold "
               f"{gallery.threshold if threshold is None else threshold:.4f}; search on {where}; "
               f"{elapsed:.1f}s", quiet)
    raise SystemExit(tally.exit_code)
