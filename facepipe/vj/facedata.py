"""The development face data, as windows for a face cascade: the CNN classifier's own sources.

:func:`facepipe.train.classifier_data.load_sources` defines the data and its
train/validation split; this module cuts cascade samples from the same splits:

* positives: every Caltech 36×36 head crop and every LFW head box (Hays' rule on
  MTCNN landmarks), squared to equal area like the CNN's labels, warped to the
  window size (bilinear), plus ``jitter`` randomly shifted/scaled/rotated copies
  each, and all of them mirrored. The window therefore *is* the head box, so the
  cascade's detections use the Caltech head-box convention of the CNN detector
  and of ``caltech_webfaces_dev``.
* negatives: the face-free scenes, and the LFW photos away from their faces
  (windows with IoU ≥ 0.3 to any squared head box are never drawn). With
  ``packaged_scenes=True`` also the people-free sample images shipped inside
  scikit-image / scikit-learn / matplotlib
  (:func:`facepipe.train.detector_data.packaged_scene_files`), split into train and
  validation by file name exactly as the scenes are (:func:`add_packaged_scenes`):
  training ones are more negative images, held-out ones more validation
  false-alarm images.

The detection sets (``detection/``) are not touched: they are the benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from facepipe.vj.samples import NegativeImage, NegativeSource, to_grey

if TYPE_CHECKING:
    from facepipe.train.classifier_data import DataSplit


@dataclass
class FaceCascadeData:
    """Training and validation samples for a face cascade."""

    train_pos: np.ndarray
    train_neg: NegativeSource
    val_pos: np.ndarray
    val_neg: NegativeSource
    info: dict
    train_groups: np.ndarray | None = None  # per training window: the face it was cut from (copies share it)


def _square(boxes: np.ndarray) -> np.ndarray:
    from facepipe.train.classifier_data import _square as square

    return square(np.asarray(boxes, np.float64).reshape(-1, 4))


def cut_windows(grey: np.ndarray, boxes: np.ndarray, size: int, rng: np.random.Generator | None = None,
                shift: float = 0.0, scale: float = 0.0, rotate: float = 0.0) -> np.ndarray:
    """Square boxes ``(K, 4)`` of a grey image warped to ``size × size`` windows (bilinear, reflected border).

    With ``rng``, each box is jittered: centre by ±``shift``·side, side by a factor
    ``exp(±scale)``, rotated by ±``rotate`` degrees.
    """
    import cv2

    out = np.empty((len(boxes), size, size), np.uint8)
    for k, (x, y, w, h) in enumerate(np.asarray(boxes, np.float64)):
        side = w
        cx, cy = x + w / 2.0, y + h / 2.0
        theta = 0.0
        if rng is not None:
            cx += rng.uniform(-shift, shift) * side
            cy += rng.uniform(-shift, shift) * side
            side *= math.exp(rng.uniform(-scale, scale))
            theta = math.radians(rng.uniform(-rotate, rotate))
        a = size / side
        c, s = math.cos(theta) * a, math.sin(theta) * a
        half = size / 2.0
        m = np.array([[c, -s, half - (c * cx - s * cy)], [s, c, half - (s * cx + c * cy)]])
        out[k] = cv2.warpAffine(grey, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return out


def add_packaged_scenes(train: DataSplit, val: DataSplit, val_fraction: float = 0.2) -> dict[str, list[str]]:
    """Append the installed packaged face-free images to the ``scenes`` of two :class:`DataSplit`s.

    Split by file name with the rule the development scenes use (a stable hash of
    the name below ``val_fraction``), so the same images are held out as in the
    detector's ``--packaged-scenes``. Returns the names added to each split.
    """
    from facepipe.io import load_image
    from facepipe.train.classifier_data import SourceImage, _stable_hash
    from facepipe.train.detector_data import packaged_scene_files

    added: dict[str, list[str]] = {"train": [], "val": []}
    for f in packaged_scene_files():
        name = f"{f.parent.name}/{f.name}"
        is_val = (_stable_hash(f.name) % 1000) < val_fraction * 1000
        (val if is_val else train).scenes.append(SourceImage(load_image(f), np.zeros((0, 4)), name))
        added["val" if is_val else "train"].append(name)
    return added


def _positives(split, size: int, rng: np.random.Generator | None, jitter: int  # noqa: ANN001
               ) -> tuple[np.ndarray, np.ndarray]:
    """Windows of every face (and its jittered copies) and, per window, the index of its face."""
    wins, groups = [], []
    n_faces = 0
    for src in list(split.crops) + list(split.faces):
        grey = to_grey(src.image)
        boxes = _square(src.boxes)
        ids = np.arange(n_faces, n_faces + len(boxes), dtype=np.int64)
        n_faces += len(boxes)
        wins.append(cut_windows(grey, boxes, size))
        groups.append(ids)
        for _ in range(jitter if rng is not None else 0):
            wins.append(cut_windows(grey, boxes, size, rng, shift=0.05, scale=0.06, rotate=6.0))
            groups.append(ids)
    if not wins:
        return np.zeros((0, size, size), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(wins), np.concatenate(groups)


def _negatives(split, size: int, scale_step: float, stride: int) -> NegativeSource:  # noqa: ANN001
    images = [NegativeImage(to_grey(s.image), name=s.name) for s in split.scenes]
    images += [NegativeImage(to_grey(f.image), _square(f.boxes), f.name) for f in split.faces]
    return NegativeSource(images, size, size, scale_step=scale_step, stride=stride, max_iou=0.3)


def load_face_cascade_data(data: Path, cache_dir: Path, size: int = 24, seed: int = 0, jitter: int = 1,
                           mirror: bool = True, max_lfw_people: int = 2400, scale_step: float = 1.25,
                           stride: int = 1, progress: Callable[[int, int], None] | None = None,
                           packaged_scenes: bool = False) -> FaceCascadeData:
    """Positives and negatives of both splits from the development data root ``data``.

    ``packaged_scenes`` adds the face-free images shipped inside installed packages
    (see :func:`add_packaged_scenes`) to both splits' negatives.
    """
    from facepipe.train.classifier_data import load_sources

    train, val, info = load_sources(data, cache_dir, max_lfw_people=max_lfw_people, progress=progress)
    info = dict(info)
    if packaged_scenes:
        info["packaged_scenes"] = add_packaged_scenes(train, val)
        info["train"], info["val"] = train.summary(), val.summary()
    rng = np.random.default_rng(seed)
    train_pos, train_groups = _positives(train, size, rng, jitter)
    if mirror:
        train_pos = np.concatenate([train_pos, train_pos[:, :, ::-1]])
        train_groups = np.concatenate([train_groups, train_groups])
    val_pos, _ = _positives(val, size, None, 0)
    info.update({"train_positive_windows": int(len(train_pos)), "val_positive_windows": int(len(val_pos)),
                 "jitter_copies": jitter, "mirrored": mirror,
                 "negative_images": {"train": len(train.scenes) + len(train.faces),
                                     "val": len(val.scenes) + len(val.faces)}})
    return FaceCascadeData(train_pos, _negatives(train, size, scale_step, stride), val_pos,
                           _negatives(val, size, scale_step, stride), info, train_groups)
