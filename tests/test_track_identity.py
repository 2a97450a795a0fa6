"""A video track is named by the majority of its frames, not by its first frame.

Every other video-gallery test shows one identical face on every frame, where the
first frame, the last frame and the vote all agree. Here the first frame of the
track matches a different enrolled person (``bea``) than the rest (``ada``):

* library: the tracker's per-track votes and :func:`vote_identity`;
* CLI: ``facepipe enroll`` + ``facepipe video`` on a generated clip whose first frame
  shows the astronaut's face mirrored (enrolled as ``bea``) and the other seven the
  face as is (enrolled as ``ada``). The track, its summary and every frame record
  must say ``ada``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import cli
from facepipe.track import Observation, Tracker, vote_identity
from facepipe.types import Box, Detection
from test_video import clip_frames, write_clip


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.mark.parametrize("first_score", [0.55, 0.95, 0.999])
def test_track_votes_follow_the_majority_not_the_first_frame(first_score: float) -> None:
    rng = np.random.default_rng(0)
    face = _unit(rng.normal(size=32))
    tr = Tracker()
    names = ["bea"] + ["ada"] * 5
    scores = [first_score] + [0.6, 0.62, 0.58, 0.61, 0.6]
    for f, (n, s) in enumerate(zip(names, scores)):
        emb = _unit(face + 0.05 * rng.normal(size=32))
        tr.update(f, f / 25, [Observation(Detection(Box(100 + 2 * f, 80, 60, 60), 0.99, "test"), emb, n, s)])
    (track,) = tr.tracks
    assert [n for n, _ in track.votes] == names
    v = vote_identity(track.votes, unknown_weight=0.5)
    assert v.name == "ada" and v.frames == 6
    assert v.confidence == pytest.approx(sum(scores[1:]) / sum(scores))


def test_vote_is_independent_of_frame_order() -> None:
    votes = [("bea", 0.9), ("ada", 0.7), ("ada", 0.7), ("unknown", 0.2), ("ada", 0.7)]
    names = {vote_identity(votes[k:] + votes[:k], 0.5).name for k in range(len(votes))}
    assert names == {"ada"}
    names = {vote_identity(list(reversed(votes[k:] + votes[:k])), 0.5).name for k in range(len(votes))}
    assert names == {"ada"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_video_names_the_track_by_the_majority_of_its_frames(tmp_path: Path, astronaut: np.ndarray) -> None:
    from PIL import Image

    frames = clip_frames(astronaut, 8, step=4)       # the face (120 px) at x = 10 + 4 i, y = 60
    first = frames[0].copy()
    first[60:180, 10:130] = first[60:180, 10:130][:, ::-1]   # mirrored face, same place
    Image.fromarray(frames[1]).save(tmp_path / "ada.png")
    Image.fromarray(first).save(tmp_path / "bea.png")
    clip = write_clip(tmp_path / "clip.mp4", [first] + frames[1:])
    runner = CliRunner()
    gal = tmp_path / "gallery"
    model = ["--detector", "haar", "--embedder", "untrained", "--device", "cpu"]
    for name in ("ada", "bea"):
        r = runner.invoke(cli, ["enroll", "-g", str(gal), *model, "--threshold", "0.5", name,
                                str(tmp_path / f"{name}.png")], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    r = runner.invoke(cli, ["video", str(clip), "--out", str(out), "--gallery", str(gal),
                            "--embedder", "untrained", "--device", "cpu", "--min-size", "40",
                            "--no-annotate"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in (out / "clip.frames.jsonl").read_text().splitlines()]
    faces = [f for rec in recs for f in rec["faces"]]
    assert len(faces) == 8 and len({f["track"] for f in faces}) == 1, "one face, one track"
    # precondition: the first frame on its own matches bea, the others ada
    assert [f["frame_name"] for f in faces] == ["bea"] + ["ada"] * 7
    # the track, its summaries and every frame carry the majority's name
    assert [f["name"] for f in faces] == ["ada"] * 8
    (track,) = json.loads((out / "clip.tracks.json").read_text())["tracks"]
    assert track["identity"] == "ada" and 0.8 < track["confidence"] < 1.0
    (row,) = csv.DictReader((out / "clip.tracks.csv").open())
    assert row["identity"] == "ada"
    assert "identities: ada" in r.output and "bea" not in r.output
