"""evaluate(): every number labelled (estimator, k, split, binarization), improper likelihoods
flagged, eval.json written and merged, the CLI, and lazy imports."""

import json
import subprocess
import sys

import pytest
import torch

from vaelab.config import ModelConfig, load_preset, override
from vaelab.data import load_dataset
from vaelab.evaluate import evaluate, evaluate_run, format_table, read_eval
from vaelab.metrics import METRICS, EvalContext, MetricUnavailable
from vaelab.metrics.features import FeatureNet, LeNet
from vaelab.model import build_model

FAST = dict(k=20, progress=False, max_images=60, probe_train_images=300)


@pytest.fixture(scope="module")
def grey():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def binary():
    return load_dataset("digits", binarize="dynamic")


@pytest.fixture(scope="module")
def feature_net():
    torch.manual_seed(0)
    return FeatureNet(
        LeNet(1, 10, image_size=8),
        key="fd_test",
        display="FD-test",
        description="an untrained LeNet",
    )


def _model(likelihood="bernoulli", seed=0):
    torch.manual_seed(seed)
    return build_model(
        ModelConfig(arch="mlp", hidden=(32,), latent_dim=4, likelihood=likelihood), (1, 8, 8)
    )


def test_every_entry_is_labelled(binary, feature_net):
    report = evaluate(_model(), binary, feature_net=feature_net, **FAST)
    assert set(report.seconds) == set(METRICS.names())
    names = report.names()
    for name in ["elbo", "elbo.bits_per_dim", "elbo.reconstruction", "elbo.kl", "log_px", "log_px.bits_per_dim",
                 "active_units", "recon.mse", "recon.psnr", "recon.ssim", "fd_test.reconstructions",
                 "fd_test.samples", "probe.accuracy", "params.total"]:  # fmt: skip
        assert name in names
    for e in report.entries:
        assert e.estimator and e.unit is not None and e.value is not None
        if not e.name.startswith("params."):
            assert e.split == "test" and e.n_images == 60
            assert e.binarization.startswith("dynamic") and "seed 0" in e.binarization
    assert report.get("log_px").k == 20 and report.get("log_px").stderr > 0
    assert "Burda" in report.get("log_px").estimator
    assert report.get("elbo").k == 1 and report.get("elbo").unit == "nats/image"
    assert report.get("log_px.bits_per_dim").unit == "bits/dim"
    assert len(report.get("elbo.kl").extra["per_dim"]) == 4
    assert report.likelihood_proper and not report.get("log_px").notes
    # bits/dim = -nats / (D ln 2)
    bpd = -report.value("log_px") / (64 * torch.log(torch.tensor(2.0)).item())
    assert report.value("log_px.bits_per_dim") == pytest.approx(bpd)
    table = format_table(report)
    for text in [
        "digits-dynamic",
        "test split (60 images)",
        "binarization: dynamic",
        "log_px",
        "Burda",
        "nats/image",
    ]:
        assert text in table
    # The same seed reproduces the numbers (binarization and every Monte Carlo draw).
    again = evaluate(_model(), binary, metrics="elbo,loglik", feature_net=feature_net, **FAST)
    assert again.value("log_px") == report.value("log_px")
    assert again.value("elbo") == report.value("elbo")


def test_bernoulli_on_grey_levels_is_flagged(grey):
    report = evaluate(_model(), grey, metrics=["elbo", "loglik"], **FAST)
    assert not report.likelihood_proper
    for name in ["elbo", "elbo.bits_per_dim", "log_px", "log_px.bits_per_dim"]:
        assert any("not a proper likelihood" in n for n in report.get(name).notes)
    assert "NOT a proper likelihood" in format_table(report)
    ok = evaluate(_model("continuous-bernoulli"), grey, metrics="loglik", **FAST)
    assert ok.likelihood_proper and not ok.get("log_px").notes


def test_dynamic_binarization_is_fixed_per_seed(binary):
    ctx = EvalContext(model=None, data=binary, split="test", seed=3)
    a, b = torch.cat(list(ctx.batches())), torch.cat(list(ctx.batches()))
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 1.0}
    other = torch.cat(list(EvalContext(model=None, data=binary, split="test", seed=4).batches()))
    assert not torch.equal(a, other)


def test_unlabeled_data_skip_the_probe_unless_asked(grey):
    from vaelab.data import DataSplits, ImageSet

    strip = lambda s: ImageSet(s.images, None, s.info)  # noqa: E731
    unlabeled = DataSplits(grey.info, strip(grey.train), strip(grey.valid), strip(grey.test))
    report = evaluate(_model(), unlabeled, metrics=None, **{**FAST, "k": 2})
    probe = report.get("probe")
    assert probe.value is None and "no labels" in probe.notes[0]
    assert report.get("fd").value is None
    with pytest.raises(MetricUnavailable):
        evaluate(_model(), unlabeled, metrics="probe", **FAST)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(_model(), grey, metrics="nope", **FAST)


# ----------------------------------------------------------------------- runs and the CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from vaelab.train import fit

    cfg = override(
        load_preset("quickstart"),
        ["train.epochs=1", "train.figures=false", "train.report=false", "model.hidden=32"],
    )
    return fit(cfg, out_dir=tmp_path_factory.mktemp("runs"), progress=False).run_dir


def test_evaluate_run_writes_and_merges_eval_json(run_dir):
    r1 = evaluate_run(run_dir, metrics="elbo,params", device="cpu", **FAST)
    assert r1.run == str(run_dir)
    evaluate_run(run_dir, metrics=["active-units"], device="cpu", **FAST)
    saved = read_eval(run_dir)["test"]
    assert {"elbo", "params.total", "active_units"} <= set(saved.names())
    assert saved.get("elbo").value == r1.value("elbo")
    assert not list(run_dir.glob(".*.tmp"))
    payload = json.loads((run_dir / "eval.json").read_text())
    assert payload["format"] == "vaelab-eval-1"


def test_cli_eval_json(run_dir, capsys):
    from vaelab.cli import main

    status = main(["eval", str(run_dir), "--k", "7", "--metrics", "elbo", "loglik", "--json",
                   "--images", "30", "--device", "cpu", "--no-write"])  # fmt: skip
    assert status == 0
    out = json.loads(capsys.readouterr().out)
    entries = {e["name"]: e for e in out["entries"]}
    assert entries["log_px"]["k"] == 7 and entries["log_px"]["n_images"] == 30
    assert entries["log_px"]["split"] == "test" and entries["log_px"]["binarization"]
    assert main(["eval", str(run_dir), "--metrics", "elbo", "--images", "30", "--device", "cpu",
                 "--quiet", "--no-write"]) == 0  # fmt: skip
    assert "estimators:" in capsys.readouterr().out


def test_import_stays_light():
    code = (
        "import sys, vaelab, vaelab.evaluate, vaelab.metrics;"
        "bad = [m for m in ('sklearn', 'skimage', 'matplotlib') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------ loglik on a random sample


def test_difference_estimate_on_every_image_is_the_plain_mean():
    from vaelab.metrics.likelihood import difference_estimate

    g = torch.Generator().manual_seed(0)
    elbo = -100 + 5 * torch.randn(40, generator=g, dtype=torch.float64)
    log_px = elbo + 3 + 0.5 * torch.randn(40, generator=g, dtype=torch.float64)
    est, se = difference_estimate(log_px, elbo, elbo)
    assert est == pytest.approx(log_px.mean().item(), abs=1e-12) and se == 0.0
    with pytest.raises(ValueError, match="2 to 40"):
        difference_estimate(log_px[:1], elbo[:1], elbo)
    with pytest.raises(ValueError, match="3 log p"):
        difference_estimate(log_px[:3], elbo[:4], elbo)


def test_difference_estimate_is_unbiased_and_its_stderr_is_right():
    """Random samples of 30 from 400 images whose log p(x) spreads 20 nats but whose gap to
    the ELBO spreads 1: the estimates centre on the true mean, scatter as the stderr says,
    and far less than the plain sample mean of log p(x) does."""
    from vaelab.metrics.likelihood import difference_estimate

    g = torch.Generator().manual_seed(1)
    elbo = -90 + 20 * torch.randn(400, generator=g, dtype=torch.float64)
    log_px = elbo + 4 + torch.rand(400, generator=g, dtype=torch.float64) * 3.5
    truth = log_px.mean().item()
    ests, ses, plain = [], [], []
    for _ in range(3000):
        idx = torch.randperm(400, generator=g)[:30]
        e, s = difference_estimate(log_px[idx], elbo[idx], elbo)
        ests.append(e), ses.append(s), plain.append(log_px[idx].mean().item())
    ests = torch.tensor(ests)
    spread = ests.std().item()
    assert abs(ests.mean().item() - truth) < 4 * spread / 3000**0.5  # unbiased
    assert spread == pytest.approx(torch.tensor(ses).mean().item(), rel=0.1)  # honest stderr
    assert spread < torch.tensor(plain).std().item() / 10  # the control variate pays


def test_loglik_sample_in_evaluate(binary):
    """Sample = every image: the plain IS mean. A random half: within its stderr of it."""
    model = _model()
    kw = dict(k=200, progress=False, max_images=80, metrics=["loglik"], seed=3)
    full = evaluate(model, binary, **kw).get("log_px")
    every = evaluate(model, binary, loglik_sample=80, **kw).get("log_px")
    assert every.value == pytest.approx(full.value, abs=1e-9) and every.stderr == 0.0
    half = evaluate(model, binary, loglik_sample=40, **kw).get("log_px")
    assert half.n_images == 80 and half.extra["sample_images"] == 40
    assert "control variate" in half.estimator and "random sample of 40 of the 80" in half.estimator
    # the stderr of the split's mean: the gap's, finite-population corrected (40 of 80)
    assert half.stderr == pytest.approx(half.extra["gap_stderr"] * 0.5**0.5, rel=1e-9)
    assert abs(half.value - full.value) < 4 * half.stderr + 0.05  # + the IS noise at k = 200
    assert half.extra["gap_mean"] > 0  # log p(x) >= ELBO on average
    with pytest.raises(ValueError, match="loglik_sample must be 2 to 80"):
        evaluate(model, binary, loglik_sample=81, **kw)


def test_cli_eval_loglik_sample(run_dir, capsys):
    from vaelab.cli import main

    rc = main(["eval", str(run_dir), "--metrics", "loglik", "--k", "10", "--images", "50",
               "--loglik-sample", "20", "--json", "--no-write"])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    entry = next(e for e in out["entries"] if e["name"] == "log_px")
    assert entry["extra"]["sample_images"] == 20 and entry["n_images"] == 50


def test_channels_last_evaluation_gives_the_same_numbers(binary):
    """A convolutional model is evaluated in NHWC (faster) with the numbers of NCHW, and is
    handed back in the layout it came in."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet", hidden=(8, 16), latent_dim=4, likelihood="bernoulli")
    model = build_model(cfg, (1, 8, 8))
    kw = dict(k=30, progress=False, max_images=40, metrics=["elbo", "loglik", "reconstruction"])
    nhwc = evaluate(model, binary, channels_last=True, **kw)
    assert all(p.is_contiguous() for p in model.parameters())  # restored
    nchw = evaluate(model, binary, channels_last=False, **kw)
    for name in ("elbo", "log_px", "recon.mse", "recon.ssim"):
        assert nhwc.value(name) == pytest.approx(nchw.value(name), rel=1e-5, abs=1e-6), name
