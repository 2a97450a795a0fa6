"""Grad-CAM for the face classifier: where in each detection the CNN sees face evidence.

For a detection, the window around it is resampled so the face fills the
classifier's window, with one window-width of context on every side (a
``3·window`` crop, 96 px by default). The net's face logit for the central window
is back-propagated to the trunk's last feature map ``A`` (stride 8); Grad-CAM
(Selvaraju et al. 2017) weights each channel by its spatially averaged gradient,
``cam = ReLU(Σ_c mean(∂y/∂A_c) · A_c)``, upsamples it to the crop and normalises it
to [0, 1]. The class-activation map of the lecture notes is the special case of a
global-average-pooled linear head; Grad-CAM extends it to any differentiable head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from facepipe.detect.base import check_image
from facepipe.types import Box, Detection

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FaceCam:
    """One detection's Grad-CAM: the heat map over the crop and where the crop lies."""

    detection: Detection
    crop: np.ndarray  # RGB uint8 (S, S, 3) the net saw
    heat: np.ndarray  # float32 (S, S) in [0, 1]
    matrix: np.ndarray  # 2x3 affine mapping image pixels to crop pixels
    logit: float


def _crop_matrix(box: Box, window: int, size: int) -> np.ndarray:
    side = max(np.sqrt(max(box.w, 1e-3) * max(box.h, 1e-3)), 1e-3)
    cx, cy = box.center
    a = window / side
    return np.array([[a, 0.0, size / 2.0 - a * cx], [0.0, a, size / 2.0 - a * cy]])


def gradcam(net: "torch.nn.Module", x: "torch.Tensor", cell: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Grad-CAM of the face logit at output ``cell`` for one normalised input ``(1, 3, H, W)``.

    Returns the map at the trunk's resolution (float32, not normalised) and the logit.
    """
    import torch

    net.eval()
    with torch.enable_grad():
        feats = net.trunk(x).detach().requires_grad_(True)
        y = net.head(feats)
        logit = y[0, 0, cell[0], cell[1]]
        (grad,) = torch.autograd.grad(logit, feats)
    weights = grad[0].mean(dim=(1, 2))  # (C,)
    cam = torch.relu((weights[:, None, None] * feats[0].detach()).sum(dim=0))
    return cam.cpu().numpy().astype(np.float32), float(logit.detach())


def explain_detections(image: np.ndarray, detections: Sequence[Detection], weights: str | None = None,
                       device: str = "cpu", context_windows: int = 1) -> list[FaceCam]:
    """Grad-CAM heat maps of the classifier's face evidence for each detection."""
    import cv2

    from facepipe.detect.cnn import load_checkpoint, to_tensor_batch
    from facepipe.device import resolve_device

    check_image(image)
    dev = resolve_device(device)
    ckpt = load_checkpoint(weights)
    net = ckpt.net.to(dev)
    cfg = ckpt.config
    size = cfg.window * (1 + 2 * context_windows)
    out = []
    for det in detections:
        m = _crop_matrix(det.box, cfg.window, size)
        interp = cv2.INTER_AREA if m[0, 0] < 1 else cv2.INTER_LINEAR
        crop = cv2.warpAffine(image, m, (size, size), flags=interp, borderMode=cv2.BORDER_REFLECT_101)
        x = net.normalize(to_tensor_batch(crop[None]).to(dev))
        grid = (size - cfg.window) // cfg.stride + 1
        cam, logit = gradcam(net, x, (grid // 2, grid // 2))
        heat = cv2.resize(cam, (size, size), interpolation=cv2.INTER_CUBIC)
        heat = np.clip(heat, 0, None)
        heat = heat / heat.max() if heat.max() > 0 else heat
        out.append(FaceCam(det, crop, heat.astype(np.float32), m, logit))
    return out


def overlay(image: np.ndarray, cams: Sequence[FaceCam], alpha: float = 0.55) -> np.ndarray:
    """The image with every detection's heat map blended in (JET colours) and boxes drawn."""
    import cv2

    from facepipe.draw import draw_detections

    h, w = image.shape[:2]
    heat = np.zeros((h, w), np.float32)
    for c in cams:
        inv = cv2.invertAffineTransform(c.matrix)
        back = cv2.warpAffine(c.heat, inv, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
        heat = np.maximum(heat, back)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    a = (alpha * heat)[:, :, None]
    blended = (image.astype(np.float32) * (1 - a) + colour.astype(np.float32) * a).astype(np.uint8)
    labels = [f"{c.detection.score:.2f}" for c in cams]
    return draw_detections(blended, [c.detection for c in cams], labels)


def face_panels(cams: Sequence[FaceCam], alpha: float = 0.55, scale: int = 2) -> np.ndarray:
    """A strip with, per detection, its crop above its Grad-CAM overlay (RGB uint8)."""
    import cv2

    cols = []
    for c in cams:
        colour = cv2.applyColorMap((c.heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
        a = (alpha * c.heat)[:, :, None]
        ov = (c.crop.astype(np.float32) * (1 - a) + colour * a).astype(np.uint8)
        col = np.concatenate([c.crop, ov], axis=0)
        cols.append(cv2.resize(col, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST))
    if not cols:
        return np.zeros((1, 1, 3), np.uint8)
    sep = np.full((cols[0].shape[0], 4, 3), 255, np.uint8)
    parts = []
    for k, c in enumerate(cols):
        if k:
            parts.append(sep)
        parts.append(c)
    return np.concatenate(parts, axis=1)
