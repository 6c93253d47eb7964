"""The DALL-E model: `<bos>` + caption tokens followed by image tokens, one decoder-only transformer.

Semantics follow DALLE-pytorch v1.6.6: every caption position owns a unique pad id (padding is a real, trained
token, never masked), a logits mask keeps text positions on text ids and image positions on image ids, and the
loss weights image tokens `loss_img_weight` times as much as text tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.codecs.tokenizers import check_caption_ids
from engine.model import fused_decode, packed
from engine.model.config import DALLEConfig
from engine.model.cross_entropy import linear_cross_entropy
from engine.model.linear import Linear
from engine.model.transformer import KVCache, Transformer
from engine.sampling import Settings, decode, row_keys


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

        self.to_logits = nn.Sequential(nn.LayerNorm(c.dim), Linear(c.dim, c.total_tokens))
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
        packed.changed()  # weights may have changed unseen (through .data) while training: pack them again
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
        """Replace padding (0) at caption position i by the unique pad id num_text_tokens + i (out of place); text
        may be a caption prefix."""
        pad_ids = torch.arange(text.shape[1], device=text.device) + self.config.num_text_tokens
        return torch.where(text == 0, pad_ids, text)

    def _check_text(self, text: torch.Tensor) -> None:
        check_caption_ids(text, self.config.text_seq_len, self.config.num_text_tokens)

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
        loss_text = linear_cross_entropy(h[:, :T].flatten(0, 1), weight[:V], bias[:V], text.flatten())
        loss_img = linear_cross_entropy(h[:, T:].flatten(0, 1), weight[V:], bias[V:], codes.flatten())
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
        codes = None
        if image is not None:
            codes = self.tokenize_images(image) if image.ndim == 4 else image
            self._check_codes(codes, text.shape[0])
        tokens = self._embed_prefix(text, codes)
        if c.stable:
            tokens = tokens * 0.1 + tokens.detach() * 0.9  # shrink embedding gradients (CogView)
        return self._transform(tokens), text, codes

    def _embed_prefix(self, text: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """Embeddings of bos + the pad-substituted caption + image codes (the last image token is only ever a target,
        so at most total_seq_len positions)."""
        c = self.config
        bos = text.new_zeros(text.shape[0], 1)
        tokens = self._embed_text(torch.cat([bos, text], dim=1))
        if not c.rotary_emb:
            tokens = tokens + self.text_pos_emb.weight[: tokens.shape[1]]
        if codes is not None and codes.shape[1]:
            img = self._embed_image(codes)
            if not c.rotary_emb:
                img = img + self._image_pos_emb()[: codes.shape[1]]
            tokens = torch.cat([tokens, img], dim=1)
        return tokens[:, : c.total_seq_len]

    def _image_pos_emb(self) -> torch.Tensor:
        """Axial image positions (image_seq_len, dim): a row table plus a column table."""
        return (self.image_pos_emb_row[:, None] + self.image_pos_emb_col[None, :]).flatten(0, 1)

    def _embed_at(self, token: torch.Tensor, pos: torch.Tensor, image: bool) -> torch.Tensor:
        """Embedding (batch, 1, dim) of one token per row at sequence position ``pos`` (a 0-dim tensor, or one
        position per row): an image code at an image position, or an internal text id at a caption position."""
        c = self.config
        if image:
            x = self._embed_image(token)
            if not c.rotary_emb:
                x = x + self._image_pos_emb().index_select(0, (pos - c.text_len).view(-1))
        else:
            x = self._embed_text(token)
            if not c.rotary_emb:
                x = x + self.text_pos_emb.weight.index_select(0, pos.view(-1))
        return x[:, None]

    def _transform(self, tokens: torch.Tensor, cache: KVCache | None = None,
                   pos: torch.Tensor | None = None) -> torch.Tensor:
        x = self.transformer(tokens, cache=cache, pos=pos)
        if self.config.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()  # DivideMax
        return x

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

    # --- sampling ---------------------------------------------------------------------------------------------------

    def next_token_logits(self, text: torch.Tensor, codes: torch.Tensor, cond_scale: float = 1.0) -> torch.Tensor:
        """Logits of the next image token by a full forward pass, with classifier-free guidance when cond_scale != 1.

        The null branch gets its own all-padding caption in the same batch; the caller's text is never modified.
        """
        if cond_scale != 1.0:  # the null caption's rows ride in the same batch
            text, codes = torch.cat([text, torch.zeros_like(text)]), torch.cat([codes, codes])
        x = self._hidden(text, codes, null_cond_prob=0.0)[0][:, -1:]
        logits = self._logits(x, offset=self.config.text_len + codes.shape[1] - 1)[:, 0]
        return _guide(logits, cond_scale)[0]

    def _vocab_logits(self, x: torch.Tensor, image: bool) -> torch.Tensor:
        """Logits over the image vocabulary (or the internal text vocabulary) only: the logits mask allows nothing
        else at a position, so the rest of the output projection is skipped."""
        V = self.config.num_text_tokens_internal
        return self.to_logits[1].part(self.to_logits[0](x), slice(V, None) if image else slice(None, V))

    def image_log_likelihood(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Each row's log p(codes | text) (batch,), summed over its image tokens, by one full forward pass: what
        reranking and caption retrieval compare. ``codes`` is the whole image, (batch, image_seq_len)."""
        c = self.config
        if codes.ndim != 2 or codes.shape[1] != c.image_seq_len:
            raise ValueError(f"image_log_likelihood needs whole images: (batch, {c.image_seq_len}) codes, "
                             f"got {tuple(codes.shape)}")
        x = self._hidden(text, codes, null_cond_prob=0.0)[0]
        logits = self._vocab_logits(x[:, c.text_seq_len:], image=True).float()
        return logits.log_softmax(-1).gather(-1, codes[..., None])[..., 0].sum(-1)

    def full_pass_logits(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The next image code's logits over the image vocabulary by one full forward pass over caption + ``codes``:
        the uncached sampler's step."""
        return self._vocab_logits(self._hidden(text, codes, null_cond_prob=0.0)[0][:, -1], image=True)

    def decode_step(self, token: torch.Tensor, pos: torch.Tensor, cache: KVCache, image: bool = True) -> torch.Tensor:
        """Feed one image code per row at image position ``pos`` (a 0-dim long tensor, so the step has static shapes
        and no host synchronisation: the function to compile or capture in a CUDA graph; or a (batch,) long tensor,
        each row at its own position, as continuous batching needs) and return the next code's logits over the image
        vocabulary. ``image=False``: an internal text id at a caption position before the last, returning the next
        caption token's logits over the internal text vocabulary. ``cache``: a ``KVCache`` or some of its rows."""
        x = self._embed_at(token, pos, image)
        if image and (logits := fused_decode.try_logits(self, x, cache, pos)) is not None:
            return logits  # the layers and the output head in one C++ call
        x = self._transform(x, cache, pos)
        return self._vocab_logits(x[:, 0], image=image)

    def compiled_decode_step(self) -> CompiledDecodeStep:
        """``decode_step`` under ``torch.compile`` as one graph, with CUDA graphs on a GPU; pass it as ``step_fn``."""
        return CompiledDecodeStep(self)

    def prefill(self, text: torch.Tensor, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run bos + ``text`` (pad-substituted internal ids, a whole caption or a prefix) + image ``codes`` through the
        model in one pass, filling ``cache``; returns the next token's logits (see ``decode_step``)."""
        tokens = self._embed_prefix(text, codes)
        x = self._transform(tokens, cache)
        return self._vocab_logits(x[:, -1], image=tokens.shape[1] >= self.config.text_len)

    def new_cache(self, batch: int, device: torch.device | str) -> KVCache:
        """An empty static KV cache for ``batch`` sequences, in the model's parameter dtype."""
        return KVCache(self.config, batch, device=device, dtype=next(self.parameters()).dtype)

    @torch.no_grad()
    def generate_images(
        self,
        text: torch.Tensor,
        *,
        filter_thres: float | None = 0.5,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        cond_scale: float | None = None,
        img: torch.Tensor | None = None,
        num_init_img_tokens: int | None = None,
        seed: int | None = None,
        image_indices: torch.Tensor | None = None,
        settings: Settings | Sequence[Settings] | None = None,
        use_cache: bool = True,
        step_fn=None,
        return_scores: bool = False,
    ):
        """Sample images (batch, channels, size, size) in [0, 1] for tokenised captions ``text``.

        Sampling: ``filter_thres`` is DALLE-pytorch's top-k as a fraction of the whole vocabulary (None: off),
        ``top_k`` an absolute count of image tokens, ``top_p`` nucleus sampling, then ``temperature``; ``cond_scale``
        != 1 is classifier-free guidance (conditional and null-caption rows in one batch; default: the config's
        ``default_cond_scale``, guided for a model trained with null captions). ``settings`` (one
        ``engine.sampling.Settings``, or one per row) replaces those five. ``img`` primes generation with its first
        ``num_init_img_tokens`` codes (default 0.4375 of the grid).

        Randomness: image ``image_indices[r]`` (default: its row) of ``seed`` (default: drawn from torch's global
        generator) is the same image whatever else shares the batch: each row draws from its own counter-based
        stream.

        ``use_cache`` decodes with the static KV cache, one token per step (``prefill`` + ``decode_step``, or
        ``step_fn``, e.g. ``compiled_decode_step()``, which brings its own cache); without it every token costs a full
        forward pass (the reference). With ``return_scores``, also returns each image's log-likelihood under the model
        given its caption (conditional, unfiltered, temperature 1; sampled tokens only), for reranking.
        """
        if self.vae is None:
            raise ValueError("generate_images needs a model with a VAE to decode images")
        codes, scores = self.sample_image_codes(
            text, filter_thres=filter_thres, top_k=top_k, top_p=top_p, temperature=temperature,
            cond_scale=cond_scale, prime=self._prime_codes(img, num_init_img_tokens, self.config), seed=seed,
            image_indices=image_indices, settings=settings, use_cache=use_cache, step_fn=step_fn)
        images = self.vae.decode(codes)
        return (images, scores) if return_scores else images

    def sample_image_codes(
        self,
        text: torch.Tensor,
        *,
        filter_thres: float | None = 0.5,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        cond_scale: float | None = None,
        prime: torch.Tensor | None = None,
        seed: int | None = None,
        image_indices: torch.Tensor | None = None,
        settings: Settings | Sequence[Settings] | None = None,
        use_cache: bool = True,
        step_fn=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image codes (batch, image_seq_len) and their log-likelihood scores (batch,) by ``engine.sampling``; see
        ``generate_images``. ``prime``: the first codes of every image, (batch, n)."""
        if settings is None:
            settings = Settings(temperature=temperature, filter_thres=filter_thres, top_k=top_k, top_p=top_p,
                                cond_scale=cond_scale)
        return decode.image_codes(self, text, decode.resolve(self, settings, text.shape[0]),
                                  self._keys(seed, image_indices, text), prime=prime, use_cache=use_cache,
                                  step_fn=step_fn)

    def _keys(self, seed: int | None, image_indices: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        if image_indices is None:
            image_indices = torch.arange(text.shape[0], device=text.device)
        if image_indices.shape != text.shape[:1]:
            raise ValueError(f"image_indices must hold one index per row, (batch,) = ({text.shape[0]},), got "
                             f"{tuple(image_indices.shape)}")
        return row_keys(seed, image_indices.to(text.device))

    def _prime_codes(self, img: torch.Tensor | None, num_init_img_tokens: int | None, c: DALLEConfig):
        if img is None:
            return None
        n_init = int(0.4375 * c.image_seq_len) if num_init_img_tokens is None else num_init_img_tokens
        if not 0 <= n_init < c.image_seq_len:
            raise ValueError(f"num_init_img_tokens must lie in [0, {c.image_seq_len}), got {n_init}")
        return self.tokenize_images(img)[:, :n_init]

    @torch.no_grad()
    def generate_texts(
        self,
        text: torch.Tensor | None = None,
        *,
        batch_size: int = 1,
        filter_thres: float | None = 0.5,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Sample captions (batch, text_seq_len) of token ids in [0, num_text_tokens), 0 for padding, completing the
        optional prefixes ``text`` (batch, n <= text_seq_len) or, without them, ``batch_size`` captions from bos.
        Caption r draws from the stream of (``seed``, r), as images do."""
        if text is None:
            text = torch.zeros(batch_size, 0, dtype=torch.long, device=next(self.parameters()).device)
        settings = Settings(temperature=temperature, filter_thres=filter_thres, top_k=top_k, top_p=top_p)
        return decode.captions(self, text, [settings] * text.shape[0], self._keys(seed, None, text))


class CompiledDecodeStep:
    """A model's ``decode_step`` under ``torch.compile`` (one graph; CUDA graphs on a GPU) and the caches it runs on.

    Call it as ``decode_step``; ``cache(batch, device)`` gives the cache to call it with, the same buffers on every
    call for a batch size (one batch size kept at a time), so that sampling again neither recompiles nor, under CUDA
    graphs, copies the cache into the graph's inputs at every step: a CUDA graph replays on fixed addresses, and its
    buffers are marked as such. Each new batch size compiles again: tens of seconds on a CPU, where a step then takes
    about half the eager time.
    """

    def __init__(self, model: DALLE):
        self.model = model
        mode = "reduce-overhead" if next(model.parameters()).is_cuda else "default"
        self.step = torch.compile(model.decode_step, mode=mode, fullgraph=True)
        self._cache: KVCache | None = None

    def __call__(self, token: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.step(token, pos, cache)

    def cache(self, batch: int, device: torch.device | str) -> KVCache:
        """The kept cache if it fits ``batch`` sequences on ``device`` in the model's dtype, else a new one (kept).
        What an earlier sampling left in it is never read: a prefill rewrites the prefix and the token-shift rings,
        and every decode step writes its position before any read of it."""
        c, dtype, device = self._cache, next(self.model.parameters()).dtype, torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if c is None or c.batch != batch or c.k0.device != device or c.k0.dtype != dtype:
            c = self._cache = None  # freed before the next one is allocated
            c = self._cache = self.model.new_cache(batch, device)
            if c.k0.is_cuda:
                for buffer in c.buffers():
                    torch._dynamo.mark_static_address(buffer)
        return c


def _guide(logits: torch.Tensor, cond_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided logits, conditional logits) from a batch whose second half holds the null-caption rows when
    ``cond_scale`` != 1: null + (cond - null) * cond_scale."""
    if cond_scale == 1.0:
        return logits, logits
    cond, null = logits.chunk(2)
    return null + (cond - null) * cond_scale, cond
