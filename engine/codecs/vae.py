"""Discrete VAE (DALL-E's dVAE as trained by DALLE-pytorch's ``train_vae.py``).

Parameter names match DALLE-pytorch v1.6.6 ``DiscreteVAE``, so its ``vae.pt`` loads strictly:
``DiscreteVAE(**ckpt["hparams"]).load_state_dict(ckpt["weights"])``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model.config import help_field

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass
class DiscreteVAEConfig:
    image_size: int = help_field("side of the square input images (a power of two)", default=256)
    num_tokens: int = help_field("codebook size (image vocabulary)", default=512)
    codebook_dim: int = help_field("width of one codebook vector", default=512)
    num_layers: int = help_field("stride-2 down/up-sampling layers; the token grid side is image_size / 2**num_layers",
                            default=3)
    num_resnet_blocks: int = help_field("residual blocks after the encoder's and before the decoder's convs", default=0)
    hidden_dim: int = help_field("conv channels inside encoder and decoder", default=64)
    channels: int = help_field("image channels (3 RGB, 4 RGBA)", default=3)
    smooth_l1_loss: bool = help_field("smooth-L1 instead of MSE reconstruction loss", default=False)
    temperature: float = help_field("Gumbel-softmax temperature when forward() gets no temp", default=0.9)
    straight_through: bool = help_field("hard one-hot samples with straight-through gradients", default=False)
    reinmax: bool = help_field("ReinMax second-order gradient estimator (needs straight_through)", default=False)
    kl_div_loss_weight: float = help_field("weight of KL(q || uniform) in the loss", default=0.0)
    normalization: Normalization | None = help_field(
        "per-channel (means, stds) applied to [0, 1] inputs; extra channels get mean 0, std 1; None = identity",
        default=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    )

    def __post_init__(self) -> None:
        for name in ("image_size", "num_tokens", "codebook_dim", "num_layers", "hidden_dim", "channels"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_resnet_blocks", self.num_resnet_blocks, minimum=0)
        if self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size must be a power of two, got {self.image_size}")
        if self.image_size < 2**self.num_layers:
            raise ValueError(
                f"image_size {self.image_size} is too small for num_layers={self.num_layers}: "
                f"it must be divisible by 2**num_layers = {2**self.num_layers}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.kl_div_loss_weight >= 0:
            raise ValueError(f"kl_div_loss_weight must be >= 0, got {self.kl_div_loss_weight}")
        # DALLE-pytorch silently ignores reinmax without straight_through; refuse a flag that would do nothing.
        if self.reinmax and not self.straight_through:
            raise ValueError("reinmax=True requires straight_through=True")
        if self.normalization is not None:
            self.normalization = _parse_normalization(self.normalization)

    @property
    def fmap_size(self) -> int:
        """Side of the token grid."""
        return self.image_size // 2**self.num_layers

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """(means, stds) with exactly `channels` entries: truncated, or extended with mean 0 / std 1 (alpha)."""
        means, stds = self.normalization or ((), ())
        pad = max(self.channels - len(means), 0)
        return [*means[: self.channels], *[0.0] * pad], [*stds[: self.channels], *[1.0] * pad]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _parse_normalization(value: Any) -> Normalization:
    # A generated CLI hands over a string such as "(0.5, 0.5, 0.5),(0.5, 0.5, 0.5)": means first, then stds.
    if isinstance(value, str):
        numbers = [float(x) for x in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", value)]
        if not numbers or len(numbers) % 2:
            raise ValueError(f"normalization string needs means then stds of equal length, got {value!r}")
        value = (numbers[: len(numbers) // 2], numbers[len(numbers) // 2 :])
    try:
        means, stds = (tuple(float(x) for x in seq) for seq in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"normalization must be (means, stds) sequences of numbers, got {value!r}") from err
    if not means or len(means) != len(stds):
        raise ValueError(f"normalization means and stds must be non-empty and of equal length, got {value!r}")
    if any(s <= 0 for s in stds):
        raise ValueError(f"normalization stds must be > 0, got {stds}")
    return means, stds


class ResBlock(nn.Module):
    def __init__(self, chan: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(chan, chan, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(chan, chan, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(chan, chan, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + x


class ConfiguredVAE(nn.Module):
    """Base of the VAEs: the sizes DALLE reads, all taken from ``self.config``."""

    config: Any

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def fmap_size(self) -> int:
        return self.config.fmap_size

    @property
    def channels(self) -> int:
        return self.config.channels

    def check_codes(self, codes: Tensor) -> None:
        """Refuse codes ``decode`` cannot take: not (b, fmap_size**2), not int64/int32, or out of the vocabulary."""
        n = self.fmap_size**2
        if codes.dim() != 2 or codes.shape[1] != n:
            raise ValueError(f"expected codes of shape (b, {n}), got {tuple(codes.shape)}")
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected int64 or int32 codes, got dtype {codes.dtype}")
        # One host sync per decode; an out-of-range id would otherwise be an opaque device-side assert.
        lo, hi = (int(v) for v in torch.aminmax(codes)) if codes.numel() else (0, 0)
        if lo < 0 or hi >= self.num_tokens:
            raise ValueError(f"codes must lie in [0, {self.num_tokens}), got values in [{lo}, {hi}]")


class DiscreteVAE(ConfiguredVAE):
    """Conv encoder -> Gumbel-softmax over `num_tokens` codes per grid cell -> codebook mixture -> conv decoder.

    Build with `DiscreteVAE(config)`, `DiscreteVAE(**hparams)` or `DiscreteVAE(config, field=override)`.
    """

    def __init__(self, config: DiscreteVAEConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = cfg = dataclasses.replace(config or DiscreteVAEConfig(), **overrides)
        hid, has_res = cfg.hidden_dim, cfg.num_resnet_blocks > 0
        self.codebook = nn.Embedding(cfg.num_tokens, cfg.codebook_dim)

        enc_in = [cfg.channels] + [hid] * (cfg.num_layers - 1)
        self.encoder = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(c, hid, 4, stride=2, padding=1), nn.ReLU()) for c in enc_in],
            *[ResBlock(hid) for _ in range(cfg.num_resnet_blocks)],
            nn.Conv2d(hid, cfg.num_tokens, 1),
        )

        # With resblocks a 1x1 conv maps the codebook to hidden_dim first; without, the first upsampling conv does.
        dec_in = [hid if has_res else cfg.codebook_dim] + [hid] * (cfg.num_layers - 1)
        self.decoder = nn.Sequential(
            *([nn.Conv2d(cfg.codebook_dim, hid, 1)] if has_res else []),
            *[ResBlock(hid) for _ in range(cfg.num_resnet_blocks)],
            *[nn.Sequential(nn.ConvTranspose2d(c, hid, 4, stride=2, padding=1), nn.ReLU()) for c in dec_in],
            nn.Conv2d(hid, cfg.channels, 1),
        )

        # Non-persistent: DALLE-pytorch state dicts carry no normalisation entries, yet these follow .to(device).
        means, stds = cfg.channel_stats()
        self.register_buffer("norm_mean", torch.tensor(means).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("norm_std", torch.tensor(stds).view(1, -1, 1, 1), persistent=False)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def _normalize(self, img: Tensor) -> Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if img.dim() != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (b, {', '.join(map(str, expected))}), got {tuple(img.shape)}")
        # In the weights' dtype: a model cast to bf16/fp16 (e.g. by DeepSpeed) may keep float32 buffers.
        return ((img - self.norm_mean) / self.norm_std).to(self.codebook.weight.dtype)

    def forward(
        self,
        img: Tensor,
        return_loss: bool = False,
        return_recons: bool = False,
        return_logits: bool = False,
        temp: float | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """img: (b, channels, image_size, image_size) in [0, 1].

        Returns the encoder logits (`return_logits`), else the reconstruction in *normalised* space, or the loss,
        or (loss, reconstruction) with `return_loss` and `return_recons`.
        """
        cfg = self.config
        normed = self._normalize(img)
        logits = self.encoder(normed)  # (b, num_tokens, f, f)
        if return_logits:
            return logits

        tau = cfg.temperature if temp is None else temp
        soft_one_hot = F.gumbel_softmax(logits, tau=tau, dim=1, hard=cfg.straight_through)
        if cfg.straight_through and cfg.reinmax:
            soft_one_hot = _reinmax(logits, soft_one_hot.detach(), tau)

        sampled = torch.einsum("bnhw,nd->bdhw", soft_one_hot, self.codebook.weight)
        out = self.decoder(sampled)
        if not return_loss:
            return out

        recon_fn = F.smooth_l1_loss if cfg.smooth_l1_loss else F.mse_loss
        loss = recon_fn(out, normed)
        if cfg.kl_div_loss_weight > 0:
            # KL(q || uniform) = sum q log q + log n, summed over cells and codes, averaged over the batch.
            # (DALLE-pytorch passes the (1,)-shaped log-uniform as kl_div's input, so its "batchmean" divides
            # by 1: its effective weight is batch_size times this one.)
            log_q = F.log_softmax(logits, dim=1)
            kl = (log_q.exp() * (log_q + math.log(cfg.num_tokens))).sum() / img.shape[0]
            loss = loss + cfg.kl_div_loss_weight * kl
        return (loss, out) if return_recons else loss

    @torch.no_grad()
    def get_codebook_indices(self, img: Tensor) -> Tensor:
        """[0, 1] images (b, channels, image_size, image_size) -> codes (b, fmap_size**2), row-major."""
        x = self._normalize(img)
        if x.is_cpu:  # oneDNN convolves channels-last natively; NCHW costs a fifth to a third more time
            x = x.contiguous(memory_format=torch.channels_last)
        return self.encoder(x).argmax(dim=1).flatten(1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes (b, fmap_size**2) -> images (b, channels, image_size, image_size) in [0, 1].

        Unlike DALLE-pytorch (which returns the decoder output in normalised space), this de-normalises and
        clamps, so every VAE in the engine decodes to pixel space.
        """
        self.check_codes(codes)
        f = self.fmap_size
        embeds = self.codebook(codes).view(-1, f, f, self.config.codebook_dim).permute(0, 3, 1, 2)
        out = self.decoder(embeds)
        return (out * self.norm_std + self.norm_mean).clamp(0.0, 1.0)


def _reinmax(logits: Tensor, sample: Tensor, tau: float) -> Tensor:
    """ReinMax (Liu et al. 2023, arXiv:2304.08612, Algorithm 2): returns `sample` in the forward pass, with a
    second-order accurate gradient w.r.t. `logits`. Codes lie on dim 1; `sample` is a detached one-hot."""
    pi0 = logits.softmax(dim=1)
    pi1 = (sample + (logits / tau).softmax(dim=1)) / 2
    # softmax(stop_grad(ln pi1 - theta) + theta) equals pi1 in value but has the softmax Jacobian at pi1.
    pi1 = ((pi1.clamp_min(1e-20).log() - logits).detach() + logits).softmax(dim=1)
    pi2 = 2 * pi1 - pi0 / 2
    return pi2 - pi2.detach() + sample
