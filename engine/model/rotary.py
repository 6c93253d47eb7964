"""Rotary position embeddings in DALLE-pytorch's layout: [text 1-D | image row | image col] per table row."""

import math

import torch

# Angle positions that keep text and image parts apart (the values DALLE-pytorch trains with).
_FAR_TEXT_POSITION = 8192.0
_FAR_IMAGE_POSITION = -10.0


def rotary_table(text_len: int, fmap_size: int, dim_head: int) -> torch.Tensor:
    """Angles, shape (text_len + fmap_size**2, 3 * 2 * (dim_head // 3 // 2)); row p is sequence position p."""
    rot_dim = dim_head // 3
    half = rot_dim // 2
    lang_freqs = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64)[:half] / rot_dim))
    pixel_freqs = torch.linspace(1.0, 5.0, half, dtype=torch.float64) * math.pi

    n_img = fmap_size**2
    text_pos = torch.cat([torch.arange(text_len, dtype=torch.float64), torch.full((n_img,), _FAR_TEXT_POSITION)])
    axis = torch.linspace(-1.0, 1.0, fmap_size, dtype=torch.float64)
    t = torch.arange(n_img)
    far = torch.full((text_len,), _FAR_IMAGE_POSITION, dtype=torch.float64)
    row_pos = torch.cat([far, axis[t // fmap_size]])
    col_pos = torch.cat([far, axis[t % fmap_size]])

    parts = [pos[:, None] * freqs[None, :] for pos, freqs in
             ((text_pos, lang_freqs), (row_pos, pixel_freqs), (col_pos, pixel_freqs))]
    # Each frequency drives an interleaved (even, odd) feature pair.
    return torch.cat([p.repeat_interleave(2, dim=-1) for p in parts], dim=-1).float()


def apply_rotary(rotary: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot features of x (..., seq, dim_head) pairwise by ``rotary = (cos, sin)`` of the angles
    (seq, rot) (computed once per forward pass, not per layer); the rest pass through."""
    cos, sin = rotary
    rot = cos.shape[-1]
    if rot == 0:
        return x
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.unflatten(-1, (-1, 2))
    rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return torch.cat([x_rot * cos.to(x.dtype) + rotated_half * sin.to(x.dtype), x_pass], dim=-1)
