"""MTCNN as the landmark teacher: five-point pseudo-labels for LFW photos, computed once and cached.

The single-pass detector learns boxes and landmarks from faces whose labels come
from MTCNN (facenet-pytorch, shipped weights, offline). Every face MTCNN finds in
an LFW photo is kept with its score, box and five landmarks; training turns the
confident ones (score ≥ ``POSITIVE_SCORE``) into positives with Hays head boxes and
the rest into *ignore* regions, because an unlabelled background face must not be
taught as a non-face.

The cache is an NPZ: ``sources`` (paths relative to the data root), ``people``,
``image_index`` (per face), ``boxes`` (K, 4 xyxy, MTCNN's tight boxes), ``scores``,
``landmarks`` (K, 5, 2), ``sizes`` (per image H, W) and the MTCNN settings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: MTCNN stage thresholds for the teacher run: lower than MTCNN's defaults so that
#: doubtful faces are found too (they become ignore regions, not negatives).
TEACHER_THRESHOLDS = (0.6, 0.6, 0.5)
TEACHER_MIN_SIZE = 20
#: Teacher faces at least this confident are training positives with landmark targets.
POSITIVE_SCORE = 0.95


@dataclass
class TeacherLabels:
    """MTCNN's faces in a list of images (arrays as stored in the cache)."""

    sources: np.ndarray  # (N,) str, relative to the data root
    people: np.ndarray  # (N,) str
    sizes: np.ndarray  # (N, 2) int  H, W
    image_index: np.ndarray  # (K,) int
    boxes: np.ndarray  # (K, 4) float32 xyxy
    scores: np.ndarray  # (K,) float32
    landmarks: np.ndarray  # (K, 5, 2) float32

    def faces_of(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(boxes xyxy, scores, landmarks)`` of image ``i``."""
        m = self.image_index == i
        return self.boxes[m], self.scores[m], self.landmarks[m]

    def __len__(self) -> int:
        return len(self.sources)


def load_teacher(path: Path) -> TeacherLabels:
    """Read a teacher cache written by :func:`build_teacher_cache`."""
    with np.load(path, allow_pickle=False) as z:
        return TeacherLabels(z["sources"].astype(str), z["people"].astype(str), z["sizes"],
                             z["image_index"], z["boxes"], z["scores"], z["landmarks"])


def _save(path: Path, sources: Sequence[str], people: Sequence[str], sizes: Sequence[tuple[int, int]],
          faces: list[tuple[int, np.ndarray, float, np.ndarray]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, sources=np.array(sources, dtype=str), people=np.array(people, dtype=str),
             sizes=np.array(sizes, np.int32).reshape(-1, 2),
             image_index=np.array([f[0] for f in faces], np.int32),
             boxes=np.array([f[1] for f in faces], np.float32).reshape(-1, 4),
             scores=np.array([f[2] for f in faces], np.float32),
             landmarks=np.array([f[3] for f in faces], np.float32).reshape(-1, 5, 2),
             thresholds=np.array(TEACHER_THRESHOLDS, np.float32), min_size=TEACHER_MIN_SIZE)
    tmp.replace(path)


def build_teacher_cache(data_root: Path, files: Sequence[tuple[str, str]], cache: Path,
                        progress: Callable[[int, int], None] | None = None,
                        save_every: int = 500) -> TeacherLabels:
    """Run MTCNN over ``files`` (``(relative path, person)``) and cache every face; resumable.

    Images already in ``cache`` are not run again; the cache is rewritten every
    ``save_every`` images so an interrupted run loses little.
    """
    from facepipe.detect.mtcnn import MTCNNDetector
    from facepipe.io import load_image

    sources: list[str] = []
    people: list[str] = []
    sizes: list[tuple[int, int]] = []
    faces: list[tuple[int, np.ndarray, float, np.ndarray]] = []
    if cache.is_file():
        old = load_teacher(cache)
        sources, people, sizes = list(old.sources), list(old.people), [tuple(s) for s in old.sizes]
        faces = [(int(i), b, float(s), lm) for i, b, s, lm in
                 zip(old.image_index, old.boxes, old.scores, old.landmarks)]
    done = set(sources)
    todo = [(f, p) for f, p in files if f not in done]
    if todo:
        det = MTCNNDetector(min_size=TEACHER_MIN_SIZE, thresholds=TEACHER_THRESHOLDS, device="cpu")
        t0 = time.time()
        for k, (rel, person) in enumerate(todo):
            img = load_image(data_root / rel)
            idx = len(sources)
            sources.append(rel)
            people.append(person)
            sizes.append((int(img.shape[0]), int(img.shape[1])))
            for d in det.detect(img):
                if d.landmarks is None:
                    continue
                faces.append((idx, np.array(d.box.xyxy(), np.float32), float(d.score), d.landmarks_array()))
            if progress is not None:
                progress(k + 1, len(todo))
            if (k + 1) % save_every == 0:
                _save(cache, sources, people, sizes, faces)
                log.info("teacher: %d/%d images, %d faces, %.0fs", k + 1, len(todo), len(faces),
                         time.time() - t0)
        _save(cache, sources, people, sizes, faces)
    labels = load_teacher(cache)
    keep = {f for f, _ in files}
    sel = np.array([s in keep for s in labels.sources], bool)
    if sel.all():
        return labels
    new_idx = np.cumsum(sel) - 1
    fm = sel[labels.image_index]
    return TeacherLabels(labels.sources[sel], labels.people[sel], labels.sizes[sel],
                         new_idx[labels.image_index[fm]].astype(np.int32), labels.boxes[fm],
                         labels.scores[fm], labels.landmarks[fm])


def lfw_files(data_root: Path, max_per_person: int = 0) -> list[tuple[str, str]]:
    """``(path relative to data_root, person)`` for LFW devtrain photos, sorted."""
    from facepipe.datasets import list_identities

    lroot = data_root / "identities" / "lfw_devtrain"
    out = []
    for person, paths in sorted(list_identities(lroot).items()):
        for p in sorted(paths)[: max_per_person or None]:
            out.append((str(Path(p).relative_to(data_root)), person))
    return out


if __name__ == "__main__":  # pragma: no cover - used as `python -m facepipe.train.detector_teacher`
    import argparse

    import torch

    ap = argparse.ArgumentParser(description="Cache MTCNN teacher labels for LFW devtrain.")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=Path("runs/detector/cache/lfw_teacher.npz"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from facepipe.datasets import data_root

    from facepipe.train.detector_data import teacher_files

    root = args.data or data_root()
    files = teacher_files(root)
    lab = build_teacher_cache(root, files, args.cache)
    log.info("done: %d images, %d faces", len(lab), len(lab.scores))
