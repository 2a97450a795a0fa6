"""facepipe's defaults, in one place.

Every command reads its default detector, embedder, sizes, output format, device
and score convention from here; ``--help`` texts and the README's defaults table
are generated from :data:`DEFAULTS`. Change a default here and nowhere else: the
benchmarks (``docs/detection.md``, ``docs/embedding.md``) justify each value.

This module must stay import-light (no torch, numpy or OpenCV): ``facepipe --help``
imports it.

Scores users see
----------------
The gallery compares unit vectors by cosine similarity ``s`` (higher = more alike).
What facepipe prints beside a name is the **distance** ``d = 1 − s`` (0 = identical,
2 = opposite; lower = more alike), and the acceptance rule is written, like
face_recognition's, as ``distance <= tolerance``, i.e. ``tolerance = 1 − threshold``.
The gallery stores its calibrated ``threshold`` as a similarity; every output that
shows a distance shows the tolerance beside it, and JSON carries both units. Note that
face_recognition's ``0.6`` is a Euclidean distance between dlib's unnormalised
descriptors; it does not carry over to facepipe's embedders — use the gallery's
calibrated tolerance (``facepipe gallery info``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Face detector for every command (detect, enroll, identify, embed, explain, video).
#: Measured best at Haar's speed on the shared detection sets (docs/detection.md).
DETECTOR = "mtcnn"

#: Embedder when a command builds a new gallery or embeds without a gallery
#: (enroll, embed, video without --gallery). ``identify`` / ``video --gallery`` use the
#: embedder named in the gallery's manifest unless --embedder is given.
#: ``dlib-transfer`` (= the registry's ``default``): dlib's public-domain ResNet trunk with a
#: facepipe-trained head, 99.30 % vs dlib's 98.97 % on held-out pairs (docs/embedding.md).
EMBEDDER = "dlib-transfer"

#: Device for the CNN stages: ``auto`` uses the first CUDA GPU when there is one.
DEVICE = "auto"

#: Where a gallery is searched (``auto``: a GPU when there is one; faiss-gpu or exact torch search).
SEARCH_DEVICE = "auto"

#: Output format of the batch commands (csv, json or jsonl).
FORMAT = "csv"

#: Detection minimum (``--min-detect-size``): smallest face side, in pixels, the
#: detector looks for. ``None`` leaves each detector's own (MTCNN 20, Haar/cnn-pyramid 24;
#: cnn from ≈ 12 px).
MIN_DETECT_SIZE: int | None = None

#: Embedding minimum (``--min-embed-size``): detected faces whose shorter side is
#: below this many pixels are reported and not embedded or identified.
MIN_EMBED_SIZE = 32

#: Haar cascade for the haar and haar+cnn detectors.
CASCADE = "default"

#: Candidates listed per face by ``identify``.
TOP_K = 1

#: Acceptance threshold of a new, uncalibrated gallery, as a cosine similarity
#: (tolerance ``1 − THRESHOLD`` in distance units).
THRESHOLD = 0.5

#: Target false-positive identification rate of a new gallery (``enroll --fpir``): the
#: threshold is derived from the embedder's shipped impostor model so that about this
#: share of people who are not enrolled is named as someone, whatever the gallery's size.
TARGET_FPIR = 0.01

#: Ambiguity rule (``--min-margin``): a best match whose similarity beats the
#: runner-up person by less than this is reported as unknown. 0 disables the rule.
MIN_MARGIN = 0.0

#: video: seconds after a track ends within which a track with the same face (embeddings)
#: is joined to it (re-identification; 0 disables it).
VIDEO_REID_GAP = 5.0

#: video: tracks seen in fewer analysed frames are dropped as spurious detections.
VIDEO_MIN_TRACK_FRAMES = 3

#: Face-classifier weights whose decisions ``explain`` visualises.
EXPLAIN_WEIGHTS = "finetune"

#: Worker processes for image batches (``--workers``); 1 = in this process.
WORKERS = 1

#: The unit users see beside a name: ``distance`` = 1 − cosine similarity.
SCORE_UNIT = "distance"


def similarity_to_distance(similarity: float) -> float:
    """Distance shown to users for a cosine similarity: ``1 − s``."""
    return 1.0 - float(similarity)


def distance_to_similarity(distance: float) -> float:
    """Cosine similarity for a user's distance or tolerance: ``1 − d``."""
    return 1.0 - float(distance)


@dataclass(frozen=True)
class Default:
    """One documented default: the option(s) it feeds and what it means."""

    option: str
    value: Any
    meaning: str

    def shown(self) -> str:
        """The value as ``--help`` and the README print it."""
        if self.value is None:
            return "detector's own"
        return str(self.value)


def table() -> list[Default]:
    """Every default with its option and meaning (README, ``facepipe --help``)."""
    return [
        Default("--detector", DETECTOR, "face detector of every command"),
        Default("--embedder", EMBEDDER, "embedder of new galleries and `embed`; identify/video use the "
                                        "gallery's own"),
        Default("--device", DEVICE, "where the CNN stages run (auto: GPU when there is one)"),
        Default("--search-device", SEARCH_DEVICE, "where a gallery is searched (auto: a GPU when there is one)"),
        Default("--format", FORMAT, "output of detect and identify (csv, json, jsonl)"),
        Default("--min-detect-size", MIN_DETECT_SIZE, "smallest face side (px) the detector looks for "
                                                      "(MTCNN 20, Haar and cnn-pyramid 24, cnn from ≈ 12)"),
        Default("--min-embed-size", MIN_EMBED_SIZE, "smallest face side (px) that is embedded and named; "
                                                    "smaller faces are reported, not identified"),
        Default("--cascade", CASCADE, "Haar cascade of haar and haar+cnn: OpenCV's `default`, `alt`, `alt2`, "
                "`alt_tree`, `profile`, facepipe's own `facepipe_frontalface.xml`, or a cascade XML path"),
        Default("--top-k", TOP_K, "candidates listed per face by identify"),
        Default("--fpir", TARGET_FPIR, "target false-positive identification rate of a new gallery: its "
                                       "threshold comes from the embedder's impostor model and follows the "
                                       "gallery's size; `gallery calibrate` refines it"),
        Default("--tolerance", f"{similarity_to_distance(THRESHOLD):g}",
                "distance (1 − cosine similarity) at or below which a gallery names a face when its "
                "embedder ships no impostor model and it was never calibrated"),
        Default("--min-margin", MIN_MARGIN, "similarity lead over the runner-up a name needs "
                                            "(0: no ambiguity rule)"),
    ]


def markdown_table() -> str:
    """The defaults as the README's markdown table (kept in sync by a test)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    rows += [f"| `{d.option}` | `{d.shown()}` | {d.meaning} |" for d in table()]
    return "\n".join(rows)


def help_epilog() -> str:
    """The defaults as plain text for ``facepipe --help`` (``\\b``: click keeps the lines as they are)."""
    width = max(len(d.option) for d in table())
    lines = ["\b", "Defaults (facepipe/defaults.py):"]
    lines += [f"  {d.option.ljust(width)}  {d.shown()}" for d in table()]
    return "\n".join(lines)
