import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from engine.codecs.tokenizers import YttmTokenizer
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig
from engine.demo.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    ShapeSpec,
    render,
)
from engine.eval_demo import ATTRIBUTES, Detected, analyse, best_of, budgets, demo_prompts, evaluate, main, matches
from engine.io.checkpoint import save_clip, save_dalle
from engine.model.clip import CLIP, CLIPConfig
from engine.model.dalle import DALLE

ROOT = Path(__file__).resolve().parents[1]
SPECS = [ShapeSpec(c, s, z, p) for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS]


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


def jpeg(img: Image.Image, **options) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=75, **options)
    return Image.open(buffer).convert("RGB")


def misreads(image_size: int, transform=lambda img: img) -> dict[tuple[ShapeSpec, int], Detected | None]:
    """Every (spec, background index) the checker gets wrong on transformed renders, with what it read."""
    wrong = {}
    for spec in SPECS:
        for b, background in enumerate(BACKGROUNDS):
            detected = analyse(transform(render(spec, image_size, background)))
            if detected != Detected(spec.colour, spec.shape, spec.size, spec.position):
                wrong[spec, b] = detected
    return wrong


@pytest.mark.parametrize("image_size", [32, 64])
def test_checker_reads_every_clean_render(image_size):
    assert misreads(image_size, to_tensor) == {}


def test_checker_survives_jpeg():
    # Quality 75 with JPEG's default 4:2:0 chroma subsampling: colour is stored at half resolution, so edges blur.
    assert misreads(32, lambda img: to_tensor(jpeg(img))) == {}
    assert misreads(32, lambda img: to_tensor(jpeg(img, subsampling=0))) == {}
    assert misreads(64, lambda img: to_tensor(jpeg(img))) == {}


def stray_pixels(image: torch.Tensor, rng: np.random.Generator, count: int = 5) -> torch.Tensor:
    """`count` pixels anywhere, touching the shape or not, set to random colours."""
    image = image.clone()
    h, w = image.shape[1:]
    for _ in range(count):
        image[:, rng.integers(h), rng.integers(w)] = torch.from_numpy(rng.random(3, dtype=np.float32))
    return image


@pytest.mark.parametrize("image_size", [32, 64])
def test_checker_ignores_stray_pixels(image_size):
    rng = np.random.default_rng(0)
    assert misreads(image_size, lambda img: stray_pixels(to_tensor(img), rng)) == {}


def test_checker_finds_nothing_in_blank_images():
    rng = np.random.default_rng(0)
    for background in BACKGROUNDS:
        blank = to_tensor(Image.new("RGB", (32, 32), background))
        assert analyse(blank) is None
        assert analyse(stray_pixels(blank, rng)) is None
        assert all(not m for m in matches(analyse(blank), SPECS[0]).values())
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        analyse(torch.zeros(1, 3, 32, 32))


def test_a_different_spec_does_not_match_the_render():
    values = {"colour": list(COLOURS), "shape": SHAPES, "size": SIZES, "position": list(POSITIONS)}
    for spec in SPECS:
        detected = analyse(to_tensor(render(spec, 32, BACKGROUNDS[0])))
        assert all(matches(detected, spec).values())
        for attribute in ATTRIBUTES:
            for value in values[attribute]:
                if value != getattr(spec, attribute):
                    scores = matches(detected, ShapeSpec(**{**spec.__dict__, attribute: value}))
                    assert not scores[attribute]
                    assert scores["all"] == (attribute == "size")  # "all" leaves size out


def test_held_out_pairs_never_reach_training():
    assert HELD_OUT <= {(c, p) for c in COLOURS for p in POSITIONS}
    assert sorted(c for c, _ in HELD_OUT) == sorted(COLOURS) and len({p for _, p in HELD_OUT}) == len(HELD_OUT)
    dataset = ShapesDataset(2000, 32, exclude=HELD_OUT)
    assert len(dataset.specs) == len(SPECS) - len(HELD_OUT) * len(SIZES) * len(SHAPES)
    assert not any((spec.colour, spec.position) in HELD_OUT for spec in dataset.specs)
    seen = {(spec.colour, spec.position) for spec in (dataset.sample(i)[0] for i in range(len(dataset)))}
    assert seen == {(c, p) for c in COLOURS for p in POSITIONS} - HELD_OUT


def test_demo_prompts_split_trained_and_held_out_pairs():
    trained, held_out = demo_prompts()
    assert demo_prompts() == (trained, held_out) and demo_prompts(1) != (trained, held_out)
    assert len(trained) == 12 and len(set(trained)) == 12
    assert not any((s.colour, s.position) in HELD_OUT for s in trained)
    assert all(sum(s.colour == c for s in trained) == 2 for c in COLOURS)
    assert all(sum(s.shape == shape for s in trained) == 4 for shape in SHAPES)
    assert sorted((s.colour, s.position, s.size) for s in held_out) == sorted(
        (c, p, size) for c, p in HELD_OUT for size in SIZES)
    for pair in HELD_OUT:  # each pair as two different shapes
        assert len({s.shape for s in held_out if (s.colour, s.position) == pair}) == 2


class CaptionIndexTokenizer:
    """Encodes each known caption as its index, so a stub model can tell which prompt a row is."""

    def __init__(self, specs: list[ShapeSpec]):
        self.captions = [spec.caption(0) for spec in specs]

    def tokenize(self, texts, context_length, truncate_text=False):
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        out[:, 0] = torch.tensor([self.captions.index(t) + 1 for t in texts])
        return out


class RenderingModel:
    """Stands in for DALLE: 'samples' the exact render of each row's prompt, recoloured where `wrong(row + seed)`, and
    scores each recoloured image as more likely than a right one."""

    config = SimpleNamespace(text_seq_len=4)

    def __init__(self, specs: list[ShapeSpec], recolour: dict[str, str] | None = None, wrong=lambda i: True):
        self.specs, self.recolour, self.wrong, self.calls = specs, recolour or {}, wrong, []

    def generate_images(self, text, *, filter_thres=0.5, temperature=1.0, cond_scale=1.0, seed=None,
                        return_scores=False):
        self.calls.append((text.shape[0], seed))
        images, likelihoods = [], []
        for row, ids in enumerate(text):
            spec = self.specs[int(ids[0]) - 1]
            wrong = self.wrong(row + seed)
            colour = self.recolour.get(spec.colour, spec.colour) if wrong else spec.colour
            spec = ShapeSpec(colour, spec.shape, spec.size, spec.position)
            images.append(to_tensor(render(spec, 32, BACKGROUNDS[(row + seed) % len(BACKGROUNDS)])))
            likelihoods.append(float(wrong))
        return (torch.stack(images), torch.tensor(likelihoods)) if return_scores else torch.stack(images)


class ColourCLIP:
    """Stands in for CLIP: scores 1 where the image's colour is its caption's, else 0."""

    config = SimpleNamespace(text_seq_len=4)

    def __init__(self, specs: list[ShapeSpec]):
        self.specs, self.calls = specs, []

    def score(self, text, images, batch_size=64):
        self.calls.append((tuple(text.shape), images.shape[0], batch_size))
        colour = self.specs[int(text[0, 0]) - 1].colour
        return torch.tensor([float(analyse(image).colour == colour) for image in images])


def test_evaluate_scores_a_perfect_and_a_wrong_colour_model(tmp_path):
    trained, held_out = demo_prompts()
    prompts = trained + held_out
    tokenizer = CaptionIndexTokenizer(prompts)
    model = RenderingModel(prompts)
    # 3 images per prompt in batches of 4, so batches straddle prompts
    result = evaluate(model, tokenizer, prompts, images_per_prompt=3, seed=5, batch_size=4, filter_thres=0.9,
                      temperature=1.0, cond_scale=1.0, save_dir=tmp_path)
    n = 3 * len(prompts)
    assert model.calls == [(min(4, n - start), 5 + start) for start in range(0, n, 4)]
    assert result["accuracy"] == {"n": n, "found": 1.0, "colour": 1.0, "shape": 1.0, "size": 1.0,
                                  "position": 1.0, "all": 1.0}
    assert [r["caption"] for r in result["prompts"]] == tokenizer.captions
    assert all(r["n"] == 3 and r["all"] == 1.0 for r in result["prompts"])
    assert result["prompts"][0]["detections"][0] == {k: getattr(prompts[0], k) for k in ATTRIBUTES}
    assert [r["spec"] for r in result["prompts"]] == [{k: getattr(p, k) for k in ATTRIBUTES} for p in prompts]
    grids = sorted(tmp_path.glob("*.png"))
    assert len(grids) == len(prompts) and Image.open(grids[0]).size == (3 * 32, 32)

    shifted = dict(zip(COLOURS, list(COLOURS)[1:] + list(COLOURS)[:1]))
    wrong = evaluate(RenderingModel(prompts, recolour=shifted), tokenizer, prompts, images_per_prompt=2, seed=0,
                     batch_size=16, filter_thres=0.9, temperature=1.0, cond_scale=1.0)
    assert wrong["accuracy"] == {"n": 2 * len(prompts), "found": 1.0, "colour": 0.0, "shape": 1.0, "size": 1.0,
                                 "position": 1.0, "all": 0.0}


def test_best_of_keeps_the_top_scoring_sample_of_each_group():
    generator = torch.Generator().manual_seed(0)
    for prompts, samples in ((1, 1), (3, 8), (5, 6), (4, 7)):
        correct = torch.rand(prompts, samples, generator=generator) < 0.5
        scores = torch.randint(0, 3, (prompts, samples), generator=generator).float()  # with ties
        for n in range(1, samples + 1):
            kept = []
            for p in range(prompts):
                for start in range(0, samples - n + 1, n):
                    group = scores[p, start:start + n].tolist()
                    kept.append(bool(correct[p, start + group.index(max(group))]))
            assert best_of(correct, scores, n) == pytest.approx(sum(kept) / len(kept))
        assert best_of(correct, scores, 1) == pytest.approx(correct.float().mean().item())
    for n in (0, 9):
        with pytest.raises(ValueError, match="n must be"):
            best_of(correct, scores, n)
    with pytest.raises(ValueError, match="prompts, samples"):
        best_of(correct, scores[:, :3], 1)
    assert budgets(1) == [1] and budgets(8) == [1, 2, 4, 8] and budgets(6) == [1, 2, 4, 6]


def test_evaluate_reranks_by_clip_and_by_likelihood():
    trained, held_out = demo_prompts()
    prompts = trained[:3] + held_out[:2]
    tokenizer = CaptionIndexTokenizer(prompts)
    shifted = dict(zip(COLOURS, list(COLOURS)[1:] + list(COLOURS)[:1]))
    # Sample 0 of each prompt is right and 1-3 recoloured; the likelihood prefers the recoloured ones.
    model = RenderingModel(prompts, recolour=shifted, wrong=lambda i: i % 4 != 0)
    clip = ColourCLIP(prompts)
    result = evaluate(model, tokenizer, prompts, clip=clip, images_per_prompt=4, seed=0, batch_size=4)
    assert result["accuracy"]["all"] == 0.25
    assert result["rerank"] == {"likelihood": {1: 0.25, 2: 0.0, 4: 0.0}, "clip": {1: 0.25, 2: 0.5, 4: 1.0}}
    assert clip.calls == [((1, 4), 4, 4)] * len(prompts)  # one caption, each prompt's images scored together
    assert all(r["clip_scores"] == [1.0, 0.0, 0.0, 0.0] and r["likelihood_scores"] == [0.0, 1.0, 1.0, 1.0]
               for r in result["prompts"])
    assert "clip" not in evaluate(model, tokenizer, prompts, images_per_prompt=4, seed=0, batch_size=4)["rerank"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained DALL-E over 32x32 images with a BPE trained on the shapes captions."""
    root = tmp_path_factory.mktemp("tiny")
    captions = [spec.caption(t) for spec in SPECS for t in range(4)]
    tokenizer = YttmTokenizer.train(captions, vocab_size=100, model_path=root / "bpe.model")
    vae = DiscreteVAE(DiscreteVAEConfig(image_size=32, num_layers=2, num_tokens=17, codebook_dim=8, hidden_dim=8,
                                        num_resnet_blocks=1))
    model = DALLE(tiny_config(num_text_tokens=tokenizer.vocab_size, text_seq_len=16, num_image_tokens=vae.num_tokens,
                              image_fmap_size=vae.fmap_size), vae)
    save_dalle(root / "dalle.safetensors", model, tokenizer)
    clip = CLIP(CLIPConfig(dim_text=16, dim_image=16, dim_latent=8, num_text_tokens=tokenizer.vocab_size,
                           text_enc_depth=1, text_seq_len=16, text_heads=1, visual_enc_depth=1, visual_heads=1,
                           visual_image_size=16, visual_patch_size=8))  # half the DALL-E's image size: resized
    save_clip(root / "clip.safetensors", clip, tokenizer)
    return root / "dalle.safetensors"


def test_cli_runs_end_to_end_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path):
    cmd = [sys.executable, "-m", "engine.eval_demo", "--dalle_path", str(tiny_checkpoint), "--images_per_prompt", "2",
           "--batch_size", "16", "--seed", "3", "--json", str(tmp_path / "eval.json"),
           "--save_dir", str(tmp_path / "images"), "--clip_path", str(tiny_checkpoint.parent / "clip.safetensors")]
    # One thread: the tiny model gains nothing from more, and on a busy machine idle-spinning OpenMP threads make
    # each step ~100x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, env=env).stdout
    assert "trained accuracy" in out and "held_out accuracy" in out and "best 1 of 2 by CLIP" in out
    assert all(spec.caption(0) in out for spec in demo_prompts(seed=3)[1])  # held-out prompts are in the table
    report = json.loads((tmp_path / "eval.json").read_text())
    assert {"args", "held_out_combinations", "trained_accuracy", "held_out_accuracy", "trained", "held_out"} <= set(
        report)
    assert report["args"]["seed"] == 3 and report["args"]["images_per_prompt"] == 2
    assert sorted(map(tuple, report["held_out_combinations"])) == sorted(HELD_OUT)
    for group, size in (("trained", 12), ("held_out", 2 * len(HELD_OUT))):
        assert len(report[group]["prompts"]) == size and report[group]["accuracy"]["n"] == 2 * size
        assert 0 <= report[f"{group}_accuracy"] == report[group]["accuracy"]["all"] <= 1
        assert set(report[group]["rerank"]) == {"likelihood", "clip"}
        assert all(set(r) == {"1", "2"} for r in report[group]["rerank"].values())
        assert all(len(p["clip_scores"]) == len(p["likelihood_scores"]) == 2 for p in report[group]["prompts"])
        grids = sorted((tmp_path / "images" / group).glob("*.png"))
        assert len(grids) == size and Image.open(grids[0]).size == (2 * 32, 32)


@pytest.mark.parametrize("clip_path", ["missing.safetensors", "dalle.safetensors"])
def test_cli_refuses_a_bad_clip_path_before_sampling(tiny_checkpoint, clip_path):
    with pytest.raises(SystemExit, match="error: "):
        main(["--dalle_path", str(tiny_checkpoint), "--clip_path", str(tiny_checkpoint.parent / clip_path)])
