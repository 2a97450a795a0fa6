"""Helpers shared by the commands: logging, progress, error reporting, output formats."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import click
from click.core import ParameterSource

from facepipe import defaults
from facepipe.errors import FacepipeError

if TYPE_CHECKING:
    from facepipe.io import InputFile

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def verbosity_options(fn: F) -> F:
    """Add ``-q/--quiet`` and ``-v/--verbose`` to a command."""
    fn = click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress bar, summary or warnings.")(fn)
    return fn


def setup_logging(quiet: bool, verbose: int) -> None:
    """Configure the ``facepipe`` logger for a command run (stderr)."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logger = logging.getLogger("facepipe")
    logger.setLevel(level)
    if not any(getattr(h, "_facepipe", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("facepipe: %(levelname)s: %(message)s"))
        handler._facepipe = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def fail(exc: FacepipeError | str) -> click.ClickException:
    """A one-line, non-zero-exit error for the CLI boundary."""
    return click.ClickException(str(exc))


def progress(items: Iterable[T], total: int | None, desc: str, quiet: bool, unit: str = "it") -> Iterator[T]:
    """A tqdm bar on stderr, hidden with ``--quiet``, for one item, or when stderr is no terminal."""
    from tqdm import tqdm

    disable = True if quiet or (total is not None and total < 2) else None
    return iter(tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr,
                     disable=disable, dynamic_ncols=True, leave=False))


def progress_bar(total: int | None, desc: str, quiet: bool, unit: str = "it") -> Any:
    """A tqdm bar to ``update()`` by hand (as items finish anywhere), hidden like :func:`progress`."""
    from tqdm import tqdm

    disable = True if quiet or (total is not None and total < 2) else None
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, dynamic_ncols=True,
                leave=False)


def report(message: str, quiet: bool = False) -> None:
    """Write one line to stderr without breaking an active progress bar."""
    if quiet:
        return
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def report_error(message: str) -> None:
    """Write one error line to stderr (always shown, also with --quiet)."""
    from tqdm import tqdm

    tqdm.write(f"facepipe: error: {message}", file=sys.stderr)


#: Failed inputs listed one per line at the end of a batch run (the rest are counted).
MAX_LISTED_FAILURES = 100


@dataclass
class BatchTally:
    """Counts for a batch run's closing summary and exit status."""

    ok: int = 0
    failed: int = 0
    items: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        """Record and report one failed input."""
        self.failed += 1
        self.failures.append(message)
        report_error(message)

    @property
    def exit_code(self) -> int:
        """0 when everything succeeded, 1 when any input failed."""
        return 1 if self.failed else 0

    def done(self, quiet: bool = False) -> SystemExit:
        """The end of a batch run: lists every failed input (file and problem) after the summary,
        so a long run's failures need not be searched for in its scrollback, and returns the
        ``SystemExit`` to raise. A run of one input has said everything in its error line."""
        if self.failures and self.ok + self.failed > 1:
            shown = self.failures[:MAX_LISTED_FAILURES]
            more = len(self.failures) - len(shown)
            report(f"facepipe: {self.failed} input(s) failed:\n" + "\n".join(f"  {m}" for m in shown)
                   + (f"\n  ... and {more} more (reported above)" if more else ""), quiet)
        return SystemExit(self.exit_code)


def expand_inputs(paths: Iterable[str], tally: BatchTally) -> list["InputFile"]:
    """Files named by PATH arguments; arguments that yield none are reported as failures."""
    from facepipe.errors import NoInputsError
    from facepipe.io import iter_inputs

    files = []
    for item in iter_inputs(list(paths)):
        if isinstance(item, NoInputsError):
            tally.fail(str(item))
        else:
            files.append(item)
    return files


def annotated_path(out_dir: Path, relative: Path, used: set[Path]) -> Path:
    """Output path mirroring the input's relative path; never overwrite a sibling's output."""
    target = out_dir / relative
    stem, suffix, n = target.stem, target.suffix or ".png", 1
    while target in used:
        target = target.with_name(f"{stem}_{n}{suffix}")
        n += 1
    used.add(target)
    return target


class RecordWriter:
    """Writes result records to stdout as CSV rows, one JSON document, or JSON lines."""

    def __init__(self, fmt: str, csv_header: list[str] | None = None, stream: Any = None) -> None:
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stdout
        self._json: list[Any] = []
        self._csv_header = csv_header
        self._header_written = False

    def csv_row(self, row: list[Any]) -> None:
        """Write one CSV row (header first if one was asked for)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if self._csv_header and not self._header_written:
            w.writerow(self._csv_header)
            self._header_written = True
        w.writerow(row)
        self.stream.write(buf.getvalue())
        self.stream.flush()

    def record(self, obj: Any) -> None:
        """Write one JSON record now (jsonl) or keep it for the closing document (json)."""
        if self.fmt == "jsonl":
            self.stream.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self.stream.flush()
        elif self.fmt == "json":
            self._json.append(obj)

    def close(self) -> None:
        """Finish the output (writes the JSON document for ``--format json``)."""
        if self.fmt == "json":
            json.dump(self._json, self.stream, indent=2)
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- shared options
# One vocabulary for every command: the same option has the same name, meaning and
# default (from facepipe.defaults) wherever it appears.

#: one-line descriptions of the registered detectors, for help texts
DETECTOR_HELP = {
    "mtcnn": "MTCNN (5 landmarks)",
    "haar": "Viola–Jones cascade",
    "cnn": "facepipe's single-pass MobileNetV2 detector (head boxes, 5 landmarks; docs/detection.md)",
    "cnn-pyramid": "facepipe's first CNN detector: the face/non-face classifier slid over an image pyramid",
    "haar+cnn": "Haar proposals verified by the CNN classifier",
    "retinaface": "RetinaFace (reference peer, when installed)",
}
_UNSET_SOURCES = (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


class FiniteFloat(click.ParamType):
    """A float in ``[min, max]`` that is not NaN or infinite (click's FloatRange lets NaN through)."""

    name = "float"

    def __init__(self, min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False) -> None:
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open

    def _range(self) -> str:
        lo = "" if self.min is None else f"{self.min:g}{'<' if self.min_open else '<='}"
        hi = "" if self.max is None else f"{'<' if self.max_open else '<='}{self.max:g}"
        return f"{lo}x{hi}"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:  # type: ignore[override]
        return "FLOAT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        import math

        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and (x < self.min or (self.min_open and x == self.min)):
            self.fail(f"{x:g} is not in the range {self._range()}", param, ctx)
        if self.max is not None and (x > self.max or (self.max_open and x == self.max)):
            self.fail(f"{x:g} is not in the range {self._range()}", param, ctx)
        return x

    def __repr__(self) -> str:
        return f"FiniteFloat({self._range()})"


def deprecated_alias(old: str, new: str, dest: str, type_: Any) -> Callable[[F], F]:
    """A hidden option ``old`` that sets ``dest`` like ``new`` does, with a warning on stderr.

    The new option must use :func:`_alias_aware` as its callback, so that its default
    does not overwrite a value given through the old name.
    """

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is None:
            return None
        click.echo(f"facepipe: warning: {old} is deprecated, use {new}", err=True)
        if ctx.get_parameter_source(dest) in _UNSET_SOURCES:
            ctx.meta[f"facepipe.alias.{dest}"] = value
            ctx.params[dest] = value
        return None

    return click.option(old, f"deprecated_{dest}", type=type_, default=None, hidden=True,
                        expose_value=False, callback=callback)


def _alias_aware(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Callback of an option with a deprecated alias: a value given by the alias wins over the default."""
    key = f"facepipe.alias.{param.name}"
    if key in ctx.meta and ctx.get_parameter_source(param.name or "") in _UNSET_SOURCES:
        return ctx.meta[key]
    return value


def _detector_help(extra: str = "") -> str:
    """The --detector help, listing the registered detectors (the registry imports no model)."""
    from facepipe.detect import available_detectors

    names = sorted(available_detectors(), key=lambda n: (n != defaults.DETECTOR, n))
    described = "; ".join(f"{n}: {DETECTOR_HELP[n]}" if n in DETECTOR_HELP else n for n in names)
    return f"Face detector [default: {defaults.DETECTOR}]. {described}." + (" " + extra if extra else "")


def detector_option(fn: F) -> F:
    """``--detector NAME`` (default :data:`facepipe.defaults.DETECTOR`)."""
    return click.option("--detector", "detector_name", default=None, metavar="NAME",
                        help=_detector_help())(fn)


def device_option(fn: F) -> F:
    """``--device`` for the CNN stages."""
    return click.option("--device", default=None, metavar="DEVICE",
                        help=f"auto, cpu, cuda or cuda:N for the CNN stages [default: {defaults.DEVICE}].")(fn)


def min_detect_size_option(fn: F) -> F:
    """``--min-detect-size PX``: the detection minimum (deprecated alias ``--min-size``)."""
    fn = deprecated_alias("--min-size", "--min-detect-size", "min_detect_size", click.IntRange(min=1))(fn)
    return click.option("--min-detect-size", "min_detect_size", type=click.IntRange(min=1), default=None,
                        metavar="PX", callback=_alias_aware,
                        help="Detection minimum: the smallest face side, in pixels, the detector looks for "
                             "[default: the detector's own: cnn none (heads from ~12 px), mtcnn 20, "
                             "haar and cnn-pyramid 24].")(fn)


def min_embed_size_option(fn: F) -> F:
    """``--min-embed-size PX``: the embedding minimum (deprecated alias ``--min-face``)."""
    fn = deprecated_alias("--min-face", "--min-embed-size", "min_embed_size", click.IntRange(min=1))(fn)
    return click.option("--min-embed-size", "min_embed_size", type=click.IntRange(min=1),
                        default=defaults.MIN_EMBED_SIZE, show_default=True, metavar="PX", callback=_alias_aware,
                        help="Embedding minimum: detected faces whose shorter side is below this are "
                             "reported and not embedded or identified.")(fn)


def embedder_option(gallery_aware: bool) -> Callable[[F], F]:
    """``--embedder NAME|PATH``; with ``gallery_aware`` the default is the gallery's own embedder."""
    if gallery_aware:
        default_text = (f"the embedder the gallery was built with (its manifest); "
                        f"{defaults.EMBEDDER} without a gallery")
    else:
        default_text = defaults.EMBEDDER

    def deco(fn: F) -> F:
        return click.option("--embedder", "embedder_name", default=None, metavar="NAME|PATH",
                            help=f"Embedder: a registered name (default, untrained, dlib) or a checkpoint "
                                 f"path [default: {default_text}].")(fn)

    return deco


def model_options(gallery_aware: bool = False) -> Callable[[F], F]:
    """``--detector``, ``--embedder``, ``--device``, ``--min-detect-size``, ``--min-embed-size``."""

    def deco(fn: F) -> F:
        fn = min_embed_size_option(fn)
        fn = min_detect_size_option(fn)
        fn = device_option(fn)
        fn = embedder_option(gallery_aware)(fn)
        return detector_option(fn)

    return deco


def format_option(help_text: str) -> Callable[[F], F]:
    """``--format csv|json|jsonl`` (default :data:`facepipe.defaults.FORMAT`)."""
    return click.option("--format", "fmt", type=click.Choice(["csv", "json", "jsonl"]), default=defaults.FORMAT,
                        show_default=True, help=help_text)


def gallery_option(required: bool = True, help_text: str = "Gallery directory.") -> Callable[[F], F]:
    """``-g/--gallery DIR`` for every command that reads a gallery."""
    return click.option("-g", "--gallery", "gallery_dir", required=required, metavar="DIR",
                        type=click.Path(file_okay=False, path_type=Path), help=help_text)


_ENGINE_PARAMS = ("engine_name", "ray_address", "ray_workers", "workers")


def _check_engine_options(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Usage errors among --engine, --ray-*, --workers, raised while parsing (before any model loads):
    the check runs in whichever of these options click processes last."""
    if param.name == "workers" and value == 0:
        raise click.BadParameter("must be at least 1 (or -1: one per CPU)", ctx, param)
    seen = {k: ctx.params[k] for k in _ENGINE_PARAMS if k in ctx.params}
    seen[param.name or ""] = value
    present = [p.name for p in ctx.command.params if p.name in _ENGINE_PARAMS]
    if all(k in seen for k in present):
        engine = seen.get("engine_name", "local")
        if engine != "ray" and (seen.get("ray_address") or seen.get("ray_workers")):
            raise click.UsageError("--ray-address and --ray-workers need --engine ray", ctx)
        if engine == "ray" and seen.get("workers", 1) != 1:
            raise click.UsageError("--workers applies to --engine local; with --engine ray use --ray-workers", ctx)
    return value


def engine_options(fn: F) -> F:
    """Add ``--engine``, ``--ray-address`` and ``--ray-workers`` to a batch command."""
    fn = click.option("--ray-workers", type=click.IntRange(min=0), default=0, show_default=True,
                      callback=_check_engine_options,
                      help="--engine ray: workers (Ray actors, each holding the models once); 0: one per "
                           "GPU of the cluster, or one per CPU without GPUs.")(fn)
    fn = click.option("--ray-address", default=None, metavar="HOST:PORT", callback=_check_engine_options,
                      help="--engine ray: join the cluster started with `ray start --head` there "
                           "(inputs and outputs must be at the same paths on every machine); "
                           "without it, a local Ray instance is started on this machine.")(fn)
    fn = click.option("--engine", "engine_name", type=click.Choice(["local", "ray"]), default="local",
                      show_default=True, callback=_check_engine_options,
                      help="local: this machine (--workers processes); ray: spread the work over Ray workers "
                           "(same outputs).")(fn)
    return workers_option(fn)


def workers_option(fn: F) -> F:
    """``--workers/--cpus N``: local worker processes (face_recognition's ``--cpus``; -1 = one per CPU)."""
    return click.option("--workers", "--cpus", "workers", type=click.IntRange(min=-1), default=defaults.WORKERS,
                        show_default=True, metavar="N", callback=_check_engine_options,
                        help="--engine local: worker processes, each loading the models once (-1: one per CPU; "
                             "1: this process). Pays off on batches of many images.")(fn)


def make_engine(engine_name: str, ray_address: str | None, ray_workers: int, device: str = "auto",
                verbose: int = 0, workers: int = 1) -> Any:
    """The engine the command-line options ask for (one-line error when it cannot start)."""
    from facepipe.engine import create_engine

    if engine_name != "ray" and (ray_address or ray_workers):
        raise click.UsageError("--ray-address and --ray-workers need --engine ray")
    if workers == 0:
        raise click.UsageError("--workers must be at least 1 (or -1: one per CPU)")
    if engine_name == "ray" and workers != 1:
        raise click.UsageError("--workers applies to --engine local; with --engine ray use --ray-workers")
    try:
        if engine_name == "ray":
            return create_engine("ray", ray_address, ray_workers, device=device, log_to_driver=verbose > 0)
        return create_engine(engine_name, workers=workers)
    except FacepipeError as exc:
        raise fail(exc) from exc
