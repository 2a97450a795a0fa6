"""``facepipe gallery reembed``: rebuild a gallery with another embedder from its enrolled photos.

A gallery's vectors only compare with vectors of the same embedder. When the default
embedder changes (or you want dlib's), the photos each vector came from are named in the
gallery's labels: this command embeds them again with the new embedder into a *new*
gallery directory, leaving the old one untouched. Photos that are missing, or whose
content changed since they were enrolled, are reported and left out.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import numpy as np

from facepipe.builders import build_pipeline
from facepipe.commands._common import (
    BatchTally, fail, gallery_option, model_options, progress, report, setup_logging, verbosity_options,
)
from facepipe.errors import FacepipeError


@click.command("reembed")
@gallery_option(help_text="The gallery to rebuild (read only).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="New gallery directory (must not hold a gallery yet).")
@model_options()
@verbosity_options
def reembed(gallery_dir: Path, out_dir: Path, detector_name: str | None, embedder_name: str | None,
            device: str | None, min_detect_size: int | None, min_embed_size: int, quiet: bool,
            verbose: int) -> None:
    """Re-embed a gallery's enrolled photos with another embedder into a new gallery.

    Reads the source photo of every vector from the gallery's labels, checks it is still
    there with the same content (sha256), embeds its largest face with --embedder, and
    enrols it under the same name into --out (same index type and aggregation; the
    threshold is the new embedder's own automatic one, because similarities of another
    embedder have another scale; `facepipe gallery calibrate` refines it). Missing or
    changed photos are reported and skipped (exit 1). Prints a JSON summary.
    """
    from facepipe import defaults
    from facepipe.commands.enroll import embed_one_face, embedder_record
    from facepipe.gallery import MANIFEST, Gallery, sha256_file
    from facepipe.gallery.openset import impostor_model_for

    setup_logging(quiet, verbose)
    try:
        if out_dir.resolve() == gallery_dir.resolve():
            raise click.UsageError("--out must be a new directory; the old gallery is kept as it is")
        if (out_dir / MANIFEST).exists():
            raise click.UsageError(f"{out_dir} already holds a gallery; choose a new --out directory")
        old = Gallery.open(gallery_dir)
        pipe = build_pipeline(detector_name, embedder_name, device, min_embed_size, largest_only=True,
                              min_detect_size=min_detect_size)
        emb_id, emb_sha, emb_desc = embedder_record(pipe.embedder)
    except FacepipeError as exc:
        raise fail(exc) from exc

    jobs = [(name, src) for name in old.people() for src in old.sources(name)]
    tally = BatchTally()
    missing: list[dict[str, str | None]] = []
    vecs: list[np.ndarray] = []
    names: list[str] = []
    sources: list[str] = []
    hashes: list[str] = []
    t0 = time.perf_counter()
    for name, src in progress(jobs, total=len(jobs), desc="reembed", quiet=quiet, unit="img"):
        if not src:
            missing.append({"name": name, "source": None, "problem": "no source path recorded"})
            tally.fail(f"{gallery_dir}: a vector of {name!r} has no source photo recorded")
            continue
        try:
            sha = sha256_file(src)
        except OSError as exc:
            missing.append({"name": name, "source": src, "problem": exc.strerror or str(exc)})
            tally.fail(f"{src}: source photo of {name!r} cannot be read ({exc.strerror or exc})")
            continue
        if not old.has_source(name, sha):
            missing.append({"name": name, "source": src, "problem": "changed since enrolment"})
            tally.fail(f"{src}: source photo of {name!r} changed since it was enrolled; left out")
            continue
        try:
            vecs.append(embed_one_face(pipe, Path(src)))
        except FacepipeError as exc:
            missing.append({"name": name, "source": src, "problem": getattr(exc, "problem", str(exc))})
            tally.fail(str(exc))
            continue
        names.append(name)
        sources.append(os.fspath(src))
        hashes.append(sha)
        tally.ok += 1
    method, agg_n = old.aggregation
    # The old threshold belongs to the old embedder's similarity scale: the new gallery gets
    # the new embedder's automatic threshold (its impostor model, the same target FPIR), or
    # the fixed default when the embedder ships no model.
    model = impostor_model_for(pipe.embedder)
    try:
        with Gallery.edit(out_dir, embedder_id=emb_id, dim=pipe.embedder.dim, embedder_sha256=emb_sha,
                          index_type=old.manifest["index"]["requested"],
                          params=old.manifest["index"].get("params"),
                          threshold=None if model is not None else defaults.THRESHOLD,
                          impostor_model=model, target_fpir=old.target_fpir if model is not None else None,
                          aggregation=method, aggregation_n=agg_n, create="only") as new:
            if emb_desc:
                new.manifest["embedder"]["describe"] = emb_desc
            new.manifest["reembedded_from"] = {"gallery": os.fspath(gallery_dir.resolve()),
                                               "embedder": old.embedder_id, "generation": old.generation}
            if vecs:
                new.add(np.stack(vecs), names, sources=sources, hashes=hashes)
    except FacepipeError as exc:
        raise fail(exc) from exc
    lost = sorted(set(old.people()) - set(names))
    final = Gallery.open(out_dir, verify=False)
    summary = {
        "gallery": os.fspath(out_dir), "from": os.fspath(gallery_dir), "embedder": emb_id,
        "previous_embedder": old.embedder_id, "vectors": len(vecs), "of": len(jobs),
        "identities": len(set(names)), "identities_lost": lost, "missing": missing,
        "threshold": final.threshold, "tolerance": round(1.0 - final.threshold, 6), "mode": final.mode,
        "calibrated": False,
    }
    click.echo(json.dumps(summary, indent=2))
    report(f"facepipe: re-embedded {len(vecs)} of {len(jobs)} photo(s) with {emb_id} into {out_dir}, "
           f"{len(missing)} missing or unusable" + (f"; people left without a photo: {', '.join(lost)}" if lost else "")
           + f"; threshold {final.threshold:.4f} (tolerance {1 - final.threshold:.4f}, {final.mode}; "
           f"`facepipe gallery calibrate` refines it), {time.perf_counter() - t0:.1f}s", quiet)
    raise tally.done(quiet)
