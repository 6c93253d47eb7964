"""Continuous batching: images join a running decode batch at any step and leave it the step they are done.

Every image brings its caption, settings and random key; its rows (a conditional one, and a null-caption one when
guided) take free rows of one static KV cache, prefilled there while the others wait a step, and then decode at their
own positions (``DALLE.decode_step`` with a position per row). The active rows are kept at the front of the cache: a
finished image's rows are filled by moving the last ones down. On the CPU every product is row-invariant
(``engine.model.linear.row_invariant``), so an image is bitwise the one ``decode.image_codes`` samples for the same
caption, settings and key, whatever joins or leaves beside it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from engine.sampling.decode import decoding, guide
from engine.sampling.rows import Rows, Settings, sample

if TYPE_CHECKING:
    from engine.model.dalle import DALLE


@dataclasses.dataclass(eq=False)
class Image:
    """One image to sample: ``text`` (text_seq_len,) its caption's ids (0-padded), ``settings`` resolved
    (``decode.resolve``), ``key`` its random key (0-dim, ``noise.row_keys``); ``owner``: whatever the caller needs
    to route it. The batch counts ``done`` (codes sampled so far) and fills ``codes`` and ``score`` (as
    ``image_codes`` does) when it leaves."""

    text: torch.Tensor
    settings: Settings
    key: torch.Tensor
    owner: Any = None
    codes: torch.Tensor | None = None
    done: int = 0
    score: torch.Tensor | None = None  # float32, summed as image_codes sums
    rows: list[int] = dataclasses.field(default_factory=list)  # its model rows: conditional, then null if guided

    @property
    def guided(self) -> bool:
        return self.settings.cond_scale != 1.0


class ContinuousBatch:
    """Up to ``capacity`` model rows decoding together (a guided image takes two). The images' codes, counts and
    scores live in batch tensors, one row per image in ``images`` order, copied to each ``Image`` as it leaves."""

    def __init__(self, model: DALLE, capacity: int, device: torch.device | str):
        self.model, self.capacity, self.device = model, capacity, torch.device(device)
        self.cache = model.new_cache(capacity, self.device)
        self.images: list[Image] = []
        self.logits: torch.Tensor | None = None  # (model rows, image codes): each row's next-code logits
        c = model.config
        self.codes = torch.zeros(0, c.image_seq_len, dtype=torch.long, device=self.device)
        self.done = torch.zeros(0, dtype=torch.long, device=self.device)
        self.scores = torch.zeros(0, device=self.device)
        self._plan: _Plan | None = None  # what the steps of this set of images index with, rebuilt when it changes

    @property
    def used(self) -> int:
        """Model rows in use."""
        return sum(len(image.rows) for image in self.images)

    @torch.no_grad()
    def admit(self, images: list[Image]) -> None:
        """Prefill the captions of ``images`` (which must fit) into free rows: they sample their first code at the
        next ``step``."""
        if not images:
            return
        first = self.used
        texts = []
        for image in images:  # each image's rows in a run: its caption, then the null caption if guided
            image.rows = list(range(first + len(texts), first + len(texts) + 1 + image.guided))
            texts += [image.text, torch.zeros_like(image.text)][: len(image.rows)]
        if first + len(texts) > self.capacity:
            raise ValueError(f"{len(texts)} rows do not fit: {self.capacity - first} of {self.capacity} are free")
        with decoding(self.model):
            text = self.model._text_with_pads(torch.stack(texts).to(self.device))
            logits = self.model.prefill(text, None, self.cache.rows(first, first + len(texts)))
        n = len(images)
        self.logits = logits if self.logits is None else torch.cat([self.logits[:first], logits])
        self.codes = torch.cat([self.codes, self.codes.new_zeros(n, self.codes.shape[1])])
        self.done = torch.cat([self.done, self.done.new_zeros(n)])
        self.scores = torch.cat([self.scores, self.scores.new_zeros(n)])
        self.images += images
        self._plan = None

    @torch.no_grad()
    def step(self) -> list[Image]:
        """Sample one code for every image, feed the codes of those not yet done, and return those that are done
        (they have left the batch)."""
        if not self.images:
            return []
        c = self.model.config
        with decoding(self.model):
            plan = self._current_plan()
            logits, cond = guide(self.logits[plan.cond_rows], self.logits[plan.null_rows], plan.guided, plan.scales)
            tokens = sample(logits, plan.rows, self.done)
            self.scores += cond.float().log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
            self.codes[plan.every, self.done] = tokens
            self.done += 1
            for image in self.images:
                image.done += 1
            finished = [image for image in self.images if image.done == c.image_seq_len]
            if finished:
                tokens = tokens[self._leave(finished)]
            if self.images:  # rows 0, 1, ... in image order
                plan = self._current_plan()
                self.logits = self.model.decode_step(tokens[plan.row_image],
                                                     c.text_len + self.done[plan.row_image] - 1,
                                                     self.cache.rows(0, len(plan.row_image)))
        return finished

    def _current_plan(self) -> _Plan:
        if self._plan is None:
            self._plan = _Plan.build(self.images, self.model.config, self.device)
        return self._plan

    def partial_codes(self, images: list[Image]) -> torch.Tensor:
        """The codes sampled so far of ``images`` (in the batch), 0 after them: (len(images), image_seq_len)."""
        place = {id(image): i for i, image in enumerate(self.images)}
        return self.codes[[place[id(image)] for image in images]]

    def cancel(self, images: list[Image]) -> None:
        """Take ``images`` out of the batch (those not in it are ignored)."""
        leaving = [image for image in images if image in self.images]
        if leaving:
            self._leave(leaving)

    def _leave(self, leaving: list[Image]) -> torch.Tensor:
        """Drop ``leaving`` (their codes and scores copied to them) and renumber the rows of the rest, moving their
        cache rows and logits down to close the gaps (rows stay in image order: the rows of image 0, then image 1,
        ...). Returns the places of the staying images in the batch before."""
        gone = set(map(id, leaving))
        for i, image in enumerate(self.images):
            if id(image) in gone:
                image.codes, image.score = self.codes[i].clone(), self.scores[i].clone()
        staying = [i for i, image in enumerate(self.images) if id(image) not in gone]
        self.images = [self.images[i] for i in staying]
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
        keep = torch.tensor(staying, dtype=torch.long, device=self.device)
        self.codes, self.done, self.scores = self.codes[keep], self.done[keep], self.scores[keep]
        self._plan = None
        return keep


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Index tensors for the steps of one set of images (rows in image order)."""

    rows: Rows  # sampling settings and keys, per image
    every: torch.Tensor  # 0..images - 1
    cond_rows: torch.Tensor  # each image's conditional model row
    null_rows: torch.Tensor  # each guided image's null-caption model row
    guided: torch.Tensor  # the guided images
    scales: torch.Tensor  # (guided, 1): their guidance scales
    row_image: torch.Tensor  # each model row's image

    @classmethod
    def build(cls, images: list[Image], c, device: torch.device) -> _Plan:
        guided = [i for i, image in enumerate(images) if image.guided]

        def tensor(values, **kwargs) -> torch.Tensor:
            return torch.tensor(values, device=device, **kwargs)

        return cls(
            rows=Rows.build([image.settings for image in images], torch.stack([image.key for image in images]),
                            c.num_image_tokens, c.total_tokens),
            every=torch.arange(len(images), device=device),
            cond_rows=tensor([image.rows[0] for image in images]),
            null_rows=tensor([images[i].rows[1] for i in guided], dtype=torch.long),
            guided=tensor(guided, dtype=torch.long),
            scales=tensor([[images[i].settings.cond_scale] for i in guided], dtype=torch.float32),
            row_image=tensor([i for i, image in enumerate(images) for _ in image.rows]))
