"""The VAE and its architectures: shapes, gradients, save/load round trips, parameter counts."""

import json
import math

import pytest
import torch

from vaelab.config import Config, ModelConfig
from vaelab.likelihoods import LIKELIHOODS
from vaelab.model import build_model, count_parameters, load_model, model_summary, save_model
from vaelab.nets import ARCHITECTURES
from vaelab.objectives import elbo

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 48)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("likelihood", LIKELIHOODS.names())
@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_forward_backward_without_nan(arch, likelihood, shape):
    torch.manual_seed(0)
    hidden = {"mlp": (32,), "conv": (), "dcgan": (8, 16, 16, 32), "resnet": (8, 16), "linear": ()}
    model = build_model(
        ModelConfig(arch=arch, latent_dim=4, likelihood=likelihood, hidden=hidden[arch]), shape
    )
    x = torch.rand(3, *shape)
    if likelihood == "bernoulli":
        x = x.round()
    if likelihood == "discretized-logistic":
        x = (x * 255).round() / 255
    out = elbo(model, x)
    assert out.elbo.shape == (3,) and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    q_z, p_x, z = model(x)
    assert z.shape == (3, 4) and p_x.mean.shape == x.shape
    assert model.sample(2).shape == (2, *shape)
    assert model.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("likelihood", LIKELIHOODS.names())
@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_save_load_gives_identical_outputs(tmp_path, arch, likelihood):
    cfg = ModelConfig(
        arch=arch,
        latent_dim=3,
        likelihood=likelihood,
        hidden={"dcgan": (8, 16), "resnet": (8,)}.get(arch, ()),
    )
    torch.manual_seed(1)
    model = build_model(cfg, (1, 16, 12))
    # Move BatchNorm statistics away from their initial values so the round trip is meaningful.
    model.train()
    model(torch.rand(8, 1, 16, 12))
    model.eval()
    save_model(model, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["image_shape"] == [1, 16, 12]
    loaded = load_model(tmp_path)
    x = torch.rand(4, 1, 16, 12)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    with torch.no_grad():
        a, b = model.reconstruct(x), loaded.reconstruct(x)
        sa, sb = model.sample(3, generator=g1), loaded.sample(3, generator=g2)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))


def test_save_full_config_and_load(tmp_path):
    cfg = Config(model=ModelConfig(latent_dim=2, hidden=(8,)))
    model = build_model(cfg, (1, 8, 8))
    save_model(model, cfg, tmp_path)
    payload = json.loads((tmp_path / "config.json").read_text())
    assert payload["train"]["lr"] == cfg.train.lr
    assert load_model(tmp_path).latent_dim == 2


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    cfg = ModelConfig(latent_dim=2, hidden=(8,))
    save_model(build_model(cfg, (1, 8, 8)), cfg, tmp_path)
    payload = json.loads((tmp_path / "config.json").read_text())
    payload["model"]["latent_dim"] = 3
    (tmp_path / "config.json").write_text(json.dumps(payload))
    with pytest.raises((ValueError, RuntimeError), match="model.safetensors|size mismatch"):
        load_model(tmp_path)


# Zhao et al. Table 1 (MLP, 256 hidden) and Table 2 (conv); Chakravarthy Table 1 (CIFAR-10 MLP).
@pytest.mark.parametrize("z,expected", [(2, 404_244), (5, 406_554), (16, 415_024)])
def test_zhao_mlp_parameter_counts(z, expected):
    model = build_model(ModelConfig(arch="mlp", hidden=(256,), latent_dim=z), (1, 28, 28))
    assert count_parameters(model) == expected


@pytest.mark.parametrize("z,expected", [(2, 184_421), (5, 194_027), (16, 229_249)])
def test_zhao_conv_parameter_counts(z, expected):
    model = build_model(ModelConfig(arch="conv", latent_dim=z), (1, 28, 28))
    assert count_parameters(model) == expected
    if z == 2:
        assert count_parameters(model.encoder) == 119_332
        assert count_parameters(model.decoder) == 65_089


def test_chakravarthy_cifar_mlp_parameter_count():
    cfg = ModelConfig(
        arch="mlp", hidden=(512,), latent_dim=256, activation="gelu", likelihood="gaussian"
    )
    assert count_parameters(build_model(cfg, (3, 32, 32))) == 3_543_552


def test_dcgan_feature_map_sizes_follow_astorga():
    model = build_model(ModelConfig(arch="dcgan", latent_dim=8), (3, 64, 48))
    h = model.encoder.body(torch.zeros(2, 3, 64, 48))
    assert h.shape == (2, 256 * 4 * 3)  # 64x48 -> 32x24 -> 16x12 -> 8x6 -> 4x3


def test_model_summary_table():
    text = model_summary(build_model(ModelConfig(arch="conv", latent_dim=2), (1, 28, 28)))
    assert "Total parameters: 184,421" in text
    assert "Conv2d" in text and "ConvTranspose2d" in text and "119,332" in text


def test_input_shape_errors():
    model = build_model(ModelConfig(latent_dim=2, hidden=(8,)), (1, 8, 8))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 8, 8\)"):
        model.encode(torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown architecture 'transformer'"):
        build_model(ModelConfig(arch="transformer"), (1, 8, 8))
    with pytest.raises(ValueError, match="activation"):
        build_model(ModelConfig(activation="swishy"), (1, 8, 8))


def test_temperature_zero_samples_the_prior_mean():
    model = build_model(ModelConfig(latent_dim=2, hidden=(8,)), (1, 8, 8)).eval()
    a = model.sample(3, temperature=0.0)
    assert torch.allclose(a, model.decode(torch.zeros(1, 2)).mean.expand(3, -1, -1, -1))


# ------------------------------------------------------------------ init_output_bias


def _mean_image(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05


@pytest.mark.parametrize(
    "likelihood,link", [("bernoulli", "sigmoid"), ("gaussian", "sigmoid"), ("gaussian", "identity")]
)
def test_output_bias_gives_the_data_mean_when_hidden_units_are_silent(likelihood, link):
    """MLP decoder: a bias per pixel. With the output layer's weights zeroed, every z decodes
    to a distribution whose mean is exactly the mean image."""
    from vaelab.model import init_output_bias

    torch.manual_seed(0)
    shape = (1, 5, 6)
    cfg = ModelConfig(
        arch="mlp", hidden=(16,), latent_dim=3, likelihood=likelihood, gaussian_link=link
    )
    model = build_model(cfg, shape)
    mean = _mean_image(shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert "per pixel" in init_output_bias(model, mean)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["decoder.2.bias"]  # nothing but the output layer's bias
    with torch.no_grad():
        model.decoder[2].weight.zero_()
    got = model.decode(torch.randn(4, 3)).mean
    assert torch.allclose(got, mean.float().expand(4, *shape), atol=1e-6)


def test_output_bias_per_channel_for_a_conv_decoder():
    from vaelab.model import init_output_bias

    torch.manual_seed(0)
    shape = (3, 32, 32)
    model = build_model(ModelConfig(arch="conv", latent_dim=4, likelihood="bernoulli"), shape)
    mean = _mean_image(shape)
    assert "per channel" in init_output_bias(model, mean)
    last = [m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    level = mean.double().mean((1, 2)).clamp(1e-3, 1 - 1e-3)
    assert torch.allclose(last.bias.double(), torch.logit(level), atol=1e-6)


def test_output_bias_not_applicable_is_none_and_changes_nothing():
    from vaelab.model import init_output_bias

    torch.manual_seed(0)
    shape = (1, 8, 8)
    for likelihood in ("discretized-logistic", "gaussian-pixel", "continuous-bernoulli"):
        model = build_model(
            ModelConfig(arch="mlp", hidden=(8,), latent_dim=2, likelihood=likelihood), shape
        )
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert init_output_bias(model, _mean_image(shape)) is None, likelihood
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = build_model(ModelConfig(arch="mlp", hidden=(8,), latent_dim=2), shape)
    with pytest.raises(ValueError, match=r"\(1, 4, 4\)"):
        init_output_bias(model, torch.rand(1, 4, 4))


def test_output_bias_clamps_constant_pixels():
    """Pixels that are always 0 or 1 (MNIST's border) get finite logits, +-logit(1 - 1e-3)."""
    from vaelab.model import init_output_bias

    shape = (1, 2, 2)
    model = build_model(ModelConfig(arch="mlp", hidden=(4,), latent_dim=2), shape)
    init_output_bias(model, torch.tensor([[[0.0, 1.0], [0.5, 0.25]]]))
    edge = math.log(999)
    assert torch.allclose(
        model.decoder[2].bias, torch.tensor([-edge, edge, 0.0, -math.log(3)]), atol=1e-5
    )


# ------------------------------------------------------------------ model.init and the
# data-dependent input centring


def _linears(seq):
    layers = list(seq)
    return [(a, b) for a, b in zip(layers[:-1], layers[1:]) if isinstance(a, torch.nn.Linear)]


def test_he_init_for_relu_layers_and_a_narrow_posterior():
    torch.manual_seed(0)
    m = build_model(ModelConfig(hidden=(400, 300), latent_dim=10), (1, 28, 28))
    relu_layers = [a for a, b in _linears(m.encoder.body) + _linears(m.decoder)
                   if isinstance(b, torch.nn.ReLU)]  # fmt: skip
    assert len(relu_layers) == 4  # 784-400-300 in the encoder, z-300-400 in the decoder
    for lin in relu_layers:
        want = math.sqrt(2.0 / lin.in_features)  # He et al. 2015, fan-in
        assert abs(float(lin.weight.detach().std()) / want - 1) < 0.05
        assert torch.count_nonzero(lin.bias) == 0
    bias = m.encoder.heads.linear.bias
    assert torch.all(bias[10:] == -3.0) and not torch.all(bias[:10] == -3.0)
    # PyTorch's default (uniform, std 1 / sqrt(3 fan_in)) under init = "torch"
    torch.manual_seed(0)
    t = build_model(ModelConfig(hidden=(400, 300), latent_dim=10, init="torch"), (1, 28, 28))
    first = t.encoder.body[1]
    assert abs(float(first.weight.detach().std()) * math.sqrt(3 * 784) - 1) < 0.05
    assert float(first.weight.detach().abs().max()) <= 1 / math.sqrt(784)
    assert not torch.all(t.encoder.heads.linear.bias[10:] == -3.0)


def test_he_init_leaves_other_activations_and_architectures_alone():
    torch.manual_seed(0)
    tanh = build_model(ModelConfig(hidden=(200,), activation="tanh"), (1, 8, 8))
    first = tanh.encoder.body[1]  # followed by tanh: PyTorch's uniform init
    assert float(first.weight.detach().abs().max()) <= 1 / math.sqrt(64)
    assert torch.count_nonzero(first.bias) > 0
    with pytest.raises(ValueError, match="model.init must be one of he, torch"):
        build_model(ModelConfig(init="xavier"), (1, 8, 8))


def test_input_bias_centres_the_first_layer_on_the_mean():
    from vaelab.model import init_input_bias

    torch.manual_seed(0)
    m = build_model(ModelConfig(hidden=(32,), latent_dim=3, init="torch"), (1, 6, 5))
    first = m.encoder.body[1]
    old_bias = first.bias.detach().clone()
    mean = torch.rand(1, 6, 5)
    assert init_input_bias(m, mean) == "encoder input centred on the training mean"
    with torch.no_grad():  # the mean image now gets what a zero image got before
        torch.testing.assert_close(first(mean.flatten()), old_bias, rtol=1e-5, atol=1e-6)
    lin = build_model(ModelConfig(arch="linear", latent_dim=2), (1, 6, 5))
    assert init_input_bias(lin, mean) is not None  # the heads are the first layer
    conv = build_model(ModelConfig(arch="conv", latent_dim=2), (1, 28, 28))
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    assert init_input_bias(conv, torch.rand(1, 28, 28)) is None
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"mean image of shape \(1, 5, 6\)"):
        init_input_bias(m, torch.rand(1, 5, 6))
