"""The default embedder is the project-trained dlib-transfer network; galleries built with the
previous default (ImageNet MobileNetV2, ``facepipe-mnv2-128``) keep loading and searching with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from facepipe.cli import cli
from facepipe.embed import DEFAULT_CHECKPOINT, DEFAULT_NAME, SHIPPED, load_embedder
from facepipe.embed.network import load_checkpoint

#: The id galleries recorded while MobileNetV2 was the default (docs/gallery.md, 2026-11-23):
#: renaming its file must not change a single weight.
PREVIOUS_DEFAULT_ID = "facepipe-mnv2-128@c493117ed51b+flip"


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_default_is_the_project_trained_dlib_transfer_network() -> None:
    assert DEFAULT_NAME == "dlib-transfer" and SHIPPED[DEFAULT_NAME] == DEFAULT_CHECKPOINT
    ck = load_checkpoint(DEFAULT_CHECKPOINT)
    assert ck["registry_name"] == "dlib-transfer" and ck["arch"]["backbone"] == "dlib_resnet"
    prov = ck["provenance"]
    # where every weight came from, how it was trained and selected, in the file itself
    assert "public domain" in prov["trunk"] and "sha256" in prov["trunk"]
    assert "trained by facepipe" in prov["head"]
    assert prov["training_command"].startswith("python scripts/train_embedder.py dlib ")
    assert "early-stop" in prov["selection"] and "test pairs were never looked at" in prov["selection"]
    assert ck["training"]["regime"] == "transfer" and ck["training"]["best_step"] > 0
    # the open-set impostor model ships with it (enroll derives thresholds from it)
    assert ck.get("calibration")


def test_previous_default_keeps_its_weights_under_its_name() -> None:
    emb = load_embedder("mobilenet-v2", device="cpu")
    assert emb.embedder_id == PREVIOUS_DEFAULT_ID
    assert load_embedder("facepipe-mnv2-128", device="cpu").embedder_id == PREVIOUS_DEFAULT_ID


@pytest.fixture(scope="module")
def photos(astronaut_photos: dict[str, Path]) -> dict[str, Path]:
    return astronaut_photos


def test_gallery_built_with_the_previous_default_still_searches_with_it(
        tmp_path: Path, photos: dict[str, Path]) -> None:
    import torch

    torch.set_num_threads(1)
    g = tmp_path / "people"
    r = run("enroll", "-g", g, "--embedder", "mobilenet-v2", "--device", "cpu", "eileen", photos["p1"], photos["p3"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((g / "manifest.json").read_text())
    assert manifest["embedder"]["id"] == PREVIOUS_DEFAULT_ID  # what the old default wrote
    # identify without --embedder: the gallery's own embedder, not today's default
    r = run("identify", "-g", g, "--device", "cpu", "--format", "jsonl", photos["p2"])
    assert r.exit_code == 0, r.output
    face = json.loads(r.stdout.splitlines()[0])["faces"][0]
    assert face["name"] == "eileen"
    # forcing today's default onto it is refused with a one-line reason, not silently mixed
    r = run("identify", "-g", g, "--device", "cpu", "--embedder", "default", photos["p2"])
    assert r.exit_code != 0 and "not comparable" in r.output
