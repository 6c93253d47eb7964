"""Sampled images as pixels: uint8 tensors, grids of them, and their PNG bytes."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as uint8 on the CPU, rounded in fp32 whatever the model's dtype."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def make_grid(images: torch.Tensor, padding: int = 2) -> torch.Tensor:
    """(n, c, h, w) images tiled row by row into one (c, H, W) image, ceil(sqrt(n)) columns, `padding` black pixels
    around and between them (torchvision's make_grid layout)."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = images.new_zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding)
    for i, image in enumerate(images):
        y, x = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[:, y: y + h, x: x + w] = image
    return grid


def pil_image(image: torch.Tensor, alpha: bool = True) -> Image.Image:
    """A (c, h, w) uint8 image (1, 3 or 4 channels) as PIL's; without ``alpha`` a fourth channel is dropped."""
    pixels = image.permute(1, 2, 0).numpy()
    if pixels.shape[2] == 1:
        return Image.fromarray(pixels[..., 0], "L")
    if pixels.shape[2] == 4 and alpha:
        return Image.fromarray(np.ascontiguousarray(pixels), "RGBA")
    return Image.fromarray(np.ascontiguousarray(pixels[..., :3]), "RGB")


def png_bytes(image: torch.Tensor) -> bytes:
    """A (c, h, w) uint8 image as PNG: lossless, so its pixels are exactly the sampled ones."""
    buffer = io.BytesIO()
    pil_image(image).save(buffer, format="PNG")
    return buffer.getvalue()
