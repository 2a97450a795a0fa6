"""``facepipe video --gallery``: embeddings, open-set decisions and one identity per track.

The gallery is built in the test with the ``untrained`` embedder (ImageNet
MobileNetV2 + seeded random head, no download): the face in the clip is the
enrolled photo itself, so even that embedder matches it far above the
threshold; a gallery whose threshold no face reaches shows the ``unknown`` path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import cli
from test_video import face_clip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def embedder():  # type: ignore[no-untyped-def]
    from facepipe.embed import load_embedder

    return load_embedder("untrained", device="cpu")


@pytest.fixture(scope="module")
def enrolled(embedder, astronaut: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The astronaut photo's embedding, as `facepipe enroll` computes it."""
    from facepipe.detect import create_detector
    from facepipe.pipeline import FacePipeline

    pipe = FacePipeline(create_detector("haar", min_size=40), embedder, device="cpu")
    faces = pipe.process(astronaut).faces
    assert len(faces) == 1
    return faces[0].embedding


def _gallery(path: Path, embedder, enrolled: np.ndarray, threshold: float) -> Path:  # type: ignore[no-untyped-def]
    from facepipe.gallery import Gallery

    with Gallery.edit(path, embedder_id=embedder.embedder_id, dim=embedder.dim,
                      threshold=threshold) as g:
        g.add(enrolled[None, :], ["eileen_collins"])
    return path


def test_video_identifies_the_enrolled_face_on_every_frame(tmp_path: Path, astronaut: np.ndarray,
                                                            embedder, enrolled) -> None:  # type: ignore[no-untyped-def]
    gal = _gallery(tmp_path / "gallery", embedder, enrolled, threshold=0.5)
    clip = face_clip(tmp_path / "clip.mp4", astronaut, n=8)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["video", str(clip), "--out", str(out), "--gallery", str(gal),
                                 "--embedder", "untrained", "--device", "cpu", "--min-size", "40",
                                 "--batch-size", "3"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "identities: eileen_collins" in r.output
    recs = [json.loads(x) for x in (out / "clip.frames.jsonl").read_text().splitlines()]
    faces = [f for rec in recs for f in rec["faces"]]
    assert len(faces) == 8
    assert {f["name"] for f in faces} == {"eileen_collins"}
    assert all(f["frame_name"] == "eileen_collins" and f["frame_similarity"] > 0.8 for f in faces)
    tracks = json.loads((out / "clip.tracks.json").read_text())["tracks"]
    assert len(tracks) == 1
    assert tracks[0]["identity"] == "eileen_collins" and tracks[0]["confidence"] == pytest.approx(1.0)
    assert tracks[0]["similarity"] > 0.8 and tracks[0]["distance"] == pytest.approx(1 - tracks[0]["similarity"], abs=1e-3)
    marker = json.loads((out / "clip.done.json").read_text())
    assert marker["settings"]["gallery"]["threshold"] == 0.5
    assert marker["settings"]["embedder"] == embedder.embedder_id


def test_unmatched_faces_are_unknown_and_vote_as_such(tmp_path: Path, astronaut: np.ndarray,
                                                      embedder, enrolled) -> None:  # type: ignore[no-untyped-def]
    from facepipe.detect import create_detector
    from facepipe.gallery import Gallery
    from facepipe.video import FrameAnalyzer, output_paths, process_video

    gal_dir = _gallery(tmp_path / "gallery", embedder, enrolled, threshold=0.9999)
    gallery = Gallery.open(gal_dir, embedder_id=embedder.embedder_id)
    analyzer = FrameAnalyzer(create_detector("haar", min_size=40), embedder, gallery, device="cpu")
    clip = face_clip(tmp_path / "clip.mp4", astronaut, n=6)
    outs = output_paths(tmp_path / "out", "clip.mp4")
    res = process_video(clip, outs, analyzer, batch_size=6, annotate=False,
                        unknown_weight=gallery.threshold)
    (track,) = res.tracks
    assert track.identity == "unknown" and track.confidence == pytest.approx(1.0)
    recs = [json.loads(x) for x in outs.frames.read_text().splitlines()]
    assert all(f["name"] == "unknown" and f["frame_name"] == "unknown" for r in recs for f in r["faces"])
    # the stages were timed
    assert res.timings["embed"] > 0 and res.timings["search"] > 0 and res.timings["align"] > 0


def test_gallery_from_another_embedder_is_refused(tmp_path: Path, astronaut: np.ndarray,
                                                  embedder) -> None:  # type: ignore[no-untyped-def]
    from facepipe.gallery import Gallery

    gal = tmp_path / "gallery"
    with Gallery.edit(gal, embedder_id="some-other-embedder@0000", dim=embedder.dim) as g:
        g.add(np.eye(embedder.dim, dtype=np.float32)[:1], ["x"])
    clip = face_clip(tmp_path / "clip.mp4", astronaut, n=3)
    r = CliRunner().invoke(cli, ["video", str(clip), "--out", str(tmp_path / "out"), "--gallery", str(gal),
                                 "--embedder", "untrained", "--device", "cpu"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "gallery" in r.output and str(gal) in r.output


def test_embed_every_skips_faces_on_identified_tracks(tmp_path: Path, astronaut: np.ndarray,
                                                      embedder, enrolled) -> None:  # type: ignore[no-untyped-def]
    from facepipe.detect import create_detector
    from facepipe.gallery import Gallery
    from facepipe.video import FrameAnalyzer, output_paths, process_video

    gallery = Gallery.open(_gallery(tmp_path / "gallery", embedder, enrolled, threshold=0.5))
    analyzer = FrameAnalyzer(create_detector("haar", min_size=40), embedder, gallery, device="cpu")
    clip = face_clip(tmp_path / "clip.mp4", astronaut, n=12)
    outs = output_paths(tmp_path / "out", "clip.mp4")
    res = process_video(clip, outs, analyzer, batch_size=4, annotate=False, embed_every=4,
                        unknown_weight=gallery.threshold)
    # the first batch (frames 0-3) starts the track and is embedded in full; from then
    # on the identified track's face is embedded on every 4th analysed frame only
    embedded = [i for i, r in enumerate(json.loads(x) for x in outs.frames.read_text().splitlines())
                if "frame_name" in r["faces"][0]]
    assert embedded == [0, 1, 2, 3, 4, 8]
    assert analyzer.embedded == 6
    (track,) = res.tracks
    assert track.identity == "eileen_collins" and track.frames == 12
    recs = [json.loads(x) for x in outs.frames.read_text().splitlines()]
    assert all(r["faces"][0]["name"] == "eileen_collins" for r in recs)


def test_onet_landmarks_agree_with_the_full_mtcnn_refinement(astronaut: np.ndarray, embedder) -> None:  # type: ignore[no-untyped-def]
    """The batched O-Net shortcut against the reference (MTCNN cascade on the face region)."""
    from facepipe.detect import create_detector
    from facepipe.pipeline import FacePipeline
    from facepipe.video import OnetLandmarker

    haar = create_detector("haar", min_size=40)
    pipe = FacePipeline(haar, embedder, device="cpu")
    onet = OnetLandmarker(device="cpu")
    images, boxes, refs = [], [], []
    for scale in (1.0, 0.6):
        import cv2

        im = cv2.resize(astronaut, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        (d,) = haar.detect(im)
        images.append(im)
        boxes.append([d.box])
        refs.append(np.array(pipe.find_landmarks(im, d.box)))
    got = onet(images, boxes)
    for (lm,), ref in zip(got, refs):
        assert lm is not None
        eye_dist = np.linalg.norm(ref[0] - ref[1])
        assert np.linalg.norm(np.array(lm) - ref, axis=1).mean() < 0.08 * eye_dist
    # a box on something that is not a face gets no landmarks
    (none,), = onet([np.full((200, 200, 3), 127, np.uint8)], [[boxes[0][0].scaled(0.3)]])
    assert none is None


@pytest.mark.data
@pytest.mark.parametrize("embedder_name", ["default", "dlib"])
def test_real_clip_performer_is_identified_by_track(shared_data: Path, tmp_path: Path, embedder_name: str) -> None:
    """Hamilton clip + the source's own enrolment photo, with facepipe's shipped embedder at
    the threshold a new gallery derives from its impostor model for the default target FPIR
    (what `facepipe enroll` gives a user without calibrating), and with dlib's
    (the [peers] extra) at its customary 0.9 cosine.

    The performer's track must carry his name; the clip's camera cut to the audience must
    end it (the audience members are not enrolled: unknown).
    """
    from facepipe.detect import create_detector
    from facepipe.embed import load_embedder
    from facepipe import defaults
    from facepipe.gallery import Gallery, impostor_model_for
    from facepipe.io import load_image
    from facepipe.pipeline import FacePipeline

    if embedder_name == "dlib":
        pytest.importorskip("dlib", reason="dlib's embedder needs the [peers] extra")
    emb = load_embedder(embedder_name, device="cpu")
    photo = shared_data / "identities" / "face_recognition_examples" / "lin_manuel_miranda" / "lin-manuel-miranda.png"
    (face,) = FacePipeline(create_detector("haar", min_size=40), emb, device="cpu",
                           largest_only=True).process(load_image(photo)).faces
    gal = tmp_path / "gallery"
    # what `facepipe enroll` does: dlib at a given threshold, a shipped embedder with its impostor model
    settings = {"threshold": 0.9} if embedder_name == "dlib" else {
        "impostor_model": impostor_model_for(emb), "target_fpir": defaults.TARGET_FPIR}
    with Gallery.edit(gal, embedder_id=emb.embedder_id, dim=emb.dim, **settings) as g:
        g.add(face.embedding[None, :], ["lin_manuel_miranda"])
    clip = shared_data / "videos" / "face_recognition_short_hamilton_clip.mp4"
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["video", str(clip), "--out", str(out), "--gallery", str(gal),
                                 "--embedder", embedder_name, "--min-size", "60", "--stride", "4",
                                 "--no-annotate", "--threads", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / f"{clip.stem}.tracks.json").read_text())
    assert summary["shot_cuts"] >= 2
    longest = max(summary["tracks"], key=lambda t: t["frames"])
    assert longest["identity"] == "lin_manuel_miranda" and longest["confidence"] > 0.7
    assert longest["last_time"] - longest["first_time"] > 3.0
    assert longest["last_time"] < 7.1          # the cut to the audience at 7.04 s ends it
    after_cut = [t for t in summary["tracks"] if t["first_time"] > 7.04 and t["identity"]]
    assert after_cut and all(t["identity"] == "unknown" for t in after_cut)
