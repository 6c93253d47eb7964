"""Weight-only quantisation for sampling: the DALL-E's linear layers keep their weights in int8 (symmetric, one
float32 scale per output feature) or in bfloat16, and its activations stay in the model's dtype.

A decode step multiplies a handful of rows by every weight matrix, so once the weights no longer fit in cache its
time is the time to read them: int8 reads a quarter of float32's bytes, bfloat16 half. ``quantize_weights`` swaps
the layers of a built model in place (module surgery, after any ``model.to(dtype)``): the model's code never branches
on it, and checkpoints are never written quantised. The VAE, the embeddings and the norms keep their weights.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from engine.model.linear import Linear, linear

WEIGHTS = ("fp32", "bf16", "int8")  # fp32: the model's own weights, in whatever dtype it has


def int8_per_feature(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): int8 ``q`` and float32 ``scale`` (out,) with weight ~ q * scale[:, None], q in [-127, 127], each
    output feature's largest magnitude mapped to 127 (an all-zero feature gets scale 1)."""
    largest = weight.detach().float().abs().amax(dim=1)
    scale = torch.where(largest > 0, largest / 127, torch.ones_like(largest))
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class StoredLinear(nn.Module):
    """A ``Linear`` whose weight is stored as ``weights`` ("int8" or "bf16"), computed by ``engine.model.linear``
    (the C++ kernel reads the stored weight on a CPU). Buffers, not parameters: nothing to train."""

    def __init__(self, layer: Linear, weights: str):
        super().__init__()
        if weights == "int8":
            weight, scale = int8_per_feature(layer.weight)
        elif weights == "bf16":
            weight, scale = layer.weight.detach().to(torch.bfloat16), None
        else:
            raise ValueError(f"weights must be int8 or bf16, got {weights!r}")
        self.in_features, self.out_features, self.weights = layer.in_features, layer.out_features, weights
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.scale)

    def part(self, x: torch.Tensor, features: slice) -> torch.Tensor:
        """Only the output features ``features``."""
        return linear(x, self.weight[features], None if self.bias is None else self.bias[features],
                      None if self.scale is None else self.scale[features])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}"


def stored_bytes(layer: nn.Linear | StoredLinear, features: slice = slice(None)) -> int:
    """Bytes a product with ``layer``'s output features ``features`` reads: weight, bias and scale, as stored."""
    tensors = (layer.weight, layer.bias, getattr(layer, "scale", None))
    return sum(t[features].numel() * t.element_size() for t in tensors if t is not None)


def quantize_weights(model, weights: str):
    """Store the weights of ``model``'s (a DALLE's) transformer and logits projection as ``weights`` ("int8",
    "bf16"; "fp32" leaves the model as it is), in place; returns the model. The logits projection keeps its weight
    when the model shares it with the token embeddings (``share_input_output_emb``)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights == "fp32":
        return model
    parts = [model.transformer] + ([] if model.config.share_input_output_emb else [model.to_logits])
    for part in parts:
        for module in list(part.modules()):
            for name, child in module.named_children():
                if isinstance(child, Linear):
                    setattr(module, name, StoredLinear(child, weights))
    return model


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=WEIGHTS, default="fp32",
                   help="how the DALL-E's linear layers store their weights while sampling: int8 (one scale per "
                        "output feature) or bf16 read a quarter or half of float32's bytes per step, activations "
                        "unchanged; fp32: as loaded")
