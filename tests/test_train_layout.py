"""train.channels_last (NHWC for convolutional networks) and train.bf16 (bfloat16 autocast).

Both change how the arithmetic is laid out, never what is computed: a channels-last run ends
where a contiguous one does, a checkpoint resumes in either layout, and bf16 keeps float32
weights, optimizer state, KL and log-likelihood.
"""

from __future__ import annotations

import pytest
import torch

import vaelab.train as train_mod
from vaelab.config import load_preset, override
from vaelab.data import load_dataset
from vaelab.devices import native_bf16
from vaelab.model import build_model, output_layer
from vaelab.nets import ARCHITECTURES
from vaelab.objectives import elbo
from vaelab.optim import FusedAdam
from vaelab.runs import load_checkpoint
from vaelab.train import TrainingInterrupted, fit


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", binarize="dynamic")


def conv_cfg(*overrides: str):
    """A small resnet VAE on the 8x8 digits: 12 steps, no figures, no report."""
    base = [
        "model.arch=resnet",
        "model.hidden=8,16",
        "model.latent_dim=4",
        "train.max_steps=12",
        "train.log_every=4",
        "train.figures=false",
        "train.report=false",
    ]
    return override(load_preset("quickstart"), base + list(overrides))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_channels_last_trains_like_contiguous(digits):
    a = fit(
        conv_cfg("train.channels_last=false", "train.bf16=false"),
        out_dir=None,
        data=digits,
        progress=False,
    )
    b = fit(
        conv_cfg("train.channels_last=true", "train.bf16=false"),
        out_dir=None,
        data=digits,
        progress=False,
    )
    assert a.summary["channels_last"] is False and b.summary["channels_last"] is True
    sa, sb = state(a.model), state(b.model)
    assert sa.keys() == sb.keys()
    for k in sa:  # same numbers, different summation order inside oneDNN
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-3, atol=1e-4, msg=k)
    # the released model is back in the usual layout
    assert all(p.is_contiguous() for p in b.model.parameters())
    va, vb = a.history[-1]["elbo"], b.history[-1]["elbo"]
    assert abs(va - vb) < 1e-2 * abs(va)


def test_channels_last_is_ignored_for_mlps(digits):
    cfg = override(load_preset("quickstart"), ["train.max_steps=3", "train.figures=false"])
    r = fit(cfg, out_dir=None, data=digits, progress=False)
    assert r.summary["channels_last"] is False and r.summary["precision"] == "float32"


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_resume_across_layouts(digits, tmp_path, first, second):
    """A checkpoint saved in one layout resumes in the other and ends where a straight run
    in the second layout ends (the optimizer's moments take the parameters' strides)."""
    straight = fit(
        conv_cfg(f"train.channels_last={str(second).lower()}", "train.bf16=false"),
        out_dir=None,
        data=digits,
        progress=False,
    )

    class StopAt:
        def on_step_end(self, st):
            if st.step == 6:
                st.request_stop("test")

    cfg1 = conv_cfg(f"train.channels_last={str(first).lower()}", "train.bf16=false")
    with pytest.raises(TrainingInterrupted):
        fit(cfg1, out_dir=tmp_path, data=digits, progress=False, callbacks=[StopAt()])
    run_dir = tmp_path / cfg1.name
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    moments = [s["exp_avg"] for s in ckpt["optimizer"]["state"].values() if s["exp_avg"].dim() == 4]
    assert moments and all(m.is_contiguous() != first for m in moments if m.shape[1] > 1)
    # train.* settings may change on resume: continue in the other layout
    cfg2 = conv_cfg(f"train.channels_last={str(second).lower()}", "train.bf16=false")
    resumed = fit(cfg2, resume=run_dir, data=digits, progress=False)
    for k, v in state(straight.model).items():
        torch.testing.assert_close(state(resumed.model)[k], v, rtol=1e-3, atol=1e-4, msg=k)


def test_match_state_layout_fixes_moments():
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    opt = FusedAdam(conv.parameters(), lr=1e-2)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    conv(x).square().mean().backward()
    opt.step()
    w = conv.weight
    st = opt.state[w]
    wrong = {k: v.contiguous() for k, v in st.items()}  # as a contiguous run would save them
    assert wrong["exp_avg"].stride() != w.stride()
    st.update(wrong)
    before = {k: v.clone() for k, v in st.items()}
    train_mod._match_state_layout(opt)
    for k in ("exp_avg", "exp_avg_sq"):
        assert st[k].stride() == w.stride()
        torch.testing.assert_close(st[k], before[k], rtol=0, atol=0)  # same values, new layout


def test_encode_decode_return_float32_under_autocast():
    cfg = override(load_preset("quickstart"), ["model.arch=resnet", "model.hidden=8,16"])
    model = build_model(cfg.model, (1, 8, 8))
    x = torch.rand(5, 1, 8, 8).round()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = model.encode(x)
        p = model.decode(q.rsample())
        out = elbo(model, x)
    assert q.mu.dtype == torch.float32 and q.logvar.dtype == torch.float32
    assert p.log_prob(x).dtype == torch.float32
    assert out.elbo.dtype == torch.float32 and out.kl.dtype == torch.float32
    exact = elbo(model, x, eps=None)
    assert torch.isfinite(out.loss.detach())
    assert abs(float(out.kl.detach().mean() - exact.kl.detach().mean())) < 0.1


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="no native bf16 on this CPU")
def test_bf16_on_a_cpu_with_native_bf16(digits):
    a = fit(conv_cfg("train.bf16=true"), out_dir=None, data=digits, progress=False)
    b = fit(conv_cfg("train.bf16=false"), out_dir=None, data=digits, progress=False)
    assert a.summary["precision"] == "bf16 autocast (float32 output layer)"
    assert b.summary["precision"] == "float32"
    assert all(p.dtype == torch.float32 for p in a.model.parameters())
    last = output_layer(a.model.decoder)  # the released model has no hooks left
    assert not last._forward_hooks and not last._forward_pre_hooks
    va, vb = a.history[-1]["elbo"], b.history[-1]["elbo"]  # 12 steps: close, not equal
    assert abs(va - vb) < 0.05 * abs(vb)
    sa, sb = state(a.model), state(b.model)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)  # bf16 really ran


def test_bf16_without_native_support_warns_and_trains_in_float32(digits, monkeypatch):
    monkeypatch.setattr(train_mod, "native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match="native bfloat16"):
        r = fit(conv_cfg("train.bf16=true", "train.max_steps=3"), out_dir=None, data=digits,
                progress=False)  # fmt: skip
    assert r.summary["precision"] == "float32"
    assert next(r.model.parameters()).dtype == torch.float32


# ------------------------------------------------ bf16 on the fused MLP path (any CPU: the
# arithmetic is the same where bf16 is emulated, only slower, so native support is faked)


def mlp_cfg(*overrides: str):
    """The quickstart MLP with ReLU (the fused gradient's kind): 12 steps."""
    base = [
        "model.activation=relu",
        "model.hidden=32,16",
        "train.max_steps=12",
        "train.log_every=4",
        "train.figures=false",
        "train.report=false",
    ]
    return override(load_preset("quickstart"), base + list(overrides))


@pytest.fixture
def fake_native_bf16(monkeypatch):
    monkeypatch.setattr(train_mod, "native_bf16", lambda device: True)


def test_bf16_mlp_takes_the_fused_path(digits, fake_native_bf16):
    a = fit(mlp_cfg("train.bf16=true"), out_dir=None, data=digits, progress=False)
    b = fit(mlp_cfg("train.bf16=false"), out_dir=None, data=digits, progress=False)
    assert a.summary["precision"].split(";")[0] == "bf16 products (fused MLP gradient)"
    assert b.summary["precision"] == "float32"
    assert all(p.dtype == torch.float32 for p in a.model.parameters())
    va, vb = a.history[-1]["elbo"], b.history[-1]["elbo"]
    assert abs(va - vb) < 0.02 * abs(vb)
    sa, sb = state(a.model), state(b.model)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)  # bf16 really ran
    for k in sa:  # 12 Adam steps of lr 2e-3 from the same start: close
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0.05, msg=k)


def test_bf16_mlp_with_gradient_clipping(digits, fake_native_bf16):
    r = fit(mlp_cfg("train.bf16=true", "train.grad_clip=1.0"), out_dir=None, data=digits,
            progress=False)  # fmt: skip
    f = fit(mlp_cfg("train.bf16=false", "train.grad_clip=1.0"), out_dir=None, data=digits,
            progress=False)  # fmt: skip
    # (where the CPU has AVX512-BF16, "; sparse first layer ..." follows: digits are sparse)
    assert r.summary["precision"].split(";")[0] == "bf16 products (fused MLP gradient)"
    # torch's fused Adam leaves the weights' version counters alone: the bf16 copies must
    # still follow every step (stale copies would train the first step's weights 12 times)
    sr, sf = state(r.model), state(f.model)
    for k in sr:
        torch.testing.assert_close(sr[k], sf[k], rtol=0, atol=0.05, msg=k)


def test_bf16_mlp_resumes_exactly(digits, tmp_path, fake_native_bf16):
    """A killed bf16 run resumes to the straight run's weights: the bf16 copies of the
    weights are rounded from the loaded checkpoint."""
    straight = fit(mlp_cfg("train.bf16=true"), out_dir=None, data=digits, progress=False)

    class StopAt:
        def on_step_end(self, st):
            if st.step == 5:
                st.request_stop("test")

    cfg = mlp_cfg("train.bf16=true")
    with pytest.raises(TrainingInterrupted):
        fit(cfg, out_dir=tmp_path, data=digits, progress=False, callbacks=[StopAt()])
    resumed = fit(cfg, resume=tmp_path / cfg.name, data=digits, progress=False)
    for k, v in state(straight.model).items():
        torch.testing.assert_close(state(resumed.model)[k], v, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize(
    "native, cfg_args, want",
    [
        (True, ("mlp",), "bf16 products (fused MLP gradient)"),
        (True, ("mlp", "train.fused=false"), "float32"),  # only the fused path
        (True, ("conv",), "bf16 autocast (float32 output layer)"),  # convolutional networks
        (False, ("mlp",), "float32"),  # no native bf16: float32, no warning
        (False, ("conv",), "float32"),
    ],
)
def test_bf16_auto_is_the_fused_mlp_path_and_convolutions_on_native_cpus(
    digits, monkeypatch, native, cfg_args, want
):
    import warnings

    monkeypatch.setattr(train_mod, "native_bf16", lambda device: native)
    kind, *extra = cfg_args
    make = mlp_cfg if kind == "mlp" else conv_cfg
    cfg = make("train.max_steps=2", *extra)
    assert cfg.train.bf16 == "auto"  # the default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = fit(cfg, out_dir=None, data=digits, progress=False)
    assert r.summary["precision"].split(";")[0] == want


def test_bf16_setting_is_checked(digits):
    from dataclasses import replace

    cfg = mlp_cfg()
    bad = replace(cfg, train=replace(cfg.train, bf16="sometimes"))
    with pytest.raises(ValueError, match="train.bf16 must be"):
        fit(bad, out_dir=None, data=digits, progress=False)


@pytest.mark.parametrize("centre", [True, False])
def test_new_runs_centre_the_mlp_encoder_input(digits, centre):
    """train.init_input_bias: at the first step the encoder's first layer maps the training
    mean image to 0 (He init: zero biases, then b = -W mean); off, it keeps zero biases."""
    from vaelab.data import mean_image

    seen = {}

    class AtStart:
        def on_train_begin(self, st):
            first = st.model.encoder.body[1]
            with torch.no_grad():
                seen["out"] = first(mean_image(digits.train).float().flatten())
                seen["bias"] = first.bias.detach().clone()

    cfg = mlp_cfg("train.max_steps=1", f"train.init_input_bias={str(centre).lower()}")
    fit(cfg, out_dir=None, data=digits, progress=False, callbacks=[AtStart()])
    if centre:
        assert seen["out"].abs().max() < 1e-5 and seen["bias"].abs().max() > 0.1
    else:
        assert torch.count_nonzero(seen["bias"]) == 0


@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_output_layer_is_the_decoders_last_product(arch):
    """output_layer() names the Linear/convolution that runs last in each architecture."""
    cfg = override(load_preset("quickstart"), [f"model.arch={arch}", "model.hidden="])
    model = build_model(cfg.model, (1, 28, 28))
    ran = []
    for m in model.decoder.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.register_forward_hook(lambda mod, a, out: ran.append(mod))
    model.decoder(torch.zeros(2, cfg.model.latent_dim))
    assert ran and output_layer(model.decoder) is ran[-1]


def test_float32_output_layer_under_autocast():
    """Every product of the decoder but the last runs in bf16; the last in float32, on its
    input rounded to bf16 by the layer before, so its output has float32 precision."""
    cfg = override(conv_cfg(), ["model.hidden=8,16"])
    model = build_model(cfg.model, (1, 8, 8))
    last = output_layer(model.decoder)
    seen = {}
    for name, m in model.decoder.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.register_forward_hook(lambda mod, a, out, name=name: seen.update({name: out.dtype}))
    z = torch.randn(3, cfg.model.latent_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model.decoder(z)
    assert plain.dtype == torch.bfloat16
    hooks = train_mod.Float32OutputLayer(last, "cpu")
    inputs = {}
    last.register_forward_pre_hook(lambda mod, a: inputs.update(x=a[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.decoder(z)
        assert torch.is_autocast_enabled("cpu")  # restored after the layer
    assert out.dtype == torch.float32
    assert sorted(set(seen.values()), key=str) == [torch.bfloat16, torch.float32]
    assert [n for n, d in seen.items() if d == torch.float32] == [
        n for n, m in model.decoder.named_modules() if m is last
    ]
    x = inputs["x"]
    assert x.dtype == torch.float32 and torch.equal(x, x.bfloat16().float())  # bf16 values
    hooks.remove()
    torch.testing.assert_close(out, model.decoder[-1](last(x)), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.decoder(z).dtype == torch.bfloat16
