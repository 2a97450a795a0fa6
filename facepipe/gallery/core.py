"""The :class:`Gallery`: enrolled unit vectors with names, searched by FAISS, decided open-set.

Storage (directory layout, locking, atomic generations) lives in
:mod:`facepipe.gallery.storage`, FAISS index building in :mod:`facepipe.gallery.index`,
the search engines (FAISS CPU/GPU, exact torch on a GPU) in :mod:`facepipe.gallery.search`,
and the open-set rule and calibration in :mod:`facepipe.gallery.decision`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from facepipe.errors import GalleryError, ShapeError
from facepipe.gallery.decision import AGGREGATIONS, DEFAULT_TARGET_FPIR, DEFAULT_THRESHOLD, MODES, Decision
from facepipe.gallery.index import DEFAULT_PARAMS, INDEX_TYPES, build_index, check_vectors, resolve_kind
from facepipe.gallery.names import UNKNOWN, check_name
from facepipe.gallery.cohort import Cohort
from facepipe.gallery.openset import ImpostorModel, comparisons
from facepipe.gallery.search import Searcher, SearchPlan, build_searcher, plan_search
from facepipe.gallery.storage import (
    LABELS_FORMAT, MANIFEST, Lock, check_writable, new_manifest, read_snapshot, refuse_orphans,
    write_generation,
)
from facepipe.types import Match

log = logging.getLogger(__name__)


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
                 sources: list[str | None], hashes: list[str | None], next_id: int,
                 penalties: tuple[str, np.ndarray] | None = None) -> None:
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
        self._impostor_model: ImpostorModel | None = None
        self._penalty: np.ndarray | None = None  # cohort penalty per id (self._ids order), lazily
        self._stored_penalty = penalties  # (cohort fingerprint, values) from the label file
        self._search_request = ("cpu", "auto", "fp32")  # (device, engine, precision) of to_device
        self._search_plan: SearchPlan | None = None
        self._searcher: Searcher | None = None          # built on first search, dropped on changes
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
    def mode(self) -> str:
        """How the threshold is set: ``auto`` (derived from the embedder's impostor model for
        the target FPIR, re-derived on every change), ``calibrated`` (``gallery calibrate``),
        ``manual`` (given by the user) or ``default`` (the fixed default, no model)."""
        d = self.manifest["decision"]
        if "mode" in d:
            return str(d["mode"])
        return "calibrated" if d.get("calibration", {}).get("method") == "fpir" else "default"

    @property
    def target_fpir(self) -> float | None:
        """The false-positive identification rate the threshold aims at (``None``: no target)."""
        t = self.manifest["decision"].get("target_fpir")
        return None if t is None else float(t)

    @property
    def impostor_model(self) -> ImpostorModel | None:
        """The embedder's impostor model stored in the manifest (``None`` without one)."""
        rec = self.manifest["decision"].get("impostor_model")
        if rec is None:
            return None
        if self._impostor_model is None:
            try:
                self._impostor_model = ImpostorModel.from_dict(rec)
            except ValueError as exc:
                raise GalleryError(self.directory / MANIFEST, f"bad impostor model in the manifest ({exc})") from exc
        return self._impostor_model

    @property
    def cohort(self) -> Cohort | None:
        """The cohort of the gallery's impostor model (``None`` without one): enrolled vectors
        in crowded parts of face space get a penalty (:mod:`facepipe.gallery.cohort`)."""
        model = self.impostor_model
        return None if model is None else model.cohort

    def penalties(self) -> np.ndarray:
        """The cohort penalty of every enrolled vector, in :meth:`vectors` (id) order; zeros
        without a cohort. Stored in the label file with the cohort's fingerprint (computed
        again only for another cohort), new vectors' as they are added."""
        cohort = self.cohort
        if cohort is None:
            return np.zeros(len(self), np.float32)
        if self._penalty is None and self._stored_penalty is not None:
            fp, values = self._stored_penalty
            if fp == cohort.fingerprint and values.size == len(self):
                self._penalty = values
        if self._penalty is None or self._penalty.size != len(self):
            self._penalty = np.concatenate(
                [cohort.penalties(self.vectors(self._ids[i:i + 65536])) for i in range(0, len(self), 65536)]
                or [np.zeros(0, np.float32)])
        return self._penalty

    @property
    def n_comparisons(self) -> int:
        """The chances a stranger's probe has to be falsely matched: enrolled vectors
        (``max`` aggregation) or people (``mean``), at least 1."""
        return comparisons(self.aggregation[0], len(self), len(self.people()))

    def operating_point(self, threshold: float | None = None) -> dict[str, Any]:
        """The decision rule in force, for outputs: ``threshold`` (similarity), ``tolerance``
        (``1 − threshold``), ``mode``, ``target_fpir``, ``n_comparisons`` and, when the gallery
        has an impostor model, ``expected_fpir`` (the model's estimate at this threshold).

        ``threshold`` given (a user's ``--tolerance`` for one run) overrides the gallery's:
        mode ``override``, no target, and the FPIR the impostor model expects at it."""
        model = self.impostor_model
        n = self.n_comparisons
        override = threshold is not None and float(threshold) != self.threshold
        thr = float(threshold) if override else self.threshold
        out: dict[str, Any] = {
            "threshold": round(thr, 6), "tolerance": round(1.0 - thr, 6),
            "mode": "override" if override else self.mode,
            "target_fpir": None if override else self.target_fpir, "n_comparisons": n,
            "aggregation": self.aggregation[0],
            "expected_fpir": None if model is None else round(model.expected_fpir(thr, n), 6),
        }
        return out

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

    def names_with_source(self, sha256: str) -> list[str]:
        """The people who have a vector from an image with this content hash, sorted."""
        return sorted(n for n, h in self._known_hashes if h == sha256)

    @staticmethod
    def check_editable(directory: str | os.PathLike[str], create: bool = True) -> None:
        """Raise :class:`GalleryError` now, before any work, when :meth:`edit` would refuse:
        not a directory, gallery files without a manifest, no gallery (``create=False``),
        or a directory that is not writable ("gallery directory is not writable")."""
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise GalleryError(d, "exists and is not a directory")
        if not (d / MANIFEST).is_file():
            if not create and not d.exists():
                raise GalleryError(d, "no such gallery directory")
            refuse_orphans(d)
            if not create:
                raise GalleryError(d, f"not a facepipe gallery (no {MANIFEST})")
        check_writable(d)

    def _refresh_people(self) -> None:
        self._name_index = {n: i for i, n in enumerate(self._names)}
        self._known_hashes = {(self._names[p], h) for p, h in zip(self._person.tolist(), self._hashes) if h}
        self._members: dict[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ creation / loading

    @classmethod
    def _new(cls, directory: Path, dim: int, embedder_id: str, embedder_sha256: str | None,
             index_type: str, params: dict[str, dict[str, int]] | None, threshold: float | None,
             aggregation: str, aggregation_n: int, impostor_model: ImpostorModel | dict[str, Any] | None = None,
             target_fpir: float | None = None) -> "Gallery":
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
        kind = resolve_kind(index_type, 0)
        if kind == "ivf":
            index = None  # trained on first commit with vectors
        else:
            index, _ = build_index(kind, dim, np.zeros((0, dim), np.float32), np.zeros(0, np.int64),
                                   all_params[kind])
        if threshold is not None:
            mode, note = "manual", "threshold given when the gallery was created"
        else:
            mode, note = "default", "fixed default: the embedder has no impostor model; run facepipe gallery calibrate"
        decision = {
            "aggregation": aggregation, "aggregation_n": int(aggregation_n),
            "threshold": float(DEFAULT_THRESHOLD if threshold is None else threshold),
            "mode": mode, "target_fpir": None,
            "calibration": {"method": mode, "note": note},
        }
        manifest = new_manifest(embedder_id, embedder_sha256, dim, index_type, kind, all_params, decision)
        g = cls(directory, manifest, index, np.zeros(0, np.int64), np.zeros(0, np.int32), [], [], [], 0)
        if impostor_model is not None and threshold is None:
            g.use_impostor_model(impostor_model, target_fpir)
        g._dirty = True
        return g

    @classmethod
    def create(cls, directory: str | os.PathLike[str], dim: int, embedder_id: str,
               embedder_sha256: str | None = None, index_type: str = "auto",
               params: dict[str, dict[str, int]] | None = None,
               threshold: float | None = None, aggregation: str = "max",
               aggregation_n: int = 3, impostor_model: ImpostorModel | dict[str, Any] | None = None,
               target_fpir: float | None = None) -> "Gallery":
        """Create an empty gallery directory; refuses one that already has a manifest.

        The threshold: ``threshold`` when given (mode ``manual``); else derived from
        ``impostor_model`` for ``target_fpir`` (mode ``auto``); else the fixed default.
        """
        d = Path(directory)
        with cls.edit(d, embedder_id=embedder_id, dim=dim, embedder_sha256=embedder_sha256,
                      index_type=index_type, params=params, threshold=threshold,
                      aggregation=aggregation, aggregation_n=aggregation_n, create="only",
                      impostor_model=impostor_model, target_fpir=target_fpir) as g:
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
            if not d.is_dir():
                raise GalleryError(d, "not a directory")
            refuse_orphans(d)
            raise GalleryError(d, f"not a facepipe gallery (no {MANIFEST})")
        with Lock(d, exclusive=False, timeout=lock_timeout):
            g = cls._load(d, verify)
        g.check_embedder(embedder_id)
        return g

    @classmethod
    @contextlib.contextmanager
    def edit(cls, directory: str | os.PathLike[str], embedder_id: str | None = None,
             dim: int | None = None, embedder_sha256: str | None = None,
             index_type: str = "auto", params: dict[str, dict[str, int]] | None = None,
             threshold: float | None = None, aggregation: str = "max", aggregation_n: int = 3,
             create: bool | str = True, lock_timeout: float = 600.0,
             impostor_model: ImpostorModel | dict[str, Any] | None = None,
             target_fpir: float | None = None) -> Iterator["Gallery"]:
        """Change a gallery under an exclusive lock; commits a new generation on success.

        The latest generation is loaded *after* the lock is taken, so concurrent
        writers see each other's changes. ``create=True`` makes a new gallery (with
        ``dim``, ``embedder_id`` and the other settings) when the directory has none;
        ``create="only"`` refuses an existing one. An exception inside the block
        discards every change. ``threshold``, ``impostor_model`` and ``target_fpir``
        set a new gallery's decision rule (see :meth:`create`).
        """
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise GalleryError(d, "exists and is not a directory")
        if not create and not (d / MANIFEST).is_file():
            if not d.exists():
                raise GalleryError(d, "no such gallery directory")
            refuse_orphans(d)
            raise GalleryError(d, f"not a facepipe gallery (no {MANIFEST})")
        check_writable(d)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GalleryError(d, f"cannot create gallery directory ({exc.strerror or exc})") from exc
        if not d.is_dir():
            raise GalleryError(d, "exists and is not a directory")
        with Lock(d, exclusive=True, timeout=lock_timeout):
            check_writable(d)
            if not (d / MANIFEST).exists():
                refuse_orphans(d)  # under the lock: another writer may have been mid-creation
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
                             threshold, aggregation, aggregation_n, impostor_model, target_fpir)
            yield g
            if g._dirty:
                g._commit()

    @classmethod
    def _load(cls, d: Path, verify: bool) -> "Gallery":
        snap = read_snapshot(d, verify)
        return cls(d, snap.manifest, snap.index, snap.ids, snap.person, snap.names, snap.sources,
                   snap.hashes, snap.next_id, snap.penalties)

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
        if self._penalty is not None and self.cohort is not None:
            self._penalty = np.concatenate([self._penalty, self.cohort.penalties(x)])
        self._person = np.concatenate([self._person, pidx])
        self._sources.extend(None if s is None else str(s) for s in sources)
        self._hashes.extend(hashes)
        self._refresh_people()
        self._dirty = True
        self._searcher = self._search_plan = None
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
            else:
                removed = self.index.remove_ids(drop_ids)
                if removed != drop_ids.size:
                    raise GalleryError(self.directory, f"FAISS removed {removed} of {drop_ids.size} vectors")
        keep = ~drop
        self._ids = self._ids[keep]
        if self._penalty is not None:
            self._penalty = self._penalty[keep]
        self._person = self._person[keep]
        self._sources = [s for s, k in zip(self._sources, keep) if k]
        self._hashes = [h for h, k in zip(self._hashes, keep) if k]
        self._compact_names()
        self._dirty = True
        self._searcher = self._search_plan = None
        return int(drop.sum())

    def _compact_names(self) -> None:
        used = np.unique(self._person)
        remap = np.full(len(self._names), -1, np.int32)
        remap[used] = np.arange(used.size, dtype=np.int32)
        self._names = [self._names[i] for i in used]
        self._person = remap[self._person] if self._person.size else self._person
        self._refresh_people()

    def set_threshold(self, threshold: float, calibration: dict[str, Any],
                      aggregation: str | None = None, aggregation_n: int | None = None,
                      mode: str = "calibrated", target_fpir: float | None = None) -> None:
        """Store a fixed threshold and its provenance (only inside :meth:`edit`).

        ``mode`` is ``calibrated`` (chosen from data) or ``manual`` (given by a user);
        either way the threshold stays as it is when people are enrolled later.
        """
        if mode not in ("calibrated", "manual"):
            raise GalleryError(self.directory, f"a fixed threshold's mode is calibrated or manual, not {mode!r}")
        d = self.manifest["decision"]
        self._set_aggregation(aggregation, aggregation_n)
        d["threshold"] = float(threshold)
        d["mode"] = mode
        d["target_fpir"] = None if target_fpir is None else float(target_fpir)
        d["calibration"] = dict(calibration)
        self._dirty = True

    def _set_aggregation(self, aggregation: str | None, aggregation_n: int | None) -> None:
        d = self.manifest["decision"]
        if aggregation is not None:
            if aggregation not in AGGREGATIONS:
                raise GalleryError(self.directory, f"unknown aggregation {aggregation!r}")
            d["aggregation"] = aggregation
        if aggregation_n is not None:
            d["aggregation_n"] = int(aggregation_n)

    def use_impostor_model(self, model: ImpostorModel | dict[str, Any], target_fpir: float | None = None,
                           aggregation: str | None = None) -> None:
        """Derive the threshold from an embedder's impostor model for ``target_fpir``
        (default :data:`DEFAULT_TARGET_FPIR`, or the gallery's current target) and keep
        re-deriving it as the gallery changes (mode ``auto``; only inside :meth:`edit`)."""
        if isinstance(model, dict):
            try:
                model = ImpostorModel.from_dict(model)
            except ValueError as exc:
                raise GalleryError(self.directory, f"bad impostor model ({exc})") from exc
        if model.embedder_id != self.embedder_id:
            raise GalleryError(self.directory, f"impostor model of {model.embedder_id!r} does not describe "
                                               f"this gallery's embedder {self.embedder_id!r}")
        target = target_fpir if target_fpir is not None else (self.target_fpir or DEFAULT_TARGET_FPIR)
        if not 0.0 < target < 1.0:
            raise GalleryError(self.directory, f"target FPIR must be in (0, 1), got {target!r}")
        d = self.manifest["decision"]
        self._set_aggregation(aggregation, None)
        d["mode"] = "auto"
        d["target_fpir"] = float(target)
        d["impostor_model"] = model.to_dict()
        self._impostor_model = model
        self._penalty = None
        self._rederive()
        self._dirty = True

    def _rederive(self) -> None:
        """Mode ``auto``: the threshold for the target FPIR at the gallery's current size."""
        d = self.manifest["decision"]
        model = self.impostor_model
        if self.mode != "auto" or model is None or self.target_fpir is None:
            return
        n = self.n_comparisons
        from facepipe.gallery.openset import per_comparison_fmr

        n_eff = model.effective_comparisons(n, self.target_fpir)
        fmr = per_comparison_fmr(self.target_fpir, n_eff)
        d["threshold"] = float(model.threshold_at_fmr(fmr))
        d["calibration"] = {
            "method": "impostor-model", "target_fpir": self.target_fpir, "n_comparisons": n,
            "counted": "enrolled vectors" if self.aggregation[0] == "max" else "enrolled people",
            "comparisons_exponent": model.exponent(self.target_fpir), "effective_comparisons": n_eff,
            "fmr_per_comparison": fmr, "embedder_id": model.embedder_id,
            "impostor_data": {"people": model.n_people, "photos": model.n_images, "pairs": model.n_pairs},
            "note": "re-derived on every change; FPIR = 1 - (1 - FMR)^(N^a)",
        }

    def person_index(self) -> np.ndarray:
        """The person index (0-based, per distinct name) of every vector, in :meth:`vectors` order."""
        return self._person.astype(np.int64)

    def vectors(self, ids: np.ndarray | None = None) -> np.ndarray:
        """The stored unit vectors for ``ids`` (default: all, in id order)."""
        ids = self._ids if ids is None else np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.index.reconstruct_batch(ids)

    # ------------------------------------------------------------------ commit

    def _commit(self) -> None:
        self._rederive()
        m = self.manifest
        n = int(self._ids.size)
        requested = m["index"]["requested"]
        kind = resolve_kind(requested, n)
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
        labels = {
            "format": LABELS_FORMAT,
            "next_id": int(self._next_id),
            "people": self._names,
            "entries": [[int(i), int(p), s, h] for i, p, s, h in
                        zip(self._ids.tolist(), self._person.tolist(), self._sources, self._hashes)],
        }
        cohort = self.cohort
        if cohort is not None:  # stored, so opening a large gallery does not recompute them
            labels["penalties"] = {"cohort": cohort.fingerprint,
                                   "values": [float(x) for x in self.penalties().tolist()]}
        write_generation(self.directory, m, self.index, labels, n, len(self.people()))
        self._dirty = False
        self._searcher = self._search_plan = None

    # ------------------------------------------------------------------ devices

    def to_device(self, device: str = "cpu", engine: str = "auto", precision: str = "fp32") -> str:
        """Search on ``cpu``, ``cuda``/``cuda:N`` or ``auto``; returns where search now runs.

        The engine (see :mod:`facepipe.gallery.search`): faiss-gpu when the installed faiss
        has GPU support, else exact torch search on the GPU (any index type), else FAISS on
        the CPU. ``engine`` forces ``faiss`` or ``torch`` (``torch`` with ``cpu`` runs the
        GPU code path on the CPU); ``precision`` ``fp16``/``bf16`` halves the GPU memory
        (torch; results stay exact). Asking for CUDA where it cannot be had (no GPU, or the
        vectors do not fit its free memory) raises :class:`DeviceUnavailableError`; ``auto``
        then searches on the CPU. The vectors are copied to the device now, so errors show
        here, and again after the gallery changes.
        """
        before = self._search_request
        self._search_request = (device, engine, precision)
        self._searcher = self._search_plan = None
        try:
            plan = self._ensure_searcher().plan
        except Exception:
            self._search_request = before  # a refused device leaves the previous choice in force
            raise
        log.info("gallery search: %s (%s)", plan.summary(), plan.reason)
        return plan.device

    def _ensure_searcher(self) -> Searcher:
        if self._searcher is None:
            device, engine, precision = self._search_request
            plan = plan_search(device, self.index_type, len(self), self.dim, engine, precision)
            self._searcher = build_searcher(plan, self.index, self.dim,
                                            lambda: (self._ids, self.vectors(self._ids)))
            self._search_plan = plan
        return self._searcher

    @property
    def search_device(self) -> str:
        """Where :meth:`search` runs: ``cpu`` or ``cuda:N``."""
        return self.search_plan.device

    @property
    def search_plan(self) -> SearchPlan:
        """How :meth:`search` runs: engine (faiss-cpu, faiss-gpu, torch), device, exactness,
        precision and why; ``.summary()`` gives one line for reports."""
        if self._search_plan is None:
            device, engine, precision = self._search_request
            self._search_plan = plan_search(device, self.index_type, len(self), self.dim, engine, precision)
        return self._search_plan

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
        D, I = self._ensure_searcher().search_unit(q, kk)
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
        """The ``top_k`` people per query, best first, by the gallery's aggregation.

        A match's ``score`` is the cosine similarity minus the enrolled vector's cohort
        penalty (:meth:`penalties`; the ``penalty`` of the match), so people are ranked
        and decided by it. Penalties only lower scores, so candidates come from the raw
        nearest neighbours, fetched deeper until no unfetched vector could rank higher.
        """
        q = check_vectors(queries, self.dim, "queries")
        method, agg_n = self.aggregation
        n_people = len(self.people())
        top_k = max(1, min(int(top_k), max(n_people, 1)))
        out: list[list[Match]] = [[] for _ in range(q.shape[0])]
        if len(self) == 0 or q.shape[0] == 0:
            return out
        pen = self.penalties() if self.cohort is not None else None
        depth = min(len(self), max(4 * top_k, 16 if method == "max" else 4 * top_k * agg_n))
        todo = np.arange(q.shape[0])
        while todo.size:
            D, I = self.search(q[todo], depth)
            retry = []
            for row, qi in enumerate(todo):
                ids = I[row]
                valid = ids >= 0
                ids, sc = ids[valid], D[row][valid]
                pos = np.searchsorted(self._ids, ids)
                persons = self._person[pos]
                p_hit = np.zeros(sc.size, np.float32) if pen is None else pen[pos]
                adj = sc - p_hit
                by_adj = np.argsort(-adj, kind="stable")  # raw order when there are no penalties
                _, first = np.unique(persons[by_adj], return_index=True)
                order = by_adj[np.sort(first)]
                distinct = persons[order]
                if distinct.size < top_k and depth < len(self):
                    retry.append(qi)
                    continue
                if method == "max":
                    # a person's best (penalised) hit among the fetched is their maximum, and
                    # exact once the k-th person beats every unfetched vector's raw score
                    if pen is not None and depth < len(self) and adj[order[top_k - 1]] < sc[-1]:
                        retry.append(qi)
                        continue
                    out[qi] = [Match(self._names[p], float(adj[j]), float(p_hit[j])) for p, j in
                               zip(distinct[:top_k].tolist(), order[:top_k].tolist())]
                else:
                    # re-score every retrieved candidate exactly over all their vectors
                    scored = []
                    for p in distinct.tolist():
                        mids = self._member_ids(p)
                        s_all = self.vectors(mids) @ q[qi]
                        pm = np.zeros(s_all.size, np.float32) if pen is None else \
                            pen[np.searchsorted(self._ids, mids)]
                        top = np.argsort(-(s_all - pm), kind="stable")[:agg_n]
                        scored.append((float((s_all[top] - pm[top]).mean()), float(pm[top].mean()), p))
                    scored.sort(key=lambda t: -t[0])
                    if pen is not None and depth < len(self) and len(scored) >= top_k and \
                            scored[top_k - 1][0] < sc[-1]:
                        retry.append(qi)
                        continue
                    out[qi] = [Match(self._names[p], s, pp) for s, pp, p in scored[:top_k]]
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

    def info(self, search_device: str | None = None) -> dict[str, Any]:
        """A summary for ``facepipe gallery info``; with ``search_device``, also how a search
        there would run (``search``: engine, device, exact, precision, reason)."""
        m = self.manifest
        out = {
            "directory": str(self.directory),
            "generation": self.generation,
            "embedder": m["embedder"],
            "dim": self.dim,
            "metric": m["metric"],
            "index": {"type": self.index_type, "requested": m["index"]["requested"],
                      "params": m["index"]["params"].get(self.index_type, {})},
            "vectors": len(self),
            "identities": len(self.people()),
            "decision": self._decision_summary(),
            "created_at": m["created_at"],
            "updated_at": m["updated_at"],
        }
        if search_device is not None:
            out["search"] = plan_search(search_device, self.index_type, len(self), self.dim).to_dict()
        return out

    def _decision_summary(self) -> dict[str, Any]:
        d = {k: v for k, v in self.manifest["decision"].items() if k != "impostor_model"}
        d.update(self.operating_point())
        model = self.impostor_model
        if model is not None:
            d["impostor_model"] = {"embedder_id": model.embedder_id, "people": model.n_people,
                                   "photos": model.n_images, "pairs": model.n_pairs,
                                   "data": model.data.get("set"), "created_at": model.created_at}
        cohort = self.cohort
        pen = self.penalties() if cohort is not None else None
        d["cohort_penalties"] = None if cohort is None else {
            "people": cohort.n_people, "photos": int(len(cohort.vectors)), "k": cohort.k, "skip": cohort.skip,
            "reference": round(cohort.reference, 6),
            "penalised_vectors": int((pen > 0).sum()), "max_penalty": round(float(pen.max()), 6) if pen.size else 0.0}
        return d
