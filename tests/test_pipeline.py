"""FacePipeline: detection -> alignment -> embedding, skip reasons and batching."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.align import align_face
from facepipe.pipeline import FacePipeline, SkipReason
from facepipe.types import Box, Detection


@pytest.fixture(scope="module")
def embedder():  # noqa: ANN201
    from facepipe.embed.network import untrained_embedder

    return untrained_embedder(dim=128, device="cpu")


@pytest.fixture(scope="module")
def mtcnn():  # noqa: ANN201
    from facepipe.detect.mtcnn import MTCNNDetector

    return MTCNNDetector(min_size=40, device="cpu")


@pytest.fixture(scope="module")
def face_img(astronaut: np.ndarray) -> np.ndarray:
    """The astronaut photo at 256x256 (face about 75 px): keeps MTCNN quick on a busy CPU."""
    import cv2

    return cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def two_faces(face_img: np.ndarray) -> np.ndarray:
    """The photo next to a 0.6x copy of itself: two real faces of different sizes."""
    import cv2

    small = cv2.resize(face_img, (154, 154), interpolation=cv2.INTER_AREA)
    canvas = np.full((256, 410, 3), 128, np.uint8)
    canvas[:, :256] = face_img
    canvas[50:204, 256:] = small
    return canvas


def test_single_face_matches_manual_alignment(face_img: np.ndarray, embedder, mtcnn) -> None:
    pipe = FacePipeline(mtcnn, embedder, min_face=20)
    result = pipe.process(face_img)
    assert len(result.faces) == 1 and not result.skipped
    f0 = result.faces[0]
    assert f0.alignment == "landmarks" and f0.crop.shape == (112, 112, 3)
    det = mtcnn.detect(face_img)[0]
    manual = embedder.embed(align_face(face_img, det.landmarks_array(), 112)[None])[0]
    assert np.allclose(f0.embedding, manual, atol=1e-4)
    assert abs(np.linalg.norm(f0.embedding) - 1) < 1e-5


def test_no_face_gives_empty_result(embedder, mtcnn) -> None:
    rng = np.random.default_rng(0)
    blank = (rng.random((200, 200, 3)) * 40 + 100).astype(np.uint8)
    result = FacePipeline(mtcnn, embedder).process(blank)
    assert result.faces == () and result.skipped == ()
    assert result.embeddings.shape[0] == 0


def test_tiny_faces_are_reported_not_embedded(face_img: np.ndarray, embedder, mtcnn) -> None:
    result = FacePipeline(mtcnn, embedder, min_face=1000).process(face_img)
    assert result.faces == ()
    assert [s.reason for s in result.skipped] == [SkipReason.TOO_SMALL]
    assert "1000" in result.skipped[0].detail


def test_largest_only_and_batch_equals_single(two_faces: np.ndarray, face_img: np.ndarray,
                                              embedder, mtcnn) -> None:
    all_faces = FacePipeline(mtcnn, embedder, min_face=20).process(two_faces)
    assert len(all_faces.faces) == 2
    largest = FacePipeline(mtcnn, embedder, min_face=20, largest_only=True).process(two_faces)
    assert len(largest.faces) == 1 and largest.faces[0].detection.box.x < 256
    assert [s.reason for s in largest.skipped] == [SkipReason.NOT_LARGEST]
    # One embedder batch across images gives the same vectors as image by image.
    pipe = FacePipeline(mtcnn, embedder, min_face=20)
    dets = [mtcnn.detect(two_faces), mtcnn.detect(face_img)]
    batch = pipe.process_batch([two_faces, face_img], dets)
    single = [pipe.process(two_faces, dets[0]), pipe.process(face_img, dets[1])]
    for b, s in zip(batch, single):
        assert len(b.faces) == len(s.faces)
        for fb, fs in zip(b.faces, s.faces):
            assert np.allclose(fb.embedding, fs.embedding, atol=1e-4)
    assert [len(f) for f in pipe.faces_batch([two_faces, face_img])] == [2, 1]


def test_detector_without_landmarks_gets_mtcnn_landmarks(face_img: np.ndarray, embedder, mtcnn) -> None:
    ref = mtcnn.detect(face_img)[0]
    boxonly = Detection(ref.box, 1.0, "haar", None)
    pipe = FacePipeline(mtcnn, embedder, min_face=20)
    result = pipe.process(face_img, detections=[boxonly])
    assert len(result.faces) == 1
    f0 = result.faces[0]
    assert f0.alignment == "mtcnn-landmarks" and f0.detection.box == ref.box
    assert np.abs(f0.detection.landmarks_array() - ref.landmarks_array()).max() < 4.0
    box = FacePipeline(mtcnn, embedder, min_face=20, landmarks="box").process(face_img, [boxonly])
    assert box.faces[0].alignment == "box"


def test_box_without_a_face_is_reported(face_img: np.ndarray, embedder, mtcnn) -> None:
    # A "face" box on the face_img's flag/suit region: MTCNN finds no landmarks there.
    wrong = Detection(Box(190, 190, 50, 50), 1.0, "haar", None)
    result = FacePipeline(mtcnn, embedder, min_face=20).process(face_img, [wrong])
    assert result.faces == ()
    assert [s.reason for s in result.skipped] == [SkipReason.NO_LANDMARKS]


def test_haar_pipeline_end_to_end(face_img: np.ndarray, embedder) -> None:
    from facepipe.detect import create_detector

    result = FacePipeline(create_detector("haar"), embedder, min_face=20, device="cpu").process(face_img)
    assert len(result.faces) >= 1
    assert all(f.alignment == "mtcnn-landmarks" for f in result.faces)
