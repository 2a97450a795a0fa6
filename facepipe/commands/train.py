"""``facepipe train``: reproduce the shipped models from the development data."""

from __future__ import annotations

import importlib

import click

#: sub-command -> (module, attribute, one-line help)
TRAIN_COMMANDS: dict[str, tuple[str, str, str]] = {
    "cascade": ("facepipe.commands.train_cascade", "cascade",
                "Train a Viola-Jones Haar cascade (OpenCV cascade XML) for faces or any object."),
    "classifier": ("facepipe.commands.train_classifier", "classifier",
                   "Train the face/non-face CNN classifier (transfer, fine-tune, scratch)."),
    "detector": ("facepipe.commands.train_detector", "detector",
                 "Train the single-pass CNN face detector with five landmarks."),
    "embedder": ("facepipe.commands.train_embedder", "embedder",
                 "Train the metric-learning face embedder."),
}


class _LazyTrainGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(TRAIN_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = TRAIN_COMMANDS.get(cmd_name)
        if spec is None:
            return None
        try:
            module = importlib.import_module(spec[0])
        except ModuleNotFoundError:
            return None
        return getattr(module, spec[1])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, TRAIN_COMMANDS[n][2]) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group("train", cls=_LazyTrainGroup)
def train() -> None:
    """Train facepipe's models (seeded; GPU when available, else CPU)."""
