"""Helpers shared by the commands: logging, progress, error reporting, output formats."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import click

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
