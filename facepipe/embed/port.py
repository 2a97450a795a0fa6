"""The dlib port as a facepipe embedder and as a self-describing checkpoint.

``port_checkpoint()`` converts dlib's public-domain ``dlib_face_recognition_resnet_model_v1.dat``
(from the PyPI package ``face_recognition_models``) with facepipe's numpy reader
(:mod:`facepipe.embed.dlib_format`) into a facepipe checkpoint dict: the torch module of
:mod:`facepipe.embed.dlib_resnet`, 150×150 ``dlib-chip-5pt`` crops, dlib's input
normalisation ``(pixel − mean) / 256`` with the file's means, and the file's provenance.
``scripts/convert_dlib.py`` writes it to disk; ``load_embedder("dlib-port")`` builds it in
memory. Neither needs dlib itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from facepipe.embed.network import NetworkEmbedder, dlib_preprocess, make_checkpoint

PORT_REGISTRY_NAME = "dlib-port"
#: The checkpoint name is the registered name, so an embedder id ``dlib-port@<hash>`` names its factory.
PORT_NAME = PORT_REGISTRY_NAME


def dlib_model_file() -> Path:
    """``dlib_face_recognition_resnet_model_v1.dat`` inside the installed ``face_recognition_models``."""
    from facepipe.embed.dlib_peer import RECOGNITION_FILE, model_dir

    return model_dir() / RECOGNITION_FILE


def port_checkpoint(path: str | Path | None = None, dtype: str = "float32") -> dict[str, Any]:
    """The converted dlib network as a facepipe checkpoint dict (float32 weights: exact port)."""
    from facepipe.embed.dlib_resnet import DLIB_PROVENANCE, dlib_arch, port_from_file

    src = Path(path) if path is not None else dlib_model_file()
    net, dnet = port_from_file(src)
    provenance = {
        "weights": DLIB_PROVENANCE if dnet.sha256 == DLIB_PROVENANCE.rsplit(" ", 1)[-1]
        else f"{src.name} (sha256 {dnet.sha256}), converted from dlib's serialised format",
        "source_sha256": dnet.sha256, "source_bytes": dnet.n_bytes,
        "converter": "facepipe.embed.dlib_format.read_face_resnet (numpy; every byte consumed)",
        "dlib_loss": dnet.loss,
    }
    training = {"note": "dlib's trained weights, unchanged (no facepipe training)",
                "dlib_layer_versions": sorted(set(dnet.versions))}
    return make_checkpoint(net, name=PORT_NAME, version="1.0", arch=dlib_arch(),
                           preprocess=dlib_preprocess(dnet.input_mean, dnet.input_size),
                           training=training, registry_name=PORT_REGISTRY_NAME, provenance=provenance,
                           dtype=dtype)


def port_embedder(device: str = "auto", path: str | Path | None = None, **kwargs: Any) -> NetworkEmbedder:
    """dlib's face ResNet run by PyTorch (CPU or CUDA), weights read from the ``.dat`` in memory."""
    ck = port_checkpoint(path)
    return NetworkEmbedder.from_checkpoint_dict(ck, path or dlib_model_file(), device=device, **kwargs)
