"""DALL-E engine: model, VAEs, tokenizers, checkpoints and sampling."""

import torch

# torch.log, exp, sin, ... on CPU tensors go through MKL's vector math, which sets up its CPU dispatch on first use: a
# first call whose tensor is split across threads can compute a part through another code path, a last bit off,
# which training amplifies: about one process in seven sampled different Gumbel noise from the same seed. One call on
# a tensor too small to split, before anything else runs, sets the library up.
torch.log(torch.ones(1))

from engine.codecs.tokenizers import (
    ChineseTokenizer,
    HugTokenizer,
    SimpleTokenizer,
    Tokenizer,
    YttmTokenizer,
    build_tokenizer,
    tokenizer_from_bytes,
)
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig
from engine.io.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_clip,
    load_dalle,
    load_vae,
    save_clip,
    save_dalle,
    save_vae,
)
from engine.model.clip import CLIP, CLIPConfig
from engine.model.config import DALLEConfig
from engine.model.dalle import DALLE

__version__ = "0.1.0"

__all__ = [
    "DALLE", "DALLEConfig", "DiscreteVAE", "DiscreteVAEConfig", "Tokenizer", "SimpleTokenizer", "YttmTokenizer",
    "HugTokenizer", "ChineseTokenizer", "build_tokenizer", "tokenizer_from_bytes", "save_dalle", "load_dalle",
    "save_vae", "load_vae", "Checkpoint", "CheckpointError", "CLIP", "CLIPConfig", "save_clip", "load_clip",
]
