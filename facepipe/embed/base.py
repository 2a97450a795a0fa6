"""The embedder interface: aligned face crops in, L2-normalised vectors out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Embedder(ABC):
    """Maps aligned RGB ``uint8`` crops ``(N, S, S, 3)`` to float32 ``(N, dim)`` unit vectors.

    :attr:`embedder_id` names the model *and* its weights (e.g. ``name@sha256-prefix``)
    so a gallery can refuse vectors from a different embedder.
    """

    name: str = "embedder"
    dim: int = 0
    crop_size: int = 112

    @property
    @abstractmethod
    def embedder_id(self) -> str:
        """Model name plus a hash of its weights."""

    @abstractmethod
    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embed a batch of aligned crops; returns float32 ``(N, dim)`` with unit rows."""
