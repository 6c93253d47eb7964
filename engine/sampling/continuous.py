"""Continuous batching: images join a running decode batch at any step and leave it the step they are done.

Every image brings its caption, settings and random key; its rows (a conditional one, and a null-caption one when
guided) take free rows of one static KV cache, prefilled there while the others wait a step, and then decode at their
own positions (``DALLE.decode_step`` with a position per row). The active rows are kept at the front of the cache: a
finished image's rows are filled by moving the last ones down. On the CPU every product is row-invariant
(``engine.linear.row_invariant``), so an image is bitwise the one ``decode.image_codes`` samples for the same caption,
settings and key, whatever joins or leaves beside it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from engine.sampling.decode import decoding, guide
from engine.sampling.rows import Rows, Settings, sample

if TYPE_CHECKING:
    from engine.dalle import DALLE


@dataclasses.dataclass(eq=False)
class Image:
    """One image to sample: ``text`` (text_seq_len,) its caption's ids (0-padded), ``settings`` resolved
    (``decode.resolve``), ``key`` its random key (0-dim, ``noise.row_keys``); ``owner``: whatever the caller needs
    to route it. The batch fills ``codes``, ``done`` (codes sampled so far) and ``score`` (as ``image_codes``)."""

    text: torch.Tensor
    settings: Settings
    key: torch.Tensor
    owner: Any = None
    codes: torch.Tensor | None = None
    done: int = 0
    score: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))  # float32, as image_codes sums
    rows: list[int] = dataclasses.field(default_factory=list)  # its model rows: conditional, then null if guided

    @property
    def guided(self) -> bool:
        return self.settings.cond_scale != 1.0


class ContinuousBatch:
    """Up to ``capacity`` model rows decoding together (a guided image takes two)."""

    def __init__(self, model: DALLE, capacity: int, device: torch.device | str):
        self.model, self.capacity, self.device = model, capacity, torch.device(device)
        self.cache = model.new_cache(capacity, self.device)
        self.images: list[Image] = []
        self.logits: torch.Tensor | None = None  # (model rows, image codes): each row's next-code logits
        self._rows: Rows | None = None  # the sampling settings of self.images, rebuilt when they change

    @property
    def used(self) -> int:
        """Model rows in use."""
        return sum(len(image.rows) for image in self.images)

    def fits(self, image: Image) -> bool:
        return self.used + 1 + image.guided <= self.capacity

    @torch.no_grad()
    def admit(self, images: list[Image]) -> None:
        """Prefill the captions of ``images`` (which must fit) into free rows: they sample their first code at the
        next ``step``."""
        if not images:
            return
        c = self.model.config
        first = self.used
        texts = []
        for image in images:  # each image's rows in a run: its caption, then the null caption if guided
            image.rows = list(range(first + len(texts), first + len(texts) + 1 + image.guided))
            texts += [image.text, torch.zeros_like(image.text)][: len(image.rows)]
            image.codes = torch.zeros(c.image_seq_len, dtype=torch.long, device=self.device)
        if first + len(texts) > self.capacity:
            raise ValueError(f"{len(texts)} rows do not fit: {self.capacity - first} of {self.capacity} are free")
        with decoding(self.model):
            text = self.model._text_with_pads(torch.stack(texts).to(self.device))
            logits = self.model.prefill(text, None, self.cache.rows(first, first + len(texts)))
        self.logits = logits if self.logits is None else torch.cat([self.logits[:first], logits])
        self.images += images
        self._rows = None

    @torch.no_grad()
    def step(self) -> list[Image]:
        """Sample one code for every image, feed the codes of those not yet done, and return those that are done
        (they have left the batch)."""
        if not self.images:
            return []
        c, model, images = self.model.config, self.model, self.images
        if self._rows is None:
            self._rows = Rows.build([image.settings for image in images], torch.stack([image.key for image in images]),
                                    c.num_image_tokens, c.total_tokens)
        cond_rows = torch.tensor([image.rows[0] for image in images], device=self.device)
        guided = [i for i, image in enumerate(images) if image.guided]
        logits, cond = guide(self.logits[cond_rows], self.logits[[images[i].rows[1] for i in guided]],
                             torch.tensor(guided, dtype=torch.long, device=self.device),
                             torch.tensor([[images[i].settings.cond_scale] for i in guided], device=self.device))
        steps = torch.tensor([image.done for image in images], device=self.device)
        with decoding(model):
            tokens = sample(logits, self._rows, steps)
            scores = cond.float().log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
        for image, token, score in zip(images, tokens, scores.cpu()):
            image.codes[image.done] = token
            image.done += 1
            image.score += score
        finished = [image for image in images if image.done == c.image_seq_len]
        if finished:
            self._leave(finished)
        if self.images:  # rows 0, 1, ... in image order
            token_of = dict(zip(map(id, images), tokens))
            fed = [image for image in self.images for _ in image.rows]
            token = torch.stack([token_of[id(image)] for image in fed])
            pos = torch.tensor([c.text_len + image.done - 1 for image in fed], device=self.device)
            with decoding(model):
                self.logits = model.decode_step(token, pos, self.cache.rows(0, len(fed)))
        return finished

    def cancel(self, images: list[Image]) -> None:
        """Take ``images`` out of the batch (those not in it are ignored)."""
        leaving = [image for image in images if image in self.images]
        if leaving:
            self._leave(leaving)

    def _leave(self, leaving: list[Image]) -> None:
        """Drop ``leaving`` and renumber the rows of the rest, moving their cache rows and logits down to close the
        gaps (rows stay in image order: the rows of image 0, then image 1, ...)."""
        gone = set(map(id, leaving))
        self.images = [image for image in self.images if id(image) not in gone]
        source = [row for image in self.images for row in image.rows]
        row = 0
        for image in self.images:
            image.rows = list(range(row, row + len(image.rows)))
            row += len(image.rows)
        moved = [(s, d) for d, s in enumerate(source) if s != d]
        if moved:
            src = torch.tensor([s for s, _ in moved], device=self.device)
            dst = torch.tensor([d for _, d in moved], device=self.device)
            self.cache.move_rows(src, dst)
        self.logits = self.logits[source] if source else None
        self._rows = None
