"""Build the detector, embedder and pipeline a command asks for, by name, from the defaults.

Shared by every command (detect, enroll, identify, embed, explain, gallery, video) so
that the same option means the same thing everywhere. Defaults come from
:mod:`facepipe.defaults`; nothing here hard-codes a model name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from facepipe import defaults

if TYPE_CHECKING:
    from facepipe.detect.base import Detector
    from facepipe.pipeline import FacePipeline

HAAR_BASED = ("haar", "haar+cnn")
#: the one detector without a network, and so without a ``device`` option
CPU_ONLY_DETECTORS = ("haar",)
#: detectors with no image-pyramid step to set (MTCNN's factor is fixed; cnn and RetinaFace run once per image)
SINGLE_PASS_DETECTORS = ("mtcnn", "cnn", "retinaface")


def build_detector(
    name: str | None = None,
    cascade: str | None = None,
    min_size: int | None = None,
    scale_factor: float | None = None,
    min_neighbors: int | None = None,
    device: str | None = None,
    **extra: Any,
) -> "Detector":
    """Create a detector, passing each one only the options it understands.

    ``None`` means "the default": :data:`facepipe.defaults.DETECTOR` for the name, the
    detector's own value for everything else. ``extra`` are passed through as given
    (e.g. ``threshold`` or ``weights`` for the CNN detectors).
    """
    from facepipe.detect import create_detector
    from facepipe.device import validate_device_spec

    name = name or defaults.DETECTOR
    device = validate_device_spec(device or defaults.DEVICE)
    haar_based = name in HAAR_BASED
    options: dict[str, Any] = {
        "cascade": (cascade or defaults.CASCADE) if haar_based else None,
        "device": device if name not in CPU_ONLY_DETECTORS else None,
        "min_size": min_size,
        # the pyramid CNN's step is its own option name; the single-pass detectors have no pyramid
        ("scale_step" if name == "cnn-pyramid" else "scale_factor"):
            scale_factor if name not in SINGLE_PASS_DETECTORS else None,
        "min_neighbors": min_neighbors if haar_based else None,
    }
    kwargs = {k: v for k, v in options.items() if v is not None}
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    return create_detector(name, **kwargs)


def build_pipeline(detector_name: str | None = None, embedder_name: str | None = None,
                   device: str | None = None, min_face: int | None = None, largest_only: bool = False,
                   min_detect_size: int | None = None) -> "FacePipeline":
    """The detector → alignment → embedder pipeline a command asked for.

    ``min_face`` is the embedding minimum (``--min-embed-size``), ``min_detect_size``
    the detection minimum (``--min-detect-size``); ``None`` takes the defaults.
    """
    from facepipe.embed import load_embedder
    from facepipe.pipeline import FacePipeline

    device = device or defaults.DEVICE
    detector = build_detector(detector_name, min_size=min_detect_size, device=device)
    embedder = load_embedder(embedder_name or defaults.EMBEDDER, device=device)
    return FacePipeline(detector, embedder, min_face=defaults.MIN_EMBED_SIZE if min_face is None else min_face,
                        largest_only=largest_only, device=device)


def gallery_embedder(gallery: Any) -> str:
    """The embedder (registered name or checkpoint path) a gallery was built with.

    Looked up from the manifest's embedder record, without loading any network:

    1. the id's name part (``name@hash``) when it is a registered embedder name;
    2. a shipped checkpoint (``facepipe/weights/embedder_*.pt``) whose sha256 is the
       manifest's ``checkpoint_sha256``, or whose recorded ``name`` is the id's name;
    3. the checkpoint path recorded at enrolment, if that file still has the same sha256;
    4. failing those, every registered embedder is loaded (CPU) and its id compared.

    Raises :class:`GalleryError` naming the embedder when none is available here; the
    caller then loads it and :meth:`Gallery.check_embedder` confirms the exact id.
    """
    from pathlib import Path

    from facepipe.embed import WEIGHTS_DIR, available_embedders
    from facepipe.errors import GalleryError
    from facepipe.gallery import sha256_file

    record = gallery.manifest.get("embedder", {})
    emb_id = str(record.get("id", ""))
    name = emb_id.split("@", 1)[0]
    want_sha = record.get("checkpoint_sha256")
    if name in available_embedders():
        return name
    for path in sorted(Path(WEIGHTS_DIR).glob("embedder_*.pt")):
        if want_sha and sha256_file(path) == want_sha:
            return str(path)
    source = (record.get("describe") or {}).get("source")
    if source and Path(source).is_file() and (not want_sha or sha256_file(source) == want_sha):
        return str(source)
    from facepipe.embed import load_embedder
    from facepipe.errors import FacepipeError

    for candidate in available_embedders():
        try:
            if load_embedder(candidate, device="cpu").embedder_id == emb_id:
                return candidate
        except FacepipeError:
            continue  # e.g. dlib without the [peers] extra
    raise GalleryError(gallery.directory, f"built with embedder {emb_id!r}, which is not available here; "
                       "pass --embedder with its checkpoint, or re-embed the gallery "
                       "(facepipe gallery reembed)")
