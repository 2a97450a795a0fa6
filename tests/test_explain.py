"""Grad-CAM explanations of the CNN classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from facepipe.detect.cnn import ClassifierConfig, FaceClassifierNet, save_checkpoint
from facepipe.explain import explain_detections, face_panels, gradcam, overlay
from facepipe.types import Box, Detection

ASTRONAUT_HEAD = Box(162.4, 60.5, 125.3, 116.5)


def test_gradcam_channel_weights_match_finite_differences() -> None:
    """Grad-CAM's weights are spatial means of d(logit)/dA; check them against perturbing A."""
    torch.manual_seed(0)
    net = FaceClassifierNet(ClassifierConfig(), pretrained=True).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    cam, logit = gradcam(net, x, (2, 2))
    with torch.no_grad():
        feats = net.trunk(x)
        base = net.head(feats)[0, 0, 2, 2]
        assert logit == pytest.approx(float(base))
        c_count = feats.shape[1]
        weights = []
        eps = 1e-6
        for c in range(c_count):
            f2 = feats.clone()
            f2[0, c] += eps  # shift the whole channel: d logit = eps * sum of gradients
            weights.append(float(net.head(f2)[0, 0, 2, 2] - base) / eps / (feats.shape[2] * feats.shape[3]))
        w = torch.tensor(weights, dtype=torch.float64)
        ref = torch.relu((w[:, None, None] * feats[0]).sum(0)).numpy()
    np.testing.assert_allclose(cam, ref, rtol=1e-4, atol=1e-6)


def test_explain_detections_on_any_box(tmp_path: Path, astronaut: np.ndarray) -> None:
    torch.manual_seed(0)
    p = save_checkpoint(tmp_path / "c.pt", FaceClassifierNet(ClassifierConfig()), ClassifierConfig(), 0.5)
    dets = [Detection(ASTRONAUT_HEAD, 0.9, "cnn"), Detection(Box(-20, 480, 60, 60), 0.5, "cnn")]
    cams = explain_detections(astronaut, dets, weights=str(p), device="cpu")
    assert len(cams) == 2
    for c in cams:
        assert c.crop.shape == (96, 96, 3) and c.heat.shape == (96, 96)
        assert c.heat.min() >= 0 and c.heat.max() <= 1.0 + 1e-6
    ov = overlay(astronaut, cams)
    assert ov.shape == astronaut.shape and ov.dtype == np.uint8
    assert face_panels(cams).shape == (2 * 96 * 2, 2 * 96 * 2 + 4, 3)
    assert explain_detections(astronaut, [], weights=str(p), device="cpu") == []


def test_trained_classifier_looks_at_the_face(astronaut: np.ndarray) -> None:
    (cam,) = explain_detections(astronaut, [Detection(ASTRONAUT_HEAD, 1.0, "cnn")], device="cpu")
    assert cam.logit > 0  # the classifier calls it a face
    inner = cam.heat[32:64, 32:64].mean()  # the face window
    ring = np.concatenate([cam.heat[:16].ravel(), cam.heat[-16:].ravel(),
                           cam.heat[:, :16].ravel(), cam.heat[:, -16:].ravel()]).mean()
    assert inner > 2 * ring


def test_explain_cli_writes_overlays(astronaut_path: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from facepipe.cli import cli

    out = tmp_path / "cams"
    res = CliRunner().invoke(cli, ["explain", str(astronaut_path), "--out", str(out), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "astronaut_gradcam.png").is_file() and (out / "astronaut_faces.png").is_file()
    assert res.output.startswith(f"{astronaut_path},0,")


def test_explain_cli_bad_checkpoint_is_one_line_naming_the_file(astronaut_path: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from facepipe.cli import cli

    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00" * 100)
    res = CliRunner().invoke(cli, ["explain", str(astronaut_path), "--out", str(tmp_path / "o"),
                                   "--detector", "haar", "--weights", str(bad)])
    assert res.exit_code != 0
    assert str(bad) in res.output and "Traceback" not in res.output
