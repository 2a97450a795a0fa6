"""Where the development data lives and small readers for its formats.

The data is read in place from ``$FACEPIPE_DATA`` (default ``../shared/data``
relative to the working directory, then relative to the repository); it is never
copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

from facepipe.errors import InputError

ENV_VAR = "FACEPIPE_DATA"


def data_root(required: bool = True) -> Path | None:
    """The development data directory, from ``$FACEPIPE_DATA`` or ``../shared/data``.

    With ``required=False`` returns ``None`` when it is absent instead of raising.
    """
    env = os.environ.get(ENV_VAR)
    candidates = [Path(env)] if env else [
        Path.cwd().parent / "shared" / "data",
        Path(__file__).resolve().parent.parent.parent / "shared" / "data",
    ]
    for c in candidates:
        if c.is_dir():
            return c
    if required:
        where = env or str(candidates[0])
        raise InputError(where, f"development data not found (set {ENV_VAR})")
    return None


def list_identities(root: str | Path) -> dict[str, list[Path]]:
    """``<root>/<person>/<images>`` as ``{person: sorted image paths}`` (non-directories skipped)."""
    from facepipe.io import IMAGE_EXTENSIONS

    r = Path(root)
    if not r.is_dir():
        raise InputError(r, "identity folder not found")
    out: dict[str, list[Path]] = {}
    for person in sorted(p for p in r.iterdir() if p.is_dir() and not p.name.startswith(".")):
        imgs = sorted(f for f in person.iterdir()
                      if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if imgs:
            out[person.name] = imgs
    return out
