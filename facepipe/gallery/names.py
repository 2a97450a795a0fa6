"""Person names in a gallery: the words reserved for rejected faces and the name rule."""

from __future__ import annotations

from facepipe.errors import GalleryError

#: The name every rejected probe gets; it cannot be enrolled.
UNKNOWN = "unknown"
RESERVED_NAMES = frozenset({UNKNOWN, "unknown_person", "no_persons_found"})


def check_name(name: str) -> str:
    """Validate a person's name (non-empty, printable, not a reserved output word)."""
    if not isinstance(name, str) or not name.strip():
        raise GalleryError("<name>", f"invalid person name {name!r}: must be a non-empty string")
    name = name.strip()
    if any(ord(c) < 32 for c in name):
        raise GalleryError("<name>", f"invalid person name {name!r}: contains control characters")
    if name.lower() in RESERVED_NAMES:
        raise GalleryError("<name>", f"{name!r} is reserved for rejected faces and cannot be enrolled")
    return name
