"""A built-in, procedurally generated dataset: simple coloured shapes on plain backgrounds, with captions.

Every sample is a pure function of (seed, index), so the dataset needs no files and is identical everywhere.
Captions vary colour, shape, size and position in several phrasings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "cyan": (20, 200, 210),
}
SHAPES = ("square", "circle", "triangle")
SIZES = ("small", "large")
# A 3x3 grid of positions named by row and column words, so each word means one thing ("top" alone would mean the
# centre column of the top row, and the model would learn it from its co-occurrence with colours instead).
# Positions lie a quarter of the image apart, a whole number of VAE cells (2 cells of 4 px at 32 px with 2 halvings),
# so a shape's tokens are the same wherever it is, only shifted.
POSITIONS = {f"{row} {col}": (x, y) for row, y in (("top", 0.25), ("middle", 0.5), ("bottom", 0.75))
             for col, x in (("left", 0.25), ("center", 0.5), ("right", 0.75))}
RADII = {"small": 5 / 32, "large": 7 / 32}  # half the shape's width as a fraction of the image (whole pixels at 32)
BACKGROUNDS = ((245, 245, 245),)  # one plain background keeps the VAE codebook small enough for CPU demos
TEMPLATES = (
    "a {size} {colour} {shape} on the {position}",
    "{size} {colour} {shape}, {position}",
    "a {colour} {shape} at the {position}, {size}",
    "the {position} has a {size} {colour} {shape}",
)
# (colour, position) pairs the demo leaves out of training, to test whether the model puts a colour it knows where it
# has never seen it: every colour once, at six different positions, so every value still occurs in training.
# (colour, shape) pairs are not held out: a red circle's edge cells get codes that, to a VAE trained on
# red squares and green circles, are patterns of neither, so no DALL-E could compose them from its training tokens.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("red", "middle left"), ("green", "top center"), ("blue", "middle right"), ("yellow", "bottom center"),
    ("purple", "middle center"), ("cyan", "bottom right")})


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    size: str
    position: str

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template % len(TEMPLATES)].format(**self.__dict__)


def render(spec: ShapeSpec, image_size: int, background: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), background)
    cx, cy = (v * image_size for v in POSITIONS[spec.position])
    r = image_size * RADII[spec.size]
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(img)
    fill = COLOURS[spec.colour]
    if spec.shape == "square":
        draw.rectangle(box, fill=fill)
    elif spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


class ShapesDataset(torch.utils.data.Dataset):
    """`num_samples` (caption, image) pairs; images are (3, image_size, image_size) floats in [0, 1].

    `exclude` holds (colour, position) combinations left out, e.g. to test generalisation to unseen pairs.
    """

    def __init__(self, num_samples: int = 10000, image_size: int = 32, seed: int = 0,
                 exclude: frozenset[tuple[str, str]] = frozenset()):
        self.num_samples, self.image_size, self.seed = num_samples, image_size, seed
        self.specs = [ShapeSpec(c, s, z, p) for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS
                      if (c, p) not in exclude]
        if not self.specs:
            raise ValueError("every colour/position combination is excluded")

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> tuple[ShapeSpec, int, int]:
        """The spec, caption template and background of sample `index`."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, index))
        return (self.specs[rng.integers(len(self.specs))], int(rng.integers(len(TEMPLATES))),
                int(rng.integers(len(BACKGROUNDS))))

    def caption(self, index: int) -> str:
        spec, template, _ = self.sample(index)
        return spec.caption(template)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        spec, template, background = self.sample(index)
        img = render(spec, self.image_size, BACKGROUNDS[background])
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        return spec.caption(template), pixels
