"""Training data for the single-pass detector: sources, splits and a composite-canvas sampler.

Sources (all read in place from the development data; the detection sets with
ground truth are never touched):

* **LFW devtrain photos** with MTCNN as the teacher (:mod:`facepipe.train.detector_teacher`):
  confident faces (score ≥ 0.95) are positives with a Hays head box computed from
  the teacher's landmarks and the five landmarks as targets; less confident ones
  are *ignore* regions (unlabelled background faces are not taught as non-faces).
  Split by person with the embedder's :func:`~facepipe.train.embedder_data.people_split`
  (seed 0, 20 %), so the held-out people are the same ones the verification
  benchmark uses: landmark error and verification with the detector's landmarks are
  measured on people it never saw.
* **Caltech 36×36 head crops**: small grey faces, box = the crop, no landmarks
  (the landmark loss is masked); near-duplicates of ``caltech_webfaces_dev`` faces dropped.
* **Face-free scenes** (49): backgrounds, decoy patches and hard negatives; split by
  image exactly as the classifier's data (same held-out scenes).
* **Packaged face-free images** (optional, ``packaged_scenes=True``): the 25 photos
  and textures without people that ship inside installed dependencies
  (:func:`packaged_scene_files`: scikit-image's coins, cells, retina, Hubble field,
  gravel, text, ...; scikit-learn's two sample photos; matplotlib's sample picture),
  added to the scenes with the same by-name split. They bring what the 49 scenes
  lack: small round and bright objects (coins, buttons, blobs) that a face detector
  tuned on scenery fires on.

A training sample is a square canvas (:class:`CompositeSampler`): either a scene
background with several faces pasted at many scales (soft-edged cut-outs with
context, so a pasted patch is not itself a cue; decoy patches of scenery are pasted
the same way), or a mosaic of LFW photos at random zoom (group-photo-like, with all
teacher faces labelled), or a crop around a mined hard negative. Optionally (``style``)
the canvas is then re-rendered as something other than a photograph — a 1-bit
print, a halftone, a poster, a cartoon or a pencil sketch (:func:`stylise`) — since
faces on the web are also drawn, printed and photocopied — and, since those pages
carry lettering, some canvases (``text``) get lines of printed text away from the
faces as negatives (:func:`draw_text_decoys`). Then photometric
augmentation aimed at grey, low-contrast group photos: grey conversion, contrast
compression, gamma, blur, noise and JPEG.

Labels per canvas: head boxes ``(K, 4)`` xywh, landmarks ``(K, 5, 2)``, a landmark
mask ``(K,)`` and ignore boxes ``(M, 4)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from facepipe.errors import InputError
from facepipe.train.classifier_data import _stable_hash, eval_set_duplicates
from facepipe.train.detector_teacher import POSITIVE_SCORE, TeacherLabels

log = logging.getLogger(__name__)

#: Landmark order after a horizontal flip (left/right eye and mouth corners swap).
FLIP_PERM = np.array([1, 0, 2, 4, 3])
#: A face cut more than this fraction outside the canvas becomes an ignore region.
MIN_VISIBLE = 0.6


def hays_boxes(landmarks: np.ndarray) -> np.ndarray:
    """Head boxes ``(K, 4)`` xywh from five-point landmarks ``(K, 5, 2)`` by Hays' rule.

    The four Caltech points are the eyes, the nose and the mouth centre (mean of the
    corners); centre = their mean, ``w = 3·x-spread``, ``h = 3·y-spread``.
    """
    p = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    pts = np.concatenate([p[:, :3], (p[:, 3:4] + p[:, 4:5]) / 2.0], axis=1)
    c = pts.mean(axis=1)
    w = 3.0 * (pts[:, :, 0].max(axis=1) - pts[:, :, 0].min(axis=1))
    h = 3.0 * (pts[:, :, 1].max(axis=1) - pts[:, :, 1].min(axis=1))
    return np.stack([c[:, 0] - w / 2, c[:, 1] - h / 2, w, h], axis=1)


@dataclass
class FacePhoto:
    """A photo with teacher labels: positives (boxes, landmarks) and ignore boxes, all xywh."""

    image: np.ndarray
    boxes: np.ndarray  # (K, 4) head boxes
    landmarks: np.ndarray  # (K, 5, 2)
    ignore: np.ndarray  # (M, 4)
    name: str = ""
    person: str = ""


@dataclass
class DetSplit:
    """Everything one split (train or val) samples from."""

    photos: list[FacePhoto] = field(default_factory=list)
    crops: np.ndarray = field(default_factory=lambda: np.zeros((0, 36, 36), np.uint8))
    scenes: list[np.ndarray] = field(default_factory=list)
    scene_names: list[str] = field(default_factory=list)
    #: mined false positives: (source kind "scene"/"photo", index, box xywh)
    hard: list[tuple[str, int, np.ndarray]] = field(default_factory=list)
    #: video frames with teacher labels, drawn instead of a photo at the ``frame_share`` rate
    frames: list[FacePhoto] = field(default_factory=list)
    frame_share: float = 0.0

    def summary(self) -> dict[str, int]:
        """Counts per source."""
        return {"lfw_photos": len(self.photos), "lfw_faces": int(sum(len(p.boxes) for p in self.photos)),
                "lfw_ignore_regions": int(sum(len(p.ignore) for p in self.photos)),
                "caltech_crops": int(len(self.crops)), "scenes": len(self.scenes),
                "hard_negatives": len(self.hard), "video_frames": len(self.frames),
                "video_faces": int(sum(len(p.boxes) for p in self.frames))}


def teacher_photo(image: np.ndarray, boxes_xyxy: np.ndarray, scores: np.ndarray, landmarks: np.ndarray,
                  name: str = "", person: str = "", positive_score: float = POSITIVE_SCORE) -> FacePhoto:
    """A :class:`FacePhoto` from MTCNN's faces: confident ones positive, the rest ignored."""
    pos = scores >= positive_score
    head = hays_boxes(landmarks) if len(landmarks) else np.zeros((0, 4))
    # ignore regions: the doubtful faces' head boxes, and their tight MTCNN boxes enlarged 1.3x
    b = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)[~pos]
    tight = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1) if len(b) else np.zeros((0, 4))
    if len(tight):
        c = tight[:, :2] + tight[:, 2:] / 2
        s = tight[:, 2:] * 1.3
        tight = np.concatenate([c - s / 2, s], 1)
    ignore = np.concatenate([head[~pos], tight]) if len(tight) else head[~pos].reshape(-1, 4)
    return FacePhoto(image, head[pos].reshape(-1, 4), np.asarray(landmarks, np.float64)[pos].reshape(-1, 5, 2),
                     ignore.reshape(-1, 4), name, person)


def validation_people(people: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> set[str]:
    """The held-out LFW people: the embedder's people split, so verification uses unseen people."""
    from facepipe.train.embedder_data import people_split

    _, val = people_split(np.asarray(sorted(set(people))), val_fraction, seed)
    return set(val)


def teacher_files(data: Path, train_per_person: int = 4, val_per_person: int = 2,
                  max_people: int | None = None) -> list[tuple[str, str]]:
    """The LFW photos the teacher labels: up to ``train_per_person`` per training person and
    ``val_per_person`` per held-out person (those are for threshold calibration and landmark error);
    ``max_people``: only the first people in alphabetical order (a CPU budget)."""
    from facepipe.train.detector_teacher import lfw_files

    files = lfw_files(data)
    val = validation_people([p for _, p in files])
    if max_people is not None:
        keep = set(sorted({p for _, p in files})[:max_people])
        files = [(f, p) for f, p in files if p in keep]
    count: dict[str, int] = {}
    out = []
    for rel, person in files:
        cap = val_per_person if person in val else train_per_person
        if count.get(person, 0) < cap:
            out.append((rel, person))
            count[person] = count.get(person, 0) + 1
    return out


#: Face-free images inside installed packages: (package, path inside it). People-free by
#: inspection (scikit-image's astronaut and camera, matplotlib's grace_hopper excluded).
PACKAGED_SCENES: tuple[tuple[str, str], ...] = tuple(
    [("skimage", f"data/{n}") for n in (
        "brick.png", "cell.png", "chelsea.png", "chessboard_RGB.png", "clock_motion.png", "coffee.png",
        "coins.png", "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png",
        "logo.png", "microaneurysms.png", "moon.png", "motorcycle_left.png", "page.png", "phantom.png",
        "retina.jpg", "rocket.jpg", "text.png")]
    + [("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
       ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png")])


def packaged_scene_files() -> list[Path]:
    """The :data:`PACKAGED_SCENES` that exist in this installation (missing packages are skipped)."""
    import importlib.util

    out = []
    for pkg, rel in PACKAGED_SCENES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        f = Path(list(spec.submodule_search_locations)[0]) / rel
        if f.is_file():
            out.append(f)
    return out


def load_detector_sources(data: Path, teacher: TeacherLabels, max_per_person: int = 4,
                          max_val_photos: int = 600, val_fraction: float = 0.2,
                          packaged_scenes: bool = False, frames: TeacherLabels | None = None,
                          frame_share: float = 0.2) -> tuple[DetSplit, DetSplit, dict]:
    """Build the train and validation splits; see the module docstring.

    ``frames``: teacher labels of video frames (:func:`~facepipe.train.detector_teacher.video_frame_files`),
    training split only (a clip is one scene: held out, it would not be a different one);
    ``frame_share`` of the photo draws then take a frame instead of an LFW photo.
    """
    from facepipe.io import IMAGE_EXTENSIONS, load_image

    train, val = DetSplit(), DetSplit()
    info: dict = {}
    val_people = validation_people(teacher.people, val_fraction)
    per_person: dict[str, int] = {}
    n_val = 0
    for i in range(len(teacher)):
        person = str(teacher.people[i])
        is_val = person in val_people
        if is_val and n_val >= max_val_photos:
            continue
        if not is_val and per_person.get(person, 0) >= max_per_person:
            continue
        b, s, lm = teacher.faces_of(i)
        if not (s >= POSITIVE_SCORE).any():
            continue
        photo = teacher_photo(load_image(data / teacher.sources[i]), b, s, lm, str(teacher.sources[i]), person)
        if is_val:
            val.photos.append(photo)
            n_val += 1
        else:
            per_person[person] = per_person.get(person, 0) + 1
            train.photos.append(photo)
    if frames is not None and len(frames):
        from facepipe.train.detector_teacher import load_sources

        if not 0.0 <= frame_share <= 1.0:
            raise ValueError(f"frame_share must be a fraction in [0, 1], got {frame_share}")
        for i, (src, img) in enumerate(load_sources(data, list(frames.sources))):
            b, s, lm = frames.faces_of(i)
            if (s >= POSITIVE_SCORE).any():
                train.frames.append(teacher_photo(img, b, s, lm, src, str(frames.people[i])))
        train.frame_share = frame_share if train.frames else 0.0
        info["video_frame_share"] = train.frame_share
    info["val_people"] = len({p.person for p in val.photos})
    info["train_people"] = len(per_person)
    cdir = data / "face_nonface" / "caltech_faces_36x36"
    ann = data / "detection" / "caltech_webfaces_dev" / "annotations.json"
    dropped = 0
    for fname, split in (("faces_train.npz", train), ("faces_val.npz", val)):
        f = cdir / fname
        if not f.is_file():
            raise InputError(f, "Caltech face crops not found")
        arr = np.load(f)["images"]
        dup = eval_set_duplicates(arr, ann) if ann.is_file() else np.zeros(len(arr), bool)
        dropped += int(dup.sum())
        split.crops = arr[~dup]
    info["caltech_crops_dropped_as_eval_duplicates"] = dropped
    def add_scene(f: Path, name: str) -> None:
        # split by file name, as the classifier's data: the same scenes stay held out
        split = val if (_stable_hash(f.name) % 1000) < 0.2 * 1000 else train
        split.scenes.append(load_image(f))
        split.scene_names.append(name)

    sdir = data / "face_nonface" / "nonface_scenes" / "images"
    scenes = sorted(f for f in sdir.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if sdir.is_dir() else []
    for f in scenes:
        add_scene(f, f.name)
    if not train.scenes or not val.scenes:
        raise InputError(sdir, "need face-free scenes for both splits")
    if packaged_scenes:
        extra = [(f, f"{f.parent.name}/{f.name}") for f in packaged_scene_files()]
        for f, name in extra:
            add_scene(f, name)
        info["packaged_scenes"] = [name for _, name in extra]
    info["train"], info["val"] = train.summary(), val.summary()
    return train, val, info


# ----------------------------------------------------------------------------- canvas sampler


@dataclass
class Canvas:
    """One training image with its labels (all boxes xywh, canvas pixels)."""

    image: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray
    lm_valid: np.ndarray
    ignore: np.ndarray


def _affine(cx: float, cy: float, a: float, theta: float, tx: float, ty: float, flip: bool) -> np.ndarray:
    """2×3 map: rotate/scale by (a, theta) about source (cx, cy), flip, then centre at (tx, ty)."""
    c, s = math.cos(theta) * a, math.sin(theta) * a
    m = np.array([[c, -s, 0.0], [s, c, 0.0]])
    if flip:
        m[0] *= -1.0
    m[:, 2] = [tx, ty] - m[:, :2] @ [cx, cy]
    return m


def _map_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = np.asarray(pts, np.float64)
    return p @ m[:, :2].T + m[:, 2]


def _map_boxes(m: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Boxes xywh through an affine map (axis-aligned bound of the rotated box, shrunk to its area)."""
    if len(boxes) == 0:
        return np.zeros((0, 4))
    a = math.sqrt(abs(np.linalg.det(m[:, :2])))
    c = _map_points(m, boxes[:, :2] + boxes[:, 2:] / 2)
    wh = boxes[:, 2:] * a
    return np.concatenate([c - wh / 2, wh], axis=1)


def _flip_landmarks(lm: np.ndarray, flip: bool) -> np.ndarray:
    return lm[:, FLIP_PERM] if flip and len(lm) else lm


def _iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from facepipe.evaluate import box_iou_matrix

    return box_iou_matrix(np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4))


class CompositeSampler:
    """Draws labelled training canvases from a :class:`DetSplit` (seeded, numpy + OpenCV).

    ``size``: canvas side. ``min_face``/``max_face``: head-box sides of pasted faces
    (log-uniform). ``augment``: photometric augmentation (off for fixed validation canvases).
    ``style``: share of canvases re-rendered by :func:`stylise`; ``text``: share given lines
    of text away from the faces (:func:`draw_text_decoys`); ``blobs``: share given small
    round objects away from the faces (:func:`draw_blob_decoys`). All three draw from a
    separate generator: the same seed gives the same boxes and landmarks whatever they are.
    ``crowd``: share of the composite canvases built as group photos instead
    (:meth:`crowd_canvas`: overlapping faces, nearer ones hiding farther ones).
    """

    KINDS = ("composite", "mosaic", "hard", "scene")

    def __init__(self, split: DetSplit, size: int = 256, seed: int = 0, min_face: float = 10.0,
                 max_face: float | None = None, augment: bool = True,
                 mix: tuple[float, float, float, float] = (0.5, 0.32, 0.1, 0.08), style: float = 0.0,
                 text: float = 0.0, blobs: float = 0.0, style_landmarks: bool = True,
                 crowd: float = 0.0) -> None:
        for name, v in (("style", style), ("text", text), ("blobs", blobs), ("crowd", crowd)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {v}")
        self.split = split
        self.size = int(size)
        self.rng = np.random.default_rng(seed)
        self.min_face = float(min_face)
        self.max_face = float(max_face or size * 0.95)
        self.augment = augment
        self.mix = np.asarray(mix, np.float64)
        self.style = float(style)
        self.text = float(text)
        self.blobs = float(blobs)
        self.crowd = float(crowd)
        self.style_landmarks = bool(style_landmarks)
        # its own generator, so the canvases' faces and labels do not depend on ``style``/``text``
        self.style_rng = np.random.default_rng([seed, 0x57])

    # -- backgrounds ---------------------------------------------------------------
    def _scene_background(self, idx: int | None = None) -> np.ndarray:
        import cv2

        rng, S = self.rng, self.size
        sc = self.split.scenes
        img = sc[rng.integers(len(sc))] if idx is None else sc[idx]
        h, w = img.shape[:2]
        # a random window of the scene, 0.3x..1x of its short side, resampled to the canvas
        side = min(h, w) * rng.uniform(0.3, 1.0) if min(h, w) > 64 else min(h, w)
        x0 = rng.uniform(0, w - side + 1e-6)
        y0 = rng.uniform(0, h - side + 1e-6)
        a = S / side
        m = np.array([[a, 0, -a * x0], [0, a, -a * y0]])
        if rng.random() < 0.5:
            m = np.array([[-1.0, 0, S], [0, 1.0, 0]]) @ np.vstack([m, [0, 0, 1]])
        return cv2.warpAffine(img, m, (S, S), flags=cv2.INTER_AREA if a < 1 else cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101)

    def _pick_photo(self) -> FacePhoto:
        """An LFW photo, or at the split's ``frame_share`` rate a video frame (same draws without frames)."""
        sp, rng = self.split, self.rng
        if sp.frames and rng.random() < sp.frame_share:
            return sp.frames[rng.integers(len(sp.frames))]
        return sp.photos[rng.integers(len(sp.photos))]

    # -- pasting -------------------------------------------------------------------
    def _roi(self, tx: float, ty: float, r: float) -> tuple[int, int, int, int] | None:
        """Canvas rows/columns ``(y0, y1, x0, x1)`` within ``r`` of ``(tx, ty)``; None if outside."""
        S = self.size
        x0, x1 = max(0, int(math.floor(tx - r))), min(S, int(math.ceil(tx + r)) + 1)
        y0, y1 = max(0, int(math.floor(ty - r))), min(S, int(math.ceil(ty + r)) + 1)
        return (y0, y1, x0, x1) if x1 > x0 and y1 > y0 else None

    def _paste_soft(self, canvas: np.ndarray, src: np.ndarray, m: np.ndarray, tx: float, ty: float,
                    r_in: float, r_out: float, border: int, aspect: float = 1.0) -> None:
        """Blend ``src`` warped by ``m`` into ``canvas`` inside a soft ellipse about ``(tx, ty)``."""
        import cv2

        roi = self._roi(tx, ty, r_out * max(aspect, 1.0))
        if roi is None:
            return
        y0, y1, x0, x1 = roi
        mm = m.copy()
        mm[:, 2] -= [x0, y0]
        a = math.sqrt(abs(np.linalg.det(m[:, :2])))
        warped = cv2.warpAffine(src, mm, (x1 - x0, y1 - y0),
                                flags=cv2.INTER_AREA if a < 0.8 else cv2.INTER_LINEAR, borderMode=border)
        warped = warped.astype(np.float32)
        if self.augment and self.rng.random() < 0.5:  # pasted faces come from other photos: own tone
            warped = np.clip(warped * self.rng.uniform(0.8, 1.2) + self.rng.uniform(-20, 20), 0, 255)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        d = np.sqrt(((xx + 0.5 - tx) / aspect) ** 2 + (yy + 0.5 - ty) ** 2)
        mask = np.clip((r_out - d) / max(r_out - r_in, 1e-3), 0.0, 1.0)[..., None]
        part = canvas[y0:y1, x0:x1].astype(np.float32)
        canvas[y0:y1, x0:x1] = (part * (1 - mask) + warped * mask).astype(np.uint8)

    def _place(self, side: float, taken: list[np.ndarray], max_iou: float = 0.1,
               near: tuple[float, float, float] | None = None) -> tuple[float, float] | None:
        """A centre for a square of ``side`` overlapping earlier placements little (≤ ``max_iou``).

        ``near``: ``(x, y, spread)``, draw the centre around ``(x, y)`` instead of anywhere.
        """
        rng, S = self.rng, self.size
        for _ in range(8):
            if near is None:
                lo, hi = -0.25 * side, S + 0.25 * side  # faces may be cut by the border
                tx, ty = rng.uniform(lo, hi), rng.uniform(lo, hi)
            else:
                tx, ty = near[0] + rng.normal(0, near[2]), near[1] + rng.normal(0, near[2])
            box = np.array([[tx - side / 2, ty - side / 2, side, side]])
            if not taken or _iou_xywh(box, np.stack(taken)).max() <= max_iou:
                taken.append(box[0])
                return tx, ty
        return None

    def _paste_face(self, canvas: np.ndarray, side: float, taken: list[np.ndarray], out: dict,
                    max_iou: float = 0.1, near: tuple[float, float, float] | None = None
                    ) -> tuple[float, float, float] | None:
        """Paste one face (a Caltech crop or an LFW photo's head); returns the opaque disc
        ``(x, y, radius)`` it covers the canvas with, None when there was no room."""
        import cv2

        rng, sp = self.rng, self.split
        use_crop = len(sp.crops) and (not sp.photos or (side <= 56 and rng.random() < 0.4))
        place = self._place(side * 1.1, taken, max_iou, near)
        if place is None:
            return None
        tx, ty = place
        theta = math.radians(rng.uniform(-12, 12)) if self.augment else 0.0
        flip = bool(rng.random() < 0.5)
        if use_crop:
            crop = cv2.cvtColor(sp.crops[rng.integers(len(sp.crops))], cv2.COLOR_GRAY2RGB)
            box = np.array([[0.0, 0.0, 36.0, 36.0]])
            a = side / 36.0
            m = _affine(18.0, 18.0, a, theta, tx, ty, flip)
            self._paste_soft(canvas, crop, m, tx, ty, side * 0.5, side * 0.62, cv2.BORDER_REPLICATE)
            out["boxes"].append(_map_boxes(m, box)[0])
            out["landmarks"].append(np.zeros((5, 2)))
            out["lm_valid"].append(0.0)
            return tx, ty, side * 0.56
        photo = self._pick_photo()
        k = rng.integers(len(photo.boxes))
        b = photo.boxes[k]
        face_side = math.sqrt(max(b[2] * b[3], 1.0))
        a = side / face_side
        cx, cy = b[0] + b[2] / 2, b[1] + b[3] / 2
        m = _affine(cx, cy, a, theta, tx, ty, flip)
        # soft round cut-out: the whole head box plus context, fading out
        r_in, r_out = side * rng.uniform(0.72, 0.9), side * rng.uniform(0.95, 1.25)
        self._paste_soft(canvas, photo.image, m, tx, ty, r_in, r_out, cv2.BORDER_REFLECT_101)
        lm = _flip_landmarks(_map_points(m, photo.landmarks[k:k + 1].reshape(-1, 2)).reshape(1, 5, 2), flip)
        out["boxes"].append(hays_boxes(lm)[0])
        out["landmarks"].append(lm[0])
        out["lm_valid"].append(1.0)
        # other faces of the photo that fall inside the cut-out: partially pasted, so ignored
        others = np.concatenate([np.delete(photo.boxes, k, axis=0), photo.ignore])
        if len(others):
            ob = _map_boxes(m, others)
            oc = ob[:, :2] + ob[:, 2:] / 2
            close = np.hypot(oc[:, 0] - tx, oc[:, 1] - ty) < side * 1.3
            out["ignore"].extend(ob[close])
        return tx, ty, (r_in + r_out) / 2

    def _paste_decoy(self, canvas: np.ndarray, side: float, taken: list[np.ndarray]) -> None:
        import cv2

        rng = self.rng
        place = self._place(side, taken)
        if place is None:
            return
        tx, ty = place
        img = self.split.scenes[rng.integers(len(self.split.scenes))]
        h, w = img.shape[:2]
        src_side = min(h, w) * rng.uniform(0.05, 0.6)
        cx, cy = rng.uniform(src_side / 2, w - src_side / 2 + 1e-6), rng.uniform(src_side / 2, h - src_side / 2 + 1e-6)
        m = _affine(cx, cy, side / src_side, math.radians(rng.uniform(-20, 20)), tx, ty, rng.random() < 0.5)
        self._paste_soft(canvas, img, m, tx, ty, side * rng.uniform(0.5, 0.9), side * rng.uniform(0.95, 1.25),
                         cv2.BORDER_REFLECT_101, aspect=rng.uniform(0.7, 1.3))

    def _face_side(self) -> float:
        lo, hi = math.log(self.min_face), math.log(self.max_face)
        # small and medium faces are what group photos have: weight the lower half more
        u = self.rng.random() ** 1.3
        return math.exp(lo + (hi - lo) * u)

    # -- canvas kinds --------------------------------------------------------------
    def composite(self) -> Canvas:
        """Scene background, 1–8 pasted faces at many scales, 0–3 decoys (or, at the
        ``crowd`` rate, a :meth:`crowd_canvas`)."""
        rng = self.rng
        if self.crowd and rng.random() < self.crowd:
            return self.crowd_canvas()
        canvas = self._scene_background()
        out: dict[str, list] = {"boxes": [], "landmarks": [], "lm_valid": [], "ignore": []}
        taken: list[np.ndarray] = []
        n = int(rng.integers(1, 9))
        sides = sorted((self._face_side() for _ in range(n)), reverse=True)
        if n > 3:  # groups: similar sizes
            base = sides[len(sides) // 2]
            sides = [base * math.exp(rng.uniform(-0.35, 0.35)) for _ in range(n)]
        for _ in range(int(rng.integers(0, 4))):
            self._paste_decoy(canvas, self._face_side(), taken)
        for side in sides:
            self._paste_face(canvas, side, taken, out)
        return self._finish(canvas, out)

    def crowd_canvas(self) -> Canvas:
        """A group photo: 4–12 faces of similar size bunched together, overlapping.

        Faces are pasted from the back (smaller) to the front (larger), so nearer heads
        hide parts of farther ones, as in a crowd; a few scene patches (shoulders, hands,
        objects) cover the edges of some faces too. A face less than half visible
        becomes an ignore region; one with a landmark hidden keeps its box as a target,
        not its landmarks.
        """
        import cv2

        rng, S = self.rng, self.size
        canvas = self._scene_background()
        out: dict[str, list] = {"boxes": [], "landmarks": [], "lm_valid": [], "ignore": []}
        n = int(rng.integers(4, 13))
        base = min(self._face_side(), S / 3.0)
        sides = sorted(base * math.exp(rng.uniform(-0.35, 0.35)) for _ in range(n))
        # centres spread about one point by about the radius of n touching heads
        group = (rng.uniform(0.25, 0.75) * S, rng.uniform(0.25, 0.75) * S,
                 base * math.sqrt(n) * rng.uniform(0.35, 0.6))
        taken: list[np.ndarray] = []
        discs: list[tuple[int, float, float, float, float]] = []  # (faces before it, x, y, r, aspect)
        for side in sides:
            before = len(out["boxes"])
            disc = self._paste_face(canvas, side, taken, out, max_iou=0.35, near=group)
            if disc is not None:
                discs.append((before, *disc, 1.0))
        for _ in range(int(rng.integers(0, 3))):  # occluders entering a face from below or the side
            if not out["boxes"]:
                break
            k = int(rng.integers(len(out["boxes"])))
            b = out["boxes"][k]
            side = math.sqrt(max(b[2] * b[3], 1.0))
            ang = rng.uniform(0.15, 0.85) * math.pi  # mostly from below (image y points down)
            if rng.random() < 0.4:
                ang = rng.choice([0.0, math.pi]) + rng.uniform(-0.3, 0.3)
            cx, cy = b[0] + b[2] / 2 + math.cos(ang) * side * 0.75, b[1] + b[3] / 2 + math.sin(ang) * side * 0.75
            r = side * rng.uniform(0.3, 0.55)
            aspect = rng.uniform(0.7, 1.4)
            img = self.split.scenes[rng.integers(len(self.split.scenes))]
            h, w = img.shape[:2]
            src_side = min(h, w) * rng.uniform(0.05, 0.5)
            sx = rng.uniform(src_side / 2, w - src_side / 2 + 1e-6)
            sy = rng.uniform(src_side / 2, h - src_side / 2 + 1e-6)
            m = _affine(sx, sy, 2 * r / src_side, math.radians(rng.uniform(-20, 20)), cx, cy, rng.random() < 0.5)
            self._paste_soft(canvas, img, m, cx, cy, r * 0.85, r * 1.1, cv2.BORDER_REFLECT_101, aspect=aspect)
            discs.append((len(out["boxes"]), cx, cy, r, aspect))
        return self._finish(canvas, occlusion_labels(out, discs))

    def mosaic(self) -> Canvas:
        """1–4 × 1–4 grid of LFW photos (random crop and zoom each), teacher labels kept."""
        import cv2

        rng, S = self.rng, self.size
        g = int(rng.choice([1, 2, 2, 3, 3, 4]))
        canvas = self._scene_background()
        out: dict[str, list] = {"boxes": [], "landmarks": [], "lm_valid": [], "ignore": []}
        edges = np.linspace(0, S, g + 1)
        for r in range(g):
            for c in range(g):
                if rng.random() < 0.15:
                    continue  # leave the scene showing
                x0, x1, y0, y1 = edges[c], edges[c + 1], edges[r], edges[r + 1]
                cw = x1 - x0
                photo = self._pick_photo()
                h, w = photo.image.shape[:2]
                # zoom: the cell shows a window of the photo between 0.45x and 1.3x its side
                win = min(h, w) * math.exp(rng.uniform(math.log(0.45), math.log(1.3)))
                k = rng.integers(len(photo.boxes))
                fc = photo.boxes[k, :2] + photo.boxes[k, 2:] / 2
                cx = fc[0] + rng.uniform(-0.3, 0.3) * win
                cy = fc[1] + rng.uniform(-0.3, 0.3) * win
                a = cw / win
                flip = bool(rng.random() < 0.5)
                m = _affine(cx, cy, a, math.radians(rng.uniform(-8, 8)), (x0 + x1) / 2, (y0 + y1) / 2, flip)
                yi0, yi1, xi0, xi1 = int(round(y0)), int(round(y1)), int(round(x0)), int(round(x1))
                mm = m.copy()
                mm[:, 2] -= [xi0, yi0]
                canvas[yi0:yi1, xi0:xi1] = cv2.warpAffine(
                    photo.image, mm, (xi1 - xi0, yi1 - yi0), flags=cv2.INTER_AREA if a < 0.8 else cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REFLECT_101)
                cell = np.array([x0, y0, x1 - x0, y1 - y0])
                lm = _flip_landmarks(_map_points(m, photo.landmarks.reshape(-1, 2)).reshape(-1, 5, 2), flip)
                boxes = hays_boxes(lm) if len(lm) else np.zeros((0, 4))
                ign = _map_boxes(m, photo.ignore)
                for bx, l in zip(boxes, lm):
                    vis = _visible_fraction(bx, cell)
                    if vis >= MIN_VISIBLE:
                        out["boxes"].append(bx)
                        out["landmarks"].append(l)
                        out["lm_valid"].append(1.0)
                    elif vis > 0.05:
                        out["ignore"].append(bx)
                for bx in ign:
                    if _visible_fraction(bx, cell) > 0.05:
                        out["ignore"].append(bx)
        return self._finish(canvas, out)

    def hard(self) -> Canvas:
        """A crop around a mined false positive (kept at about its scale), plus 0–2 pasted faces."""
        import cv2

        rng, S, sp = self.rng, self.size, self.split
        kind, idx, box = sp.hard[rng.integers(len(sp.hard))]
        src = sp.scenes[idx] if kind == "scene" else sp.photos[idx].image
        side = math.sqrt(max(box[2] * box[3], 1.0))
        target = float(np.clip(side * math.exp(rng.uniform(-0.3, 0.3)), self.min_face, self.max_face))
        a = target / side
        cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
        tx, ty = rng.uniform(target / 2, S - target / 2), rng.uniform(target / 2, S - target / 2)
        flip = bool(rng.random() < 0.5)
        m = _affine(cx, cy, a, 0.0, tx, ty, flip)
        canvas = cv2.warpAffine(src, m, (S, S), flags=cv2.INTER_AREA if a < 0.8 else cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT_101)
        out: dict[str, list] = {"boxes": [], "landmarks": [], "lm_valid": [], "ignore": []}
        taken = [np.array([tx - target / 2, ty - target / 2, target, target])]
        if kind == "photo":
            ph = sp.photos[idx]
            lm = _flip_landmarks(_map_points(m, ph.landmarks.reshape(-1, 2)).reshape(-1, 5, 2), flip)
            whole = np.array([0.0, 0.0, S, S])
            for bx, l in zip(hays_boxes(lm) if len(lm) else [], lm):
                if _visible_fraction(bx, whole) >= MIN_VISIBLE:
                    out["boxes"].append(bx)
                    out["landmarks"].append(l)
                    out["lm_valid"].append(1.0)
                    taken.append(bx)
                else:
                    out["ignore"].append(bx)
            out["ignore"].extend(_map_boxes(m, ph.ignore))
        for _ in range(int(rng.integers(0, 3))):
            self._paste_face(canvas, self._face_side(), taken, out)
        return self._finish(canvas, out)

    def scene(self) -> Canvas:
        """A face-free scene window, sometimes with decoys (pure negatives)."""
        canvas = self._scene_background()
        taken: list[np.ndarray] = []
        for _ in range(int(self.rng.integers(0, 4))):
            self._paste_decoy(canvas, self._face_side(), taken)
        return self._finish(canvas, {"boxes": [], "landmarks": [], "lm_valid": [], "ignore": []})

    def sample(self) -> Canvas:
        """One canvas of a random kind (kinds without sources are skipped)."""
        p = self.mix.copy()
        if not self.split.photos:
            p[1] = 0.0
        if not self.split.hard:
            p[2] = 0.0
        if not self.split.photos and not len(self.split.crops):
            p[0] = p[1] = 0.0
        kind = self.KINDS[int(self.rng.choice(4, p=p / p.sum()))]
        return getattr(self, kind)()

    def batch(self, n: int) -> list[Canvas]:
        """``n`` canvases."""
        return [self.sample() for _ in range(n)]

    # -- labels and photometry -----------------------------------------------------
    def _finish(self, canvas: np.ndarray, out: dict) -> Canvas:
        S = self.size
        boxes = np.asarray(out["boxes"], np.float64).reshape(-1, 4)
        lms = np.asarray(out["landmarks"], np.float64).reshape(-1, 5, 2)
        valid = np.asarray(out["lm_valid"], np.float64).reshape(-1)
        ignore = [np.asarray(out["ignore"], np.float64).reshape(-1, 4)]
        whole = np.array([0.0, 0.0, S, S])
        keep = np.array([_visible_fraction(b, whole) >= MIN_VISIBLE for b in boxes], bool).reshape(-1)
        ignore.append(boxes[~keep])
        boxes, lms, valid = boxes[keep], lms[keep], valid[keep]
        # a landmark outside the canvas is not a target
        inside = ((lms >= 0) & (lms < S)).all(axis=(1, 2)) if len(lms) else np.zeros(0, bool)
        valid = valid * inside
        if self.text and self.style_rng.random() < self.text:
            canvas = draw_text_decoys(canvas, self.style_rng, np.concatenate([boxes] + ignore),
                                      int(self.style_rng.integers(1, 5)))
        if self.blobs and self.style_rng.random() < self.blobs:
            canvas = draw_blob_decoys(canvas, self.style_rng, np.concatenate([boxes] + ignore),
                                      int(self.style_rng.integers(1, 11)))
        if self.style and self.style_rng.random() < self.style:
            canvas = stylise(canvas, self.style_rng)
            if not self.style_landmarks:  # points on a cartoon or a 1-bit print are not targets
                valid = valid * 0.0
        img = self._photometric(canvas) if self.augment else canvas
        return Canvas(np.ascontiguousarray(img), boxes.astype(np.float32), lms.astype(np.float32),
                      valid.astype(np.float32), np.concatenate(ignore).astype(np.float32))

    def _photometric(self, img: np.ndarray) -> np.ndarray:
        """Grey, contrast compression, brightness, gamma, blur, noise and JPEG, at random."""
        import cv2

        rng = self.rng
        x = img.astype(np.float32)
        if rng.random() < 0.45:  # the benchmark that judges us is grey
            g = x @ np.array([0.299, 0.587, 0.114], np.float32)
            x = np.repeat(g[..., None], 3, axis=2)
        else:
            grey = x.mean(axis=2, keepdims=True)
            x = grey + (x - grey) * rng.uniform(0.5, 1.4)
        mean = x.mean()
        if rng.random() < 0.3:  # low contrast
            x = (x - mean) * rng.uniform(0.35, 0.7) + mean
        else:
            x = (x - mean) * rng.uniform(0.75, 1.3) + mean
        x = x + rng.uniform(-35, 35)
        np.clip(x, 0, 255, out=x)
        if rng.random() < 0.3:
            x = 255.0 * (x / 255.0) ** rng.uniform(0.6, 1.6)
        if rng.random() < 0.2:
            x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 1.6))
        if rng.random() < 0.15:
            x = x + rng.normal(0, rng.uniform(2, 9), x.shape).astype(np.float32)
        out = np.clip(x, 0, 255).astype(np.uint8)
        if rng.random() < 0.35:
            ok, enc = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 90))])
            if ok:
                out = cv2.imdecode(enc, cv2.IMREAD_UNCHANGED)
                if out.ndim == 2:
                    out = np.repeat(out[..., None], 3, axis=2)
        return out


_FONTS = (0, 1, 2, 3, 4, 6, 7)  # cv2.FONT_HERSHEY_* (5, script simplex, left out; italics by flag)
_GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789&@$%!?.-"


def draw_text_decoys(img: np.ndarray, rng: np.random.Generator, avoid_xywh: np.ndarray, lines: int) -> np.ndarray:
    """Draw up to ``lines`` lines of random printed text that stay clear of ``avoid_xywh`` boxes.

    Letters and digits (round O, Q, 8, @ ...) are what a face detector fires on in posters,
    captions and magazine covers; here they are unlabelled, i.e. negatives. Glyph heights
    8 px to a third of the image, light to bold strokes, dark, light or coloured, sometimes
    on a plain band (a caption or sign). A line overlapping a box (even a little) is not drawn.
    """
    import cv2

    out = img.copy()
    h_img, w_img = out.shape[:2]
    avoid = np.asarray(avoid_xywh, np.float64).reshape(-1, 4)
    for _ in range(lines):
        italic = rng.random() < 0.2
        font = int(rng.choice(_FONTS)) | (cv2.FONT_ITALIC if italic else 0)
        word = "".join(rng.choice(list(_GLYPHS), int(rng.integers(2, 10))))
        if rng.random() < 0.5:
            word = word.upper()
        (_, h1), _ = cv2.getTextSize(word, font, 1.0, 1)
        height = math.exp(rng.uniform(math.log(8.0), math.log(max(min(h_img, w_img) / 3.0, 9.0))))
        scale = height / max(h1, 1)
        thick = max(1, int(round(scale * rng.uniform(0.8, 4.0))))
        (tw, th), base = cv2.getTextSize(word, font, scale, thick)
        x_lo, x_hi = sorted((-0.2 * tw, w_img - 0.8 * tw))  # a long word may run off both sides
        x = int(rng.uniform(x_lo, x_hi))
        y = int(rng.uniform(th, h_img + 0.2 * th))
        pad = thick + 2 + (int(0.3 * th) if italic else 0)  # slanted glyphs lean past the box
        box = np.array([x - pad, y - th - pad, tw + 2 * pad, th + base + 2 * pad], np.float64)
        if len(avoid) and _iou_xywh(box[None], avoid).max() > 0:  # touches a face or ignore region
            continue
        if rng.random() < 0.35:  # a plain band behind it: caption, sign, banner
            band = tuple(int(v) for v in rng.integers(0, 256, 3))
            cv2.rectangle(out, (int(box[0]), int(box[1])), (int(box[0] + box[2]), int(box[1] + box[3])), band, -1)
            bright = sum(band) / 3 > 127
            ink = tuple(int(v) for v in (rng.integers(0, 70, 3) if bright else rng.integers(186, 256, 3)))
        else:
            r = rng.random()
            ink = tuple(int(v) for v in (rng.integers(0, 60, 3) if r < 0.4 else rng.integers(200, 256, 3) if r < 0.7
                                         else rng.integers(0, 256, 3)))
        cv2.putText(out, word, (x, y), font, scale, ink, thick, cv2.LINE_AA)
    return out


#: The small round objects :func:`draw_blob_decoys` draws from.
BLOBS = ("button", "coin", "ring", "spot")


def draw_blob_decoys(img: np.ndarray, rng: np.random.Generator, avoid_xywh: np.ndarray, count: int) -> np.ndarray:
    """Draw up to ``count`` small round objects (buttons, coins, rings, bright or dark spots).

    Below ~20 px a face is a round blob with a few darker dots, and so are the jacket
    buttons, coins, rings and lamp highlights a detector fires on in real photos
    (``docs/detection.md``: most of the non-face false boxes on Caltech). Drawn unlabelled,
    i.e. as negatives: 5–48 px across (log-uniform), dark, light, metallic or coloured,
    shaded, sometimes with two or four holes (buttons) or a highlight, softened to the
    image's sharpness. An object overlapping a box of ``avoid_xywh`` (even a little) is not drawn.
    """
    import cv2

    out = img.copy()
    h_img, w_img = out.shape[:2]
    avoid = np.asarray(avoid_xywh, np.float64).reshape(-1, 4)
    for _ in range(count):
        d = math.exp(rng.uniform(math.log(5.0), math.log(48.0)))
        r = d / 2
        cx, cy = rng.uniform(0, w_img), rng.uniform(0, h_img)
        box = np.array([cx - r - 2, cy - r - 2, d + 4, d + 4], np.float64)
        if len(avoid) and _iou_xywh(box[None], avoid).max() > 0:
            continue
        x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
        x1, y1 = min(int(math.ceil(box[0] + box[2])), w_img), min(int(math.ceil(box[1] + box[3])), h_img)
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        kind = BLOBS[int(rng.integers(len(BLOBS)))]
        u = rng.random()
        if kind in ("coin", "ring") and u < 0.7:  # metal: silver, gold, copper
            base = np.array([(200, 200, 205), (212, 175, 55), (184, 115, 51)][int(rng.integers(3))], np.float64)
            base = np.clip(base * rng.uniform(0.5, 1.1), 0, 255)
        elif u < 0.35:
            base = rng.uniform(0, 70, 3)
        elif u < 0.6:
            base = rng.uniform(180, 255, 3)
        else:
            base = rng.uniform(0, 255, 3)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        dist = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
        alpha = np.clip(r + 0.5 - dist, 0.0, 1.0)  # antialiased disc
        # light from one side: a linear shade across the disc
        ang = rng.uniform(0, 2 * math.pi)
        shade = 1.0 + rng.uniform(0.1, 0.5) * ((xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)) / max(r, 1)
        col = base[None, None, :] * shade[..., None]
        if kind == "ring":
            inner = r * rng.uniform(0.55, 0.8)
            alpha = alpha * np.clip(dist - inner + 0.5, 0.0, 1.0)
        elif kind in ("button", "coin"):
            rim = np.clip(1.0 - np.abs(dist - r * rng.uniform(0.75, 0.9)) / max(r * 0.08, 0.6), 0.0, 1.0)
            col = col * (1.0 - 0.35 * rim[..., None] * (1 if rng.random() < 0.5 else -1))
            if kind == "button" and r >= 3 and rng.random() < 0.7:
                holes = 2 if rng.random() < 0.5 else 4
                off, hr = r * rng.uniform(0.2, 0.35), max(r * rng.uniform(0.08, 0.15), 0.5)
                rot = rng.uniform(0, math.pi)
                for k in range(holes):
                    a = rot + 2 * math.pi * k / holes
                    hd = np.hypot(xx + 0.5 - (cx + off * math.cos(a)), yy + 0.5 - (cy + off * math.sin(a)))
                    col = col * (1.0 - 0.7 * np.clip(hr + 0.5 - hd, 0.0, 1.0))[..., None]
        else:  # spot: a soft highlight or shadow
            alpha = np.exp(-0.5 * (dist / max(r * 0.5, 0.5)) ** 2)
        if kind != "spot" and rng.random() < 0.5:  # a specular highlight
            hx, hy = cx - 0.35 * r * math.cos(ang), cy - 0.35 * r * math.sin(ang)
            hl = np.exp(-0.5 * (np.hypot(xx - hx, yy - hy) / max(r * 0.18, 0.5)) ** 2)
            col = col + (255.0 - col) * 0.8 * hl[..., None]
        patch = out[y0:y1, x0:x1].astype(np.float64)
        blended = patch * (1 - alpha[..., None]) + np.clip(col, 0, 255) * alpha[..., None]
        sigma = rng.uniform(0.0, 1.0)
        if sigma > 0.3:
            blended = cv2.GaussianBlur(blended, (0, 0), sigma)
        out[y0:y1, x0:x1] = np.clip(blended, 0, 255).astype(np.uint8)
    return out


#: The renderings :func:`stylise` draws from.
STYLES = ("binary", "halftone", "poster", "cartoon", "sketch")


def stylise(img: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """Re-render an RGB uint8 image as a non-photograph; geometry is unchanged.

    ``binary``: 1-bit print (Otsu or local threshold); ``halftone``: ordered dither at a
    random dot size; ``poster``: 2–5 grey or colour levels; ``cartoon``: smoothed flat
    colours with dark ink lines; ``sketch``: pencil drawing (colour dodge of the grey
    image by its blurred negative). ``kind`` picks one (random otherwise).
    """
    import cv2

    if kind is None:
        kind = STYLES[int(rng.integers(len(STYLES)))]
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if kind == "binary":
        g = cv2.GaussianBlur(grey, (0, 0), rng.uniform(0.3, 1.2))
        if rng.random() < 0.5:
            _, out = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        else:
            block = int(rng.choice([15, 25, 41, 61]))
            out = cv2.adaptiveThreshold(g, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, block,
                                        float(rng.uniform(-4, 8)))
    elif kind == "halftone":
        bayer = np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]], np.float32)
        cell = int(rng.integers(1, 3))  # dot pitch 4 or 8 px
        tile = (np.kron(bayer, np.ones((cell, cell), np.float32)) + 0.5) / 16.0 * 255.0
        h, w = grey.shape
        reps = (h // tile.shape[0] + 1, w // tile.shape[1] + 1)
        out = np.where(grey.astype(np.float32) > np.tile(tile, reps)[:h, :w], 255, 0).astype(np.uint8)
    elif kind == "poster":
        levels = int(rng.integers(2, 6))
        src = (grey[..., None] if rng.random() < 0.6 else img).astype(np.float32)
        q = np.floor(src / 256.0 * levels) * (255.0 / max(levels - 1, 1))
        out = np.clip(q, 0, 255).astype(np.uint8)
        if out.shape[-1] == 1:
            out = out[..., 0]
    elif kind == "cartoon":
        smooth = img
        for _ in range(int(rng.integers(1, 3))):
            smooth = cv2.bilateralFilter(smooth, 7, float(rng.uniform(40, 90)), 7)
        levels = int(rng.integers(3, 7))
        flat = (np.floor(smooth.astype(np.float32) / 256.0 * levels) + 0.5) * (256.0 / levels)
        edges = cv2.adaptiveThreshold(cv2.medianBlur(grey, 5), 255, cv2.ADAPTIVE_THRESH_MEAN_C,
                                      cv2.THRESH_BINARY, 9, float(rng.uniform(2, 6)))
        out = np.clip(flat * (edges[..., None] / 255.0), 0, 255).astype(np.uint8)
    elif kind == "sketch":
        inv = cv2.GaussianBlur(255 - grey, (0, 0), rng.uniform(3.0, 9.0))
        out = cv2.divide(grey, np.maximum(255 - inv, 1).astype(np.uint8), scale=256)
    else:
        raise ValueError(f"unknown style {kind!r}; choose from {', '.join(STYLES)}")
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out)


def occlusion_labels(out: dict[str, list], discs: Sequence[tuple[int, float, float, float, float]],
                     max_hidden: float = 0.5) -> dict[str, list]:
    """Labels of faces pasted one over another: ``out`` lists boxes (xywh), landmarks,
    landmark validity and ignore boxes in paste order; each disc ``(n, x, y, r, aspect)``
    was pasted after the first ``n`` faces and hides what it covers of them. A face more
    than ``max_hidden`` covered becomes an ignore region; one with a landmark covered
    keeps its box, not its landmark targets."""
    res: dict[str, list] = {"boxes": [], "landmarks": [], "lm_valid": [], "ignore": list(out["ignore"])}
    for k, (b, lm, v) in enumerate(zip(out["boxes"], out["landmarks"], out["lm_valid"])):
        later = [(x, y, r, asp) for before, x, y, r, asp in discs if before > k]
        if _hidden_fraction(np.asarray(b, np.float64), later) > max_hidden:
            res["ignore"].append(b)
            continue
        if v and later and _points_hidden(lm, later).any():
            v = 0.0
        res["boxes"].append(b)
        res["landmarks"].append(lm)
        res["lm_valid"].append(v)
    return res


def _points_hidden(points: np.ndarray, discs: Sequence[tuple[float, float, float, float]]) -> np.ndarray:
    """Which ``(K, 2)`` points lie inside any elliptic disc ``(x, y, r, aspect)`` (x radius r·aspect)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    hid = np.zeros(len(pts), bool)
    for x, y, r, asp in discs:
        hid |= np.hypot((pts[:, 0] - x) / asp, pts[:, 1] - y) < r
    return hid


def _hidden_fraction(box: np.ndarray, discs: Sequence[tuple[float, float, float, float]], grid: int = 12) -> float:
    """Fraction of ``box`` (xywh) covered by the elliptic discs, on a ``grid × grid`` sample."""
    if not discs:
        return 0.0
    g = (np.arange(grid) + 0.5) / grid
    xx, yy = np.meshgrid(box[0] + g * box[2], box[1] + g * box[3])
    return float(_points_hidden(np.stack([xx.ravel(), yy.ravel()], 1), discs).mean())


def _visible_fraction(box: np.ndarray, region: np.ndarray) -> float:
    """Fraction of ``box``'s area (xywh) inside ``region`` (xywh)."""
    ix = max(0.0, min(box[0] + box[2], region[0] + region[2]) - max(box[0], region[0]))
    iy = max(0.0, min(box[1] + box[3], region[1] + region[3]) - max(box[1], region[1]))
    return ix * iy / max(box[2] * box[3], 1e-6)
