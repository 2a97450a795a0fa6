"""The CUDA code paths agree with the CPU: run wherever torch sees a CUDA GPU.

Marked ``gpu`` and skipped only when ``torch.cuda.is_available()`` is false (nothing to
install: PyPI's default torch wheel is a CUDA build). Each test compares a CUDA result
with the CPU result of the same public call: detectors (every registered one that takes
a device), the embedders under bf16 autocast, and ``facepipe video --device cuda``.
GPU *search* in the gallery is tested in ``test_gallery.py`` (it needs a faiss with GPU
support).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facepipe.cli import cli
from facepipe.detect import available_detectors, create_detector

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is false)")]

#: MTCNN's landmarks of the astronaut's face (see test_align_reference.py).
LANDMARKS = np.array([[205.0, 101.7], [246.8, 103.7], [224.7, 129.0], [201.7, 139.2], [245.3, 141.9]])


def _on(name: str, device: str):  # type: ignore[no-untyped-def]
    try:
        return create_detector(name, device=device)
    except TypeError:
        pytest.skip(f"detector {name!r} runs on the CPU only")
    except ImportError as exc:
        pytest.skip(f"detector {name!r} needs {exc.name or exc}: install the [peers] extra")


@pytest.mark.parametrize("name", available_detectors())
def test_detector_on_cuda_matches_cpu(name: str, astronaut: np.ndarray) -> None:
    cpu = _on(name, "cpu").detect(astronaut)
    gpu_det = _on(name, "cuda")
    gpu = gpu_det.detect(astronaut)
    assert len(gpu) == len(cpu), (cpu, gpu)
    for a, b in zip(cpu, gpu):
        assert a.box.iou(b.box) > 0.9 and abs(a.score - b.score) < 0.05
    # a batch of different sizes on the GPU gives the single-image results
    small = np.ascontiguousarray(astronaut[::2, ::2])
    batch = gpu_det.detect_batch([astronaut, small])
    assert [len(x) for x in batch] == [len(gpu), len(gpu_det.detect(small))]


@pytest.mark.parametrize("name", ["default", "untrained"])
def test_embedder_on_cuda_matches_cpu(name: str, astronaut: np.ndarray) -> None:
    from facepipe.align import align_face
    from facepipe.embed import load_embedder

    cpu = load_embedder(name, device="cpu")
    gpu = load_embedder(name, device="cuda")
    crops = np.stack([align_face(astronaut, LANDMARKS + d, cpu.crop_size) for d in (0.0, 3.0, -4.0)])
    a, b = cpu.embed(crops), gpu.embed(crops)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    assert np.min(np.sum(a * b, axis=1)) > 0.99     # bf16 autocast on CUDA, fp32 on the CPU
    assert cpu.embedder_id == gpu.embedder_id


def test_video_runs_on_cuda(tmp_path: Path, astronaut: np.ndarray) -> None:
    from test_video import face_clip

    clip = face_clip(tmp_path / "clip.mp4", astronaut, n=6)
    for device in ("cpu", "cuda"):
        r = CliRunner().invoke(cli, ["video", str(clip), "--out", str(tmp_path / device),
                                     "--detector", "mtcnn", "--device", device, "--no-annotate"],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
    tracks = {d: json.loads((tmp_path / d / "clip.tracks.json").read_text())["tracks"] for d in ("cpu", "cuda")}
    assert len(tracks["cuda"]) == len(tracks["cpu"]) == 1
    assert tracks["cuda"][0]["frames"] == tracks["cpu"][0]["frames"] == 6

