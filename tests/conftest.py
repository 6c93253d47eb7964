import pytest
import torch

from engine.config import DALLEConfig
from engine.dalle import DALLE


def tiny_config(**overrides) -> DALLEConfig:
    base = dict(num_text_tokens=23, text_seq_len=5, num_image_tokens=17, image_fmap_size=3,
                dim=32, depth=2, heads=2, dim_head=16)
    base.update(overrides)
    return DALLEConfig(**base)


def random_batch(config: DALLEConfig, batch: int = 3, generator: torch.Generator | None = None):
    text = torch.randint(1, config.num_text_tokens, (batch, config.text_seq_len), generator=generator)
    text[:, config.text_seq_len - 2:] = 0  # trailing padding, as the tokenizers produce
    codes = torch.randint(0, config.num_image_tokens, (batch, config.image_seq_len), generator=generator)
    return text, codes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    return DALLE(tiny_config())
