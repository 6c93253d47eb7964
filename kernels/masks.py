"""DALL-E attention patterns as mask predicates over sequence positions.

Layout: positions ``0..text_len-1`` are bos + caption, the rest is an ``fmap_size x fmap_size`` image grid in
row-major order (image token ``t = p - text_len``). Every pattern is causal; text queries see earlier text, image
queries see all text plus the image keys of their pattern (see ``dalle-semantics.md`` §5.1):

- ``full``: every earlier image key;
- ``axial_row``: same row, column <= own;
- ``axial_col``: same column, row <= own;
- ``conv_like`` (DALLE-pytorch v1.5+): keys at ``(r - a*d, c - b*d)`` for ``a, b`` in ``0..k-1``, a window whose
  bottom-right corner is the query;
- ``conv_like_centered`` (pre-1.5): ``|dr|, |dc| <= (k//2)*d`` on the dilation lattice, raster-causal.

Predicates work on Python ints and on broadcasting integer tensors alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["PATTERNS", "allowed", "block_layout", "check_geometry", "dense_mask", "image_key_window"]

Index = int | torch.Tensor  # a position, or an integer tensor of positions
Mask = bool | torch.Tensor

PATTERNS = ("full", "axial_row", "axial_col", "conv_like", "conv_like_centered")


def check_geometry(
    pattern: str,
    *,
    text_len: int,
    fmap_size: int,
    kernel_size: int = 5,
    dilation: int = 1,
    seq_len: int | None = None,
) -> None:
    """Raise ValueError unless the pattern name and geometry are valid (and ``seq_len`` fits, when given)."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; valid patterns: {', '.join(PATTERNS)}")
    for name, value in (("text_len", text_len), ("fmap_size", fmap_size),
                        ("kernel_size", kernel_size), ("dilation", dilation)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if seq_len is not None:
        max_len = text_len + fmap_size ** 2
        if not 1 <= seq_len <= max_len:
            raise ValueError(
                f"seq_len must be in 1..{max_len} (text_len {text_len} + fmap_size {fmap_size}**2), got {seq_len}")


# Image->image rules on image token indices, written as in the table of dalle-semantics.md §5.1;
# `allowed` adds text visibility and the global causal mask on top.

def _full(tq: Index, tk: Index, fmap_size: int, kernel_size: int, dilation: int) -> Mask:
    return tk <= tq


def _axial_row(tq: Index, tk: Index, fmap_size: int, kernel_size: int, dilation: int) -> Mask:
    return (tq // fmap_size == tk // fmap_size) & (tk % fmap_size <= tq % fmap_size)


def _axial_col(tq: Index, tk: Index, fmap_size: int, kernel_size: int, dilation: int) -> Mask:
    return (tq % fmap_size == tk % fmap_size) & (tk // fmap_size <= tq // fmap_size)


def _on_lattice(delta: Index, lo: int, hi: int, dilation: int) -> Mask:
    """``delta`` lies in ``[lo, hi]`` and is a multiple of ``dilation``."""
    return (delta >= lo) & (delta <= hi) & (delta % dilation == 0)


def _conv_like(tq: Index, tk: Index, fmap_size: int, kernel_size: int, dilation: int) -> Mask:
    reach = (kernel_size - 1) * dilation
    dr = tq // fmap_size - tk // fmap_size  # query minus key: the window extends up and left only
    dc = tq % fmap_size - tk % fmap_size
    return _on_lattice(dr, 0, reach, dilation) & _on_lattice(dc, 0, reach, dilation)


def _conv_like_centered(tq: Index, tk: Index, fmap_size: int, kernel_size: int, dilation: int) -> Mask:
    reach = (kernel_size // 2) * dilation
    dr = tq // fmap_size - tk // fmap_size
    dc = tq % fmap_size - tk % fmap_size
    # The centred window's lower half and the own row's right part are future keys: raster order drops them.
    return _on_lattice(dr, -reach, reach, dilation) & _on_lattice(dc, -reach, reach, dilation) & (tk <= tq)


_IMAGE_RULES: dict[str, Callable[[Index, Index, int, int, int], Mask]] = {
    "full": _full,
    "axial_row": _axial_row,
    "axial_col": _axial_col,
    "conv_like": _conv_like,
    "conv_like_centered": _conv_like_centered,
}


def check_pos(pos: int | torch.Tensor, q: torch.Tensor, max_seq: int) -> None:
    """Raise ValueError unless ``pos`` is an int in ``[0, max_seq)``, or a 0-dim or ``(batch,)`` integer tensor on q's
    device (whose values are not read here: that would sync with the device)."""
    if isinstance(pos, torch.Tensor):
        if (pos.dim() > 1 or (pos.dim() == 1 and pos.shape[0] != q.shape[0]) or pos.dtype.is_floating_point
                or pos.dtype.is_complex or pos.dtype == torch.bool):
            raise ValueError(f"pos must be an int, a 0-dim integer tensor or a (batch,) = ({q.shape[0]},) integer "
                             f"tensor, got {pos.dtype} of shape {tuple(pos.shape)}")
        if pos.device != q.device:
            raise ValueError(f"pos must be on q's device {q.device}, got {pos.device}")
    elif not 0 <= pos < max_seq:
        raise ValueError(f"pos must lie in [0, {max_seq}), got {pos}")


def allowed(
    pattern: str,
    q: Index,
    k: Index,
    *,
    text_len: int,
    fmap_size: int,
    kernel_size: int = 5,
    dilation: int = 1,
) -> Mask:
    """Whether query position ``q`` may attend to key position ``k`` (bool, or a broadcast bool tensor)."""
    check_geometry(pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size, dilation=dilation)
    image_rule = _IMAGE_RULES[pattern](q - text_len, k - text_len, fmap_size, kernel_size, dilation)
    # Causality makes text queries see only text; an image query sees all text plus its pattern's image keys.
    return (k <= q) & ((k < text_len) | image_rule)


def dense_mask(
    pattern: str,
    seq_len: int,
    *,
    text_len: int,
    fmap_size: int,
    kernel_size: int = 5,
    dilation: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``(seq_len, seq_len)`` bool mask, True where query row may attend to key column."""
    check_geometry(pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size, dilation=dilation,
                   seq_len=seq_len)
    pos = torch.arange(seq_len, device=device)
    return allowed(pattern, pos[:, None], pos[None, :], text_len=text_len, fmap_size=fmap_size,
                   kernel_size=kernel_size, dilation=dilation)


def block_layout(
    pattern: str,
    seq_len: int,
    *,
    text_len: int,
    fmap_size: int,
    block_size: int,
    kernel_size: int = 5,
    dilation: int = 1,
) -> torch.Tensor:
    """``(nb, nb)`` bool layout, ``nb = ceil(seq_len / block_size)``: True where query block i has any allowed key
    in key block j, i.e. where a block-sparse kernel must visit the tile."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    mask = dense_mask(pattern, seq_len, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                      dilation=dilation)
    num_blocks = -(-seq_len // block_size)
    pad = num_blocks * block_size - seq_len
    mask = F.pad(mask, (0, pad, 0, pad))  # pads with False: padding never needs a visit
    return mask.view(num_blocks, block_size, num_blocks, block_size).any(dim=3).any(dim=1)


def image_key_window(
    pattern: str, t: int, *, fmap_size: int, kernel_size: int = 5, dilation: int = 1
) -> tuple[int, int, int, int, int, int]:
    """The image keys of image query ``t`` (row-major index) as a lattice window, for kernels that enumerate keys.

    Returns ``(row_lo, row_hi, row_step, col_lo, col_hi, col_step)``: the keys are the in-grid cells
    ``(row, col)`` with ``row`` in ``row_lo, row_lo + row_step, ..., row_hi`` and ``col`` likewise, that are not
    after the query in raster order (on ``row_hi``, the query's own row, only ``col <= t % fmap_size``). Bounds
    are already clipped to the grid and lie on the window's lattice. Equals ``allowed``'s image rule for ``t``.
    """
    r, c = divmod(t, fmap_size)
    last = fmap_size - 1
    if pattern == "full":
        return 0, r, 1, 0, last, 1
    if pattern == "axial_row":
        return r, r, 1, 0, c, 1
    if pattern == "axial_col":
        return 0, r, 1, c, c, 1
    if pattern not in ("conv_like", "conv_like_centered"):
        raise ValueError(f"unknown attention pattern {pattern!r}; valid patterns: {', '.join(PATTERNS)}")
    d = dilation
    up = (kernel_size - 1 if pattern == "conv_like" else kernel_size // 2) * d  # reach above and to the left
    right = 0 if pattern == "conv_like" else (kernel_size // 2) * d
    # Clip to the grid, staying on the query's lattice (cells an exact multiple of d away).
    row_lo = r - min(up, r) // d * d
    col_lo = c - min(up, c) // d * d
    col_hi = c + min(right, last - c) // d * d
    return row_lo, r, d, col_lo, col_hi, d
