"""Detector evaluation: precision–recall, average precision, recall and FP/image.

Works on any set in the ``facepipe-detection-v1`` format (``annotations.json``
with ``images[].file`` and ``images[].boxes`` as ``[x, y, w, h]``). Matching is
PASCAL VOC style: detections of the whole set are sorted by score; each is a
true positive if it overlaps a not-yet-matched ground-truth box of its image with
IoU at least the threshold (the best such box is taken), else a false positive.
AP is the all-point interpolated area under the precision–recall curve.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from facepipe.errors import InputError
from facepipe.types import Box, Detection


@dataclass(frozen=True)
class GroundTruthImage:
    """One annotated image: its file and its face boxes."""

    path: Path
    boxes: tuple[Box, ...]
    width: int
    height: int


def load_annotations(path: str | Path) -> list[GroundTruthImage]:
    """Read a ``facepipe-detection-v1`` ``annotations.json`` (file or its directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "annotations.json"
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise InputError(p, "annotation file not found") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(p, f"cannot parse annotations ({exc})") from exc
    if doc.get("format") != "facepipe-detection-v1" or "images" not in doc:
        raise InputError(p, "not a facepipe-detection-v1 annotation file")
    out = []
    for entry in doc["images"]:
        boxes = tuple(Box(*map(float, b)) for b in entry.get("boxes", []))
        out.append(
            GroundTruthImage(p.parent / entry["file"], boxes, int(entry.get("width", 0)),
                             int(entry.get("height", 0)))
        )
    return out


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every row of ``a`` (N, 4 xywh) and ``b`` (M, 4 xywh)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ax1, ay1 = a[:, 0:1], a[:, 1:2]
    ax2, ay2 = ax1 + a[:, 2:3], ay1 + a[:, 3:4]
    bx1, by1 = b[:, 0], b[:, 1]
    bx2, by2 = bx1 + b[:, 2], by1 + b[:, 3]
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    union = (a[:, 2:3] * a[:, 3:4]) + (b[:, 2] * b[:, 3]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@dataclass
class PRResult:
    """Precision–recall outcome of one detector at one IoU threshold."""

    iou: float
    ap: float
    recall: float
    precision: float
    fp_per_image: float
    n_gt: int
    n_det: int
    tp: int
    fp: int
    recall_curve: list[float] = field(repr=False, default_factory=list)
    precision_curve: list[float] = field(repr=False, default_factory=list)
    scores: list[float] = field(repr=False, default_factory=list)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP (VOC 2010+): area under the monotone precision envelope."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def precision_recall(
    detections: Sequence[Sequence[Detection]],
    ground_truth: Sequence[Sequence[Box]],
    iou_threshold: float = 0.5,
) -> PRResult:
    """Match detections to ground truth over a whole set and compute PR/AP."""
    if len(detections) != len(ground_truth):
        raise ValueError("detections and ground_truth must have one entry per image")
    n_gt = sum(len(g) for g in ground_truth)
    flat: list[tuple[float, int, int]] = []  # (score, image index, detection index)
    for i, dets in enumerate(detections):
        for j, d in enumerate(dets):
            flat.append((float(d.score), i, j))
    flat.sort(key=lambda t: -t[0])
    gt_arrays = [np.array([[b.x, b.y, b.w, b.h] for b in g], dtype=np.float64).reshape(-1, 4)
                 for g in ground_truth]
    matched = [np.zeros(len(g), dtype=bool) for g in ground_truth]
    tp = np.zeros(len(flat))
    for k, (_, i, j) in enumerate(flat):
        g = gt_arrays[i]
        if len(g) == 0:
            continue
        b = detections[i][j].box
        ious = box_iou_matrix(np.array([[b.x, b.y, b.w, b.h]]), g)[0]
        ious[matched[i]] = -1.0
        best = int(np.argmax(ious))
        if ious[best] >= iou_threshold:
            matched[i][best] = True
            tp[k] = 1.0
    ctp = np.cumsum(tp)
    cfp = np.cumsum(1.0 - tp)
    recall = ctp / max(n_gt, 1)
    precision = ctp / np.maximum(ctp + cfp, 1e-12)
    ap = average_precision(recall, precision) if len(flat) else 0.0
    n_img = max(len(detections), 1)
    return PRResult(
        iou=iou_threshold,
        ap=ap,
        recall=float(recall[-1]) if len(flat) else 0.0,
        precision=float(precision[-1]) if len(flat) else 0.0,
        fp_per_image=float(cfp[-1]) / n_img if len(flat) else 0.0,
        n_gt=n_gt,
        n_det=len(flat),
        tp=int(ctp[-1]) if len(flat) else 0,
        fp=int(cfp[-1]) if len(flat) else 0,
        recall_curve=recall.tolist(),
        precision_curve=precision.tolist(),
        scores=[t[0] for t in flat],
    )


@dataclass
class DetectorRun:
    """Detections of one detector over a set, with per-image timings in ms."""

    name: str
    detections: list[list[Detection]]
    ms_per_image: list[float]


def run_detector(
    detect: Callable[[np.ndarray], list[Detection]],
    images: Iterable[np.ndarray],
    name: str,
    warmup: int = 1,
) -> DetectorRun:
    """Run ``detect`` over decoded images, timing each call (decode excluded)."""
    dets: list[list[Detection]] = []
    times: list[float] = []
    imgs = list(images)
    for im in imgs[:warmup]:
        detect(im)
    for im in imgs:
        t0 = time.perf_counter()
        dets.append(detect(im))
        times.append((time.perf_counter() - t0) * 1000.0)
    return DetectorRun(name, dets, times)


def summarize(run: DetectorRun, ground_truth: Sequence[Sequence[Box]],
              ious: Sequence[float] = (0.5, 0.3)) -> dict[str, object]:
    """JSON-ready summary: per IoU AP/recall/precision/FPPI, plus median ms/image."""
    out: dict[str, object] = {
        "detector": run.name,
        "images": len(run.detections),
        "median_ms_per_image": float(np.median(run.ms_per_image)) if run.ms_per_image else None,
    }
    for t in ious:
        r = precision_recall(run.detections, ground_truth, t)
        out[f"iou{t:g}"] = {
            "ap": round(r.ap, 4),
            "recall": round(r.recall, 4),
            "precision": round(r.precision, 4),
            "fp_per_image": round(r.fp_per_image, 4),
            "tp": r.tp,
            "fp": r.fp,
            "n_gt": r.n_gt,
            "n_det": r.n_det,
        }
    return out


def plot_pr_curves(
    curves: dict[str, PRResult], out_path: str | Path, title: str = "Precision–recall"
) -> None:
    """Plot several detectors' PR curves on one figure (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    # Labels of the form "name @IoU0.5" share name's colour; the looser IoU is solid.
    colours: dict[str, str] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for label, r in curves.items():
        base, _, iou = label.partition(" @IoU")
        colour = colours.setdefault(base, cycle[len(colours) % len(cycle)])
        style = "--" if iou and float(iou) >= 0.5 else "-"
        ax.plot(r.recall_curve, r.precision_curve, lw=1.6, ls=style, color=colour,
                label=f"{label} (AP {r.ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
