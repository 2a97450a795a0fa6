"""One exception hierarchy for facepipe.

Every error a user can cause (a bad file, an unknown model name, a device that is
not there) is a :class:`FacepipeError`. The command line turns these into a
single line on stderr and a non-zero exit code; library users catch them.
"""

from __future__ import annotations

from pathlib import Path


class FacepipeError(Exception):
    """Base class of every error facepipe raises on purpose."""


class InputError(FacepipeError):
    """A problem with a file or path given by the user; ``path`` names it."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ImageReadError(InputError):
    """An image file is missing, empty, truncated, corrupt or not an image."""


class VideoReadError(InputError):
    """A video file cannot be opened or decoded."""


class NoInputsError(InputError):
    """A path, directory or glob that yields no usable files."""


class OutputError(InputError):
    """An output location that cannot be created or written."""


class UnknownModelError(FacepipeError):
    """A detector, embedder, cascade or backbone name that is not registered."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]) -> None:
        self.kind = kind
        self.name = name
        self.valid = list(valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(self.valid)}")


class CheckpointError(InputError):
    """A model checkpoint that is missing, corrupt, or for another architecture."""


class DeviceUnavailableError(FacepipeError):
    """A compute device was asked for that this machine does not have."""


class GalleryError(InputError):
    """A gallery directory that is corrupt, locked, or built by another embedder."""


class ShapeError(FacepipeError, ValueError):
    """An array passed to a public function has the wrong shape or dtype."""
