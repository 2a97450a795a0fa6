"""Face embedders: aligned crops to unit vectors for verification and the gallery."""

from facepipe.embed.base import Embedder

__all__ = ["Embedder"]
