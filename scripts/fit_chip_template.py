#!/usr/bin/env python
"""Fit the ``dlib-chip-5pt`` template: where MTCNN's five landmarks land in dlib's 150×150 chips.

For every face of an aligned cache written with ``scripts/align_dataset.py --dlib-shapes``
(MTCNN box + landmarks, and dlib's 5-point shape predicted in the MTCNN box), dlib's own
``get_face_chip_details(shape, 150, 0.25)`` gives the chip; its image→chip transform
(dlib's ``get_mapping_to_chip``: the chip's corners onto the rotated chip rectangle) maps
MTCNN's landmarks into chip coordinates. The template is their mean over the
**development** people (the benchmark's held-out people are not used). The script then
measures, on the held-out people, how far the chip obtained by a least-squares similarity
from MTCNN's landmarks to the template is from dlib's chip (corner and landmark
displacements in chip pixels), and writes everything to ``--json``.

    python scripts/fit_chip_template.py --data out/aligned/lfw_multi_112.npz \
        --json docs/chip_template.json

Needs dlib (the ``[peers]`` extra); facepipe itself never needs it at run time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def chip_to_image(rect: tuple[float, float, float, float], angle: float, size: int = 150) -> np.ndarray:
    """dlib's chip→image affine (2×3) for chip_details (rect l, t, r, b; angle), as in extract_image_chips."""
    l, t, r, b = rect
    c = np.array([(l + r) / 2.0, (t + b) / 2.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def rp(p: tuple[float, float]) -> np.ndarray:
        return rot @ (np.asarray(p, float) - c) + c

    src = np.array([[0, 0], [size - 1, 0], [0, size - 1]], float)     # chip corners tl, tr, bl
    dst = np.stack([rp((l, t)), rp((r, t)), rp((l, b))])               # rotated rect corners
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T                                    # 2×3: image = M · [c, r, 1]


def invert(m: np.ndarray) -> np.ndarray:
    """Inverse of a 2×3 affine."""
    a = np.linalg.inv(m[:, :2])
    return np.hstack([a, -a @ m[:, 2:]])


def apply(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    """2×3 affine on (N, 2) points."""
    return p @ m[:, :2].T + m[:, 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--refine", type=int, default=10,
                    help="fixed-point iterations correcting the mean template's scale bias [10]")
    ap.add_argument("--weights", choices=["uniform", "inverse-variance"], default="inverse-variance",
                    help="point weights of the least-squares fit [inverse-variance]")
    ap.add_argument("--check-chips", type=int, default=20,
                    help="faces whose chips are re-extracted to check the mapping against dlib's own chip")
    args = ap.parse_args(argv)

    import cv2
    import dlib

    from facepipe.align import similarity_matrix
    from facepipe.io import load_image
    from facepipe.train.embedder_data import is_heldout

    lms, shapes, boxes, labels, sources = [], [], [], [], []
    for p in args.data:
        with np.load(p) as z:
            if "dlib_shapes" not in z:
                raise SystemExit(f"{p}: no dlib_shapes (re-run align_dataset.py with --dlib-shapes)")
            lms.append(z["landmarks"].astype(np.float64))
            shapes.append(z["dlib_shapes"].astype(np.float64))
            boxes.append(z["boxes"].astype(np.float64))
            labels.append(z["labels"].astype(str))
            sources.append(z["sources"].astype(str))
    lm, sh, bx = np.concatenate(lms), np.concatenate(shapes), np.concatenate(boxes)
    lab, src = np.concatenate(labels), np.concatenate(sources)
    held = np.array([is_heldout(x) for x in lab])

    to_chip = []
    for k in range(len(lm)):
        x, y, w, h = bx[k]
        rect = dlib.rectangle(int(round(x)), int(round(y)), int(round(x + w)), int(round(y + h)))
        det = dlib.full_object_detection(rect, dlib.points([dlib.point(int(a), int(b)) for a, b in sh[k]]))
        cd = dlib.get_face_chip_details(det, 150, 0.25)
        r = cd.rect
        to_chip.append(invert(chip_to_image((r.left(), r.top(), r.right(), r.bottom()), cd.angle)))
    to_chip = np.stack(to_chip)
    in_chip = np.einsum("nij,nkj->nki", to_chip[:, :, :2], lm) + to_chip[:, None, :, 2]

    # Check the mapping: our warp with dlib's transform vs dlib's own chip (bilinear both).
    diffs = []
    for k in np.linspace(0, len(lm) - 1, args.check_chips).astype(int):
        image = load_image(src[k].split("#")[0])
        x, y, w, h = bx[k]
        rect = dlib.rectangle(int(round(x)), int(round(y)), int(round(x + w)), int(round(y + h)))
        det = dlib.full_object_detection(rect, dlib.points([dlib.point(int(a), int(b)) for a, b in sh[k]]))
        ref = np.asarray(dlib.get_face_chip(image, det, 150, 0.25), np.float64)
        ours = cv2.warpAffine(image, to_chip[k], (150, 150), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT).astype(np.float64)
        diffs.append(float(np.abs(ref[10:-10, 10:-10] - ours[10:-10, 10:-10]).mean()))

    dev = ~held
    template = in_chip[dev].mean(0)
    spread = in_chip[dev].std(0)
    mean_template = template.copy()
    # The plain mean is biased for a least-squares fit from noisy points (regression
    # dilution: chips come out ~3 % smaller than dlib's). Refine it to a fixed point where,
    # averaged over the development faces, our chip transform maps onto dlib's: move the
    # template through E_k = dlib_k ∘ ours_k⁻¹ and average.
    import facepipe.align as al

    weights = 1.0 / (spread ** 2).sum(1) if args.weights == "inverse-variance" else np.ones(5)
    weights = weights / weights.max()
    al.WEIGHTS[al.DLIB_CHIP] = weights

    def ours(k: int, tmpl: np.ndarray) -> np.ndarray:
        al.GEOMETRIES[al.DLIB_CHIP] = (tmpl, 150, 1.0)
        return similarity_matrix(lm[k], 150, al.DLIB_CHIP)

    dev_idx = np.flatnonzero(dev)
    for _ in range(args.refine):
        moved = np.stack([apply(to_chip[k], apply(invert(ours(k, template)), template)) for k in dev_idx])
        template = moved.mean(0)
    # MTCNN box size in chip pixels (for the landmark-free box crop)
    scale = np.sqrt(np.abs(np.linalg.det(to_chip[:, :, :2])))
    box_frac = float(np.median(np.maximum(bx[dev, 2], bx[dev, 3]) * scale[dev] / 150.0))

    # Held-out people: our chip (LS similarity MTCNN -> template) vs dlib's chip.
    al.GEOMETRIES[al.DLIB_CHIP] = (template, 150, box_frac)
    corners = np.array([[0, 0], [149, 0], [0, 149], [149, 149], [74.5, 74.5]], float)
    corner_err, dlib_pt_err = [], []
    for k in np.flatnonzero(held):
        ours = similarity_matrix(lm[k], 150, al.DLIB_CHIP)
        # where dlib's chip corners land in our chip
        dl_corners_img = apply(invert(to_chip[k]), corners)
        corner_err.append(np.linalg.norm(apply(ours, dl_corners_img) - corners, axis=1))
        dlib_pt_err.append(np.linalg.norm(apply(ours, sh[k]) - apply(to_chip[k], sh[k]), axis=1))
    corner_err, dlib_pt_err = np.array(corner_err), np.array(dlib_pt_err)
    scale_ratio = []
    for k in np.flatnonzero(held):
        ours = similarity_matrix(lm[k], 150, al.DLIB_CHIP)
        scale_ratio.append(np.sqrt(abs(np.linalg.det(ours[:, :2]))) / scale[k])
    scale_ratio = np.array(scale_ratio)

    out = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "faces_fit": int(dev.sum()), "people_fit": int(len(set(lab[dev]))),
        "faces_heldout_checked": int(held.sum()),
        "template_150": np.round(template, 4).tolist(),
        "weights": np.round(weights, 4).tolist(), "weighting": args.weights,
        "mean_of_mapped_points_150": np.round(mean_template, 4).tolist(),
        "refine_iterations": args.refine,
        "template_std_px": np.round(spread, 3).tolist(),
        "box_fraction": round(box_frac, 4),
        "mapping_check_mean_abs_diff_grey_levels": round(float(np.mean(diffs)), 3),
        "heldout_chip_corner_displacement_px": {
            "mean": round(float(corner_err[:, :4].mean()), 3),
            "median": round(float(np.median(corner_err[:, :4])), 3),
            "p95": round(float(np.percentile(corner_err[:, :4], 95)), 3)},
        "heldout_chip_centre_displacement_px": {
            "mean": round(float(corner_err[:, 4].mean()), 3),
            "p95": round(float(np.percentile(corner_err[:, 4], 95)), 3)},
        "heldout_dlib_landmark_displacement_px": {
            "mean": round(float(dlib_pt_err.mean()), 3),
            "p95": round(float(np.percentile(dlib_pt_err, 95)), 3)},
        "heldout_scale_ratio_ours_over_dlib": {
            "median": round(float(np.median(scale_ratio)), 4),
            "p5": round(float(np.percentile(scale_ratio, 5)), 4),
            "p95": round(float(np.percentile(scale_ratio, 95)), 4)},
        "point_order": ["left eye", "right eye", "nose tip", "left mouth corner", "right mouth corner"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
