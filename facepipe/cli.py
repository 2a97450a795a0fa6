"""The ``facepipe`` command line: a thin shell over the library.

Each command lives in :mod:`facepipe.commands` and is imported lazily so that
``facepipe --help`` stays fast and one broken optional dependency cannot take
down unrelated commands.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from facepipe import __version__, defaults

#: command name -> (module, attribute, one-line help shown by ``facepipe --help``)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "detect": ("facepipe.commands.detect", "detect", "Find faces in images (MTCNN, Haar cascade, CNN or Haar+CNN)."),
    "train": ("facepipe.commands.train", "train", "Train the face classifier or the embedder."),
    "enroll": ("facepipe.commands.enroll", "enroll", "Enrol people's photos into a face gallery."),
    "identify": ("facepipe.commands.identify", "identify", "Name the faces in images, or call them unknown."),
    "gallery": ("facepipe.commands.gallery", "gallery", "List, inspect, calibrate, re-embed or remove from a gallery."),
    "explain": ("facepipe.commands.explain", "explain", "Show why: detector Grad-CAM, and with -g the gallery match."),
    "video": ("facepipe.commands.video", "video", "Detect, track and identify faces in video files."),
    "embed": ("facepipe.commands.embed", "embed", "Write face embeddings (NumPy) with a JSON sidecar."),
}


class LazyGroup(click.Group):
    """A click group that imports each command's module only when it is run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = COMMANDS.get(cmd_name)
        if spec is None:
            return None
        module, attr, _ = spec
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=defaults.help_epilog())
@click.version_option(__version__, prog_name="facepipe")
def cli() -> None:
    """facepipe: face detection, alignment, embedding and open-set recognition.

    Results go to stdout, progress and messages to stderr. Run
    `facepipe COMMAND --help` for each command's options.
    """


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    return cli.main(args=argv, prog_name="facepipe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
