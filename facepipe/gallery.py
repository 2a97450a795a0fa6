"""The face gallery: a FAISS index of enrolled unit vectors, their labels, and the open-set rule.

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

Vectors are compared by inner product on L2-normalised vectors (cosine similarity, higher
is more similar). Index types: ``flat`` (exact ``IndexFlatIP`` in an ``IndexIDMap2``),
``ivf`` (``IndexIVFFlat`` with its own ids, approximate, trained k-means cells) and
``hnsw`` (``IndexHNSWFlat`` in an ``IndexIDMap2``, approximate graph search). ``auto``
uses ``flat`` below :data:`AUTO_HNSW_FROM` vectors and ``hnsw`` from there on.

The open-set decision: each person's score for a probe aggregates the similarities to
that person's enrolled vectors (``max``, or the ``mean`` of their top ``n``); the best
person is returned when the score reaches the gallery's threshold, else ``unknown``.
:func:`calibrate_threshold` chooses that threshold from impostor scores (probes of people
who are not enrolled) at a target false-positive identification rate (FPIR).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from facepipe.errors import DeviceUnavailableError, GalleryError, ShapeError
from facepipe.types import Match

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
FORMAT = "facepipe-gallery/1"
LABELS_FORMAT = "facepipe-gallery-labels/1"
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
AGGREGATIONS = ("max", "mean")
#: ``auto`` switches from exact ``flat`` to ``hnsw`` at this many vectors.
AUTO_HNSW_FROM = 200_000
#: The name every rejected probe gets; it cannot be enrolled.
UNKNOWN = "unknown"
RESERVED_NAMES = frozenset({UNKNOWN, "unknown_person", "no_persons_found"})
#: Threshold of a gallery that was never calibrated (cosine similarity).
DEFAULT_THRESHOLD = 0.5
DEFAULT_PARAMS: dict[str, dict[str, int]] = {
    "flat": {},
    "ivf": {"nlist": 0, "nprobe": 16},  # nlist 0: chosen from the size when trained
    "hnsw": {"M": 32, "efConstruction": 64, "efSearch": 128},
}
_GEN_FILE_RE = re.compile(r"^(index|labels)-(\d{6,})\.(faiss|json)(\.tmp-\d+)?$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
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


def check_vectors(vectors: np.ndarray, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    """Validate and L2-normalise a ``(N, D)`` float array; returns a contiguous float32 copy.

    Raises :class:`ShapeError` for a wrong shape, non-finite values or zero rows.
    """
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise ShapeError(f"{what} must be a 2-D array (N, D), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ShapeError(f"{what} have dimension {arr.shape[1]}, the gallery expects {dim}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ShapeError(f"{what} must be floating point, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32).copy()
    if arr.size and not np.isfinite(arr).all():
        raise ShapeError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1)
    if arr.shape[0] and (norms < 1e-12).any():
        raise ShapeError(f"{what}: {int((norms < 1e-12).sum())} row(s) have zero length")
    if arr.shape[0]:
        arr /= norms[:, None]
    return arr


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


# --------------------------------------------------------------------------- FAISS indexes


def _faiss() -> Any:
    import faiss

    return faiss


def _ivf_nlist(n: int, requested: int = 0) -> int:
    """IVF cell count: ``4*sqrt(n)`` (or the request), at most ``n // 39`` so k-means is fed."""
    want = requested if requested > 0 else int(round(4 * math.sqrt(max(n, 1))))
    return max(1, min(want, max(n // 39, 1)))


def build_index(kind: str, dim: int, vectors: np.ndarray, ids: np.ndarray,
                params: dict[str, int] | None = None) -> tuple[Any, dict[str, int]]:
    """Build a FAISS inner-product index of ``kind`` holding ``vectors`` under ``ids``.

    Returns the index and the parameters actually used (IVF records its ``nlist`` and
    how many vectors it was trained on). ``vectors`` must already be unit rows.
    """
    faiss = _faiss()
    p = dict(DEFAULT_PARAMS[kind])
    p.update(params or {})
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(p["efConstruction"])
        inner.hnsw.efSearch = int(p["efSearch"])
        index = faiss.IndexIDMap2(inner)
    elif kind == "ivf":
        n = len(vectors)
        if n == 0:
            raise GalleryError("<gallery>", "an IVF index needs vectors to train on; enrol someone first")
        nlist = _ivf_nlist(n, int(p.get("nlist_requested", 0)))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on at most 64 points per cell (a fixed random subset) for 10 iterations:
        # enough for well-placed cells, and trains 4,000 cells over 1M vectors in seconds
        cap = 64 * nlist
        train = vectors if n <= cap else vectors[np.random.default_rng(0).choice(n, cap, replace=False)]
        index.cp.niter = 10
        index.train(train)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = int(p["nprobe"])
        p["nlist"] = nlist
        p["trained_on"] = int(n)
        p.setdefault("nlist_requested", 0)
    else:
        raise GalleryError("<gallery>", f"unknown index type {kind!r}; valid: {', '.join(INDEX_TYPES)}")
    if len(vectors):
        index.add_with_ids(vectors, ids)
    return index, p


def _apply_search_params(index: Any, kind: str, params: dict[str, int]) -> None:
    faiss = _faiss()
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(params.get("nprobe", 16))
    elif kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = int(params.get("efSearch", 128))


def _resolve_kind(requested: str, n: int) -> str:
    if requested == "auto":
        return "hnsw" if n >= AUTO_HNSW_FROM else "flat"
    return requested


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """A threshold chosen at a target FPIR, with what it achieved on the calibration data."""

    threshold: float
    target_fpir: float
    fpir: float
    dir: float | None
    n_impostor: int
    n_genuine: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "threshold": self.threshold, "target_fpir": self.target_fpir, "fpir": self.fpir,
            "dir": self.dir, "n_impostor": self.n_impostor, "n_genuine": self.n_genuine,
        }


def calibrate_threshold(
    impostor_scores: Sequence[float] | np.ndarray,
    target_fpir: float,
    genuine_scores: Sequence[float] | np.ndarray | None = None,
    genuine_correct: Sequence[bool] | np.ndarray | None = None,
) -> Calibration:
    """The lowest threshold whose FPIR on ``impostor_scores`` is at most ``target_fpir``.

    ``impostor_scores`` are the best gallery scores of probes of people who are *not*
    enrolled (a probe is a false positive when its score reaches the threshold).
    With ``genuine_scores`` (best score of probes of enrolled people) and
    ``genuine_correct`` (whether the best identity was the right one), the detection
    and identification rate DIR = P(correct and score >= threshold) is reported too.
    """
    imp = np.asarray(impostor_scores, dtype=np.float64).ravel()
    if not 0.0 <= target_fpir < 1.0:
        raise ValueError(f"target FPIR must be in [0, 1), got {target_fpir}")
    if imp.size == 0:
        raise ValueError("calibration needs at least one impostor score")
    if not np.isfinite(imp).all():
        raise ValueError("impostor scores contain NaN or infinite values")
    desc = np.sort(imp)[::-1]
    allowed = int(math.floor(target_fpir * imp.size + 1e-9))
    if allowed >= imp.size:
        threshold = float(np.nextafter(desc[-1], -np.inf))
    else:
        # strictly above the (allowed+1)-th highest impostor score: at most `allowed` pass
        threshold = float(np.nextafter(np.float32(desc[allowed]), np.float32(np.inf)))
    fpir = float((imp >= threshold).mean())
    dir_rate: float | None = None
    n_gen = 0
    if genuine_scores is not None:
        gen = np.asarray(genuine_scores, dtype=np.float64).ravel()
        n_gen = int(gen.size)
        correct = (np.ones_like(gen, dtype=bool) if genuine_correct is None
                   else np.asarray(genuine_correct, dtype=bool).ravel())
        if correct.shape != gen.shape:
            raise ValueError("genuine_scores and genuine_correct differ in length")
        dir_rate = float(((gen >= threshold) & correct).mean()) if n_gen else None
    return Calibration(threshold, float(target_fpir), fpir, dir_rate, int(imp.size), n_gen)


def dir_fpir_curve(
    genuine_scores: np.ndarray, genuine_correct: np.ndarray, impostor_scores: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DIR and FPIR at every distinct threshold: returns ``(thresholds, fpir, dir)``."""
    gen = np.asarray(genuine_scores, dtype=np.float64)
    ok = np.asarray(genuine_correct, dtype=bool)
    imp = np.sort(np.asarray(impostor_scores, dtype=np.float64))
    thr = np.unique(np.concatenate([gen, imp]))[::-1]
    fpir = 1.0 - np.searchsorted(imp, thr, side="left") / max(imp.size, 1)
    gen_ok = np.sort(gen[ok])
    dir_ = (gen_ok.size - np.searchsorted(gen_ok, thr, side="left")) / max(gen.size, 1)
    return thr, fpir, dir_


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Decision:
    """The open-set answer for one probe: ``name`` is a person or ``"unknown"``.

    ``score`` is the best person's aggregated similarity (also when rejected) or
    ``nan`` for an empty gallery; ``candidates`` are the top-k people, best first.
    """

    name: str
    score: float
    candidates: tuple[Match, ...] = field(default_factory=tuple)

    @property
    def known(self) -> bool:
        """Whether the probe was accepted as an enrolled person."""
        return self.name != UNKNOWN


# --------------------------------------------------------------------------- the gallery


class _Lock:
    """An ``fcntl.flock`` on ``DIR/.lock`` with a timeout and a clear error."""

    def __init__(self, directory: Path, exclusive: bool, timeout: float) -> None:
        self.path = directory / LOCK_FILE
        self.exclusive = exclusive
        self.timeout = timeout
        self.fd: int | None = None

    def __enter__(self) -> "_Lock":
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if not self.exclusive and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                return self  # read-only gallery: nobody can be writing it through us
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


class Gallery:
    """Enrolled face vectors with names, searched by FAISS, decided open-set.

    Open one with :meth:`open` (read-only snapshot) or change one inside
    :meth:`edit` (exclusive lock, committed atomically on leaving the block)::

        with Gallery.edit("people/", embedder_id=emb.embedder_id, dim=emb.dim) as g:
            g.add(vectors, ["ada"] * len(vectors), sources=paths)
        g = Gallery.open("people/", embedder_id=emb.embedder_id)
        decisions = g.identify(probe_vectors, top_k=3)
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], index: Any,
                 ids: np.ndarray, person: np.ndarray, names: list[str],
                 sources: list[str | None], hashes: list[str | None], next_id: int) -> None:
        self.directory = directory
        self.manifest = manifest
        self.index = index
        self._ids = ids              # sorted int64 external ids
        self._person = person        # int32 person index per id
        self._names = names          # person index -> name
        self._sources = sources
        self._hashes = hashes
        self._next_id = next_id
        self._dirty = False
        self._rebuild_needed = False
        self._search_index: Any = None   # GPU copy (searched with internal positions)
        self._search_kind = "cpu"
        self._refresh_people()

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.manifest["dim"])

    @property
    def embedder_id(self) -> str:
        """The embedder whose vectors this gallery holds."""
        return str(self.manifest["embedder"]["id"])

    @property
    def index_type(self) -> str:
        """The FAISS index type in use: flat, ivf or hnsw."""
        return str(self.manifest["index"]["type"])

    @property
    def threshold(self) -> float:
        """The open-set acceptance threshold (cosine similarity)."""
        return float(self.manifest["decision"]["threshold"])

    @property
    def aggregation(self) -> tuple[str, int]:
        """Per-identity score aggregation ``(method, n)``."""
        d = self.manifest["decision"]
        return str(d["aggregation"]), int(d.get("aggregation_n", 1))

    @property
    def generation(self) -> int:
        """The committed generation number this snapshot was loaded from."""
        return int(self.manifest["generation"])

    def __len__(self) -> int:
        return int(self._ids.size)

    def people(self) -> dict[str, int]:
        """Enrolled names with their number of vectors, sorted by name."""
        counts = np.bincount(self._person, minlength=len(self._names)) if self._person.size else \
            np.zeros(len(self._names), dtype=np.int64)
        return {n: int(c) for n, c in sorted(zip(self._names, counts)) if c > 0}

    def sources(self, name: str) -> list[str | None]:
        """Source files of one person's vectors."""
        p = self._name_index.get(name)
        if p is None:
            return []
        return [self._sources[i] for i in np.flatnonzero(self._person == p)]

    def has_source(self, name: str, sha256: str) -> bool:
        """Whether ``name`` already has a vector from an image with this content hash."""
        return (name, sha256) in self._known_hashes

    def _refresh_people(self) -> None:
        self._name_index = {n: i for i, n in enumerate(self._names)}
        self._known_hashes = {(self._names[p], h) for p, h in zip(self._person.tolist(), self._hashes) if h}
        self._members: dict[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ creation / loading

    @classmethod
    def _new(cls, directory: Path, dim: int, embedder_id: str, embedder_sha256: str | None,
             index_type: str, params: dict[str, dict[str, int]] | None, threshold: float,
             aggregation: str, aggregation_n: int) -> "Gallery":
        if index_type not in INDEX_TYPES:
            raise GalleryError(directory, f"unknown index type {index_type!r}; valid: {', '.join(INDEX_TYPES)}")
        if aggregation not in AGGREGATIONS:
            raise GalleryError(directory, f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
        if not isinstance(dim, int) or dim < 1:
            raise GalleryError(directory, f"invalid vector dimension {dim!r}")
        all_params = {k: dict(v) for k, v in DEFAULT_PARAMS.items()}
        for k, v in (params or {}).items():
            all_params.setdefault(k, {}).update(v)
        if all_params["ivf"].get("nlist"):
            all_params["ivf"]["nlist_requested"] = int(all_params["ivf"]["nlist"])
        kind = _resolve_kind(index_type, 0)
        if kind == "ivf":
            index = None  # trained on first commit with vectors
        else:
            index, _ = build_index(kind, dim, np.zeros((0, dim), np.float32), np.zeros(0, np.int64),
                                   all_params[kind])
        manifest = {
            "format": FORMAT,
            "generation": 0,
            "created_at": _now(),
            "updated_at": _now(),
            "embedder": {"id": embedder_id, "checkpoint_sha256": embedder_sha256},
            "dim": dim,
            "metric": "inner_product",
            "normalized": True,
            "index": {"requested": index_type, "type": kind, "params": all_params},
            "decision": {
                "aggregation": aggregation, "aggregation_n": int(aggregation_n),
                "threshold": float(threshold),
                "calibration": {"method": "default", "note": "not calibrated; run facepipe gallery calibrate"},
            },
            "count": {"vectors": 0, "identities": 0},
        }
        g = cls(directory, manifest, index, np.zeros(0, np.int64), np.zeros(0, np.int32), [], [], [], 0)
        g._dirty = True
        return g

    @classmethod
    def create(cls, directory: str | os.PathLike[str], dim: int, embedder_id: str,
               embedder_sha256: str | None = None, index_type: str = "auto",
               params: dict[str, dict[str, int]] | None = None,
               threshold: float = DEFAULT_THRESHOLD, aggregation: str = "max",
               aggregation_n: int = 3) -> "Gallery":
        """Create an empty gallery directory; refuses one that already has a manifest."""
        d = Path(directory)
        with cls.edit(d, embedder_id=embedder_id, dim=dim, embedder_sha256=embedder_sha256,
                      index_type=index_type, params=params, threshold=threshold,
                      aggregation=aggregation, aggregation_n=aggregation_n, create="only") as g:
            pass
        return g

    @classmethod
    def open(cls, directory: str | os.PathLike[str], embedder_id: str | None = None,
             verify: bool = True, lock_timeout: float = 600.0) -> "Gallery":
        """Load the current generation of a gallery (a read-only snapshot).

        With ``embedder_id`` a gallery built by another embedder is refused. With
        ``verify`` (default) the index and label files are checked against the sha256
        recorded in the manifest, so truncated or corrupted files are refused.
        """
        d = Path(directory)
        if not (d / MANIFEST).is_file():
            if not d.exists():
                raise GalleryError(d, "no such gallery directory")
            raise GalleryError(d, f"not a facepipe gallery (no {MANIFEST})")
        with _Lock(d, exclusive=False, timeout=lock_timeout):
            g = cls._load(d, verify)
        g.check_embedder(embedder_id)
        return g

    @classmethod
    @contextlib.contextmanager
    def edit(cls, directory: str | os.PathLike[str], embedder_id: str | None = None,
             dim: int | None = None, embedder_sha256: str | None = None,
             index_type: str = "auto", params: dict[str, dict[str, int]] | None = None,
             threshold: float = DEFAULT_THRESHOLD, aggregation: str = "max", aggregation_n: int = 3,
             create: bool | str = True, lock_timeout: float = 600.0) -> Iterator["Gallery"]:
        """Change a gallery under an exclusive lock; commits a new generation on success.

        The latest generation is loaded *after* the lock is taken, so concurrent
        writers see each other's changes. ``create=True`` makes a new gallery (with
        ``dim``, ``embedder_id`` and the other settings) when the directory has none;
        ``create="only"`` refuses an existing one. An exception inside the block
        discards every change.
        """
        d = Path(directory)
        if not create and not (d / MANIFEST).is_file():
            raise GalleryError(d, "no such gallery directory" if not d.exists()
                               else f"not a facepipe gallery (no {MANIFEST})")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GalleryError(d, f"cannot create gallery directory ({exc.strerror or exc})") from exc
        if not d.is_dir():
            raise GalleryError(d, "exists and is not a directory")
        with _Lock(d, exclusive=True, timeout=lock_timeout):
            if (d / MANIFEST).exists():
                if create == "only":
                    raise GalleryError(d, "a gallery already exists here")
                g = cls._load(d, verify=True)
                g.check_embedder(embedder_id)
            else:
                if not create:
                    raise GalleryError(d, f"not a facepipe gallery (no {MANIFEST})")
                if dim is None or not embedder_id:
                    raise GalleryError(d, "a new gallery needs the embedder id and vector dimension")
                g = cls._new(d, dim, embedder_id, embedder_sha256, index_type, params,
                             threshold, aggregation, aggregation_n)
            yield g
            if g._dirty:
                g._commit()

    @classmethod
    def _load(cls, d: Path, verify: bool) -> "Gallery":
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
        cls._verify_file(lpath, lab_meta, verify, "label file")
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
            cls._verify_file(ipath, idx_meta, verify, "index file")
            faiss = _faiss()
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
            _apply_search_params(index, kind, params)
        elif ids.size:
            raise GalleryError(mpath, "manifest lists vectors but no index file")
        return cls(d, manifest, index, ids, person, names, sources, hashes, next_id)

    @staticmethod
    def _verify_file(path: Path, meta: dict[str, Any], verify: bool, what: str) -> None:
        if not path.is_file():
            raise GalleryError(path, f"gallery {what} is missing")
        size = path.stat().st_size
        if size != int(meta["bytes"]):
            raise GalleryError(path, f"gallery {what} is truncated or changed "
                               f"({size} bytes, manifest says {meta['bytes']})")
        if verify and sha256_file(path) != meta["sha256"]:
            raise GalleryError(path, f"gallery {what} is corrupt (sha256 differs from the manifest)")

    def check_embedder(self, embedder_id: str | None) -> None:
        """Refuse (GalleryError) when ``embedder_id`` differs from the gallery's."""
        if embedder_id is not None and embedder_id != self.embedder_id:
            raise GalleryError(self.directory,
                               f"built by embedder {self.embedder_id!r}, not {embedder_id!r}; vectors "
                               "from different embedders are not comparable (enrol into a new gallery)")

    # ------------------------------------------------------------------ changes

    def add(self, vectors: np.ndarray, names: Sequence[str], sources: Sequence[str | None] | None = None,
            hashes: Sequence[str | None] | None = None) -> np.ndarray:
        """Add one vector per name (several per person are fine); returns their new ids.

        Only inside :meth:`edit`; the change is written when the block ends.
        """
        x = check_vectors(vectors, self.dim)
        n = x.shape[0]
        if len(names) != n:
            raise ShapeError(f"{n} vectors but {len(names)} names")
        sources = list(sources) if sources is not None else [None] * n
        hashes = list(hashes) if hashes is not None else [None] * n
        if len(sources) != n or len(hashes) != n:
            raise ShapeError(f"{n} vectors but {len(sources)} sources / {len(hashes)} hashes")
        if n == 0:
            return np.zeros(0, np.int64)
        pidx = np.empty(n, np.int32)
        for i, name in enumerate(names):
            name = check_name(name)
            p = self._name_index.get(name)
            if p is None:
                p = len(self._names)
                self._names.append(name)
                self._name_index[name] = p
            pidx[i] = p
        new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        kind = self.index_type
        if self.index is None:  # an IVF gallery's first vectors: train its cells on them
            self.index, used = build_index(kind, self.dim, x, new_ids, self.manifest["index"]["params"].get(kind))
            self.manifest["index"]["params"][kind] = used
        else:
            self.index.add_with_ids(x, new_ids)
        self._next_id += n
        self._ids = np.concatenate([self._ids, new_ids])
        self._person = np.concatenate([self._person, pidx])
        self._sources.extend(None if s is None else str(s) for s in sources)
        self._hashes.extend(hashes)
        self._refresh_people()
        self._dirty = True
        log.debug("added %d vector(s) to %s index", n, kind)
        return new_ids

    def remove(self, names: Sequence[str]) -> int:
        """Remove every vector of the named people; returns how many were removed.

        Unknown names raise :class:`GalleryError`. Only inside :meth:`edit`.
        """
        missing = [n for n in names if n not in self._name_index or not (self._person == self._name_index[n]).any()]
        if missing:
            raise GalleryError(self.directory, f"not enrolled: {', '.join(sorted(set(missing)))}")
        pset = np.asarray(sorted({self._name_index[n] for n in names}), dtype=np.int32)
        drop = np.isin(self._person, pset)
        drop_ids = self._ids[drop]
        if self.index is not None and drop_ids.size:
            if self.index_type == "hnsw":
                # HNSW graphs cannot delete: rebuild the graph over the people who stay
                kind = self.index_type
                keep_ids = self._ids[~drop]
                self.index, used = build_index(kind, self.dim, self.vectors(keep_ids), keep_ids,
                                               self.manifest["index"]["params"].get(kind))
                self.manifest["index"]["params"][kind] = used
                self._search_index = None
            else:
                removed = self.index.remove_ids(drop_ids)
                if removed != drop_ids.size:
                    raise GalleryError(self.directory, f"FAISS removed {removed} of {drop_ids.size} vectors")
        keep = ~drop
        self._ids = self._ids[keep]
        self._person = self._person[keep]
        self._sources = [s for s, k in zip(self._sources, keep) if k]
        self._hashes = [h for h, k in zip(self._hashes, keep) if k]
        self._compact_names()
        self._dirty = True
        return int(drop.sum())

    def _compact_names(self) -> None:
        used = np.unique(self._person)
        remap = np.full(len(self._names), -1, np.int32)
        remap[used] = np.arange(used.size, dtype=np.int32)
        self._names = [self._names[i] for i in used]
        self._person = remap[self._person] if self._person.size else self._person
        self._refresh_people()

    def set_threshold(self, threshold: float, calibration: dict[str, Any],
                      aggregation: str | None = None, aggregation_n: int | None = None) -> None:
        """Store a threshold and its provenance (only inside :meth:`edit`)."""
        d = self.manifest["decision"]
        if aggregation is not None:
            if aggregation not in AGGREGATIONS:
                raise GalleryError(self.directory, f"unknown aggregation {aggregation!r}")
            d["aggregation"] = aggregation
        if aggregation_n is not None:
            d["aggregation_n"] = int(aggregation_n)
        d["threshold"] = float(threshold)
        d["calibration"] = dict(calibration)
        self._dirty = True

    def vectors(self, ids: np.ndarray | None = None) -> np.ndarray:
        """The stored unit vectors for ``ids`` (default: all, in id order)."""
        ids = self._ids if ids is None else np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.index.reconstruct_batch(ids)

    # ------------------------------------------------------------------ commit

    def _commit(self) -> None:
        faiss = _faiss()
        d = self.directory
        m = self.manifest
        n = int(self._ids.size)
        requested = m["index"]["requested"]
        kind = _resolve_kind(requested, n)
        params = m["index"]["params"]
        ivf_p = params.get("ivf", {})
        if kind != m["index"]["type"]:
            self._rebuild_needed = True
        if kind == "ivf" and n and ivf_p.get("trained_on") and n >= 8 * int(ivf_p["trained_on"]):
            self._rebuild_needed = True  # grown far past what its cells were trained on
        if self._rebuild_needed and n:
            log.info("building %s index over %d vectors", kind, n)
            vecs = self.vectors(self._ids)
            self.index, used = build_index(kind, self.dim, vecs, self._ids, params.get(kind))
            params[kind] = used
        elif self._rebuild_needed and kind == "ivf":
            self.index = None  # an empty IVF index is trained again by the next enrolment
        elif self._rebuild_needed:
            self.index, params[kind] = build_index(kind, self.dim, np.zeros((0, self.dim), np.float32),
                                                   np.zeros(0, np.int64), params.get(kind))
        self._rebuild_needed = False
        m["index"]["type"] = kind

        gen = int(m["generation"]) + 1
        labels = {
            "format": LABELS_FORMAT,
            "next_id": int(self._next_id),
            "people": self._names,
            "entries": [[int(i), int(p), s, h] for i, p, s, h in
                        zip(self._ids.tolist(), self._person.tolist(), self._sources, self._hashes)],
        }
        lname = f"labels-{gen:06d}.json"
        ldata = json.dumps(labels, separators=(",", ":")).encode("utf-8")
        _write_atomic(d / lname, ldata)
        m["labels"] = {"file": lname, "bytes": len(ldata), "sha256": hashlib.sha256(ldata).hexdigest()}
        if self.index is not None:
            iname = f"index-{gen:06d}.faiss"
            ipath = d / iname
            tmp = ipath.with_name(f"{iname}.tmp-{os.getpid()}")
            faiss.write_index(self.index, str(tmp))
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
        m["updated_at"] = _now()
        m["count"] = {"vectors": n, "identities": len(self.people())}
        _fsync_dir(d)
        _write_atomic(d / MANIFEST, (json.dumps(m, indent=2) + "\n").encode("utf-8"))
        _fsync_dir(d)
        self._dirty = False
        self._search_index = None
        self._sweep(keep={lname, m["index"]["file"]["file"] if m["index"]["file"] else ""})

    def _sweep(self, keep: set[str]) -> None:
        """Delete other generations' files and leftovers of interrupted writes."""
        for f in self.directory.iterdir():
            if _GEN_FILE_RE.match(f.name) and f.name not in keep:
                try:
                    f.unlink()
                except OSError as exc:
                    log.warning("cannot remove stale gallery file %s: %s", f, exc)
        for f in self.directory.glob(f"{MANIFEST}.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    # ------------------------------------------------------------------ devices

    def to_device(self, device: str = "cpu") -> str:
        """Search on ``cpu``, ``cuda``/``cuda:N`` or ``auto``; returns where search now runs.

        GPU search needs a faiss build with GPU support (``faiss-gpu``); asking for
        CUDA without one raises :class:`DeviceUnavailableError`. FAISS has no GPU
        HNSW, so an HNSW gallery is searched exactly (brute force) on the GPU.
        """
        spec = (device or "auto").strip().lower()
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", spec):
            raise DeviceUnavailableError(f"invalid device {device!r}; use auto, cpu, cuda or cuda:N")
        faiss = _faiss()
        n_gpu = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
        has_gpu = n_gpu > 0 and hasattr(faiss, "StandardGpuResources")
        if spec == "cpu" or (spec == "auto" and not has_gpu):
            self._search_index, self._search_kind = None, "cpu"
            return "cpu"
        if not has_gpu:
            why = ("this faiss build has no GPU support (faiss-cpu); install faiss-gpu, see docs/gallery.md"
                   if not hasattr(faiss, "StandardGpuResources") else "faiss sees no CUDA GPU")
            raise DeviceUnavailableError(f"device {spec!r} requested for gallery search but {why}")
        gpu = int(spec.split(":")[1]) if ":" in spec else 0
        if gpu >= n_gpu:
            raise DeviceUnavailableError(f"device {spec!r} requested but faiss sees only {n_gpu} GPU(s)")
        if self.index is None or len(self) == 0:
            self._search_index, self._search_kind = None, f"cuda:{gpu}"
            return f"cuda:{gpu}"
        res = faiss.StandardGpuResources()
        kind = self.index_type
        if kind == "ivf":
            inner = faiss.extract_index_ivf(self.index)
            gpu_index = faiss.index_cpu_to_gpu(res, gpu, inner)
            positions = None  # IVF keeps its own (external) ids
        else:
            flat = faiss.IndexFlatIP(self.dim)
            flat.add(self.vectors(self._ids))
            gpu_index = faiss.index_cpu_to_gpu(res, gpu, flat)
            positions = self._ids
        self._gpu_res = res
        self._search_index = (gpu_index, positions)
        self._search_kind = f"cuda:{gpu}"
        return self._search_kind

    @property
    def search_device(self) -> str:
        """Where :meth:`search` runs: ``cpu`` or ``cuda:N``."""
        return self._search_kind

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw nearest-vector search: ``(scores, ids)`` of shape ``(n, k)``; id -1 pads."""
        q = check_vectors(queries, self.dim, "queries")
        n = q.shape[0]
        k = int(k)
        if k < 1:
            raise ValueError("k must be at least 1")
        if len(self) == 0 or n == 0:
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        kk = min(k, len(self))
        if self._search_index is not None:
            gpu_index, positions = self._search_index
            D, I = gpu_index.search(q, kk)
            if positions is not None:
                I = np.where(I >= 0, positions[np.clip(I, 0, None)], -1)
        else:
            D, I = self.index.search(q, kk)
        if kk < k:
            D = np.pad(D, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            I = np.pad(I, ((0, 0), (0, k - kk)), constant_values=-1)
        D = np.where(I >= 0, D, -np.inf).astype(np.float32)
        return D, I

    def _member_ids(self, p: int) -> np.ndarray:
        if self._members is None:
            order = np.argsort(self._person, kind="stable")
            bounds = np.searchsorted(self._person[order], np.arange(len(self._names) + 1))
            self._members = {i: self._ids[order[bounds[i]:bounds[i + 1]]] for i in range(len(self._names))}
        return self._members[p]

    def rank(self, queries: np.ndarray, top_k: int = 1) -> list[list[Match]]:
        """The ``top_k`` people per query, best first, by the gallery's aggregation."""
        q = check_vectors(queries, self.dim, "queries")
        method, agg_n = self.aggregation
        n_people = len(self.people())
        top_k = max(1, min(int(top_k), max(n_people, 1)))
        out: list[list[Match]] = [[] for _ in range(q.shape[0])]
        if len(self) == 0 or q.shape[0] == 0:
            return out
        depth = min(len(self), max(4 * top_k, 16 if method == "max" else 4 * top_k * agg_n))
        todo = np.arange(q.shape[0])
        while todo.size:
            D, I = self.search(q[todo], depth)
            retry = []
            for row, qi in enumerate(todo):
                ids = I[row]
                valid = ids >= 0
                ids, sc = ids[valid], D[row][valid]
                persons = self._person[np.searchsorted(self._ids, ids)]
                _, first = np.unique(persons, return_index=True)
                order = np.sort(first)
                distinct = persons[order]
                if distinct.size < top_k and depth < len(self):
                    retry.append(qi)
                    continue
                if method == "max":
                    # neighbours come best first: a person's first hit is their maximum
                    out[qi] = [Match(self._names[p], float(sc[j])) for p, j in
                               zip(distinct[:top_k].tolist(), order[:top_k].tolist())]
                else:
                    # re-score every retrieved candidate exactly over all their vectors
                    scored = []
                    for p in distinct.tolist():
                        v = self.vectors(self._member_ids(p))
                        s = np.sort(v @ q[qi])[::-1][:agg_n]
                        scored.append((float(s.mean()), p))
                    scored.sort(key=lambda t: -t[0])
                    out[qi] = [Match(self._names[p], s) for s, p in scored[:top_k]]
            todo = np.asarray(retry, dtype=np.int64)
            depth = min(len(self), depth * 4)
        return out

    def identify(self, queries: np.ndarray, top_k: int = 1, threshold: float | None = None) -> list[Decision]:
        """Open-set decision per query: the best person if their score reaches the threshold."""
        t = self.threshold if threshold is None else float(threshold)
        decisions = []
        for cands in self.rank(queries, top_k):
            if not cands:
                decisions.append(Decision(UNKNOWN, float("nan"), ()))
                continue
            best = cands[0]
            name = best.name if best.score >= t else UNKNOWN
            decisions.append(Decision(name, best.score, tuple(cands)))
        return decisions

    def calibration_scores(self, genuine: np.ndarray, genuine_names: Sequence[str],
                           impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Best-person scores for calibration: ``(genuine_scores, genuine_correct, impostor_scores)``.

        ``genuine`` are probes of enrolled people (not the enrolled images themselves)
        with their true names; ``impostor`` are probes of people who are not enrolled.
        """
        gen = check_vectors(genuine, self.dim, "genuine probes") if len(genuine) else np.zeros((0, self.dim), np.float32)
        imp = check_vectors(impostor, self.dim, "impostor probes") if len(impostor) else np.zeros((0, self.dim), np.float32)
        if len(genuine_names) != gen.shape[0]:
            raise ShapeError(f"{gen.shape[0]} genuine probes but {len(genuine_names)} names")
        not_enrolled = sorted(set(genuine_names) - set(self.people()))
        if not_enrolled:
            raise GalleryError(self.directory, "genuine probes of people who are not enrolled: "
                               + ", ".join(not_enrolled[:5]) + (" ..." if len(not_enrolled) > 5 else ""))
        g_best = self.rank(gen, 1) if gen.shape[0] else []
        i_best = self.rank(imp, 1) if imp.shape[0] else []
        gs = np.asarray([c[0].score for c in g_best], dtype=np.float64)
        gc = np.asarray([c[0].name == n for c, n in zip(g_best, genuine_names)], dtype=bool)
        isc = np.asarray([c[0].score for c in i_best], dtype=np.float64)
        return gs, gc, isc

    def info(self) -> dict[str, Any]:
        """A summary for ``facepipe gallery info``."""
        m = self.manifest
        return {
            "directory": str(self.directory),
            "generation": self.generation,
            "embedder": m["embedder"],
            "dim": self.dim,
            "metric": m["metric"],
            "index": {"type": self.index_type, "requested": m["index"]["requested"],
                      "params": m["index"]["params"].get(self.index_type, {})},
            "vectors": len(self),
            "identities": len(self.people()),
            "decision": m["decision"],
            "created_at": m["created_at"],
            "updated_at": m["updated_at"],
        }
