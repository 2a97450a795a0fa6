"""Box geometry shared by the detectors and the video tracker (numpy only)."""

from __future__ import annotations

import numpy as np


def suppress_contained(boxes_xyxy: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices (by descending score) of the boxes no higher-scoring box contains.

    A box is dropped when at least ``threshold`` of the smaller of it and a higher-scoring
    kept box lies inside the other (intersection over the smaller area, MTCNN's "Min" NMS):
    plain IoU NMS keeps a head box nested in a larger one for the same face, since their
    IoU is small, and Haar keeps nested boxes of one face at neighbouring scales. Ties in
    score keep the earlier box. ``threshold`` ≥ 1 keeps every box.
    """
    order = np.argsort(-scores, kind="stable")
    if threshold >= 1.0 or len(order) < 2:
        return order
    b = boxes_xyxy[order].astype(np.float64)
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    iomin = iw * ih / np.maximum(np.minimum(area[:, None], area[None, :]), 1e-9)
    alive = np.ones(len(b), bool)
    for i in range(len(b)):
        if alive[i]:
            later = np.arange(i + 1, len(b))
            alive[later[iomin[i, later] >= threshold]] = False
    return order[alive]
