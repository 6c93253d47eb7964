"""DiscreteVAE: DALLE-pytorch key compatibility, training options, tokenise/decode, overfitting, validation."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig, _reinmax

TINY = dict(image_size=8, num_layers=2, num_tokens=10, codebook_dim=6, hidden_dim=5)


def tiny_vae(seed: int = 0, **kw) -> DiscreteVAE:
    torch.manual_seed(seed)
    return DiscreteVAE(**{**TINY, **kw})


def shapes(vae: DiscreteVAE) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in vae.state_dict().items()}


# --- state-dict compatibility (dalle-semantics.md §10.5) ---------------------------------------------------------


def test_state_dict_keys_without_resblocks():
    vae = DiscreteVAE(image_size=32, num_layers=3, num_tokens=10, codebook_dim=6, hidden_dim=5, channels=3)
    # Conv2d weights are (out, in, k, k); ConvTranspose2d weights are (in, out, k, k).
    assert shapes(vae) == {
        "codebook.weight": (10, 6),
        "encoder.0.0.weight": (5, 3, 4, 4), "encoder.0.0.bias": (5,),
        "encoder.1.0.weight": (5, 5, 4, 4), "encoder.1.0.bias": (5,),
        "encoder.2.0.weight": (5, 5, 4, 4), "encoder.2.0.bias": (5,),
        "encoder.3.weight": (10, 5, 1, 1), "encoder.3.bias": (10,),
        # Without resblocks the first transposed conv reads the codebook vectors directly.
        "decoder.0.0.weight": (6, 5, 4, 4), "decoder.0.0.bias": (5,),
        "decoder.1.0.weight": (5, 5, 4, 4), "decoder.1.0.bias": (5,),
        "decoder.2.0.weight": (5, 5, 4, 4), "decoder.2.0.bias": (5,),
        "decoder.3.weight": (3, 5, 1, 1), "decoder.3.bias": (3,),
    }  # fmt: skip


def test_state_dict_keys_with_resblocks():
    vae = DiscreteVAE(image_size=32, num_layers=3, num_resnet_blocks=2, num_tokens=10, codebook_dim=6, hidden_dim=5)

    def res(prefix: str) -> dict[str, tuple[int, ...]]:
        return {
            f"{prefix}.net.0.weight": (5, 5, 3, 3), f"{prefix}.net.0.bias": (5,),
            f"{prefix}.net.2.weight": (5, 5, 3, 3), f"{prefix}.net.2.bias": (5,),
            f"{prefix}.net.4.weight": (5, 5, 1, 1), f"{prefix}.net.4.bias": (5,),
        }  # fmt: skip

    assert shapes(vae) == {
        "codebook.weight": (10, 6),
        "encoder.0.0.weight": (5, 3, 4, 4), "encoder.0.0.bias": (5,),
        "encoder.1.0.weight": (5, 5, 4, 4), "encoder.1.0.bias": (5,),
        "encoder.2.0.weight": (5, 5, 4, 4), "encoder.2.0.bias": (5,),
        **res("encoder.3"), **res("encoder.4"),
        "encoder.5.weight": (10, 5, 1, 1), "encoder.5.bias": (10,),
        "decoder.0.weight": (5, 6, 1, 1), "decoder.0.bias": (5,),  # 1x1 codebook -> hidden
        **res("decoder.1"), **res("decoder.2"),
        "decoder.3.0.weight": (5, 5, 4, 4), "decoder.3.0.bias": (5,),  # hidden -> hidden from here on
        "decoder.4.0.weight": (5, 5, 4, 4), "decoder.4.0.bias": (5,),
        "decoder.5.0.weight": (5, 5, 4, 4), "decoder.5.0.bias": (5,),
        "decoder.6.weight": (3, 5, 1, 1), "decoder.6.bias": (3,),
    }  # fmt: skip


def test_loads_train_vae_checkpoint(tmp_path):
    # train_vae.py saves {hparams: <these seven keys>, weights: vae.state_dict()} (dalle-semantics.md §14).
    hparams = dict(image_size=16, num_layers=2, num_tokens=12, channels=3, codebook_dim=8, hidden_dim=6,
                   num_resnet_blocks=1)  # fmt: skip
    src = DiscreteVAE(**hparams)
    torch.save({"hparams": hparams, "weights": src.state_dict()}, tmp_path / "vae.pt")

    ckpt = torch.load(tmp_path / "vae.pt", weights_only=True)
    vae = DiscreteVAE(DiscreteVAEConfig(**ckpt["hparams"]))
    vae.load_state_dict(ckpt["weights"], strict=True)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(vae.get_codebook_indices(x), src.get_codebook_indices(x))
    codes = vae.get_codebook_indices(x)
    assert torch.equal(vae.decode(codes), src.decode(codes))


# --- forward / backward --------------------------------------------------------------------------------------------

OPTIONS = {
    "default": {},
    "straight_through": dict(straight_through=True),
    "reinmax": dict(straight_through=True, reinmax=True),
    "kl": dict(kl_div_loss_weight=0.1),
    "smooth_l1": dict(smooth_l1_loss=True),
    "rgba": dict(channels=4),
    "resblocks": dict(num_resnet_blocks=2),
}


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_forward_backward(opts):
    vae = tiny_vae(**opts)
    c, f = vae.channels, vae.fmap_size
    x = torch.rand(3, c, 8, 8)

    assert vae(x).shape == (3, c, 8, 8)
    assert vae(x, return_logits=True).shape == (3, 10, f, f)
    loss, recons = vae(x, return_loss=True, return_recons=True, temp=0.7)
    assert recons.shape == (3, c, 8, 8) and loss.dim() == 0 and torch.isfinite(loss)

    loss.backward()
    for name in ("encoder.0.0.weight", "codebook.weight", f"decoder.{len(vae.decoder) - 1}.weight"):
        grad = vae.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_kl_term_is_batch_mean_kl_to_uniform():
    x = torch.rand(4, 3, 8, 8)
    losses = []
    for weight in (0.0, 0.5):
        vae = tiny_vae(kl_div_loss_weight=weight)
        torch.manual_seed(1)  # same Gumbel noise, so the reconstruction terms agree
        losses.append(vae(x, return_loss=True))
    q = vae(x, return_logits=True).softmax(dim=1)
    kl = (q * (q.log() - math.log(1 / 10))).sum() / 4
    torch.testing.assert_close(losses[1] - losses[0], 0.5 * kl)


def test_reconstruction_loss_is_in_normalised_space():
    vae = tiny_vae()
    x = torch.rand(2, 3, 8, 8)
    torch.manual_seed(3)
    loss, out = vae(x, return_loss=True, return_recons=True)
    torch.testing.assert_close(loss, F.mse_loss(out, (x - 0.5) / 0.5))


def test_reinmax_value_is_the_sample_and_gradient_matches_the_paper():
    torch.manual_seed(0)
    tau = 0.7
    logits = torch.randn(2, 5, 3, 3, requires_grad=True)
    sample = F.one_hot(torch.randint(0, 5, (2, 3, 3)), 5).permute(0, 3, 1, 2).float()
    upstream = torch.randn(2, 5, 3, 3)

    out = _reinmax(logits, sample, tau)
    assert torch.equal(out.detach(), sample)
    (grad,) = torch.autograd.grad((out * upstream).sum(), logits)

    # ReinMax (arXiv:2304.08612): grad = 2 J(pi1) g - J(pi0) g / 2, with J(p) g = p * (g - <p, g>) the softmax
    # Jacobian-vector product, pi0 = softmax(logits), pi1 = (D + softmax(logits / tau)) / 2.
    def jvp(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return p * (g - (p * g).sum(dim=1, keepdim=True))

    pi0 = logits.detach().softmax(dim=1)
    pi1 = (sample + (logits.detach() / tau).softmax(dim=1)) / 2
    torch.testing.assert_close(grad, 2 * jvp(pi1, upstream) - jvp(pi0, upstream) / 2)


# --- tokenise / decode ---------------------------------------------------------------------------------------------


def test_codebook_indices_are_row_major_argmax():
    vae = tiny_vae()
    x = torch.rand(3, 3, 8, 8)
    codes = vae.get_codebook_indices(x)
    assert codes.shape == (3, 4) and codes.dtype == torch.long and not codes.requires_grad
    assert codes.min() >= 0 and codes.max() < 10
    logits = vae(x, return_logits=True)
    for r in range(2):
        for c in range(2):
            assert torch.equal(codes[:, r * 2 + c], logits[:, :, r, c].argmax(dim=1))


def test_codebook_indices_channels_last_matches_nchw():
    """Tokenising runs the CPU encoder channels-last: the same logits (float64) and codes as NCHW."""
    vae = DiscreteVAE(DiscreteVAEConfig(image_size=32, num_layers=2, num_tokens=64, hidden_dim=16,
                                        num_resnet_blocks=1)).double().eval()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        nchw = vae.encoder(vae._normalize(x))
        last = vae.encoder(vae._normalize(x).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(last, nchw, rtol=0, atol=1e-12)
    assert torch.equal(vae.get_codebook_indices(x), nchw.argmax(dim=1).flatten(1))


@pytest.mark.parametrize("channels", [3, 4])
def test_decode_returns_pixel_space(channels):
    vae = tiny_vae(channels=channels)
    x = torch.rand(2, channels, 8, 8)
    codes = vae.get_codebook_indices(x)
    images = vae.decode(codes)
    assert images.shape == x.shape
    assert images.min() >= 0 and images.max() <= 1

    # De-normalised with (0.5, 0.5, 0.5[, alpha: 0, 1]) and clamped, unlike DALLE-pytorch's raw decoder output.
    raw = vae.decoder(vae.codebook(codes).view(2, 2, 2, -1).permute(0, 3, 1, 2))
    mean = torch.tensor([0.5, 0.5, 0.5, 0.0][:channels]).view(1, -1, 1, 1)
    std = torch.tensor([0.5, 0.5, 0.5, 1.0][:channels]).view(1, -1, 1, 1)
    torch.testing.assert_close(images, (raw * std + mean).clamp(0, 1))


def test_normalisation_adds_no_state_and_follows_dtype():
    vae = tiny_vae(channels=4).double()
    assert not any(k.startswith("norm") for k in vae.state_dict())
    assert vae(torch.rand(1, 4, 8, 8, dtype=torch.float64)).dtype == torch.float64


def _toy_images() -> torch.Tensor:
    """Six solid colours, a half-white image and a red square on black: 8 RGB images of 16x16."""
    colours = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1), (0, 0, 0), (1, 1, 0)]
    images = [torch.tensor(c, dtype=torch.float).view(3, 1, 1).expand(3, 16, 16) for c in colours]
    half = torch.zeros(3, 16, 16)
    half[:, :, :8] = 1
    square = torch.zeros(3, 16, 16)
    square[0, 4:12, 4:12] = 1
    return torch.stack([*images, half, square])


def test_overfits_toy_images():
    # 200 Adam steps take ~1-2 s on one CPU core. Over seeds 0-11 the hard reconstruction MSE (pixel space,
    # decode of argmax codes) ended at <= 5e-4; the threshold 5e-3 (RMS error ~0.07 per pixel value) leaves 10x
    # margin, against 0.23 for predicting the mean image. The small KL-to-uniform weight stops early codebook
    # collapse (without it some seeds map red, black and the red square to one code and stall at ~0.05).
    x = _toy_images()
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_layers=2, num_tokens=32, codebook_dim=32, hidden_dim=32,
                      kl_div_loss_weight=1e-3)  # fmt: skip
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(200):
        loss = vae(x, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard_mse = F.mse_loss(vae.decode(vae.get_codebook_indices(x)), x).item()
    assert hard_mse < 5e-3


# --- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 3, 16, 16), r"expected images of shape \(b, 3, 8, 8\), got \(2, 3, 16, 16\)"),
        ((2, 3, 8, 4), r"got \(2, 3, 8, 4\)"),
        ((2, 4, 8, 8), r"expected images of shape \(b, 3, 8, 8\), got \(2, 4, 8, 8\)"),
        ((3, 8, 8), r"got \(3, 8, 8\)"),
    ],
)
def test_bad_images(shape, match):
    vae = tiny_vae()
    with pytest.raises(ValueError, match=match):
        vae(torch.rand(shape))
    with pytest.raises(ValueError, match=match):
        vae.get_codebook_indices(torch.rand(shape))


@pytest.mark.parametrize(
    "codes, match",
    [
        (torch.tensor([[0, 1, 2, 10]]), r"codes must lie in \[0, 10\), got values in \[0, 10\]"),
        (torch.tensor([[-1, 1, 2, 3]]), r"codes must lie in \[0, 10\), got values in \[-1, 3\]"),
        (torch.zeros(1, 5, dtype=torch.long), r"expected codes of shape \(b, 4\), got \(1, 5\)"),
        (torch.zeros(4, dtype=torch.long), r"expected codes of shape \(b, 4\), got \(4,\)"),
        (torch.zeros(1, 4), r"expected int64 or int32 codes, got dtype torch.float32"),
    ],
)
def test_bad_codes(codes, match):
    with pytest.raises(ValueError, match=match):
        tiny_vae().decode(codes)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(image_size=24), "image_size must be a power of two, got 24"),
        (dict(image_size=4, num_layers=3), "image_size 4 is too small for num_layers=3"),
        (dict(num_layers=0), "num_layers must be an integer >= 1, got 0"),
        (dict(num_tokens=0), "num_tokens must be an integer >= 1"),
        (dict(hidden_dim=8.0), "hidden_dim must be an integer >= 1, got 8.0"),
        (dict(channels=True), "channels must be an integer >= 1, got True"),
        (dict(num_resnet_blocks=-1), "num_resnet_blocks must be an integer >= 0"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(kl_div_loss_weight=-1.0), "kl_div_loss_weight must be >= 0"),
        (dict(reinmax=True), "reinmax=True requires straight_through=True"),
        (dict(normalization=((0.5, 0.5), (0.5,))), "must be non-empty and of equal length"),
        (dict(normalization=((0.5,), (0.0,))), "stds must be > 0"),
        (dict(normalization=((0.5,), "x")), r"must be \(means, stds\) sequences of numbers"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        DiscreteVAEConfig(**kw)


# --- config --------------------------------------------------------------------------------------------------------


def test_config_round_trip_and_derived_values():
    cfg = DiscreteVAEConfig(image_size=64, num_layers=3, channels=4, straight_through=True, reinmax=True)
    assert DiscreteVAEConfig(**dataclasses.asdict(cfg)) == cfg
    assert cfg.fmap_size == 8
    assert cfg.channel_stats() == ([0.5, 0.5, 0.5, 0.0], [0.5, 0.5, 0.5, 1.0])
    assert DiscreteVAEConfig(channels=1).channel_stats() == ([0.5], [0.5])
    assert DiscreteVAEConfig(normalization=None).channel_stats() == ([0.0] * 3, [1.0] * 3)
    # JSON gives lists and a generated CLI gives a string; both normalise to the same tuples.
    assert DiscreteVAEConfig(normalization=[[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]) == DiscreteVAEConfig()
    assert DiscreteVAEConfig(normalization="(0.5, 0.5, 0.5),(0.5, 0.5, 0.5)") == DiscreteVAEConfig()
    assert all(f.metadata.get("help") for f in dataclasses.fields(DiscreteVAEConfig))


def test_model_construction_forms():
    hparams = dict(image_size=32, num_layers=2, num_tokens=16, channels=3, codebook_dim=8, hidden_dim=4,
                   num_resnet_blocks=0)  # fmt: skip
    vae = DiscreteVAE(**hparams)
    assert vae.config == DiscreteVAEConfig(**hparams)
    assert (vae.image_size, vae.num_tokens, vae.num_layers, vae.fmap_size, vae.channels) == (32, 16, 2, 8, 3)

    cfg = DiscreteVAEConfig(**hparams)
    overridden = DiscreteVAE(cfg, num_tokens=20)
    assert overridden.num_tokens == 20 and cfg.num_tokens == 16  # the caller's config is not mutated
    assert DiscreteVAE().config == DiscreteVAEConfig()
