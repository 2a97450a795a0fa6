"""Person names in a gallery: the one rule every enrolled name follows.

A person name is what ``identify`` prints and what ``--from-folders`` reads from a
folder name, so it must survive CSV, JSON, file systems and terminals:

- surrounding whitespace is removed and the name is normalised to Unicode NFC (so a
  folder name from macOS, stored decomposed, is the same person as one typed in);
- 1 to :data:`MAX_NAME_LENGTH` characters;
- no path separators (``/`` or ``\\``), and not ``.`` or ``..``;
- no control characters (tabs, newlines, escape sequences, ...) and no line or
  paragraph separators;
- not one of the words facepipe prints for a face it does not name
  (:data:`RESERVED_NAMES`, compared case-insensitively).

:func:`check_name` enforces it; the gallery calls it for every vector it stores.
"""

from __future__ import annotations

import unicodedata

from facepipe.errors import GalleryError

#: The name every rejected probe gets; it cannot be enrolled.
UNKNOWN = "unknown"
RESERVED_NAMES = frozenset({UNKNOWN, "unknown_person", "no_persons_found"})
#: Longest person name, in characters.
MAX_NAME_LENGTH = 128


def check_name(name: str) -> str:
    """Validate a person name against the rule above; returns its normalised form.

    Raises :class:`GalleryError` (path ``<name>``) saying which part of the rule failed.
    """
    if not isinstance(name, str):
        raise GalleryError("<name>", f"invalid person name {name!r}: must be a string")
    shown = name if len(name) <= 40 else name[:40] + "..."
    norm = unicodedata.normalize("NFC", name.strip())
    if not norm:
        raise GalleryError("<name>", f"invalid person name {shown!r}: empty")
    if len(norm) > MAX_NAME_LENGTH:
        raise GalleryError("<name>", f"invalid person name {shown!r}: {len(norm)} characters, "
                                     f"at most {MAX_NAME_LENGTH} allowed")
    if "/" in norm or "\\" in norm:
        raise GalleryError("<name>", f"invalid person name {shown!r}: contains a path separator (/ or \\)")
    if norm in (".", ".."):
        raise GalleryError("<name>", f"invalid person name {shown!r}: '.' and '..' are not names")
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in norm):
        raise GalleryError("<name>", f"invalid person name {shown!r}: contains control characters")
    if norm.lower() in RESERVED_NAMES:
        raise GalleryError("<name>", f"{norm!r} is reserved for rejected faces and cannot be enrolled")
    return norm
