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

A source is an image file or one frame of a video, written ``<video path>#<frame index>``
(:func:`video_frame_files`, :func:`load_sources`): real scenes with several small faces
that the LFW portraits lack.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: MTCNN stage thresholds for the teacher run: lower than MTCNN's defaults so that
#: doubtful faces are found too (they become ignore regions, not negatives).
TEACHER_THRESHOLDS = (0.6, 0.6, 0.5)
TEACHER_MIN_SIZE = 20
#: Teacher faces at least this confident are training positives with landmark targets.
POSITIVE_SCORE = 0.95
#: Separates a video's path from a frame index in a source name: ``videos/clip.mp4#30``.
FRAME_SEP = "#"


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
        images = load_sources(data_root, [f for f, _ in todo])
        for k, ((rel, person), (_, img)) in enumerate(zip(todo, images)):
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


def video_frame_files(data_root: Path, every: int) -> list[tuple[str, str]]:
    """``("videos/<file>#<k>", "video:<file>")`` for every ``every``-th frame (0, every, 2·every, ...)
    of each video under ``data_root/videos``; none when ``every`` is 0."""
    from facepipe.video.reading import VIDEO_EXTENSIONS, read_frames

    if every <= 0:
        return []
    vdir = data_root / "videos"
    vids = sorted(f for f in vdir.iterdir() if f.suffix.lower() in VIDEO_EXTENSIONS) if vdir.is_dir() else []
    out = []
    for v in vids:
        rel = str(v.relative_to(data_root))
        # the frames that really decode (a container's frame count is an estimate)
        out.extend((f"{rel}{FRAME_SEP}{f.index}", f"video:{v.name}")
                   for f in read_frames(v, stride=every) if f.image is not None)
    return out


def load_sources(data_root: Path, sources: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """``(source, RGB image)`` in the order given: image files read one by one, video frames
    (``path#k``) taken from one sequential decode of their video (only the frames asked for are kept)."""
    from facepipe.errors import InputError
    from facepipe.io import load_image
    from facepipe.video.reading import read_frames

    wanted: dict[str, set[int]] = {}
    for s in sources:
        if FRAME_SEP in s:
            v, k = s.rsplit(FRAME_SEP, 1)
            wanted.setdefault(v, set()).add(int(k))
    decoded: dict[str, dict[int, np.ndarray]] = {}
    for s in sources:
        if FRAME_SEP not in s:
            yield s, load_image(data_root / s)
            continue
        v, k = s.rsplit(FRAME_SEP, 1)
        if v not in decoded:
            decoded[v] = {f.index: f.image for f in read_frames(data_root / v)
                          if f.index in wanted[v] and f.image is not None}
        img = decoded[v].get(int(k))
        if img is None:
            raise InputError(data_root / v, f"frame {k} could not be decoded")
        yield s, img


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
