"""Draw detections and labels on images (for --annotate and video output)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from facepipe.types import Detection

_PALETTE = [
    (46, 204, 113), (52, 152, 219), (231, 76, 60), (241, 196, 15),
    (155, 89, 182), (26, 188, 156), (230, 126, 34), (236, 240, 241),
]


def color_for(index: int) -> tuple[int, int, int]:
    """A stable, distinct RGB colour for an index (track id, identity number)."""
    return _PALETTE[index % len(_PALETTE)]


def draw_detections(
    image: np.ndarray,
    detections: Sequence[Detection],
    labels: Sequence[str] | None = None,
    colors: Sequence[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """Return a copy of an RGB image with boxes, optional labels and landmarks drawn."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    thick = max(1, int(round(min(h, w) / 300)))
    font_scale = max(0.4, min(h, w) / 900)
    for i, det in enumerate(detections):
        color = colors[i] if colors is not None else (46, 204, 113)
        x1, y1, x2, y2 = (int(round(v)) for v in det.box.xyxy())
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick, cv2.LINE_AA)
        text = labels[i] if labels is not None else f"{det.score:.2f}"
        if text:
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
            ty = y1 - 4 if y1 - th - 6 >= 0 else y2 + th + 4
            cv2.rectangle(out, (x1, ty - th - 3), (x1 + tw + 4, ty + base - 1), color, -1)
            cv2.putText(out, text, (x1 + 2, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                        (0, 0, 0), 1, cv2.LINE_AA)
        if det.landmarks is not None:
            for (lx, ly) in det.landmarks:
                cv2.circle(out, (int(round(lx)), int(round(ly))), max(1, thick), (255, 0, 0), -1)
    return out
