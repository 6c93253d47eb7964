"""The DALL-E model: `<bos>` + caption tokens followed by image tokens, one decoder-only transformer.

Semantics follow DALLE-pytorch v1.6.6: every caption position owns a unique pad id (padding is a real, trained
token, never masked), a logits mask keeps text positions on text ids and image positions on image ids, and the
loss weights image tokens `loss_img_weight` times as much as text tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import DALLEConfig
from engine.sampling import gumbel_sample, top_k
from engine.transformer import Transformer


class DALLE(nn.Module):
    def __init__(self, config: DALLEConfig, vae: nn.Module | None = None):
        super().__init__()
        self.config = c = config
        if vae is not None:
            if (vae.num_tokens, vae.fmap_size) != (c.num_image_tokens, c.image_fmap_size):
                raise ValueError(
                    f"VAE has {vae.num_tokens} tokens on a {vae.fmap_size}x{vae.fmap_size} grid but the config "
                    f"expects {c.num_image_tokens} tokens on a {c.image_fmap_size}x{c.image_fmap_size} grid"
                )
            vae.requires_grad_(False).eval()  # the VAE is frozen while DALL-E trains
        self.vae = vae

        self.to_logits = nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, c.total_tokens))
        if not c.share_input_output_emb:
            self.text_emb = nn.Embedding(c.num_text_tokens_internal, c.dim)
            self.image_emb = nn.Embedding(c.num_image_tokens, c.dim)
        if not c.rotary_emb:
            self.text_pos_emb = nn.Embedding(c.text_len, c.dim)
            # Axial image positions: a row table plus a column table, summed.
            self.image_pos_emb_row = nn.Parameter(torch.randn(c.image_fmap_size, c.dim))
            self.image_pos_emb_col = nn.Parameter(torch.randn(c.image_fmap_size, c.dim))
        self.transformer = Transformer(c)

        positions = torch.arange(c.total_seq_len)[:, None]
        token_is_text = torch.arange(c.total_tokens)[None, :] < c.num_text_tokens_internal
        # Positions before the last caption token predict text; from there on they predict image tokens.
        self.register_buffer("logits_allowed", (positions >= c.text_seq_len) != token_is_text, persistent=False)

    def train(self, mode: bool = True) -> DALLE:
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    # --- embeddings ------------------------------------------------------------------------------------------------

    def _embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        if self.config.share_input_output_emb:
            return F.embedding(ids, self.to_logits[1].weight[: self.config.num_text_tokens_internal])
        return self.text_emb(ids)

    def _embed_image(self, codes: torch.Tensor) -> torch.Tensor:
        if self.config.share_input_output_emb:
            return F.embedding(codes, self.to_logits[1].weight[self.config.num_text_tokens_internal:])
        return self.image_emb(codes)

    def _text_with_pads(self, text: torch.Tensor) -> torch.Tensor:
        """Replace padding (0) at caption position i by the unique pad id num_text_tokens + i (out of place)."""
        pad_ids = torch.arange(self.config.text_seq_len, device=text.device) + self.config.num_text_tokens
        return torch.where(text == 0, pad_ids, text)

    def _check_text(self, text: torch.Tensor) -> None:
        c = self.config
        if text.dtype != torch.long or text.ndim != 2 or text.shape[1] != c.text_seq_len:
            raise ValueError(
                f"text must be a (batch, {c.text_seq_len}) long tensor of token ids (tokenize with "
                f"context_length={c.text_seq_len}), got {tuple(text.shape)} {text.dtype}"
            )
        if text.numel() and (text.min() < 0 or text.max() >= c.num_text_tokens):
            raise ValueError(f"text token ids must lie in [0, {c.num_text_tokens}), "
                             f"got ids in [{int(text.min())}, {int(text.max())}]")

    def tokenize_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ValueError("this model has no VAE: pass image codes (batch, image_seq_len) instead of images")
        return self.vae.get_codebook_indices(images)

    # --- forward ---------------------------------------------------------------------------------------------------

    def forward(
        self,
        text: torch.Tensor,
        image: torch.Tensor | None = None,
        return_loss: bool = False,
        null_cond_prob: float | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, total_tokens), or the weighted loss with `return_loss`.

        `image` is raw images (batch, channels, size, size) in [0, 1], tokenised by the VAE, or image codes
        (batch, n <= image_seq_len). `null_cond_prob` (default: the config's, during training only) replaces whole
        captions by the null caption, for classifier-free guidance.
        """
        c = self.config
        x, text, codes = self._hidden(text, image, null_cond_prob)
        if not return_loss:
            return self._logits(x, offset=0)

        if codes is None or codes.shape[1] != c.image_seq_len:
            raise ValueError(f"return_loss needs the full image: {c.image_seq_len} codes or an image")
        # The logits mask leaves text positions only text ids and image positions only image ids, and masked
        # logits add exactly nothing to the softmax; so each part is projected onto its own vocabulary slice,
        # which is the same loss at a fraction of the output projection's cost.
        T, V = c.text_seq_len, c.num_text_tokens_internal
        h = self.to_logits[0](x)
        weight, bias = self.to_logits[1].weight, self.to_logits[1].bias
        text_logits = F.linear(h[:, :T], weight[:V], bias[:V])
        image_logits = F.linear(h[:, T:], weight[V:], bias[V:])
        loss_text = F.cross_entropy(text_logits.transpose(1, 2), text)
        loss_img = F.cross_entropy(image_logits.transpose(1, 2), codes)
        return (loss_text + c.loss_img_weight * loss_img) / (c.loss_img_weight + 1)

    def _hidden(
        self, text: torch.Tensor, image: torch.Tensor | None, null_cond_prob: float | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Transformer output (batch, seq, dim), plus the pad-substituted text and the image codes."""
        c = self.config
        self._check_text(text)
        p = (c.null_cond_prob if self.training else 0.0) if null_cond_prob is None else null_cond_prob
        if p > 0:
            keep = torch.rand(text.shape[0], 1, device=text.device) >= p
            text = text * keep
        text = self._text_with_pads(text)
        bos = torch.zeros_like(text[:, :1])
        tokens = self._embed_text(torch.cat([bos, text], dim=1))
        if not c.rotary_emb:
            tokens = tokens + self.text_pos_emb.weight

        codes = None
        if image is not None:
            codes = self.tokenize_images(image) if image.ndim == 4 else image
            self._check_codes(codes, text.shape[0])
            n_img = codes.shape[1]
            img = self._embed_image(codes)
            if not c.rotary_emb:
                pos = (self.image_pos_emb_row[:, None] + self.image_pos_emb_col[None, :]).flatten(0, 1)
                img = img + pos[:n_img]
            tokens = torch.cat([tokens, img], dim=1)
        tokens = tokens[:, : c.total_seq_len]  # the last image token is only ever a target

        if c.stable:
            tokens = tokens * 0.1 + tokens.detach() * 0.9  # shrink embedding gradients (CogView)
        x = self.transformer(tokens)
        if c.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()  # DivideMax
        return x, text, codes

    def _logits(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """Masked logits of hidden states x at sequence positions offset, offset + 1, ..."""
        logits = self.to_logits(x)
        allowed = self.logits_allowed[offset: offset + logits.shape[1]]
        return logits.masked_fill(~allowed, -torch.finfo(logits.dtype).max)

    def _check_codes(self, codes: torch.Tensor, batch: int) -> None:
        c = self.config
        if codes.dtype != torch.long or codes.ndim != 2 or codes.shape[0] != batch or codes.shape[1] > c.image_seq_len:
            raise ValueError(
                f"image must be images (batch, channels, size, size) or a (batch, <= {c.image_seq_len}) long tensor "
                f"of codes, got {tuple(codes.shape)} {codes.dtype}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= c.num_image_tokens):
            raise ValueError(f"image codes must lie in [0, {c.num_image_tokens})")

    # --- sampling --------------------------------------------------------------------------------------------------

    def next_token_logits(self, text: torch.Tensor, codes: torch.Tensor, cond_scale: float = 1.0) -> torch.Tensor:
        """Logits of the next image token, with classifier-free guidance when cond_scale != 1.

        The null branch gets its own all-padding caption in the same batch; the caller's text is never modified.
        """
        if cond_scale != 1.0:  # the null caption's rows ride in the same batch
            text, codes = torch.cat([text, torch.zeros_like(text)]), torch.cat([codes, codes])
        x = self._hidden(text, codes, null_cond_prob=0.0)[0][:, -1:]
        logits = self._logits(x, offset=self.config.text_len + codes.shape[1] - 1)[:, 0]
        if cond_scale == 1.0:
            return logits
        cond, null = logits.chunk(2)
        return null + (cond - null) * cond_scale

    @torch.no_grad()
    def generate_images(
        self,
        text: torch.Tensor,
        *,
        filter_thres: float = 0.5,
        temperature: float = 1.0,
        cond_scale: float = 1.0,
        img: torch.Tensor | None = None,
        num_init_img_tokens: int | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Sample images (batch, channels, size, size) in [0, 1] for tokenised captions `text`.

        Reference method: one full forward pass per image token. `filter_thres` is DALLE-pytorch's top-k as a
        fraction of the vocabulary; `img` primes generation with its first `num_init_img_tokens` codes.
        """
        c = self.config
        if self.vae is None:
            raise ValueError("generate_images needs a model with a VAE to decode images")
        text = text[:, : c.text_seq_len]
        self._check_text(text)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=text.device).manual_seed(seed)

        codes = text.new_empty(text.shape[0], 0)
        if img is not None:
            n_init = int(0.4375 * c.image_seq_len) if num_init_img_tokens is None else num_init_img_tokens
            if not 0 <= n_init < c.image_seq_len:
                raise ValueError(f"num_init_img_tokens must lie in [0, {c.image_seq_len}), got {n_init}")
            codes = self.tokenize_images(img)[:, :n_init]

        was_training = self.training
        self.eval()
        try:
            while codes.shape[1] < c.image_seq_len:
                logits = self.next_token_logits(text, codes, cond_scale)
                sample = gumbel_sample(top_k(logits, filter_thres), temperature, generator)
                codes = torch.cat([codes, (sample - c.num_text_tokens_internal)[:, None]], dim=1)
        finally:
            self.train(was_training)
        return self.vae.decode(codes)
