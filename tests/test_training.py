"""Every ``facepipe train`` command, run for a few steps on a handful of real images.

Each test drives the command as a user does, on a tiny copy of the development data
(symlinks to real photos, a slice of the real face crops), and checks the three things
a training run owes its user: it finishes, the checkpoint it writes loads into the
component it trains, and the training loss went down. Seconds, not minutes: the point
is that training still *works* after a refactor, not how well it trains.

A ``facepipe train`` sub-command without a test here fails
:func:`test_every_train_command_has_a_training_test`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import cli

ROOT = Path(__file__).resolve().parent.parent
#: ``facepipe train`` sub-commands covered by a test in this file.
TESTED = {"classifier", "embedder"}

def test_every_train_command_has_a_training_test() -> None:
    r = CliRunner().invoke(cli, ["train", "--help"])
    assert r.exit_code == 0, r.output
    listed = r.output.split("Commands:", 1)[1].split()
    from facepipe.commands.train import TRAIN_COMMANDS

    untested = sorted(set(TRAIN_COMMANDS) - TESTED)
    assert not untested, f"`facepipe train {untested[0]}` has no tiny training test in {__file__}"
    assert set(TRAIN_COMMANDS) <= set(listed)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """One torch thread (shared machine) and the test's own working directory: training
    commands keep caches under ./out and ./runs by default."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    yield
    torch.set_num_threads(before)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


# --------------------------------------------------------------------------- embedder


@pytest.fixture(scope="module")
def aligned_cache(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 LFW people x 2 photos, aligned by scripts/align_dataset.py (the documented first step).

    60 people, because the people-disjoint validation (a fifth of them) needs folds of at
    least two people to form its LFW-style pairs.
    """
    from facepipe.datasets import list_identities

    lfw = list_identities(shared_data / "identities" / "lfw_devtrain")
    people = [p for p, ims in lfw.items() if len(ims) >= 2]
    tree = tmp_path_factory.mktemp("lfw_tiny")
    for p in people[::len(people) // 60][:60]:
        for f in lfw[p][:2]:
            _link(f, tree / p / f.name)
    spec = importlib.util.spec_from_file_location("align_dataset", ROOT / "scripts" / "align_dataset.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    out = tree.parent / "aligned.npz"
    assert mod.main(["--kind", "identities", "--root", str(tree), "--out", str(out),
                     "--threads", "1", "--detect-min", "60"]) == 0
    return out


@pytest.mark.data
@pytest.mark.slow
def test_train_embedder_writes_a_loadable_checkpoint_and_learns(aligned_cache: Path, tmp_path: Path) -> None:
    import torch

    from facepipe.embed import load_embedder

    ck = tmp_path / "runs" / "tiny.pt"
    r = CliRunner().invoke(cli, ["train", "embedder", "--data", str(aligned_cache), "--steps", "40",
                                 "--batch-size", "32", "--m-per-class", "2", "--freeze-blocks", "14",
                                 "--threads", "1", "--device", "cpu", "--out", str(ck)])
    assert r.exit_code == 0, r.output
    report = json.loads(Path(str(ck) + ".json").read_text())
    assert 0.0 <= report["metrics"]["plain"]["auc"] <= 1.0
    emb = load_embedder(str(ck), device="cpu")
    crops = np.load(aligned_cache)["crops"][:4]
    v = emb.embed(crops)
    assert v.shape == (4, emb.dim) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert emb.embedder_id != load_embedder("default", device="cpu").embedder_id
    history = torch.load(ck, map_location="cpu", weights_only=True)["training"]["history_tail"]
    # logged at steps 1, 10, 20, 30, 40; batches differ, so one step's loss is noisy:
    # without learning it wanders between 0.53 and 0.62 here, learning takes it to ~0.03
    assert [h["step"] for h in history] == [1, 10, 20, 30, 40]
    end = np.mean([h["loss"] for h in history[-2:]])
    assert end < 0.5 * history[0]["loss"], history


# --------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def tiny_data_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The development data's layout with 150 real face crops per split and the real scenes."""
    root = tmp_path_factory.mktemp("data_tiny")
    crops = root / "face_nonface" / "caltech_faces_36x36"
    crops.mkdir(parents=True)
    for name in ("faces_train.npz", "faces_val.npz"):
        with np.load(shared_data / "face_nonface" / "caltech_faces_36x36" / name) as z:
            np.savez(crops / name, images=z["images"][:150])
    _link(shared_data / "face_nonface" / "nonface_scenes" / "images",
          root / "face_nonface" / "nonface_scenes" / "images")
    return root


@pytest.mark.data
@pytest.mark.slow
def test_train_classifier_writes_a_loadable_checkpoint_and_learns(tiny_data_root: Path, tmp_path: Path,
                                                                  astronaut: np.ndarray) -> None:
    from facepipe.detect import create_detector

    out = tmp_path / "clf"
    r = CliRunner().invoke(cli, ["train", "classifier", "--data", str(tiny_data_root), "--out", str(out),
                                 "--regime", "transfer", "--epochs-transfer", "2", "--steps-per-epoch", "20",
                                 "--batch-size", "32", "--epochs-bootstrap", "0", "--bootstrap-rounds", "0",
                                 "--lfw-people", "0", "--threads", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())["transfer"]
    losses = [h["loss"] for h in metrics["history"]]
    assert len(losses) == 2 and losses[1] < 0.95 * losses[0], metrics["history"]
    assert metrics["metrics"]["roc_auc"] > 0.9   # face crops vs scene windows: easy after 40 steps
    det = create_detector("cnn", weights=str(out / "transfer.pt"), device="cpu")
    faces = det.detect(astronaut)
    assert all(0.0 <= f.score <= 1.0 for f in faces)
