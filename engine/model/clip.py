"""CLIP: a contrastive text-image model with DALLE-pytorch's ``CLIP`` semantics, used to rerank generated images.

Text: token + learned position embeddings, a non-causal transformer, then the mean over positions (over the kept ones
when a ``text_mask`` is given, which also hides the dropped positions from attention). Image: a ViT over
``visual_patch_size`` patches with learned position embeddings, then the mean over patches. Both means go through a
bias-free projection to ``dim_latent`` and are L2-normalised; similarities are cosines scaled by ``exp(temperature)``.

Images are taken as given, in [0, 1] (``ToTensor``'s range, in which DALLE-pytorch's training scripts feed every
model), with no normalisation inside, exactly like DALLE-pytorch's CLIP, so its weights carry over unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from engine.codecs.tokenizers import check_caption_ids
from engine.model.config import help_field
from engine.model.linear import Linear
from engine.model.transformer import FeedForward, Layer, layer_scale_init

DIM_HEAD = 64  # DALLE-pytorch's CLIP leaves its transformers' head width at the default


@dataclass
class CLIPConfig:
    dim_text: int = help_field("text transformer width", default=512)
    dim_image: int = help_field("image transformer width", default=512)
    dim_latent: int = help_field("width of the shared text-image latent space", default=512)
    num_text_tokens: int = help_field("tokenizer vocabulary size", default=10000)
    text_enc_depth: int = help_field("text transformer layers", default=6)
    text_seq_len: int = help_field("fixed caption length in tokens", default=256)
    text_heads: int = help_field("text attention heads (64 wide each)", default=8)
    num_visual_tokens: int = help_field(
        "unused; kept so that DALLE-pytorch's CLIP keyword arguments map onto this config", default=512
    )
    visual_enc_depth: int = help_field("image transformer layers", default=6)
    visual_heads: int = help_field("image attention heads (64 wide each)", default=8)
    visual_image_size: int = help_field("image side in pixels", default=256)
    visual_patch_size: int = help_field("ViT patch side in pixels (must divide the image side)", default=32)
    channels: int = help_field("image channels", default=3)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.visual_image_size % self.visual_patch_size:
            raise ValueError(f"visual_patch_size {self.visual_patch_size} must divide "
                             f"visual_image_size {self.visual_image_size}")

    @property
    def num_patches(self) -> int:
        return (self.visual_image_size // self.visual_patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.channels * self.visual_patch_size**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)


class Attention(nn.Module):
    """Full bidirectional attention; ``key_mask`` (batch, n), True = attend, hides the other keys."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = Linear(dim, heads * DIM_HEAD * 3, bias=False)
        self.to_out = Linear(heads * DIM_HEAD, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # (b, h, n, d)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class Branch(nn.Module):
    """LayerScale(PreNorm(fn)), DALLE-pytorch's residual branch with token shift and sandwich norm off."""

    def __init__(self, dim: int, fn: nn.Module, layer: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), layer_scale_init(layer)))
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **fn_kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), **fn_kwargs) * self.scale


class Encoder(nn.Module):
    """DALLE-pytorch's ``Transformer(causal=False, rotary_emb=False)``: full attention, GEGLU feed-forward, no final
    norm."""

    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList(
            Layer(Branch(dim, Attention(dim, heads), i), Branch(dim, FeedForward(dim, dropout=0.0), i))
            for i in range(1, depth + 1)
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer.attn(x, key_mask=key_mask)
            x = x + layer.ff(x)
        return x


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = c = config
        self.text_emb = nn.Embedding(c.num_text_tokens, c.dim_text)
        self.text_pos_emb = nn.Embedding(c.text_seq_len, c.dim_text)
        self.text_transformer = Encoder(c.dim_text, c.text_enc_depth, c.text_heads)
        self.to_text_latent = Linear(c.dim_text, c.dim_latent, bias=False)

        self.to_visual_embedding = Linear(c.patch_dim, c.dim_image)
        self.visual_pos_emb = nn.Embedding(c.num_patches, c.dim_image)
        self.visual_transformer = Encoder(c.dim_image, c.visual_enc_depth, c.visual_heads)
        self.to_visual_latent = Linear(c.dim_image, c.dim_latent, bias=False)

        self.temperature = nn.Parameter(torch.tensor(1.0))  # log of the similarity scale

    # --- input checks ----------------------------------------------------------------------------------------------

    def _check_text(self, text: torch.Tensor, text_mask: torch.Tensor | None) -> None:
        check_caption_ids(text, self.config.text_seq_len, self.config.num_text_tokens)
        if text_mask is None:
            return
        if text_mask.dtype != torch.bool or text_mask.shape != text.shape:
            raise ValueError(f"text_mask must be a bool tensor shaped like text {tuple(text.shape)} (e.g. text != 0), "
                             f"got {tuple(text_mask.shape)} {text_mask.dtype}")
        if not text_mask.any(dim=1).all():
            raise ValueError("text_mask keeps no position of some caption; its mean would be undefined")

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        expected = (c.channels, c.visual_image_size, c.visual_image_size)
        if not images.is_floating_point() or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be a float (batch, {', '.join(map(str, expected))}) tensor in [0, 1], "
                             f"got {tuple(images.shape)} {images.dtype}")

    # --- towers ----------------------------------------------------------------------------------------------------

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-norm latents (batch, dim_latent) of captions (batch, text_seq_len).

        Without ``text_mask``, every position (padding included) is attended to and averaged, as in DALLE-pytorch;
        with it (e.g. ``text != 0``), only the kept positions are.
        """
        self._check_text(text, text_mask)
        x = self.text_emb(text) + self.text_pos_emb.weight
        x = self.text_transformer(x, key_mask=text_mask)
        if text_mask is None:
            pooled = x.mean(dim=1)
        else:
            keep = text_mask[..., None]
            pooled = torch.where(keep, x, 0).sum(dim=1) / keep.sum(dim=1)
        return F.normalize(self.to_text_latent(pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm latents (batch, dim_latent) of images (batch, channels, size, size) in [0, 1]."""
        self._check_images(images)
        p = self.config.visual_patch_size
        patches = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.to_visual_embedding(patches) + self.visual_pos_emb.weight
        pooled = self.visual_transformer(x).mean(dim=1)
        return F.normalize(self.to_visual_latent(pooled), dim=-1)

    # --- scores ----------------------------------------------------------------------------------------------------

    def forward(self, text: torch.Tensor, image: torch.Tensor, text_mask: torch.Tensor | None = None,
                return_loss: bool = False) -> torch.Tensor:
        """Scaled cosine similarity (batch,) of each caption with its image, or with ``return_loss`` the symmetric
        InfoNCE loss over the batch (caption i belongs to image i, every other pairing is a negative)."""
        text_latents, image_latents = self.encode_text(text, text_mask), self.encode_image(image)
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"text and image batches differ: {text.shape[0]} captions, {image.shape[0]} images")
        scale = self.temperature.exp()
        if not return_loss:
            return (text_latents * image_latents).sum(dim=-1) * scale
        sim = text_latents @ image_latents.t() * scale
        labels = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2

    @torch.no_grad()
    def similarity(self, text: torch.Tensor, images: torch.Tensor,
                   text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled cosine similarity (batch,) of each image to its caption, for reranking: ``text`` is one caption
        (1, text_seq_len), encoded once for all images, or one caption per image (batch, text_seq_len)."""
        text_latents, image_latents = self.encode_text(text, text_mask), self.encode_image(images)
        if text.shape[0] not in (1, images.shape[0]):
            raise ValueError(f"similarity needs one caption or one per image: got {text.shape[0]} captions for "
                             f"{images.shape[0]} images")
        return (text_latents * image_latents).sum(dim=-1) * self.temperature.exp()

    @torch.no_grad()
    def score(self, text: torch.Tensor, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """``similarity`` (n,) of images of any square size, uint8 pixels or floats in [0, 1], to one caption
        (1, text_seq_len), for reranking samples: ``batch_size`` images at a time, each resized to
        ``visual_image_size`` (bilinear, antialiased). The caption is pooled over its tokens only, padding (id 0)
        masked out, as ``train_clip.py`` trains it. Returned in float32 on the CPU."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        size, device = self.config.visual_image_size, self.temperature.device
        text = text.to(device)
        scores = []
        for chunk in images.split(batch_size):
            chunk = chunk.to(device)
            chunk = chunk.float() if chunk.is_floating_point() else chunk.float() / 255
            if chunk.shape[-2:] != (size, size):
                chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            scores.append(self.similarity(text, chunk, text != 0).float().cpu())
        return torch.cat(scores)
