"""Sampling from a DALL-E: per-row settings (``Settings``), counter-based randomness that makes each image depend
only on its seed and index (``noise``), and the decode loops over the model's KV cache (``decode``)."""

from engine.sampling.noise import row_keys
from engine.sampling.rows import Settings
from engine.sampling.decode import captions, image_codes, resolve  # noqa: I001 (after rows, which it imports)

__all__ = ["Settings", "captions", "image_codes", "resolve", "row_keys"]
