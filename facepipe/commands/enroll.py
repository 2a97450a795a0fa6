"""``facepipe enroll``: add people's photos to a gallery (incremental, atomic, locked).

Also holds the pieces ``identify`` and ``gallery calibrate`` share: the model options,
building the detector → alignment → embedder pipeline, and embedding the one face of
an enrolment photo.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import click
import numpy as np

from facepipe import defaults
from facepipe.builders import build_pipeline, gallery_embedder
from facepipe.commands._common import (
    BatchTally, FiniteFloat, engine_options, fail, gallery_option, make_engine, model_options, progress_bar, report,
    setup_logging, verbosity_options,
)
from facepipe.errors import FacepipeError, ImageReadError, NoInputsError


def embedder_record(embedder: Any) -> tuple[str, str | None, dict[str, Any]]:
    """``(embedder_id, checkpoint sha256 or None, description)`` for a gallery manifest."""
    from facepipe.gallery import sha256_file

    source = getattr(embedder, "source", None)
    sha = sha256_file(source) if source and Path(source).is_file() else None
    describe = embedder.describe() if hasattr(embedder, "describe") else {}
    return embedder.embedder_id, sha, describe


def describe_threshold(g: Any) -> str:
    """One phrase for summaries: the threshold in force and where it came from."""
    op = g.operating_point()
    head = f"threshold {op['threshold']:.4f} (tolerance {op['tolerance']:.4f})"
    if op["mode"] == "auto":
        unit = "vectors" if op["aggregation"] == "max" else "people"
        return f"{head} for FPIR {op['target_fpir']:g} over {op['n_comparisons']} enrolled {unit} (automatic)"
    if op["mode"] == "calibrated":
        return f"{head} calibrated for FPIR {op['target_fpir']:g}" if op["target_fpir"] else f"{head} (calibrated)"
    return f"{head} ({op['mode']})"


def embed_one_face(pipe: Any, path: Path) -> np.ndarray:
    """The unit embedding of the largest face in an enrolment photo.

    Raises :class:`ImageReadError` naming the file when it cannot be read or no
    usable face is found in it.
    """
    from facepipe.io import load_image

    image = load_image(path)
    result = pipe.process(image)
    if not result.faces:
        if result.skipped:
            why = "; ".join(sorted({s.detail for s in result.skipped}))
            raise ImageReadError(path, f"no usable face ({why})")
        raise ImageReadError(path, "no face found")
    best = max(result.faces, key=lambda f: f.detection.box.area)
    return np.asarray(best.embedding, dtype=np.float32)


def parse_index_params(pairs: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """``("efSearch=64", "nprobe=32")`` -> ``{"hnsw": {"efSearch": 64}, "ivf": {"nprobe": 32}}``."""
    from facepipe.gallery import DEFAULT_PARAMS

    owner = {k: kind for kind, ps in DEFAULT_PARAMS.items() for k in ps}
    out: dict[str, dict[str, int]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in owner:
            raise click.BadParameter(f"{pair!r}: expected KEY=INT with KEY one of {', '.join(sorted(owner))}",
                                     param_hint="--index-param")
        try:
            n = int(value)
        except ValueError:
            raise click.BadParameter(f"{pair!r}: {value!r} is not an integer", param_hint="--index-param") from None
        if n < 0 or (n == 0 and key != "nlist"):
            raise click.BadParameter(f"{pair!r}: must be positive", param_hint="--index-param")
        out.setdefault(owner[key], {})[key] = n
    return out


@dataclass
class EnrolItem:
    """One photo to enrol for one person."""

    name: str
    path: Path
    sha256: str = ""


def _folder_items(root: Path, tally: BatchTally) -> list[EnrolItem]:
    from facepipe.datasets import list_identities

    problems: list[FacepipeError] = []
    people = list_identities(root, problems=problems)
    for problem in problems:
        tally.fail(str(problem))
    if not people:
        raise NoInputsError(root, "no <person>/<image> folders found")
    return [EnrolItem(name, p) for name, paths in people.items() for p in paths]


def _chunks(items: list[EnrolItem], n: int) -> Iterable[list[EnrolItem]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class _EnrollCommand(click.Command):
    """``enroll`` takes either NAME IMAGE... or --from-folders ROOT; the usage line says so."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [self.options_metavar or "[OPTIONS]", "(NAME IMAGE... | --from-folders ROOT)"]


@click.command("enroll", cls=_EnrollCommand)
@click.argument("name", required=False)
@click.argument("images", nargs=-1, metavar="IMAGE...")
@gallery_option(help_text="Gallery directory (created on first enrolment).")
@click.option("--from-folders", "root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Enrol ROOT/<person>/<images> (person = folder name).")
@click.option("--replace", is_flag=True, help="Remove the named people's existing vectors first.")
@click.option("--index-type", type=click.Choice(["auto", "flat", "ivf", "hnsw"]), default="auto",
              show_default=True, help="FAISS index of a new gallery (auto: exact flat, HNSW from 200k vectors).")
@click.option("--index-param", "index_params", multiple=True, metavar="KEY=INT",
              help="New gallery: index setting, e.g. efSearch=64, M=32, efConstruction=64 (hnsw), "
                   "nlist=1024, nprobe=64 (ivf). Repeatable.")
@click.option("--aggregation", type=click.Choice(["max", "mean"]), default="max", show_default=True,
              help="New gallery: a person's score is the max, or the mean of the top 3, of their vectors' scores.")
@click.option("--fpir", type=FiniteFloat(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="Target false-positive identification rate (share of people who are not enrolled that "
                   "may be named as someone); the threshold is derived from the embedder's impostor model "
                   f"and re-derived as people are enrolled [{defaults.TARGET_FPIR}].")
@click.option("--threshold", type=FiniteFloat(-1.0, 1.0), default=None,
              help="New gallery: a fixed acceptance threshold (cosine similarity, = 1 − tolerance) instead "
                   "of the automatic one.")
@click.option("--commit-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="Commit a new gallery generation after this many embedded photos.")
@model_options(gallery_aware=True)
@engine_options
@verbosity_options
def enroll(name: str | None, images: tuple[str, ...], gallery_dir: Path, root: Path | None, replace: bool,
           index_type: str, index_params: tuple[str, ...], aggregation: str, fpir: float | None,
           threshold: float | None, commit_every: int,
           detector_name: str | None, embedder_name: str | None, device: str | None, min_detect_size: int | None,
           min_embed_size: int, engine_name: str, ray_address: str | None, ray_workers: int, workers: int,
           quiet: bool, verbose: int) -> None:
    """Enrol people into a gallery: NAME IMAGE... or --from-folders ROOT.

    Each photo contributes the embedding of its largest face; several photos per
    person are kept as several vectors. Photos already enrolled for that person
    (same file content) are skipped without being embedded again, so re-running on a
    grown folder only embeds what is new. Writes are atomic and locked: a crash
    leaves the previous gallery intact, and concurrent enrolments are serialised.
    Unreadable photos or photos without a face are reported and skipped (exit 1).
    """
    from facepipe.engine import WorkerFactory
    from facepipe.engine.work import largest_face_embedding, map_images
    from facepipe.gallery import Gallery, check_name, impostor_model_for, sha256_file
    from facepipe.io import iter_inputs, path_problem

    setup_logging(quiet, verbose)
    tally = BatchTally()
    params = parse_index_params(index_params)
    try:
        if root is not None:
            if name is not None or images:
                raise click.UsageError("give either NAME IMAGE... or --from-folders ROOT, not both")
            items = []
            for it in _folder_items(root, tally):
                try:
                    it.name = check_name(it.name)
                except FacepipeError as exc:
                    tally.fail(f"{it.path.parent}: folder name is not a valid person name "
                               f"({getattr(exc, 'problem', exc)}); its photos are skipped")
                    continue
                items.append(it)
        else:
            if name is None or not images:
                raise click.UsageError("give NAME and at least one IMAGE, or --from-folders ROOT")
            name = check_name(name)
            items = []
            for it in iter_inputs(images):
                if isinstance(it, NoInputsError):
                    tally.fail(str(it))
                else:
                    items.append(EnrolItem(name, it.path))
        Gallery.check_editable(gallery_dir)
        existing = Gallery.open(gallery_dir) if (gallery_dir / "manifest.json").exists() else None
    except FacepipeError as exc:
        raise fail(exc) from exc

    # incremental: photos whose content is already enrolled for that person are skipped
    todo: list[EnrolItem] = []
    skipped_known = 0
    names_of_photo: dict[str, set[str]] = {}
    for it in items:
        try:
            it.sha256 = sha256_file(it.path)
        except OSError as exc:
            tally.fail(f"{it.path}: cannot read ({path_problem(exc, it.path)})")
            continue
        if existing is not None and not replace and existing.has_source(it.name, it.sha256):
            skipped_known += 1
            continue
        todo.append(it)
        names_of_photo.setdefault(it.sha256, set()).add(it.name)
    # the same photo under two names is almost always a mistake: say so (it is still enrolled)
    replaced = {i.name for i in items} if replace else set()
    for it in todo:
        others = names_of_photo[it.sha256] - {it.name}
        if existing is not None:
            others |= set(existing.names_with_source(it.sha256)) - replaced - {it.name}
        if others:
            report(f"facepipe: warning: {it.path}: the same photo is also enrolled as "
                   f"{', '.join(repr(o) for o in sorted(others))}; enrolling it as {it.name!r} too", quiet)
    if not todo and existing is not None and not replace:
        report(f"facepipe: nothing new to enrol ({skipped_known} photo(s) already enrolled, "
               f"{tally.failed} failed); gallery has {len(existing.people())} people / {len(existing)} vectors",
               quiet)
        raise tally.done(quiet)
    try:
        if embedder_name is None and existing is not None:
            embedder_name = gallery_embedder(existing)
        factory = WorkerFactory(build_pipeline, detector_name, embedder_name, device, min_embed_size,
                                largest_only=True, min_detect_size=min_detect_size)
        pipe = factory()
        emb_id, emb_sha, emb_desc = embedder_record(pipe.embedder)
        if existing is not None:
            existing.check_embedder(emb_id)
    except FacepipeError as exc:
        raise fail(exc) from exc
    replace_names = sorted({i.name for i in items}) if replace else []

    t0 = time.perf_counter()
    added = 0
    new_people: set[str] = set()
    model = impostor_model_for(pipe.embedder)
    if model is None and threshold is None and (existing is None or existing.mode == "default"):
        report(f"facepipe: warning: the embedder {emb_id} ships no impostor model, so the gallery keeps the "
               f"fixed threshold {defaults.THRESHOLD} (tolerance {1 - defaults.THRESHOLD:g}) whatever its size; "
               "run `facepipe gallery calibrate` after enrolling", quiet)
    create_kw = dict(dim=pipe.embedder.dim, embedder_sha256=emb_sha, index_type=index_type, params=params,
                     aggregation=aggregation, threshold=threshold,
                     impostor_model=model if threshold is None else None, target_fpir=fpir)
    bar = progress_bar(len(todo), "enroll", quiet, unit="img")
    pending: list[tuple[EnrolItem, np.ndarray]] = []

    def commit(batch: list[tuple[EnrolItem, np.ndarray]], first: bool) -> int:
        with Gallery.edit(gallery_dir, embedder_id=emb_id, **create_kw) as g:
            if "describe" not in g.manifest["embedder"] and emb_desc:
                g.manifest["embedder"]["describe"] = emb_desc
            if first and replace_names:
                present = [n for n in replace_names if n in g.people()]
                if present:
                    g.remove(present)
            # another process may have enrolled the same photos meanwhile
            fresh = [(it, v) for it, v in batch if replace or not g.has_source(it.name, it.sha256)]
            before = set(g.people())
            if fresh:
                g.add(np.stack([v for _, v in fresh]), [it.name for it, _ in fresh],
                      sources=[os.fspath(it.path) for it, _ in fresh],
                      hashes=[it.sha256 for it, _ in fresh])
            new_people.update(set(g.people()) - before)
            if threshold is None and model is not None and g.mode in ("default", "auto"):
                # a gallery made before impostor models (or by an older record) goes automatic
                g.use_impostor_model(model, fpir)
            elif fpir is not None and g.mode == "auto" and g.impostor_model is not None:
                g.use_impostor_model(g.impostor_model, fpir)
            return len(fresh)

    first = True
    engine = make_engine(engine_name, ray_address, ray_workers, device or "auto", verbose, workers)
    try:
        for it, res in zip(todo, map_images(engine, factory, [it.path for it in todo], on_images=bar.update)):
            try:
                pending.append((it, largest_face_embedding(res)))
            except FacepipeError as exc:
                tally.fail(str(exc))
                continue
            if len(pending) >= commit_every:
                added += commit(pending, first)
                first, pending = False, []
        if pending or (first and replace_names):
            added += commit(pending, first)
        elif first and not (gallery_dir / "manifest.json").exists():
            commit([], True)  # an empty but valid gallery, so `identify` can open it
    except FacepipeError as exc:
        raise fail(exc) from exc
    finally:
        bar.close()
        engine.close()
    tally.ok = added
    try:
        final = Gallery.open(gallery_dir, verify=False)
    except FacepipeError as exc:
        raise fail(exc) from exc
    report(f"facepipe: enrolled {added} photo(s) ({len(new_people)} new people), "
           f"{skipped_known} already enrolled, {tally.failed} failed, {time.perf_counter() - t0:.1f}s; "
           f"gallery has {len(final.people())} people / {len(final)} vectors; {describe_threshold(final)}", quiet)
    if final.mode == "calibrated":
        was = int(final.manifest["decision"].get("calibration", {}).get("n_comparisons") or 0)
        if was and final.n_comparisons >= 2 * was:
            report(f"facepipe: warning: the threshold was calibrated for {was} comparisons and the gallery now "
                   f"has {final.n_comparisons}: more people, more chances of a false match; re-run "
                   "`facepipe gallery calibrate` (or `--auto`)", quiet)
    raise tally.done(quiet)
