"""Block plans for block-sparse attention over the DALL-E patterns: which key tiles each query tile visits.

Pure PyTorch and device-agnostic, so any block-sparse backend (Triton, CUDA) can share it. A plan is built once per
geometry from the exact element mask (``kernels.masks.dense_mask``) and cached.

Tiling. The text part ``[0, text_len)`` and the image part ``[text_len, seq)`` are tiled separately, each from its
own start, so image tiles hold whole grid rows whenever the block size is a multiple of ``fmap_size`` (or the
reverse) whatever the caption length. With DALLE-pytorch's 257-token text a uniform tiling from 0 would put a row
boundary inside every image tile and turn it into a partial tile (``kernels.md`` §7.4). The price is one short
text tile when ``text_len`` is not a multiple of the block size.

Kernel order. ``axial_col`` runs in column-major image order, where it *is* ``axial_row`` (``kernels.md`` §8.2):
in raster order every image tile holds every column and no tile can be skipped. ``kernel_order`` gives the
permutation; a ragged ``axial_col`` sequence is zero-padded to the full grid first, which is exact because every
padded key comes after every real query of its column.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .masks import check_geometry, dense_mask

__all__ = ["BlockPlan", "block_plan", "kernel_order", "kernel_seq_len", "tile_bounds"]


@dataclass(frozen=True)
class BlockPlan:
    """Tiles of one geometry and, per query tile, the key tiles to visit (and the transpose, per key tile).

    Tile ``i`` of an axis covers positions ``[bounds[i], bounds[i + 1])``. Index tables are int32, padded with 0
    past each row's count; ``*_full`` flag tiles whose every element is allowed (no element mask needed), the
    others are partial and need the exact mask.
    """

    seq_len: int                # length in kernel order (axial_col: padded to the full grid)
    q_bounds: torch.Tensor      # (num_q_tiles + 1,) int32
    k_bounds: torch.Tensor      # (num_k_tiles + 1,) int32
    layout: torch.Tensor        # (num_q_tiles, num_k_tiles) bool: tile has an allowed element
    full: torch.Tensor          # (num_q_tiles, num_k_tiles) bool: every element allowed
    kv_counts: torch.Tensor     # (num_q_tiles,) int32
    kv_indices: torch.Tensor    # (num_q_tiles, max_kv) int32, ascending key tiles
    kv_full: torch.Tensor       # (num_q_tiles, max_kv) bool
    q_counts: torch.Tensor      # (num_k_tiles,) int32
    q_indices: torch.Tensor     # (num_k_tiles, max_q) int32, ascending query tiles
    q_full: torch.Tensor        # (num_k_tiles, max_q) bool

    @property
    def num_visits(self) -> int:
        return int(self.kv_counts.sum())


def kernel_seq_len(pattern: str, seq_len: int, *, text_len: int, fmap_size: int) -> int:
    """Sequence length the kernel runs on: ``seq_len``, or the full grid for ``axial_col`` with image tokens."""
    return text_len + fmap_size ** 2 if pattern == "axial_col" and seq_len > text_len else seq_len


def kernel_order(pattern: str, seq_len: int, *, text_len: int, fmap_size: int,
                 device: torch.device | str | None = None) -> torch.Tensor | None:
    """Gather index from the (padded) raster sequence to kernel order, or None where the orders agree.

    For ``axial_col`` the image part is transposed to column-major order. Transposing a square grid is an
    involution, so the same index also maps kernel order back to raster order.
    """
    if pattern != "axial_col" or seq_len <= text_len:
        return None
    grid = torch.arange(fmap_size ** 2, device=device).view(fmap_size, fmap_size)
    return torch.cat([torch.arange(text_len, device=device), text_len + grid.t().reshape(-1)])


def tile_bounds(seq_len: int, text_len: int, block: int) -> list[int]:
    """Tile boundaries: text tiles from 0, image tiles from ``text_len``, the last tile of each part ragged."""
    text_end = min(text_len, seq_len)
    return [*range(0, text_end, block), *range(text_end, seq_len, block), seq_len]


def _lut(layout: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the count, the ascending True columns (padded with 0) and their full flags."""
    counts = layout.sum(dim=1)
    columns = torch.arange(layout.shape[1]).expand_as(layout)
    # Sorting puts the visited columns first, in ascending order; the sentinel shape[1] marks padding.
    indices = torch.where(layout, columns, layout.shape[1]).sort(dim=1).values[:, :max(int(counts.max()), 1)]
    valid = indices < layout.shape[1]
    indices = torch.where(valid, indices, 0)
    flags = full.gather(1, indices) & valid
    return counts.to(torch.int32), indices.to(torch.int32).contiguous(), flags.contiguous()


@functools.lru_cache(maxsize=64)
def block_plan(
    pattern: str,
    seq_len: int,
    *,
    text_len: int,
    fmap_size: int,
    kernel_size: int = 5,
    dilation: int = 1,
    block_m: int = 64,
    block_n: int = 64,
    device: str = "cpu",
) -> BlockPlan:
    """The cached plan for one geometry with ``block_m``-row query tiles and ``block_n``-row key tiles.

    ``seq_len`` is the caller's length; for ``axial_col`` the plan is in kernel order (see ``kernel_order``) and
    may also be asked for with the padded length. Tensors live on ``device``.
    """
    check_geometry(pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size, dilation=dilation,
                   seq_len=seq_len)
    length = kernel_seq_len(pattern, seq_len, text_len=text_len, fmap_size=fmap_size)
    mask = dense_mask(pattern, length, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                      dilation=dilation)
    order = kernel_order(pattern, seq_len, text_len=text_len, fmap_size=fmap_size)
    if order is not None:
        mask = mask[order][:, order]

    q_bounds = torch.tensor(tile_bounds(length, text_len, block_m))
    k_bounds = torch.tensor(tile_bounds(length, text_len, block_n))
    # Allowed elements per tile from a 2-D prefix sum, read at the tile corners.
    prefix = F.pad(mask.to(torch.int32).cumsum(0).cumsum(1), (1, 0, 1, 0))
    corners = prefix[q_bounds][:, k_bounds]
    counts = corners[1:, 1:] - corners[:-1, 1:] - corners[1:, :-1] + corners[:-1, :-1]
    area = q_bounds.diff()[:, None] * k_bounds.diff()[None, :]
    layout, full = counts > 0, counts == area

    kv = _lut(layout, full)
    by_key = _lut(layout.t(), full.t())
    tensors = [q_bounds.to(torch.int32), k_bounds.to(torch.int32), layout, full, *kv, *by_key]
    return BlockPlan(length, *(t.to(device) for t in tensors))
