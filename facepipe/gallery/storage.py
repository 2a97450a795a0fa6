"""Gallery storage: the directory layout, locking and atomic generations.

A gallery is a directory::

    DIR/manifest.json          the commit point: which generation is current, its files'
                               sha256, the embedder, dimension, metric, index type,
                               threshold and how it was calibrated, timestamps
    DIR/index-000007.faiss     the FAISS index of generation 7
    DIR/labels-000007.json     vector id -> person name, source file, source sha256
    DIR/.lock                  fcntl lock file (writers exclusive, loaders shared)

Every change writes a *new* generation (index and labels to temporary names, fsync,
rename), then atomically replaces ``manifest.json``. A crash or ``kill -9`` at any point
leaves the manifest pointing at the previous, complete generation; leftovers of an
interrupted write are swept by the next writer. Writers hold an exclusive ``flock`` for
the whole read-modify-write, so two processes enrolling at once are serialised and
neither loses the other's identities; readers take a shared lock only while loading.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.errors import GalleryError
from facepipe.gallery.index import apply_search_params, faiss_module

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
FORMAT = "facepipe-gallery/1"
LABELS_FORMAT = "facepipe-gallery-labels/1"
GEN_FILE_RE = re.compile(r"^(index|labels)-(\d{6,})\.(faiss|json)(\.tmp-\d+)?$")


def now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` via a temporary file, fsync and rename."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def not_writable(d: Path, exc: OSError) -> GalleryError:
    """The error for a gallery directory that cannot be written."""
    return GalleryError(d, f"gallery directory is not writable ({exc.strerror or exc}); nothing was changed")


def check_writable(d: Path) -> None:
    """Raise :class:`GalleryError` unless a file can be created in ``d``.

    For a directory that does not exist yet, its nearest existing parent is checked
    (the gallery would be created there). Root ignores permission bits, so this
    tries a real write instead of asking :func:`os.access`.
    """
    target = d
    while not target.exists() and target.parent != target:
        target = target.parent
    if not target.is_dir():
        raise GalleryError(d, f"{target} exists and is not a directory")
    probe = target / f".facepipe-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    except OSError as exc:
        if target == d or exc.errno in _NOT_WRITABLE:
            raise not_writable(d, exc) from exc
        raise GalleryError(d, f"cannot create gallery directory ({exc.strerror or exc})") from exc
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def gallery_files(d: Path) -> list[str]:
    """Names in ``d`` that belong to a gallery's generations (index, labels, manifest leftovers)."""
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise GalleryError(d, f"cannot list the gallery directory ({exc.strerror or exc})") from exc
    return sorted(n for n in names if GEN_FILE_RE.match(n) or n.startswith(f"{MANIFEST}.tmp-"))


def refuse_orphans(d: Path) -> None:
    """Refuse a directory without a manifest that holds gallery files: never overwrite them.

    Temporary files of an interrupted write (``*.tmp-PID``) were never committed and
    do not count; the next writer sweeps them.
    """
    orphans = [n for n in gallery_files(d) if ".tmp-" not in n]
    if orphans:
        shown = ", ".join(orphans[:3]) + (f" and {len(orphans) - 3} more" if len(orphans) > 3 else "")
        raise GalleryError(d, f"holds gallery files ({shown}) but no {MANIFEST} (a damaged gallery, or an "
                              "interrupted first enrolment); refusing to overwrite them: restore "
                              f"{MANIFEST}, or move them away, or use another directory")


class Lock:
    """An ``fcntl.flock`` on ``DIR/.lock`` with a timeout and a clear error."""

    def __init__(self, directory: Path, exclusive: bool, timeout: float) -> None:
        self.path = directory / LOCK_FILE
        self.exclusive = exclusive
        self.timeout = timeout
        self.fd: int | None = None

    def __enter__(self) -> "Lock":
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in _NOT_WRITABLE:
                if not self.exclusive:
                    return self  # read-only gallery: nobody can be writing it through us
                raise not_writable(self.path.parent, exc) from exc
            raise GalleryError(self.path.parent, f"cannot open lock file ({exc.strerror or exc})") from exc
        op = (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                fcntl.flock(self.fd, op)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise GalleryError(self.path.parent,
                                       f"locked by another facepipe process for more than {self.timeout:.0f}s")
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


@dataclass
class Snapshot:
    """One committed generation as loaded: manifest, FAISS index and per-vector labels."""

    manifest: dict[str, Any]
    index: Any
    ids: np.ndarray                 # sorted int64 external ids
    person: np.ndarray              # int32 person index per id
    names: list[str]                # person index -> name
    sources: list[str | None]
    hashes: list[str | None]
    next_id: int
    penalties: tuple[str, np.ndarray] | None = None  # (cohort fingerprint, penalty per id)


def new_manifest(embedder_id: str, embedder_sha256: str | None, dim: int, index_type: str, kind: str,
                 params: dict[str, dict[str, int]], decision: dict[str, Any]) -> dict[str, Any]:
    """The manifest of an empty gallery (generation 0, not yet written)."""
    return {
        "format": FORMAT,
        "generation": 0,
        "created_at": now(),
        "updated_at": now(),
        "embedder": {"id": embedder_id, "checkpoint_sha256": embedder_sha256},
        "dim": dim,
        "metric": "inner_product",
        "normalized": True,
        "index": {"requested": index_type, "type": kind, "params": params},
        "decision": decision,
        "count": {"vectors": 0, "identities": 0},
    }


def verify_file(path: Path, meta: dict[str, Any], verify: bool, what: str) -> None:
    """Refuse a generation file that is missing, of the wrong size or (``verify``) wrong sha256."""
    if not path.is_file():
        raise GalleryError(path, f"gallery {what} is missing")
    size = path.stat().st_size
    if size != int(meta["bytes"]):
        raise GalleryError(path, f"gallery {what} is truncated or changed "
                           f"({size} bytes, manifest says {meta['bytes']})")
    if verify and sha256_file(path) != meta["sha256"]:
        raise GalleryError(path, f"gallery {what} is corrupt (sha256 differs from the manifest)")


def read_snapshot(d: Path, verify: bool) -> Snapshot:
    """Load the generation ``d/manifest.json`` points at, checking every file against it."""
    mpath = d / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GalleryError(mpath, f"corrupt gallery manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise GalleryError(mpath, f"not a {FORMAT} manifest (format {found!r})")
    try:
        dim = int(manifest["dim"])
        kind = manifest["index"]["type"]
        params = manifest["index"]["params"][kind] if kind in manifest["index"]["params"] else {}
        idx_meta = manifest["index"].get("file")
        lab_meta = manifest["labels"]
        n_expected = int(manifest["count"]["vectors"])
    except (KeyError, TypeError, ValueError) as exc:
        raise GalleryError(mpath, f"gallery manifest is missing field {exc}") from exc

    lpath = d / lab_meta["file"]
    verify_file(lpath, lab_meta, verify, "label file")
    try:
        labels = json.loads(lpath.read_text(encoding="utf-8"))
        if labels.get("format") != LABELS_FORMAT:
            raise ValueError(f"format {labels.get('format')!r}")
        names: list[str] = list(labels["people"])
        entries = labels["entries"]
        ids = np.asarray([e[0] for e in entries], dtype=np.int64)
        person = np.asarray([e[1] for e in entries], dtype=np.int32)
        sources = [e[2] for e in entries]
        hashes = [e[3] for e in entries]
        next_id = int(labels["next_id"])
        pen = labels.get("penalties")
        penalties = None
        if pen is not None:
            values = np.asarray(pen["values"], dtype=np.float32)
            if values.shape != ids.shape or not np.isfinite(values).all() or (values < 0).any():
                raise ValueError("cohort penalties do not match the entries")
            penalties = (str(pen["cohort"]), values)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError,
            ValueError) as exc:
        raise GalleryError(lpath, f"corrupt gallery label file ({exc})") from exc
    if ids.size != n_expected or (person.size and (person.min() < 0 or person.max() >= len(names))):
        raise GalleryError(lpath, "label file does not match the manifest (wrong counts)")
    if ids.size > 1 and not (np.diff(ids) > 0).all():
        raise GalleryError(lpath, "label file ids are not strictly increasing")

    index = None
    if idx_meta is not None:
        ipath = d / idx_meta["file"]
        verify_file(ipath, idx_meta, verify, "index file")
        faiss = faiss_module()
        try:
            index = faiss.read_index(str(ipath))
        except RuntimeError as exc:
            raise GalleryError(ipath, f"corrupt or unreadable FAISS index ({str(exc).splitlines()[0][:200]})") from exc
        if index.d != dim:
            raise GalleryError(ipath, f"index dimension {index.d} differs from the manifest's {dim}")
        if index.ntotal != ids.size:
            raise GalleryError(ipath, f"index holds {index.ntotal} vectors but the label file lists {ids.size}")
        if kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            if ivf.direct_map.type != faiss.DirectMap.Hashtable:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        else:
            stored = faiss.vector_to_array(index.id_map) if hasattr(index, "id_map") else None
            if stored is None or not np.array_equal(stored, ids):
                raise GalleryError(ipath, "index ids do not match the label file")
        apply_search_params(index, kind, params)
    elif ids.size:
        raise GalleryError(mpath, "manifest lists vectors but no index file")
    return Snapshot(manifest, index, ids, person, names, sources, hashes, next_id, penalties)


def write_generation(d: Path, manifest: dict[str, Any], index: Any, labels: dict[str, Any],
                     n_vectors: int, n_identities: int) -> None:
    """Commit a new generation: labels and index under new names, then the manifest.

    ``manifest`` is updated in place (generation, file records, counts, time). The
    previous generation's files are swept only after the new manifest is durable. A
    write that fails (disk full, directory made read-only) removes what it wrote and
    raises :class:`GalleryError`; the previous generation stays current.
    """
    faiss = faiss_module()
    m = manifest
    before = json.loads(json.dumps(m))
    gen = int(m["generation"]) + 1
    lname = f"labels-{gen:06d}.json"
    iname = f"index-{gen:06d}.faiss"
    try:
        ldata = json.dumps(labels, separators=(",", ":")).encode("utf-8")
        _write_atomic(d / lname, ldata)
        m["labels"] = {"file": lname, "bytes": len(ldata), "sha256": hashlib.sha256(ldata).hexdigest()}
        if index is not None:
            ipath = d / iname
            tmp = ipath.with_name(f"{iname}.tmp-{os.getpid()}")
            faiss.write_index(index, str(tmp))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, ipath)
            m["index"]["file"] = {"file": iname, "bytes": ipath.stat().st_size, "sha256": sha256_file(ipath)}
        else:
            m["index"]["file"] = None
        m["generation"] = gen
        m["updated_at"] = now()
        m["count"] = {"vectors": int(n_vectors), "identities": int(n_identities)}
        fsync_dir(d)
        _write_atomic(d / MANIFEST, (json.dumps(m, indent=2) + "\n").encode("utf-8"))
    except (OSError, RuntimeError) as exc:
        m.clear()
        m.update(before)
        for name in (lname, iname, f"{lname}.tmp-{os.getpid()}", f"{iname}.tmp-{os.getpid()}",
                     f"{MANIFEST}.tmp-{os.getpid()}"):
            with contextlib.suppress(OSError):
                (d / name).unlink()
        if isinstance(exc, OSError) and exc.errno in _NOT_WRITABLE:
            raise not_writable(d, exc) from exc
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:200]
        raise GalleryError(d, f"cannot write the gallery ({why}); the previous generation is kept") from exc
    fsync_dir(d)
    sweep(d, keep={lname, m["index"]["file"]["file"] if m["index"]["file"] else ""})


def sweep(d: Path, keep: set[str]) -> None:
    """Delete other generations' files and leftovers of interrupted writes."""
    for f in d.iterdir():
        if GEN_FILE_RE.match(f.name) and f.name not in keep:
            try:
                f.unlink()
            except OSError as exc:
                log.warning("cannot remove stale gallery file %s: %s", f, exc)
    for f in d.glob(f"{MANIFEST}.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
