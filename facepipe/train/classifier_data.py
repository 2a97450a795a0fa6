"""Training data for the face/non-face classifier: sources, splits and a window sampler.

Sources (all read in place from the development data, never copied):

* **Caltech 36×36 head crops** (``face_nonface/caltech_faces_36x36``): the source's
  own train/val split; crops that are near-duplicates of a face in the evaluation
  set ``detection/caltech_webfaces_dev`` are dropped so that benchmark stays honest.
* **LFW** (``identities/lfw_devtrain``): one photo per person; head boxes in the
  Caltech convention (Hays' rule: centre of eyes/nose/mouth, 3× their spread)
  computed from MTCNN's landmarks (teacher labels, cached under ``runs/``). Split
  by person. Their surroundings give negatives (windows with IoU < 0.3 to every face).
* **Face-free scenes** (``face_nonface/nonface_scenes``): random windows at all
  scales; split by image.
* **Hard negatives**: windows the detector itself fires on in training scenes and
  LFW backgrounds (bootstrapping), see :func:`facepipe.train.classifier.mine_hard_negatives`.

The detection sets (``caltech_webfaces_dev``, ``dlib_pascal_faces``) are kept out of
training entirely: they are the benchmark.

Every sample is a ``(window + 2·context)``-pixel crop (48 px by default) whose
central 32 px window was jittered around a face or placed at random; the 3×3 grid
of windows the network sees in it (8 px apart) each get a label (1 face, 0 not,
-1 ignore) from IoU with the faces, and box-offset targets where IoU ≥ 0.4.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from facepipe.errors import InputError
from facepipe.evaluate import box_iou_matrix

log = logging.getLogger(__name__)

POS_IOU = 0.5
NEG_IOU = 0.3
BOX_IOU = 0.4


@dataclass
class SourceImage:
    """An RGB image and its face boxes (``(K, 4)`` xywh, head convention)."""

    image: np.ndarray
    boxes: np.ndarray
    name: str = ""


@dataclass
class DataSplit:
    """Everything one split (train or val) samples from."""

    crops: list[SourceImage] = field(default_factory=list)  # padded Caltech crops, one face each
    faces: list[SourceImage] = field(default_factory=list)  # LFW photos with all faces boxed
    scenes: list[SourceImage] = field(default_factory=list)  # face-free scenes
    hard: list[np.ndarray] = field(default_factory=list)  # mined 48x48 negative crops

    def summary(self) -> dict[str, int]:
        """Counts per source."""
        return {"caltech_crops": len(self.crops), "lfw_images": len(self.faces),
                "lfw_faces": int(sum(len(f.boxes) for f in self.faces)),
                "scenes": len(self.scenes), "hard_negatives": len(self.hard)}


def _stable_hash(s: str) -> int:
    return int(hashlib.sha1(s.encode()).hexdigest()[:8], 16)


def hays_head_box(landmarks5: np.ndarray) -> np.ndarray:
    """Head box ``[x, y, w, h]`` from 5 MTCNN landmarks by Hays' rule (Caltech convention).

    The 4 Caltech points are left eye, right eye, nose and mouth centre (mean of the two
    mouth corners); centre = their mean, ``w = 3·x-spread``, ``h = 3·y-spread``.
    """
    p = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)
    pts = np.stack([p[0], p[1], p[2], (p[3] + p[4]) / 2.0])
    c = pts.mean(axis=0)
    w = 3.0 * (pts[:, 0].max() - pts[:, 0].min())
    h = 3.0 * (pts[:, 1].max() - pts[:, 1].min())
    return np.array([c[0] - w / 2, c[1] - h / 2, w, h])


def lfw_head_boxes(root: Path, people: list[str], cache: Path,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, list[list[float]]]:
    """Head boxes of every confident MTCNN face in the first image of each person (cached JSON)."""
    from facepipe.datasets import list_identities
    from facepipe.detect.mtcnn import MTCNNDetector
    from facepipe.io import load_image

    known: dict[str, list[list[float]]] = {}
    if cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except json.JSONDecodeError:
            log.warning("ignoring unreadable cache %s", cache)
    todo = [p for p in people if p not in known]
    if todo:
        ids = list_identities(root)
        det = MTCNNDetector(min_size=30, device="cpu")
        for k, person in enumerate(todo):
            if person not in ids:
                continue
            img = load_image(ids[person][0])
            boxes = [hays_head_box(d.landmarks_array()).round(1).tolist()
                     for d in det.detect(img) if d.score >= 0.9 and d.landmarks is not None]
            known[person] = boxes
            if progress is not None:
                progress(k + 1, len(todo))
            if (k + 1) % 200 == 0:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(known))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
    return {p: known[p] for p in people if p in known}


def _norm_rows(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float32)
    x = x - x.mean(axis=1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def eval_set_duplicates(crops: np.ndarray, annotations: Path, threshold: float = 0.9) -> np.ndarray:
    """Mask of 36×36 crops whose pixels correlate ≥ ``threshold`` with a face of an evaluation set.

    Each ground-truth box of the detection set is cut out, converted to grey and
    resized to the crops' size; normalised cross-correlation finds near-duplicates.
    """
    import cv2

    from facepipe.evaluate import load_annotations
    from facepipe.io import load_image

    size = crops.shape[1]
    refs = []
    for gt in load_annotations(annotations):
        grey = cv2.cvtColor(load_image(gt.path), cv2.COLOR_RGB2GRAY)
        for b in gt.boxes:
            m = np.array([[size / b.w, 0, -b.x * size / b.w], [0, size / b.h, -b.y * size / b.h]])
            refs.append(cv2.warpAffine(grey, m, (size, size), flags=cv2.INTER_AREA,
                                       borderMode=cv2.BORDER_REPLICATE))
    if not refs:
        return np.zeros(len(crops), bool)
    sim = _norm_rows(crops) @ _norm_rows(np.stack(refs)).T
    return sim.max(axis=1) >= threshold


def load_sources(data: Path, cache_dir: Path, max_lfw_people: int = 2400, val_fraction: float = 0.2,
                 progress: Callable[[int, int], None] | None = None) -> tuple[DataSplit, DataSplit, dict]:
    """Build the train and validation splits from ``data`` (the shared data root)."""
    import cv2

    from facepipe.datasets import list_identities
    from facepipe.io import IMAGE_EXTENSIONS, load_image

    train, val = DataSplit(), DataSplit()
    info: dict = {}
    # Caltech crops (source split), minus near-duplicates of the evaluation set's faces.
    cdir = data / "face_nonface" / "caltech_faces_36x36"
    dups_total = 0
    for fname, split in (("faces_train.npz", train), ("faces_val.npz", val)):
        f = cdir / fname
        if not f.is_file():
            raise InputError(f, "Caltech face crops not found")
        arr = np.load(f)["images"]
        dup = np.zeros(len(arr), bool)
        ann = data / "detection" / "caltech_webfaces_dev" / "annotations.json"
        if ann.is_file():
            dup = eval_set_duplicates(arr, ann)
        dups_total += int(dup.sum())
        pad = 12
        for im in arr[~dup]:
            rgb = cv2.cvtColor(cv2.copyMakeBorder(im, pad, pad, pad, pad, cv2.BORDER_REFLECT_101),
                               cv2.COLOR_GRAY2RGB)
            split.crops.append(SourceImage(rgb, np.array([[pad, pad, 36.0, 36.0]])))
    info["caltech_crops_dropped_as_eval_duplicates"] = dups_total
    # LFW: first image of a subset of people, split by person.
    lroot = data / "identities" / "lfw_devtrain"
    people = sorted(p.name for p in lroot.iterdir() if p.is_dir()) if lroot.is_dir() else []
    rng = np.random.default_rng(1234)
    people = sorted(rng.permutation(people)[:max_lfw_people].tolist()) if people else []
    boxes = lfw_head_boxes(lroot, people, cache_dir / "lfw_head_boxes.json", progress) if people else {}
    ids = list_identities(lroot) if people else {}
    n_lfw_skipped = 0
    for person in people:
        b = boxes.get(person, [])
        if len(b) == 0:
            n_lfw_skipped += 1
            continue
        split = val if (_stable_hash(person) % 1000) < val_fraction * 1000 else train
        split.faces.append(SourceImage(load_image(ids[person][0]), np.asarray(b, dtype=np.float64), person))
    info["lfw_people_without_confident_face"] = n_lfw_skipped
    # Scenes, split by image.
    sdir = data / "face_nonface" / "nonface_scenes" / "images"
    scenes = sorted(f for f in sdir.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if sdir.is_dir() else []
    for f in scenes:
        split = val if (_stable_hash(f.name) % 1000) < val_fraction * 1000 else train
        split.scenes.append(SourceImage(load_image(f), np.zeros((0, 4)), f.name))
    if not train.scenes or not val.scenes:
        raise InputError(sdir, "need face-free scenes for both splits")
    info["train"], info["val"] = train.summary(), val.summary()
    return train, val, info


# ----------------------------------------------------------------------------- sampling


def _square(boxes: np.ndarray) -> np.ndarray:
    """Boxes (K, 4 xywh) as squares of equal area about the same centre."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4)
    s = np.sqrt(np.maximum(boxes[:, 2] * boxes[:, 3], 1e-6))
    cx = boxes[:, 0] + boxes[:, 2] / 2
    cy = boxes[:, 1] + boxes[:, 3] / 2
    return np.stack([cx - s / 2, cy - s / 2, s, s], axis=1)


def _iou(win: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of windows (M, 4) with boxes (K, 4), xywh."""
    return box_iou_matrix(win, boxes)


class WindowSampler:
    """Draws labelled classifier crops from a :class:`DataSplit` (seeded, numpy + OpenCV)."""

    def __init__(self, split: DataSplit, window: int = 32, context: int = 8, stride: int = 8,
                 seed: int = 0, augment: bool = True) -> None:
        self.split = split
        self.window = window
        self.context = context
        self.stride = stride
        self.size = window + 2 * context
        self.grid = (self.size - window) // stride + 1
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        g = np.arange(self.grid) * stride
        jj, ii = np.meshgrid(g, g)
        self.cells = np.stack([jj.ravel(), ii.ravel(), np.full(jj.size, window), np.full(jj.size, window)],
                              axis=1).astype(np.float64)

    # -- geometry ---------------------------------------------------------------
    def _warp(self, src: SourceImage, cx: float, cy: float, side: float
              ) -> tuple[np.ndarray, np.ndarray]:
        """Crop with the window (centre, side) mapped to the crop's central window; boxes mapped too."""
        import cv2

        rng = self.rng
        a = self.window / side
        theta = math.radians(rng.uniform(-10, 10)) if self.augment else 0.0
        flip = bool(self.augment and rng.random() < 0.5)
        c, s = math.cos(theta) * a, math.sin(theta) * a
        half = self.size / 2.0
        m = np.array([[c, -s, half - (c * cx - s * cy)], [s, c, half - (s * cx + c * cy)]])
        if flip:
            m = np.array([[-1.0, 0, self.size], [0, 1.0, 0]]) @ np.vstack([m, [0, 0, 1]])
        interp = cv2.INTER_AREA if a < 0.7 else cv2.INTER_LINEAR
        crop = cv2.warpAffine(src.image, m, (self.size, self.size), flags=interp,
                              borderMode=cv2.BORDER_REFLECT_101)
        b = src.boxes
        if len(b):
            ctr = np.stack([b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2, np.ones(len(b))], axis=1) @ m.T
            w, h = b[:, 2] * a, b[:, 3] * a
            boxes = np.stack([ctr[:, 0] - w / 2, ctr[:, 1] - h / 2, w, h], axis=1)
        else:
            boxes = np.zeros((0, 4))
        return crop, boxes

    def _labels(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(self.cells)
        label = np.zeros(n, np.float32)
        target = np.zeros((n, 4), np.float32)
        bmask = np.zeros(n, np.float32)
        if len(boxes):
            iou = _iou(self.cells, _square(boxes))
            best = iou.argmax(axis=1)
            m = iou[np.arange(n), best]
            label[m >= POS_IOU] = 1.0
            label[(m >= NEG_IOU) & (m < POS_IOU)] = -1.0
            sel = m >= BOX_IOU
            if sel.any():
                fb = boxes[best[sel]]
                cw = self.cells[sel]
                W = float(self.window)
                target[sel, 0] = ((fb[:, 0] + fb[:, 2] / 2) - (cw[:, 0] + W / 2)) / W
                target[sel, 1] = ((fb[:, 1] + fb[:, 3] / 2) - (cw[:, 1] + W / 2)) / W
                target[sel, 2] = np.log(np.maximum(fb[:, 2], 1e-3) / W)
                target[sel, 3] = np.log(np.maximum(fb[:, 3], 1e-3) / W)
                bmask[sel] = 1.0
        g = self.grid
        return label.reshape(g, g), target.reshape(g, g, 4), bmask.reshape(g, g)

    def _photometric(self, crops: np.ndarray) -> np.ndarray:
        """Colour/contrast/brightness/gamma jitter, random grey, blur and noise on a batch."""
        import cv2

        rng = self.rng
        n = len(crops)
        x = crops.astype(np.float32)
        grey = x.mean(axis=3, keepdims=True)
        sat = rng.uniform(0.6, 1.4, (n, 1, 1, 1)).astype(np.float32)
        sat[rng.random(n) < 0.2] = 0.0  # fully grey
        x = grey + (x - grey) * sat
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(np.float32) + mean \
            + rng.uniform(-30, 30, (n, 1, 1, 1)).astype(np.float32)
        np.clip(x, 0, 255, out=x)
        sel = np.where(rng.random(n) < 0.3)[0]
        if len(sel):
            gam = rng.uniform(0.7, 1.4, (len(sel), 1, 1, 1)).astype(np.float32)
            x[sel] = 255.0 * (x[sel] / 255.0) ** gam
        for k in np.where(rng.random(n) < 0.15)[0]:
            x[k] = cv2.GaussianBlur(x[k], (0, 0), rng.uniform(0.5, 1.2))
        noisy = rng.random(n) < 0.1
        if noisy.any():
            x[noisy] += rng.normal(0, 1, x[noisy].shape).astype(np.float32) * \
                rng.uniform(2, 8, (int(noisy.sum()), 1, 1, 1)).astype(np.float32)
        return np.clip(x, 0, 255).astype(np.uint8)

    # -- sample kinds -----------------------------------------------------------
    def _positive(self) -> tuple[SourceImage, float, float, float]:
        rng = self.rng
        use_crops = self.split.crops and (not self.split.faces or rng.random() < 0.45)
        src = self.split.crops[rng.integers(len(self.split.crops))] if use_crops \
            else self.split.faces[rng.integers(len(self.split.faces))]
        b = src.boxes[rng.integers(len(src.boxes))]
        side = math.sqrt(b[2] * b[3]) * math.exp(rng.uniform(-0.25, 0.25))
        cx = b[0] + b[2] / 2 + rng.uniform(-0.12, 0.12) * side
        cy = b[1] + b[3] / 2 + rng.uniform(-0.12, 0.12) * side
        return src, cx, cy, side

    def _near_face(self) -> tuple[SourceImage, float, float, float]:
        rng = self.rng
        src = self.split.faces[rng.integers(len(self.split.faces))]
        b = src.boxes[rng.integers(len(src.boxes))]
        side = math.sqrt(b[2] * b[3]) * math.exp(rng.uniform(-1.1, 1.3))
        cx = b[0] + b[2] / 2 + rng.uniform(-0.9, 0.9) * side
        cy = b[1] + b[3] / 2 + rng.uniform(-0.9, 0.9) * side
        return src, cx, cy, side

    def _random_window(self, pool: list[SourceImage]) -> tuple[SourceImage, float, float, float]:
        rng = self.rng
        src = pool[rng.integers(len(pool))]
        h, w = src.image.shape[:2]
        hi = max(min(h, w), 17.0)
        side = math.exp(rng.uniform(math.log(16.0), math.log(hi)))
        cx = rng.uniform(side / 2 - 8, max(w - side / 2 + 8, side / 2 - 7))
        cy = rng.uniform(side / 2 - 8, max(h - side / 2 + 8, side / 2 - 7))
        return src, cx, cy, side

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``n`` crops ``(n, S, S, 3)`` uint8, labels ``(n, g, g)``, box targets ``(n, g, g, 4)``, box mask."""
        rng = self.rng
        sp = self.split
        kinds = ["pos", "near", "lfw_bg", "scene", "hard"]
        p = np.array([0.35, 0.15 if sp.faces else 0, 0.08 if sp.faces else 0, 0.27, 0.15 if sp.hard else 0])
        p = p / p.sum()
        crops = np.empty((n, self.size, self.size, 3), np.uint8)
        g = self.grid
        labels = np.empty((n, g, g), np.float32)
        targets = np.empty((n, g, g, 4), np.float32)
        masks = np.empty((n, g, g), np.float32)
        for k, kind in enumerate(rng.choice(len(kinds), size=n, p=p)):
            kind = kinds[kind]
            if kind == "hard":
                c = sp.hard[rng.integers(len(sp.hard))]
                if self.augment and rng.random() < 0.5:
                    c = c[:, ::-1]
                crop = np.ascontiguousarray(c)
                lab, tgt, msk = np.zeros((g, g), np.float32), np.zeros((g, g, 4), np.float32), np.zeros((g, g), np.float32)
            else:
                if kind == "pos":
                    src, cx, cy, side = self._positive()
                elif kind == "near":
                    src, cx, cy, side = self._near_face()
                elif kind == "lfw_bg":
                    src, cx, cy, side = self._random_window(sp.faces)
                else:
                    src, cx, cy, side = self._random_window(sp.scenes)
                crop, boxes = self._warp(src, cx, cy, side)
                lab, tgt, msk = self._labels(boxes)
            crops[k] = crop
            labels[k], targets[k], masks[k] = lab, tgt, msk
        if self.augment:
            crops = self._photometric(crops)
        return crops, labels, targets, masks
