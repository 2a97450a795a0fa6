"""The shipped embedders tell people apart: real photos, and the checkpoint really loaded.

A test that only checks shapes and norms passes with a randomly initialised network
(the checkpoint's weights silently not loaded). These tests assert what a user relies
on: two photos of one person are closer than photos of two different people.

* ``data``: eight LFW people (three photos each) from the development data, embedded
  through the same detection + alignment as ``facepipe embed``; every registered
  embedder except the ``untrained`` floor must rank same-person pairs above
  different-person pairs (AUC) and find each photo's nearest neighbour among the
  same person's photos. The untrained floor must fail that bar, so the bar means
  something.
* no data: the default embedder runs exactly the checkpoint's tensors (same weights hash and
  vectors as the checkpoint loaded strictly by hand) and its vectors differ from those of a
  freshly initialised network of the same architecture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facepipe.embed import available_embedders, load_embedder

#: Bars the shipped embedder clears with room (measured: AUC 0.97, nearest neighbour 23/24)
#: and a network without its trained weights does not (untrained floor 0.81 / 13 of 24;
#: random weights 0.60-0.66 / 6-9 of 24).
MIN_AUC = 0.90
MIN_NEAREST = 0.75
PEOPLE, PHOTOS = 8, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lfw_faces(shared_data: Path) -> tuple[list[np.ndarray], list[object], np.ndarray]:
    """(images, largest MTCNN detection per image, person index) for 8 LFW people x 3 photos."""
    from facepipe.datasets import list_identities
    from facepipe.detect import create_detector
    from facepipe.io import load_image

    lfw = list_identities(shared_data / "identities" / "lfw_devtrain")
    people = [p for p, ims in lfw.items() if len(ims) >= 4]
    pick = people[::len(people) // PEOPLE][:PEOPLE]  # spread over the alphabet, deterministic
    det = create_detector("mtcnn", device="cpu")
    images, dets, labels = [], [], []
    for k, person in enumerate(pick):
        for path in lfw[person][:PHOTOS]:
            im = load_image(path)
            faces = det.detect(im)
            assert faces, f"MTCNN found no face in {path}"
            images.append(im)
            dets.append(max(faces, key=lambda d: d.box.w * d.box.h))
            labels.append(k)
    return images, dets, np.array(labels)


def _separation(name: str, lfw_faces: tuple[list[np.ndarray], list[object], np.ndarray]) -> tuple[float, float]:
    """(AUC of same- vs different-person cosine similarities, nearest-neighbour accuracy)."""
    from facepipe.detect import create_detector
    from facepipe.pipeline import FacePipeline

    images, dets, labels = lfw_faces
    try:
        emb = load_embedder(name, device="cpu")
    except ImportError as exc:  # dlib: the [peers] extra
        pytest.skip(f"embedder {name!r} needs {exc.name or exc}: install the [peers] extra")
    pipe = FacePipeline(create_detector("haar"), emb, min_face=1, device="cpu")
    vecs = []
    for im, d in zip(images, dets):
        (face,) = pipe.process(im, detections=[d]).faces
        vecs.append(face.embedding)
    e = np.stack(vecs).astype(np.float64)
    s = e @ e.T
    iu = np.triu_indices(len(e), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    gen, imp = s[iu][same], s[iu][~same]
    auc = float(np.mean(gen[:, None] > imp[None, :]) + 0.5 * np.mean(gen[:, None] == imp[None, :]))
    np.fill_diagonal(s, -np.inf)
    nearest = float(np.mean(labels[s.argmax(1)] == labels))
    return auc, nearest


@pytest.mark.data
@pytest.mark.parametrize("name", [n for n in available_embedders() if n != "untrained"])
def test_same_person_photos_are_closer_than_different_people(name: str, lfw_faces) -> None:  # type: ignore[no-untyped-def]
    auc, nearest = _separation(name, lfw_faces)
    assert auc >= MIN_AUC and nearest >= MIN_NEAREST, \
        f"{name}: same-vs-different AUC {auc:.3f} (bar {MIN_AUC}), nearest neighbour {nearest:.3f} (bar {MIN_NEAREST})"


@pytest.mark.data
def test_the_bar_is_above_an_untrained_network(lfw_faces) -> None:  # type: ignore[no-untyped-def]
    auc, nearest = _separation("untrained", lfw_faces)
    assert auc < MIN_AUC or nearest < MIN_NEAREST, (auc, nearest)


# -- without the data: the checkpoint's weights are the ones that run -----------------------


def _crop(astronaut: np.ndarray, size: int) -> np.ndarray:
    from facepipe.align import align_face

    # MTCNN's landmarks of the astronaut (rounded): no detector needed here
    lm = np.array([[205.0, 101.7], [246.8, 103.7], [224.7, 129.0], [201.7, 139.2], [245.3, 141.9]])
    return align_face(astronaut, lm, size)


def test_default_embedder_runs_the_checkpoint_weights(astronaut: np.ndarray) -> None:
    import torch

    from facepipe.embed import DEFAULT_CHECKPOINT
    from facepipe.embed.network import NetworkEmbedder, build_network

    emb = load_embedder("default", device="cpu")
    ck = torch.load(DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)
    # the checkpoint's tensors, loaded strictly by hand into the same architecture, give the
    # same weights hash and the same vectors (the embedder may fold layers for inference:
    # dlib-family networks fold each affine into its convolution, so compare what they compute)
    ref_net = build_network(ck["arch"], pretrained=False)
    ref_net.load_state_dict(ck["state_dict"], strict=True)
    ref = NetworkEmbedder(ref_net, name=ck["name"], arch=ck["arch"], preprocess=ck["preprocess"], device="cpu")
    assert ref.embedder_id == emb.embedder_id, "the default embedder's weights are not the checkpoint's"
    crop = _crop(astronaut, emb.crop_size)[None]
    assert np.allclose(emb.embed(crop), ref.embed(crop), atol=1e-5)
    # ... and they matter: a fresh network of the same architecture embeds differently
    fresh = NetworkEmbedder(build_network(ck["arch"], pretrained=False), name="fresh", arch=ck["arch"],
                            preprocess=ck["preprocess"], device="cpu")
    a, b = emb.embed(crop)[0], fresh.embed(crop)[0]
    assert float(a @ b) < 0.9, "the default embedder behaves like an untrained network"
    assert emb.embedder_id != fresh.embedder_id
