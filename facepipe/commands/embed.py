"""``facepipe embed``: raw face embeddings (NumPy) with a JSON sidecar describing every row."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from facepipe.builders import build_pipeline
from facepipe.commands._common import (
    BatchTally, engine_options, expand_inputs, fail, make_engine, model_options, progress_bar, report,
    setup_logging, verbosity_options,
)
from facepipe.errors import FacepipeError, OutputError


def _outputs(out: Path) -> tuple[Path, Path]:
    """The ``.npy`` vectors file and its ``.json`` sidecar for ``--out``."""
    npy = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")
    return npy, npy.with_suffix(".json")


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(path, f"cannot write ({exc.strerror or exc})") from exc


@click.command("embed")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Vectors file (.npy added if missing); the sidecar is the same name with .json.")
@model_options()
@click.option("--largest-only/--all-faces", default=False, show_default=True,
              help="Embed only the largest face of each image, or every face.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--batch-images", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images whose faces are embedded in one batch.")
@engine_options
@verbosity_options
def embed(paths: tuple[str, ...], out: Path, detector_name: str | None, embedder_name: str | None,
          device: str | None, min_detect_size: int | None, min_embed_size: int, largest_only: bool, overwrite: bool, batch_images: int,
          engine_name: str, ray_address: str | None, ray_workers: int, workers: int, quiet: bool, verbose: int) -> None:
    """Write one embedding per detected face to a NumPy file plus a JSON sidecar.

    PATH is an image, a directory (searched recursively) or a glob. Row k of the
    .npy (float32, unit rows) is described by faces[k] in the sidecar: source file,
    face box, landmarks, alignment, plus the embedder id. Images with no face and
    faces below --min-embed-size are reported on stderr and listed in the sidecar, not
    embedded; unreadable files are reported and skipped (exit code 1).
    """
    from facepipe.engine import WorkerFactory
    from facepipe.engine.work import map_images
    from facepipe.io import ensure_output_dir

    setup_logging(quiet, verbose)
    npy, side = _outputs(out)
    try:
        for p in (npy, side):
            if p.exists() and not overwrite:
                raise OutputError(p, "exists (use --overwrite to replace it)")
        ensure_output_dir(npy.parent)  # fail before the work, not after it
        factory = WorkerFactory(build_pipeline, detector_name, embedder_name, device, min_embed_size,
                                largest_only=largest_only, min_detect_size=min_detect_size)
        pipe = factory()
    except FacepipeError as exc:
        raise fail(exc) from exc
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from exc

    tally = BatchTally()
    files = expand_inputs(paths, tally)
    vectors: list[np.ndarray] = []
    faces: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    no_face: list[str] = []
    failed: list[dict[str, str]] = []
    t0 = time.perf_counter()
    bar = progress_bar(len(files), "embed", quiet, unit="img")
    engine = make_engine(engine_name, ray_address, ray_workers, device or "auto", verbose, workers)
    try:
        for res in map_images(engine, factory, [f.path for f in files], batch_images, on_images=bar.update):
            src = os.fspath(res.path)
            if res.error is not None:
                tally.fail(res.error)
                failed.append({"source": src, "error": res.problem})
                continue
            tally.ok += 1
            for s in res.skipped:
                skipped.append({"source": src, **s.detection.to_dict(), "reason": s.reason.value,
                                "detail": s.detail})
                if s.reason.value != "not_largest":
                    report(f"facepipe: {src}: face at ({s.detection.box.x:.0f}, {s.detection.box.y:.0f}) "
                           f"not embedded: {s.detail}", quiet)
            if not res.faces:
                no_face.append(src)
                if not res.skipped:
                    report(f"facepipe: {src}: no face found, skipped", quiet)
            for f in res.faces:
                faces.append({"row": len(vectors), "source": src, "width": res.width,
                              "height": res.height, **f.detection.to_dict(),
                              "alignment": f.alignment})
                vectors.append(f.embedding)
            tally.items += len(res.faces)
    finally:
        bar.close()
        engine.close()
    emb = pipe.embedder
    arr = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, emb.dim), np.float32)
    sidecar = {
        "format": "facepipe-embeddings-v1",
        "vectors": npy.name,
        "shape": list(arr.shape),
        "embedder": emb.embedder_id,
        "embedder_info": emb.describe() if hasattr(emb, "describe") else {},
        "detector": pipe.detector.describe() if hasattr(pipe.detector, "describe") else {},
        "min_embed_size": pipe.min_face,
        "largest_only": pipe.largest_only,
        "faces": faces,
        "skipped_faces": skipped,
        "images_without_embedded_face": no_face,
        "failed": failed,
    }
    try:
        _write_atomic(npy, lambda f: np.save(f, arr))
        _write_atomic(side, lambda f: f.write(json.dumps(sidecar, indent=2, default=str).encode()))
    except FacepipeError as exc:
        raise fail(exc) from exc
    report(f"facepipe: {tally.ok} image(s), {len(vectors)} face(s) embedded -> {npy} (+ {side.name}), "
           f"{len(no_face)} without a face, {len(skipped)} face(s) skipped, {tally.failed} failed, "
           f"{time.perf_counter() - t0:.1f}s", quiet)
    raise tally.done(quiet)
