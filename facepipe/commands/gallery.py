"""``facepipe gallery list|info|remove|calibrate``: inspect and maintain a gallery."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from facepipe import defaults
from facepipe.commands._common import (
    FiniteFloat, RecordWriter, fail, progress, report, report_error, setup_logging, verbosity_options,
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
@click.option("--search", "show_search", is_flag=True,
              help="Also report how identify would search this gallery on --search-device: engine "
                   "(faiss-cpu, faiss-gpu, torch), device, exact or approximate, precision, and why.")
@click.option("--search-device", default=defaults.SEARCH_DEVICE, show_default=True,
              help="With --search: the device to plan for (auto, cpu, cuda, cuda:N).")
def info(gallery_dir: Path, show_search: bool, search_device: str) -> None:
    """Print the gallery's manifest summary as JSON (embedder, index, threshold, counts)."""
    from facepipe.gallery import Gallery

    try:
        g = Gallery.open(gallery_dir)
        out = g.info(search_device if show_search else None)
    except FacepipeError as exc:
        raise fail(exc) from exc
    click.echo(json.dumps(out, indent=2))


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
@click.option("--fpir", type=FiniteFloat(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="Target false-positive identification rate: the share of people who are not enrolled "
                   "that may be named as someone [the gallery's target, else facepipe's default].")
@click.option("--impostors", "impostor_root", default=None,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Optional: ROOT/<person>/<images> (or a folder of images) of people who are NOT enrolled.")
@click.option("--genuine", "genuine_root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Optional: ROOT/<person>/<images>: more photos of enrolled people "
                                 "(photos that are themselves enrolled are left out).")
@click.option("--max-per-person", type=click.IntRange(min=1), default=None,
              help="Use at most this many photos per person.")
@click.option("--aggregation", type=click.Choice(["max", "mean"]), default=None,
              help="Switch the gallery's per-person aggregation before calibrating.")
@click.option("--auto", "auto", is_flag=True,
              help="Go back to the threshold derived from the embedder's impostor model for --fpir, "
                   "re-derived as people are enrolled (the default for a new gallery).")
@click.option("--dry-run", is_flag=True, help="Report the threshold without storing it.")
@model_options(gallery_aware=True)
@verbosity_options
def calibrate(gallery_dir: Path, fpir: float | None, impostor_root: Path | None, genuine_root: Path | None,
              max_per_person: int | None, aggregation: str | None, auto: bool, dry_run: bool,
              detector_name: str | None, embedder_name: str | None, device: str | None,
              min_detect_size: int | None, min_embed_size: int, quiet: bool, verbose: int) -> None:
    """Choose the acceptance threshold for a target FPIR from the evidence at hand.

    Works from what a gallery already holds: every enrolled photo is left out in
    turn and searched against the rest (leave one out). Against the *other* people it
    is a stranger with a look-alike face (impostor evidence from your own photos);
    against the person's other photos it shows how many of your people would still
    be recognised (DIR: right name and accepted). The embedder's shipped impostor
    model covers what a small gallery cannot resolve. --impostors (photos of people
    who are not enrolled) and --genuine (more photos of enrolled people) add
    evidence. The threshold, the rule that chose it and every count are stored in
    the manifest and printed as JSON; thin evidence is reported as a WARNING.
    """
    from facepipe.gallery import DEFAULT_TARGET_FPIR, Gallery, sha256_file
    from facepipe.gallery.evidence import calibrate_gallery
    from facepipe.gallery.openset import impostor_model_for

    setup_logging(quiet, verbose)
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        click.echo(f"facepipe: WARNING: {msg}", err=True)  # shown also with --quiet: it changes the answer

    try:
        g = Gallery.open(gallery_dir)
        if len(g) == 0:
            raise fail(f"{gallery_dir}: gallery is empty; enrol people before calibrating")
        if not dry_run:
            Gallery.check_editable(gallery_dir, create=False)  # before the work, not after it
        if aggregation is not None:
            g.manifest["decision"]["aggregation"] = aggregation
        target = fpir if fpir is not None else (g.target_fpir or DEFAULT_TARGET_FPIR)
        need_photos = impostor_root is not None or genuine_root is not None
        model = g.impostor_model
        pipe = None
        if need_photos or model is None:
            pipe = build_pipeline(detector_name, embedder_name or gallery_embedder(g), device, min_embed_size,
                                  largest_only=True, min_detect_size=min_detect_size)
            g.check_embedder(pipe.embedder.embedder_id)
            model = impostor_model_for(pipe.embedder) or model
        enrolled = g.people()
        imp_people = _probe_items(impostor_root, max_per_person) if impostor_root else {}
        gen_people = _probe_items(genuine_root, max_per_person) if genuine_root else {}
    except FacepipeError as exc:
        raise fail(exc) from exc
    t0 = time.perf_counter()

    if auto:
        if model is None:
            raise fail(f"{gallery_dir}: the embedder {g.embedder_id} ships no impostor model, so there is no "
                       "automatic threshold; calibrate with --impostors instead")
        record_auto = {"stored": not dry_run, "mode": "auto", "target_fpir": target}
        if not dry_run:
            try:
                with Gallery.edit(gallery_dir, embedder_id=g.embedder_id, create=False) as ge:
                    ge.use_impostor_model(model, target, aggregation=aggregation)
                    op = ge.operating_point()
            except FacepipeError as exc:
                raise fail(exc) from exc
        else:
            op = {"threshold": model.threshold_for_fpir(target, g.n_comparisons), "n_comparisons": g.n_comparisons}
        click.echo(json.dumps({**record_auto, **op}, indent=2))
        report(f"facepipe: threshold {op['threshold']:.4f} (tolerance {1 - op['threshold']:.4f}) derived from the "
               f"embedder's impostor model for FPIR {target:g} over {op['n_comparisons']} comparisons; "
               "re-derived as people are enrolled", quiet)
        return

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

    # photos given on the command line (the enrolled photos themselves are always used)
    jobs = [(name, p, True) for name, ps in gen_people.items() for p in ps] + \
           [(name, p, False) for name, ps in imp_people.items() for p in ps]
    gen_vecs, gen_names, imp_vecs = [], [], []
    excluded = failed = 0
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
    if imp_people and not imp_vecs:
        warn(f"{impostor_root}: no impostor face could be embedded")
    dim = g.dim
    gs, gc, isc = g.calibration_scores(np.asarray(gen_vecs).reshape(-1, dim), gen_names,
                                       np.asarray(imp_vecs).reshape(-1, dim))
    try:
        result = calibrate_gallery(g, target, model, isc, gs, gc)
    except ValueError as exc:
        raise fail(f"{gallery_dir}: {exc}") from exc
    for w in result.warnings:
        warn(w)
    t = result.threshold
    rec = dict(result.record)
    loo_counts, model_counts = rec.pop("leave_one_out"), rec.pop("impostor_model")
    record = {
        **rec,
        "fpir": rec["observed_fpir"], "excluded_enrolled_photos": excluded, "failed_photos": failed,
        "n_impostor_people": len(imp_people), "n_genuine_people": len({*gen_names}),
        "evidence": {
            "leave_one_out": loo_counts,
            "impostors": {"folder": str(impostor_root) if impostor_root else None, "people": len(imp_people),
                          "probes": int(isc.size)},
            "genuine": {"folder": str(genuine_root) if genuine_root else None, "people": len({*gen_names}),
                        "probes": int(gs.size), "excluded_enrolled_photos": excluded},
            "impostor_model": model_counts,
            "failed_photos": failed,
        },
        "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "warnings": warnings,
    }
    if not dry_run:
        try:
            with Gallery.edit(gallery_dir, embedder_id=g.embedder_id, create=False) as ge:
                if model is not None and ge.impostor_model is None:
                    ge.manifest["decision"]["impostor_model"] = model.to_dict()
                ge.set_threshold(t, record, aggregation=aggregation, target_fpir=target)
        except FacepipeError as exc:
            raise fail(exc) from exc
    click.echo(json.dumps({"stored": not dry_run, **record}, indent=2))
    report(f"facepipe: threshold {t:.4f} (tolerance {1 - t:.4f}) for FPIR {target:g} by {record['rule']}; "
           f"{record['n_impostor']} impostor and {record['n_genuine']} genuine probes"
           + (f", DIR {record['dir']:.3f}" if record["dir"] is not None else ", DIR unknown")
           + f", {time.perf_counter() - t0:.1f}s", quiet)


def _register_reembed() -> None:
    from facepipe.commands.reembed import reembed

    gallery.add_command(reembed)


_register_reembed()
