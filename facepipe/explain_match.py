"""Why this name? Explaining a gallery match: candidates, margin, threshold and the regions that matched.

For a face and a gallery, :func:`explain_faces` ranks the enrolled people (similarity,
distance, margin to the runner-up, the threshold and tolerance in force, see
:mod:`facepipe.scores`), finds the best person's enrolled photo that is closest to the
face (re-embedding the photos named in the gallery's labels; missing photos are
reported, not fatal) and computes, for both aligned crops, a map of the regions that
drove their similarity:

* ``gradcam`` (embedders with a convolutional trunk, ``net.features``; not dlib's ResNet family, whose 2×2 last map is too coarse): Grad-CAM on the
  embedding similarity. With ``A`` the trunk's last feature map of one crop, ``u`` its
  raw embedding and ``t`` the other crop's unit embedding, ``s = <u, t> / ‖u‖`` (the
  cosine similarity, with ‖u‖ held fixed so that the normalisation does not project the
  gradient away) is back-propagated to ``A``; each channel is weighted by its spatially
  averaged gradient and ``map = ReLU(Σ_c mean(∂s/∂A_c) · A_c)``, upsampled to the crop
  and scaled to [0, 1]. For a global-average-pooled linear head, as facepipe's embedders
  have, the map before ReLU sums exactly to ``s − s(A = 0)``: each cell's share of the
  similarity (a similarity-CAM, Stylianou et al. 2019). It explains the network without
  flip test-time augmentation; the similarity printed is the embedder's own.
* ``occlusion`` (any embedder, e.g. dlib's): a grey patch slides over the crop; a
  pixel's value is the mean drop in similarity over the patches covering it (rises
  are ignored), scaled to [0, 1].

``auto`` uses Grad-CAM where the embedder supports it, else occlusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from facepipe.errors import FacepipeError
from facepipe.scores import Verdict, decide

if TYPE_CHECKING:
    import torch

    from facepipe.pipeline import FacePipeline
    from facepipe.types import Detection

METHODS = ("auto", "gradcam", "occlusion")


class ExplainUnsupported(FacepipeError):
    """The embedder does not support the requested explanation method."""


@dataclass(frozen=True)
class Reference:
    """The enrolled photo of the best person closest to the probe, with its map."""

    source: str
    crop: np.ndarray
    heat: np.ndarray
    similarity: float  # probe vs this photo's face (the embedder's own similarity)


@dataclass(frozen=True)
class MatchExplanation:
    """One face's answer and the evidence for it."""

    detection: "Detection"
    verdict: Verdict
    crop: np.ndarray  # the probe's aligned crop
    heat: np.ndarray | None  # where the probe matched its reference, [0, 1]
    reference: Reference | None
    problem: str | None  # why there is no reference (no candidates, photos missing, ...)
    method: str

    def to_dict(self, top_k: int | None = None) -> dict[str, Any]:
        """JSON fields: the face, the decision (see Verdict.to_dict) and the reference used."""
        d = {**self.detection.to_dict(), **self.verdict.to_dict(top_k), "method": self.method}
        d["reference"] = None if self.reference is None else {
            "source": self.reference.source, "similarity": round(self.reference.similarity, 5),
            "distance": round(1.0 - self.reference.similarity, 5)}
        d["reference_problem"] = self.problem
        return d


# --------------------------------------------------------------------------- maps


def _network(embedder: Any) -> Any:
    net = getattr(embedder, "net", None)
    eid = getattr(embedder, "embedder_id", embedder)
    if net is not None and hasattr(net, "blocks") and hasattr(net, "stem"):
        # dlib's face ResNet family pools a 2x2 map (150-px chips): Grad-CAM would paint four squares
        raise ExplainUnsupported(f"embedder {eid!r}: its last feature map (2x2 for dlib's ResNet) is too coarse "
                                 "for Grad-CAM; use --method occlusion")
    if net is None or not hasattr(net, "forward_unnormalised") or _trunk(net) is None:
        raise ExplainUnsupported(f"embedder {eid!r} has no convolutional trunk to explain with Grad-CAM; "
                                 "use --method occlusion")
    return net


def _trunk(net: Any) -> Any:
    """The module whose output is the last convolutional map before global pooling (``features``)."""
    import torch

    m = getattr(net, "features", None)
    return m if isinstance(m, torch.nn.Module) else None


def _input(embedder: Any, crop: np.ndarray) -> "torch.Tensor":
    """The crop as the network's normalised input ``(1, 3, S, S)`` (the embedder's preprocessing)."""
    import torch

    from facepipe.embed.network import input_affine

    crops = embedder.check_crops(np.ascontiguousarray(crop[None]))
    a, b = (torch.from_numpy(v).view(1, 3, 1, 1) for v in input_affine(embedder.preprocess))
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() * a - b
    return x.to(embedder.device)


def dot_from_features(embedder: Any, crop: np.ndarray, target: np.ndarray,
                      delta: "torch.Tensor | None" = None) -> tuple[float, float, "torch.Tensor", "torch.Tensor"]:
    """The raw embedding ``u = head(A)`` of ``crop`` against ``target``, with the trunk's map ``A`` exposed.

    Returns ``(<u, t>, ‖u‖, A, ∂<u, t>/∂A)`` (no flip TTA); the cosine similarity is
    ``<u, t> / ‖u‖``. ``delta`` (shaped like ``A``) is added to the feature map first, for
    finite-difference checks.
    """
    import torch

    net = _network(embedder)
    x = _input(embedder, crop)
    t = torch.as_tensor(np.asarray(target, np.float32), device=x.device)
    held: dict[str, torch.Tensor] = {}

    def hook(_m: Any, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        a = out.detach().float().contiguous()
        if delta is not None:
            a = a + delta.to(a)
        a.requires_grad_(True)
        held["A"] = a
        return a

    handle = _trunk(net).register_forward_hook(hook)
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            u = net.forward_unnormalised(x).float()[0]
            dot = (u * t).sum()
            (grad,) = torch.autograd.grad(dot, held["A"])
    finally:
        handle.remove()
        net.train(was_training)
    return float(dot.detach()), float(u.detach().norm()), held["A"].detach()[0], grad[0]


def gradcam_terms(embedder: Any, crop: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Grad-CAM of the similarity at the trunk's resolution, before ReLU, and the similarity.

    ``cam[h, w] = Σ_c mean_hw(∂s/∂A_c) · A_c[h, w]`` with ``s = <u, t> / ‖u‖`` and ‖u‖ held
    fixed (so the gradient is not projected away by the normalisation). For a
    global-average-pooled linear head (facepipe's embedders) the map is an exact
    decomposition: ``Σ cam = s − s(A = 0)``.
    """
    dot, norm, a, grad = dot_from_features(embedder, crop, target)
    g = grad / max(norm, 1e-12)
    cam = (g.mean(dim=(1, 2))[:, None, None] * a).sum(dim=0).cpu().numpy()
    return cam.astype(np.float32), dot / max(norm, 1e-12)


def _normalise(heat: np.ndarray) -> np.ndarray:
    heat = np.clip(np.nan_to_num(heat.astype(np.float32)), 0, None)
    m = float(heat.max())
    return heat / m if m > 0 else heat


def similarity_gradcam(embedder: Any, crop: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Grad-CAM of the similarity between ``crop``'s embedding and the unit vector ``target``,
    as a float32 map over the crop in [0, 1]."""
    import cv2

    cam, _ = gradcam_terms(embedder, crop, target)
    cam = np.clip(cam, 0, None)  # positive evidence for the match
    size = crop.shape[0]
    return _normalise(cv2.resize(cam, (size, size), interpolation=cv2.INTER_CUBIC))


def occlusion_map(embedder: Any, crop: np.ndarray, target: np.ndarray, patch: int | None = None,
                  stride: int | None = None) -> np.ndarray:
    """Similarity drop when a grey patch hides each region of ``crop`` (float32 map in [0, 1])."""
    size = crop.shape[0]
    patch = patch or max(4, size // 6)
    stride = stride or max(2, patch // 2)
    fill = crop.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    starts = list(range(0, max(size - patch, 0) + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    boxes = [(y, x) for y in starts for x in starts]
    batch = np.repeat(crop[None], len(boxes), axis=0)
    for k, (y, x) in enumerate(boxes):
        batch[k, y:y + patch, x:x + patch] = fill
    t = np.asarray(target, np.float32)
    base = float(embedder.embed(np.ascontiguousarray(crop[None]))[0] @ t)
    sims = embedder.embed(batch) @ t
    drop = np.zeros((size, size), np.float64)
    count = np.zeros((size, size), np.float64)
    for (y, x), s in zip(boxes, sims):
        drop[y:y + patch, x:x + patch] += max(0.0, base - float(s))
        count[y:y + patch, x:x + patch] += 1
    return _normalise(drop / np.maximum(count, 1))


def match_map(embedder: Any, crop: np.ndarray, target: np.ndarray, method: str = "auto") -> tuple[np.ndarray, str]:
    """The map of ``method`` (``auto``: Grad-CAM when supported, else occlusion) and the method used."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method in ("auto", "gradcam"):
        try:
            return similarity_gradcam(embedder, crop, target), "gradcam"
        except ExplainUnsupported:
            if method == "gradcam":
                raise
    return occlusion_map(embedder, crop, target), "occlusion"


# --------------------------------------------------------------------------- faces


def _best_reference(pipe: "FacePipeline", probe: np.ndarray, sources: Sequence[str | None],
                    max_photos: int) -> tuple[tuple[str, np.ndarray, float] | None, list[str]]:
    """The enrolled photo whose largest face is closest to ``probe``: (source, crop, similarity)."""
    from facepipe.io import load_image

    problems: list[str] = []
    best: tuple[str, np.ndarray, float] | None = None
    for src in [s for s in sources if s][:max_photos]:
        if not Path(src).is_file():
            problems.append(f"{src}: enrolled photo is missing")
            continue
        try:
            res = pipe.process(load_image(src))
        except FacepipeError as exc:
            problems.append(str(exc))
            continue
        if not res.faces:
            problems.append(f"{src}: no usable face found in the enrolled photo")
            continue
        face = max(res.faces, key=lambda f: f.detection.box.area)
        sim = float(np.asarray(face.embedding) @ probe)
        if best is None or sim > best[2]:
            best = (src, face.crop, sim)
    if not [s for s in sources if s]:
        problems.append("the gallery records no source photo for this person")
    return best, problems


def explain_faces(image: np.ndarray, pipe: "FacePipeline", gallery: Any, threshold: float,
                  min_margin: float = 0.0, top_k: int = 3, method: str = "auto", max_photos: int = 20,
                  detections: Sequence["Detection"] | None = None) -> list[MatchExplanation]:
    """Explain the gallery's answer for every embedded face of ``image`` (detection order);
    ``detections`` skips detection (the pipeline's detector runs otherwise)."""
    result = pipe.process(image, detections)
    if not result.faces:
        return []
    ranked = gallery.rank(result.embeddings, top_k=max(top_k, 2))
    out = []
    for face, cands in zip(result.faces, ranked):
        verdict = decide(cands, threshold, min_margin)
        probe = np.asarray(face.embedding, np.float32)
        if verdict.best is None:
            out.append(MatchExplanation(face.detection, verdict, face.crop, None, None,
                                        "the gallery is empty", method))
            continue
        found, problems = _best_reference(pipe, probe, gallery.sources(verdict.best), max_photos)
        if found is None:
            out.append(MatchExplanation(face.detection, verdict, face.crop, None, None,
                                        "; ".join(problems) or "no enrolled photo available", method))
            continue
        src, ref_crop, sim = found
        ref_vec = pipe.embedder.embed(np.ascontiguousarray(ref_crop[None]))[0]
        heat, used = match_map(pipe.embedder, face.crop, ref_vec, method)
        ref_heat, _ = match_map(pipe.embedder, ref_crop, probe, used)
        out.append(MatchExplanation(face.detection, verdict, face.crop, heat,
                                    Reference(src, ref_crop, ref_heat, sim), None, used))
    return out


# --------------------------------------------------------------------------- pictures


def _blend(crop: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    import cv2

    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    a = (alpha * heat)[:, :, None]
    return (crop.astype(np.float32) * (1 - a) + colour.astype(np.float32) * a).astype(np.uint8)


def _tile(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)


def _text_block(lines: Sequence[str], width: int, height: int) -> np.ndarray:
    import cv2

    block = np.full((height, width, 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(block, line, (6, 18 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return block


def explanation_lines(e: MatchExplanation, top_k: int = 3) -> list[str]:
    """The text beside one face's panel: decision, tolerance, margin, candidates, reference."""
    v = e.verdict
    lines = []
    if v.known:
        lines.append(f"-> {v.name}  (distance {v.distance:.3f} <= tolerance {v.tolerance:.3f})")
    elif v.similarity is None:
        lines.append("-> unknown (empty gallery)")
    elif v.ambiguous:
        lines.append(f"-> unknown: near-tie, margin {v.margin:.3f} < {v.min_margin:.3f}")
    else:
        lines.append(f"-> unknown  (best distance {v.distance:.3f} > tolerance {v.tolerance:.3f})")
    lines.append("margin to runner-up: " + ("none (one person)" if v.margin is None else f"{v.margin:.3f}"))
    for k, m in enumerate(v.candidates[:top_k], 1):
        lines.append(f"{k}. {m.name[:28]}  sim {m.score:.3f}  dist {1 - m.score:.3f}")
    if e.reference is not None:
        lines.append(f"closest photo: {Path(e.reference.source).name[:30]}")
        lines.append(f"  sim {e.reference.similarity:.3f}  map: {e.method}")
    elif e.problem:
        lines.append(("no reference: " + e.problem)[:60])
    return lines


def match_panels(explanations: Sequence[MatchExplanation], tile: int = 160, top_k: int = 3) -> np.ndarray:
    """One row per face: probe crop | probe map | closest enrolled photo | its map | the numbers."""
    rows = []
    text_w = 470
    for e in explanations:
        blank = np.full((tile, tile, 3), 235, np.uint8)
        probe = _tile(e.crop, tile)
        probe_map = _tile(_blend(e.crop, e.heat), tile) if e.heat is not None else blank
        if e.reference is not None:
            ref = _tile(e.reference.crop, tile)
            ref_map = _tile(_blend(e.reference.crop, e.reference.heat), tile)
        else:
            ref, ref_map = blank, blank
        sep = np.full((tile, 4, 3), 255, np.uint8)
        text = _text_block(explanation_lines(e, top_k), text_w, tile)
        rows.append(np.concatenate([probe, sep, probe_map, sep, ref, sep, ref_map, sep, text], axis=1))
    if not rows:
        return np.full((40, 4 * tile + text_w, 3), 255, np.uint8)
    gap = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
    parts = []
    for k, r in enumerate(rows):
        if k:
            parts.append(gap)
        parts.append(r)
    return np.concatenate(parts, axis=0)
