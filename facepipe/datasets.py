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


def list_identities(root: str | Path, problems: list[InputError] | None = None) -> dict[str, list[Path]]:
    """``<root>/<person>/<images>`` as ``{person: sorted image paths}`` (non-directories skipped).

    A person folder that cannot be read, or an image entry that cannot be accessed
    (broken link, no permission), raises :class:`InputError` naming it; with
    ``problems`` given, those errors are appended to it instead and listing goes on.
    """
    from facepipe.io import IMAGE_EXTENSIONS, path_problem

    def problem(err: InputError) -> None:
        if problems is None:
            raise err
        problems.append(err)

    r = Path(root)
    if not r.is_dir():
        raise InputError(r, "identity folder not found")
    out: dict[str, list[Path]] = {}
    try:
        entries = sorted(r.iterdir())
    except OSError as exc:
        raise InputError(r, f"cannot read folder: {path_problem(exc, r)}") from exc
    for person in entries:
        if person.name.startswith(".") or not person.is_dir():
            continue
        try:
            files = sorted(person.iterdir())
        except OSError as exc:
            problem(InputError(person, f"cannot read folder: {path_problem(exc, person)}"))
            continue
        imgs = []
        for f in files:
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                if f.stat().st_mode & 0o170000 == 0o100000:
                    imgs.append(f)
            except OSError as exc:
                problem(InputError(f, path_problem(exc, f)))
        if imgs:
            out[person.name] = imgs
    return out
