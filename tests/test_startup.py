"""Start-up (issue 11 item 8): what `--help`, `gallery` and a first detection import.

Wall-clock targets are measured by scripts/bench_startup.py (docs/startup.md), not here;
these tests pin the causes: `--help` and the gallery subcommands never import torch, and
MTCNN is imported without torchvision's Python package yet finds exactly the same faces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(code: str) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; report which heavy packages it imported."""
    probe = (code + "\nimport json, sys\n"
             "print(json.dumps({m: m in sys.modules for m in ('torch', 'torchvision', 'facenet_pytorch', 'cv2')}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli(argv: list[str]) -> str:
    return ("import sys\nfrom facepipe.cli import main\n"
            f"sys.argv = ['facepipe'] + {argv!r}\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["detect", "--help"], ["identify", "--help"],
                                  ["video", "--help"], ["gallery", "--help"], ["gallery", "list", "--help"]])
def test_help_does_not_import_torch(argv: list[str]) -> None:
    mods = _modules_after(_cli(argv))
    assert not mods["torch"] and not mods["cv2"], (argv, mods)


def test_gallery_list_and_info_do_not_import_torch(tmp_path: Path) -> None:
    from facepipe.gallery import Gallery

    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    with Gallery.edit(tmp_path / "g", embedder_id="test@0", dim=8) as g:
        g.add(v, ["ada", "ada", "bob"])
    for sub in ("list", "info"):
        mods = _modules_after(_cli(["gallery", sub, "-g", str(tmp_path / "g")]))
        assert not mods["torch"], (sub, mods)


def test_mtcnn_import_skips_torchvision() -> None:
    mods = _modules_after("from facepipe.fastimport import mtcnn_class\nmtcnn_class()")
    assert mods["torch"] and not mods["torchvision"]


def test_default_pipeline_skips_torchvision() -> None:
    """identify/enroll with the defaults (MTCNN + the dlib-family embedder) never pay for
    torchvision's import."""
    mods = _modules_after("from facepipe.builders import build_pipeline\n"
                          "p = build_pipeline(None, None, 'cpu', None)\n"
                          "import numpy as np\n"
                          "from skimage import data\n"
                          "assert len(p.process(data.astronaut()).faces) == 1")
    assert mods["torch"] and not mods["torchvision"], mods


_DETECT = """
import json, sys
import numpy as np
from skimage import data
{pre}
from facepipe.detect import create_detector
det = create_detector("mtcnn", device="cpu")
out = []
for im in (data.astronaut(), np.ascontiguousarray(np.concatenate([data.astronaut()] * 2, axis=1))):
    out.append([[round(v, 3) for v in (*d.box.xyxy(), d.score)] + [round(c, 3) for p in d.landmarks for c in p]
                for d in det.detect(im)])
print(json.dumps(out))
"""


def test_light_mtcnn_finds_exactly_what_facenet_pytorch_finds() -> None:
    """Same boxes, scores and landmarks as the ordinary facenet_pytorch import (brute-force reference)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    results = []
    for pre in ("", "import torchvision, facenet_pytorch  # the ordinary route"):
        out = subprocess.run([sys.executable, "-c", _DETECT.format(pre=pre)], capture_output=True, text=True,
                             env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    light, ordinary = results
    assert light == ordinary
    assert len(light[0]) == 1 and len(light[1]) == 2


def test_real_torchvision_still_importable_after_light_mtcnn() -> None:
    mods = _modules_after("from facepipe.fastimport import mtcnn_class\nmtcnn_class()\n"
                          "import torchvision, facenet_pytorch\n"
                          "from torchvision.ops import nms\n"
                          "assert facenet_pytorch.MTCNN is mtcnn_class()\n"
                          "from torchvision.models import mobilenet_v2")
    assert mods["torchvision"] and mods["facenet_pytorch"]
