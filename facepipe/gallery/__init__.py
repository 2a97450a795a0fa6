"""The face gallery: a FAISS index of enrolled unit vectors, their labels, and the open-set rule.

One module per concern:

- :mod:`facepipe.gallery.storage`: the directory layout, ``flock`` locking and atomic
  generations (a crash at any point leaves the previous complete generation);
- :mod:`facepipe.gallery.index`: building FAISS indexes (flat, IVF, HNSW);
- :mod:`facepipe.gallery.search`: where and how a gallery is searched (FAISS on the CPU,
  faiss-gpu, exact torch search on a GPU), and the benchmark entry points;
- :mod:`facepipe.gallery.decision`: the open-set decision and threshold calibration;
- :mod:`facepipe.gallery.openset`: impostor models shipped with embedders, thresholds
  for a target FPIR that account for the gallery's size;
- :mod:`facepipe.gallery.cohort`: cohort penalties, a higher bar for enrolled faces in
  crowded parts of face space (the impostor model's development people as the cohort);
- :mod:`facepipe.gallery.evidence`: leave-one-out evidence from the enrolled vectors;
- :mod:`facepipe.gallery.names`: the person-name rule;
- :mod:`facepipe.gallery.core`: :class:`Gallery`, which ties them together.

Everything public is re-exported here: ``from facepipe.gallery import Gallery``.
"""

from __future__ import annotations

from facepipe.gallery.core import Gallery
from facepipe.gallery.decision import (
    AGGREGATIONS, DEFAULT_TARGET_FPIR, DEFAULT_THRESHOLD, MODES, Calibration, Decision, calibrate_threshold,
    dir_fpir_curve,
)
from facepipe.gallery.index import AUTO_HNSW_FROM, DEFAULT_PARAMS, INDEX_TYPES, build_index, check_vectors
from facepipe.gallery.names import RESERVED_NAMES, UNKNOWN, check_name
from facepipe.gallery.openset import ImpostorModel, impostor_model_for
from facepipe.gallery.search import (
    ENGINES, PRECISIONS, SearchPlan, TorchSearcher, plan_search, searcher_from_array, time_search,
)
from facepipe.gallery.storage import FORMAT, LABELS_FORMAT, LOCK_FILE, MANIFEST, sha256_file

__all__ = [
    "AGGREGATIONS", "AUTO_HNSW_FROM", "DEFAULT_PARAMS", "DEFAULT_TARGET_FPIR", "DEFAULT_THRESHOLD", "ENGINES",
    "FORMAT", "INDEX_TYPES", "LABELS_FORMAT", "LOCK_FILE", "MANIFEST", "MODES", "PRECISIONS", "RESERVED_NAMES",
    "UNKNOWN", "Calibration", "Decision", "Gallery", "ImpostorModel", "SearchPlan", "TorchSearcher",
    "build_index", "calibrate_threshold", "check_name", "check_vectors", "dir_fpir_curve", "impostor_model_for",
    "plan_search", "searcher_from_array", "sha256_file", "time_search",
]
