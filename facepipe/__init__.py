"""facepipe: a staged face detection and open-set recognition pipeline.

Stages: detection (Viola–Jones Haar cascade or a transfer-learned CNN),
landmark alignment, metric-learning embeddings and a FAISS gallery. The library
is usable without the command line; see :mod:`facepipe.detect` for detectors and
:mod:`facepipe.io` for image loading. Importing facepipe loads no models.
"""

__version__ = "0.1.0"
