"""``facepipe gallery list|info|remove|calibrate``: inspect and maintain a gallery."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from facepipe.commands._common import (
    RecordWriter, fail, progress, report, report_error, setup_logging, verbosity_options,
)
from facepipe.builders import build_pipeline, gallery_embedder
from facepipe.commands._common import gallery_option, model_options
from facepipe.commands.enroll import embed_one_face
from facepipe.errors import FacepipeError

log = logging.getLogger(__name__)

_gallery_option = gallery_option()


@click.group("gallery")
def gallery() -> None:
    """Inspect, edit and calibrate a face gallery."""


@gallery.command("list")
@_gallery_option
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "jsonl"]), default="csv", show_default=True)
@click.option("--sources", is_flag=True, help="Also list each person's enrolled photos (json/jsonl).")
def list_people(gallery_dir: Path, fmt: str, sources: bool) -> None:
    """List enrolled people with their number of vectors (CSV: name,vectors)."""
    from facepipe.gallery import Gallery

    try:
        g = Gallery.open(gallery_dir)
    except FacepipeError as exc:
        raise fail(exc) from exc
    w = RecordWriter(fmt)
    for name, count in g.people().items():
        if fmt == "csv":
            w.csv_row([name, count])
        else:
            rec: dict[str, Any] = {"name": name, "vectors": count}
            if sources:
                rec["sources"] = g.sources(name)
            w.record(rec)
    w.close()


@gallery.command("info")
@_gallery_option
def info(gallery_dir: Path) -> None:
    """Print the gallery's manifest summary as JSON (embedder, index, threshold, counts)."""
    from facepipe.gallery import Gallery

    try:
        g = Gallery.open(gallery_dir)
    except FacepipeError as exc:
        raise fail(exc) from exc
    click.echo(json.dumps(g.info(), indent=2))


@gallery.command("remove")
@_gallery_option
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@verbosity_options
def remove(gallery_dir: Path, names: tuple[str, ...], quiet: bool, verbose: int) -> None:
    """Remove people (all their vectors) from the gallery; unknown names are an error."""
    from facepipe.gallery import Gallery

    setup_logging(quiet, verbose)
    try:
        with Gallery.edit(gallery_dir, create=False) as g:
            n = g.remove(list(names))
            left = len(g.people())
    except FacepipeError as exc:
        raise fail(exc) from exc
    report(f"facepipe: removed {len(set(names))} people ({n} vectors); {left} people remain", quiet)


def _probe_items(root: Path, max_per_person: int | None) -> dict[str, list[Path]]:
    """``root/<person>/<images>``, or a flat folder of images as one anonymous group."""
    from facepipe.datasets import list_identities
    from facepipe.errors import NoInputsError
    from facepipe.io import IMAGE_EXTENSIONS

    people = list_identities(root)
    flat = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if flat:
        people[f"<{root.name}>"] = flat
    if not people:
        raise NoInputsError(root, "no images found (expected ROOT/<person>/<images>)")
    if max_per_person:
        people = {k: v[:max_per_person] for k, v in people.items()}
    return people


@gallery.command("calibrate")
@_gallery_option
@click.option("--fpir", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.01, show_default=True,
              help="Target false-positive identification rate on the impostor probes.")
@click.option("--genuine", "genuine_root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="ROOT/<person>/<images>: held-out photos of enrolled people "
                                 "(photos that are themselves enrolled are left out).")
@click.option("--impostors", "impostor_root", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="ROOT/<person>/<images> (or a folder of images) of people who are NOT enrolled.")
@click.option("--max-per-person", type=click.IntRange(min=1), default=None,
              help="Use at most this many photos per person.")
@click.option("--aggregation", type=click.Choice(["max", "mean"]), default=None,
              help="Switch the gallery's per-person aggregation before calibrating.")
@click.option("--dry-run", is_flag=True, help="Report the threshold without storing it.")
@model_options(gallery_aware=True)
@verbosity_options
def calibrate(gallery_dir: Path, fpir: float, genuine_root: Path | None, impostor_root: Path,
              max_per_person: int | None, aggregation: str | None, dry_run: bool,
              detector_name: str | None, embedder_name: str | None, device: str | None,
              min_detect_size: int | None, min_embed_size: int, quiet: bool, verbose: int) -> None:
    """Choose the acceptance threshold at a target FPIR and store it in the manifest.

    The threshold is the lowest score at which at most FPIR of the impostor probes
    (people not enrolled) would be accepted as someone. With --genuine, the
    detection-and-identification rate (DIR: right person and accepted) of held-out
    photos of enrolled people is reported at that threshold too. Prints a JSON summary.
    """
    from facepipe.gallery import Gallery, calibrate_threshold, sha256_file

    setup_logging(quiet, verbose)
    try:
        g = Gallery.open(gallery_dir)
        if len(g) == 0:
            raise fail(f"{gallery_dir}: gallery is empty; enrol people before calibrating")
        if not dry_run:
            Gallery.check_editable(gallery_dir, create=False)  # before the work, not after it
        if aggregation is not None:
            g.manifest["decision"]["aggregation"] = aggregation
        pipe = build_pipeline(detector_name, embedder_name or gallery_embedder(g), device, min_embed_size,
                              largest_only=True, min_detect_size=min_detect_size)
        g.check_embedder(pipe.embedder.embedder_id)
        enrolled = g.people()
        imp_people = _probe_items(impostor_root, max_per_person)
        gen_people = _probe_items(genuine_root, max_per_person) if genuine_root else {}
    except FacepipeError as exc:
        raise fail(exc) from exc

    clash = sorted(set(imp_people) & set(enrolled))
    if clash:
        report(f"facepipe: warning: leaving out {len(clash)} impostor folder(s) of enrolled people: "
               + ", ".join(clash[:5]) + (" ..." if len(clash) > 5 else ""), quiet)
        imp_people = {k: v for k, v in imp_people.items() if k not in enrolled}
    not_enrolled = sorted(set(gen_people) - set(enrolled))
    if not_enrolled:
        report(f"facepipe: warning: leaving out {len(not_enrolled)} genuine folder(s) of people who are "
               "not enrolled: " + ", ".join(not_enrolled[:5]) + (" ..." if len(not_enrolled) > 5 else ""), quiet)
        gen_people = {k: v for k, v in gen_people.items() if k in enrolled}

    jobs = [(name, p, True) for name, ps in gen_people.items() for p in ps] + \
           [(name, p, False) for name, ps in imp_people.items() for p in ps]
    gen_vecs, gen_names, imp_vecs = [], [], []
    excluded = failed = 0
    t0 = time.perf_counter()
    for name, path, is_gen in progress(jobs, total=len(jobs), desc="calibrate", quiet=quiet, unit="img"):
        try:
            if is_gen and g.has_source(name, sha256_file(path)):
                excluded += 1  # an enrolled photo would match itself
                continue
            v = embed_one_face(pipe, path)
        except FacepipeError as exc:
            failed += 1
            if verbose:
                report_error(str(exc))
            continue
        except OSError as exc:
            failed += 1
            report_error(f"{path}: cannot read ({exc.strerror or exc})")
            continue
        if is_gen:
            gen_vecs.append(v)
            gen_names.append(name)
        else:
            imp_vecs.append(v)
    if not imp_vecs:
        raise fail(f"{impostor_root}: no impostor face could be embedded; cannot calibrate")
    dim = g.dim
    gs, gc, isc = g.calibration_scores(np.asarray(gen_vecs).reshape(-1, dim), gen_names,
                                       np.asarray(imp_vecs).reshape(-1, dim))
    cal = calibrate_threshold(isc, fpir, gs if len(gs) else None, gc if len(gs) else None)
    method, agg_n = g.aggregation
    record = {
        "method": "fpir", **cal.to_dict(),
        "rank1": float(gc.mean()) if len(gc) else None,
        "n_impostor_people": len(imp_people), "n_genuine_people": len({*gen_names}),
        "impostors": str(impostor_root), "genuine": str(genuine_root) if genuine_root else None,
        "excluded_enrolled_photos": excluded, "failed_photos": failed,
        "aggregation": method, "aggregation_n": agg_n,
        "embedder_id": g.embedder_id, "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cal.n_impostor * fpir < 1:
        report(f"facepipe: warning: {cal.n_impostor} impostor probes cannot resolve FPIR {fpir}; "
               f"the threshold only rejects every impostor seen (use at least {int(np.ceil(1 / max(fpir, 1e-9)))})",
               quiet)
    if not dry_run:
        try:
            with Gallery.edit(gallery_dir, embedder_id=g.embedder_id, create=False) as ge:
                ge.set_threshold(cal.threshold, record, aggregation=aggregation)
        except FacepipeError as exc:
            raise fail(exc) from exc
    click.echo(json.dumps({"stored": not dry_run, **record}, indent=2))
    report(f"facepipe: threshold {cal.threshold:.4f} at FPIR {cal.fpir:.4f} (target {fpir}) from "
           f"{cal.n_impostor} impostor and {cal.n_genuine} genuine probes"
           + (f", DIR {cal.dir:.3f}" if cal.dir is not None else "")
           + f", {time.perf_counter() - t0:.1f}s", quiet)
