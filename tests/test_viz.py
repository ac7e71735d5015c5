"""Figures: every registered kind draws a non-blank PNG (or GIF) with the expected grid on a small
trained model; the inverse-CDF grid hits the right quantiles; attribute probes recover a known
direction; interpolation, the CLI and the lazy import of matplotlib."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab import build_model, elbo
from vaelab.config import ModelConfig
from vaelab.data import load_dataset

viz = pytest.importorskip("vaelab.viz")


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


def _train(data, latent_dim: int, steps: int, seed: int = 0):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP trains faster on one thread, above all on a busy box
    try:
        return _train_steps(data, latent_dim, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train_steps(data, latent_dim: int, steps: int, seed: int):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(latent_dim=latent_dim, hidden=(64,)), data.info.shape)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    tr = data.train
    for _ in range(steps):
        idx = torch.randint(len(tr), (64,), generator=g)
        loss = elbo(model, tr.to_float(tr.images[idx], generator=g)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def model(digits):
    """A z = 4 MLP VAE trained for a few hundred steps on the 8x8 digits (about a second)."""
    return _train(digits, 4, 300)


@pytest.fixture(scope="session")
def model_z2(digits):
    return _train(digits, 2, 100, seed=1)


def fake_metrics(ssim: bool = False) -> list[dict]:
    """Records in the format of metrics.jsonl: the KL rises while the loss falls."""
    recs = []
    for step in range(0, 200, 10):
        kl = 2 + 10 * (1 - np.exp(-step / 50))
        rec = 100 * np.exp(-step / 40) + 40
        recs.append(
            dict(
                kind="step",
                step=step,
                epoch=step // 50 + 1,
                split="train",
                loss=rec + kl,
                elbo=-(rec + kl),
                rec=rec,
                kl=kl,
                beta=1.0,
                lr=1e-3,
            )
        )
        if step % 50 == 40:
            for split in ("train", "valid"):
                r = dict(
                    kind="epoch",
                    step=step,
                    epoch=step // 50 + 1,
                    split=split,
                    loss=rec + kl + 1,
                    elbo=-(rec + kl + 1),
                    rec=rec + 1,
                    kl=kl,
                    beta=1.0,
                    lr=1e-3,
                )
                if ssim and split == "valid":
                    r["ssim"] = 0.5 + step / 500
                recs.append(r)
    return recs


def write_run(path, metrics: list[dict], latent_dim: int = 2, batch_size: int = 100):
    """A run folder with just config.json and metrics.jsonl (what the log figures read)."""
    import json

    from vaelab.config import Config, override
    from vaelab.runs import write_config

    path.mkdir(parents=True)
    cfg = override(Config(), [f"model.latent_dim={latent_dim}", f"train.batch_size={batch_size}"])
    write_config(path, cfg, (1, 8, 8))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return path


@pytest.fixture(scope="session")
def logged_runs(tmp_path_factory):
    """Two run folders that differ in latent size and batch size, with four epochs each."""
    root = tmp_path_factory.mktemp("logged")
    return [
        write_run(root / "a", fake_metrics(), latent_dim=2, batch_size=100),
        write_run(root / "b", fake_metrics(), latent_dim=3, batch_size=50),
    ]


# Kinds drawn from the logs of saved runs rather than from models.
LOGGED_RUN_KINDS = {"bound-curves"}


def inputs_for(kind, model, model_z2, digits, logged_runs=()):
    runs = list(logged_runs) if kind in LOGGED_RUN_KINDS else [model_z2, model]
    given = {"model": model, "data": digits, "metrics": fake_metrics(), "runs": runs}
    return {k: given[k] for k in viz.figure_inputs(kind)}


# Small options so that every kind draws quickly.
FAST = {
    "attribute-traversal": {"n": 3, "steps": 5},
    "attribute-add": {"n": 3},
    "interpolation": {"n": 2, "steps": 5},
    "latent-scatter": {"n": 200},
    "manifold": {"n": 6},
    "neighbourhood": {"n": 3},
    "reconstructions": {"n": 8},
    "samples": {"n": 16},
    "traversal": {"steps": 5},
    "traversal-animation": {"steps": 5},
    "latent-comparison": {"n": 4},
}


def image_array(fig, ax: int = 0) -> np.ndarray:
    """The array the figure's ``ax``-th axes shows (the tiled grid)."""
    return np.asarray(fig.axes[ax].get_images()[0].get_array())


def assert_not_blank(path, min_side: int = 150) -> Image.Image:
    im = Image.open(path)
    assert min(im.size) >= min_side, im.size
    grey = np.asarray(im.convert("L"), dtype=np.float64)
    assert grey.std() > 20, "image is (nearly) uniform"
    assert (grey < 200).mean() > 0.01, "image is all but white"
    return im


# ------------------------------------------------------------------------------ every kind


@pytest.mark.parametrize("kind", viz.FIGURES.names())
def test_every_figure_kind_saves_a_non_blank_image(
    kind, model, model_z2, digits, logged_runs, tmp_path
):
    inputs = inputs_for(kind, model, model_z2, digits, logged_runs)
    fig = viz.render(kind, **inputs, **FAST.get(kind, {}))
    path = viz.save_figure(fig, tmp_path / f"{kind}{viz.output_suffix(kind)}")
    im = assert_not_blank(path)
    if kind == "traversal-animation":
        assert im.format == "GIF" and im.n_frames == 2 * 5 - 2
    else:
        assert im.format == "PNG"
    assert list(tmp_path.iterdir()) == [path], "the atomic save left a temporary file"


def test_every_kind_is_documented():
    for kind in viz.FIGURES.names():
        assert viz.FIGURES.describe(kind), f"{kind} has no docstring"


def test_save_default_figures_is_fast_and_writes_two_pngs(model, digits, tmp_path):
    import time

    viz.save_default_figures(model, digits, tmp_path / "warm")  # first draw loads fonts
    t0 = time.perf_counter()
    paths = viz.save_default_figures(model, digits, tmp_path / "figures")
    assert time.perf_counter() - t0 < 2.0
    assert [p.name for p in paths] == ["reconstructions.png", "samples.png"]
    for p in paths:
        assert_not_blank(p)


# ------------------------------------------------------------------------------ grids


def test_reconstruction_grids(model, digits):
    # 8 pairs -> 2 rows... pairs_per_row = ceil(sqrt(4)) = 2, so 4 columns (o, r, o, r), 4 rows.
    fig = viz.reconstructions(model, digits, n=8)
    assert image_array(fig).shape == (4 * 9 + 1, 4 * 9 + 1)
    fig = viz.reconstructions(model, digits, n=8, layout="rows")
    assert image_array(fig).shape == (2 * 9 + 1, 8 * 9 + 1)
    # Odd columns are the originals, exactly as the data gives them.
    x, _, _ = viz.base.pick(digits, 8)
    grid = image_array(viz.reconstructions(model, digits, n=8))
    np.testing.assert_allclose(grid[1:9, 1:9], x[0, 0].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="layout"):
        viz.reconstructions(model, digits, layout="diagonal")


def test_sample_grid_has_one_panel_per_temperature(model):
    fig = viz.samples(model, n=16, temperature=(0.5, 1.0))
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 2
    assert image_array(fig, 0).shape == (4 * 9 + 1, 4 * 9 + 1)
    assert [ax.get_title() for ax in panels] == ["T = 0.5", "T = 1"]
    # T = 0 decodes z = 0 everywhere: all tiles identical.
    g = image_array(viz.samples(model, n=4, temperature=0.0))
    np.testing.assert_allclose(g[1:9, 1:9], g[10:18, 10:18], atol=1e-6)


def test_manifold_grid_and_dims(model, model_z2, digits):
    fig = viz.manifold(model_z2, n=7)
    assert image_array(fig).shape == (7 * 8, 7 * 8)  # seamless: no padding
    fig = viz.manifold(model, digits, n=5, dims=(3, 1))
    assert image_array(fig).shape == (5 * 8, 5 * 8)
    assert fig.axes[0].get_xlabel() == "z[3]" and fig.axes[0].get_ylabel() == "z[1]"
    # Without dims, z > 2 uses the two dimensions with the most KL.
    order, _ = viz.base.dims_by_kl(model, digits)
    title = viz.manifold(model, digits, n=3).axes[0].get_title()
    assert f"z[{order[0]}], z[{order[1]}]" in title and "most KL" in title
    with pytest.raises(ValueError, match="different"):
        viz.manifold(model, digits, dims=(1, 1))
    plane = np.array([[1.0, 1.0, 0, 0], [0, 0, 1.0, -1.0]]) / np.sqrt(2)
    fig = viz.manifold(model, n=4, plane=plane)
    assert image_array(fig).shape == (4 * 8, 4 * 8)
    assert "chosen plane" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="shape"):
        viz.manifold(model, n=4, plane=plane[:, :3])
    one = build_model(ModelConfig(latent_dim=1, hidden=(16,)), digits.info.shape)
    assert image_array(viz.manifold(one, n=9)).shape == (8, 9 * 8)


def test_traversal_and_interpolation_grids(model, digits):
    fig = viz.traversal(model, digits, steps=5)
    assert image_array(fig).shape == (4 * 9 + 1, 5 * 9 + 1)  # z = 4 rows, 5 values
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    kls = [float(s.split("KL")[1]) for s in labels]
    assert kls == sorted(kls, reverse=True), "rows must be ordered by KL"
    fig = viz.traversal(model, digits, dims=(2,), steps=3, base="zero")
    assert image_array(fig).shape == (9 + 1, 3 * 9 + 1)
    fig = viz.interpolation(model, digits, n=2, steps=4)
    assert image_array(fig).shape == (4 * 9 + 1, 6 * 9 + 1)  # 2 pairs x (linear, slerp)
    assert (
        image_array(viz.interpolation(model, digits, n=2, steps=4, method="slerp")).shape[0] == 19
    )


def test_neighbourhood_and_attribute_add_grids(model, digits):
    fig = viz.neighbourhood(model, digits, n=3, sigma=(0.1, 1.0), samples=2)
    assert image_array(fig).shape == (3 * 9 + 1, (2 + 2 * 2) * 9 + 1)
    fig = viz.neighbourhood(model, digits, n=2, sigma=0.0, samples=1)
    grid = image_array(fig)  # sigma = 0: the sample is the reconstruction
    np.testing.assert_allclose(grid[1:9, 10:18], grid[1:9, 19:27], atol=1e-6)
    fig = viz.render("attribute-add", model=model, data=digits, attribute="0", n=3)
    assert image_array(fig).shape == (3 * 9 + 1, 6 * 9 + 1)
    assert "is digit 0" in fig.axes[0].get_title()


def test_latent_comparison_orders_panels_by_latent_size(model, model_z2, digits):
    fig = viz.latent_comparison([model, model_z2], n=4)
    assert [ax.get_title() for ax in fig.axes] == ["z = 2", "z = 4"]
    fig = viz.latent_comparison([model, model_z2], digits, mode="reconstructions", n=4)
    assert [ax.get_title() for ax in fig.axes] == ["data", "z = 2", "z = 4"]
    with pytest.raises(ValueError, match="needs data"):
        viz.latent_comparison([model], mode="reconstructions")


def test_latent_scatter_direct_projected_and_chosen(model, model_z2, digits):
    fig = viz.latent_scatter(model_z2, digits, n=100)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z[0]", "z[1]")
    assert ax.get_legend() is not None and len(ax.get_legend().get_texts()) == 10
    fig = viz.latent_scatter(model, digits, n=100)
    assert fig.axes[0].get_xlabel().startswith("PC1")
    fig = viz.latent_scatter(model, digits, n=100, dims=(2, 3))
    assert fig.axes[0].get_xlabel() == "z[2]"
    with pytest.raises(ValueError, match="umap-learn|unknown projection"):
        viz.latent_scatter(model, digits, n=50, method="nope")


def test_training_curves_panels_and_ssim(tmp_path):
    fig = viz.training_curves(fake_metrics())
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titles) == 4 and any("KL" in t for t in titles) and any("ELBO" in t for t in titles)
    assert "SSIM per epoch: not logged" in fig.get_supxlabel()
    kl_ax = next(ax for ax in fig.axes if "KL" in ax.get_title())
    labels = [line.get_label() for line in kl_ax.lines]
    assert "valid (epoch)" in labels and "train (epoch)" in labels
    fig = viz.training_curves(fake_metrics(ssim=True))
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert "SSIM per epoch (validation)" in titles
    with pytest.raises(ValueError, match="no training records"):
        viz.training_curves([])


def test_bound_curves_plot_images_seen_per_run_and_split(logged_runs, tmp_path):
    fig = viz.bound_curves(logged_runs)  # run folders
    ax = fig.axes[0]
    steps = np.array([40, 90, 140, 190], float)  # the epoch records of fake_metrics
    labels = ["z = 2, batch_size = 100", "z = 3, batch_size = 50"]
    lines = {line.get_label(): line for line in ax.lines}
    assert sorted(lines) == sorted(
        f"{lab} ({s})" for lab in labels for s in ("train", "validation")
    )
    for label, batch in zip(labels, (100, 50)):
        train, valid = lines[f"{label} (train)"], lines[f"{label} (validation)"]
        np.testing.assert_array_equal(train.get_xdata(), steps * batch)
        np.testing.assert_array_equal(valid.get_xdata(), steps * batch)
        assert (train.get_linestyle(), valid.get_linestyle()) == ("--", "-")
        assert train.get_color() == valid.get_color()
    assert lines[f"{labels[0]} (train)"].get_color() != lines[f"{labels[1]} (train)"].get_color()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [*labels, "train", "validation"]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "ELBO (nats / image)"
    assert ax.get_title() == "Lower bound vs training images seen: digits"
    assert_not_blank(viz.save_figure(fig, tmp_path / "bound.png"))
    # Loaded runs and explicit labels; one run is labelled by its folder name.
    from vaelab.runs import load_run

    fig = viz.bound_curves([load_run(p) for p in logged_runs], labels=["small", "large"])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()][:2] == ["small", "large"]
    fig = viz.bound_curves(logged_runs[:1])
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "a"
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        viz.bound_curves(logged_runs[:1], labels=["x", "y"])


def test_bound_curves_y_range_leaves_out_an_outlying_first_epoch(logged_runs, tmp_path):
    ax = viz.bound_curves(logged_runs).axes[0]
    assert ax.get_ylim()[0] < min(line.get_ydata().min() for line in ax.lines)
    elbos = [-500.0, -100.0, -95.0, -92.0, -90.0]  # the first epoch far below the rest
    records = [
        {"kind": "epoch", "split": s, "step": 10 * (i + 1), "epoch": i + 1, "elbo": v}
        for i, v in enumerate(elbos)
        for s in ("train", "valid")
    ]
    ax = viz.bound_curves([write_run(tmp_path / "outlier", records)]).axes[0]
    assert -500 < ax.get_ylim()[0] < -100 and ax.get_ylim()[1] > -90


def test_bound_curves_errors_name_the_run(logged_runs, tmp_path):
    steps_only = [r for r in fake_metrics() if r["kind"] == "step"]
    bare = write_run(tmp_path / "no-epochs", steps_only)
    with pytest.raises(ValueError, match=r"no-epochs: metrics.jsonl has no epoch records"):
        viz.bound_curves([logged_runs[0], bare])
    with pytest.raises(ValueError, match="run folders.*got a Linear"):
        viz.bound_curves([torch.nn.Linear(2, 2)])  # a model has no log


def test_plot_a_sweep_folder_draws_every_run(tmp_path, capsys):
    from vaelab.cli import main
    from vaelab.sweep import sweep_run_dirs

    sweep = tmp_path / "sweep"
    for z in (10, 2):  # natural order: latent_dim=2 before latent_dim=10
        write_run(sweep / f"latent_dim={z}_seed=0", fake_metrics(), latent_dim=z)
    assert main(["plot", str(sweep), "--kind", "bound-curves"]) == 0
    out = sweep / "figures" / "bound-curves.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert_not_blank(out)
    fig = viz.bound_curves(sweep_run_dirs(sweep))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()][:2] == ["z = 2", "z = 10"]
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--kind", "bound-curves"]) == 2
    assert "no run folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ pure pieces


def test_inverse_cdf_grid_maps_to_the_right_quantiles():
    from scipy.stats import norm

    q = viz.inverse_cdf_grid(7, 0.05, 0.95)
    np.testing.assert_allclose(norm.cdf(q), np.linspace(0.05, 0.95, 7), atol=1e-12)
    assert q[3] == pytest.approx(0.0, abs=1e-12)
    assert q[0] == pytest.approx(-1.6448536, abs=1e-6) and q[-1] == pytest.approx(1.6448536)
    np.testing.assert_allclose(q, -q[::-1], atol=1e-12)
    with pytest.raises(ValueError):
        viz.inverse_cdf_grid(5, 0.0, 0.9)
    z = viz.manifold_latents(3, 4, dims=(2, 0))
    assert z.shape == (3, 3, 4)
    q3 = viz.inverse_cdf_grid(3)
    np.testing.assert_allclose(z[0, :, 2], q3)  # columns: first axis grows to the right
    np.testing.assert_allclose(z[:, 0, 0], q3[::-1])  # rows: second axis grows upwards
    assert np.all(z[..., [1, 3]] == 0)
    plane = np.array([[1.0, 1.0, 0, 0], [0, 0, 1.0, -1.0]]) / np.sqrt(2)
    zp = viz.manifold_latents(3, 4, plane=plane)
    np.testing.assert_allclose(zp[1, 1], 0.0, atol=1e-12)
    np.testing.assert_allclose(zp[1, 2] @ plane[0], q3[2])


def test_slerp_and_lerp():
    z0, z1 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    t = np.linspace(0, 1, 5)
    s = viz.slerp(z0, z1, t)
    np.testing.assert_allclose(s[0], z0, atol=1e-12)
    np.testing.assert_allclose(s[-1], z1, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0)  # stays on the circle
    np.testing.assert_allclose(s[2], np.array([1, 1]) / np.sqrt(2))
    l = viz.lerp(z0, z1, t)
    np.testing.assert_allclose(l[2], [0.5, 0.5])
    np.testing.assert_allclose(viz.slerp(z0, 2 * z0, t), viz.lerp(z0, 2 * z0, t))  # parallel


def test_attribute_directions_recover_a_known_direction():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3000, 6))
    w = rng.standard_normal(6)
    w /= np.linalg.norm(w)
    margin = z @ w
    keep = np.abs(margin) > 0.1  # linearly separable with a margin
    z, margin = z[keep], margin[keep]
    u = np.zeros(6)
    u[0] = 1.0
    targets = np.stack([margin > 0, z[:, 0] > 0.5], 1)
    dirs = viz.fit_directions(z, targets, ["known", "axis"], seed=0)
    known = viz.find_direction(dirs, "known")
    assert known.accuracy > 0.99
    assert abs(known.baseline - 0.5) < 0.05
    assert known.direction @ w > 0.98
    assert np.linalg.norm(known.direction) == pytest.approx(1.0)
    assert known.gap > 0
    axis = viz.find_direction(dirs, "AXIS")
    assert axis.direction @ u > 0.98 and axis.accuracy > 0.98
    # Random labels: the probe is at chance, no better than the majority baseline.
    noise = viz.fit_directions(z, rng.random((len(z), 1)) < 0.5, ["noise"], seed=0)[0]
    assert noise.accuracy < 0.6
    with pytest.raises(ValueError, match="unknown attribute"):
        viz.find_direction(dirs, "Smiling")


def test_binary_attributes_from_classes_and_factors():
    class Info:
        num_classes, label_names, attribute_names = 3, ("0", "1", "2"), None

    names, y = viz.binary_attributes(np.array([0, 2, 1, 2]), Info())
    assert names == ["is digit 0", "is digit 1", "is digit 2"]
    np.testing.assert_array_equal(y[:, 2], [False, True, False, True])

    class Factors:
        attribute_names = ("color", "shape", "scale", "Smiling")

    labels = np.array([[0, 0, 0, -1], [0, 1, 5, 1], [0, 2, 3, 1], [0, 1, 1, -1]])
    names, y = viz.binary_attributes(labels, Factors())
    assert names == ["shape=0", "shape=1", "shape=2", "scale high", "Smiling"]
    np.testing.assert_array_equal(y[:, -1], [False, True, True, False])
    np.testing.assert_array_equal(y[:, 3], [False, True, True, False])  # above the median 2


def test_probe_on_digits_beats_the_baseline(model, digits):
    dirs = viz.probe_attributes(model, digits)
    assert len(dirs) == 10
    assert np.mean([d.accuracy for d in dirs]) > np.mean([d.baseline for d in dirs])
    assert all(d.n == len(digits.train) and d.n_test == len(digits.test) for d in dirs)


# ------------------------------------------------------------------------------ API and errors


def test_render_checks_inputs_and_options(model, digits):
    with pytest.raises(ValueError, match="needs data"):
        viz.render("reconstructions", model=model)
    with pytest.raises(ValueError, match="no option.*temperature"):
        viz.render("manifold", model=model, temperature=2.0)
    with pytest.raises(ValueError, match="unknown figure"):
        viz.render("nope", model=model)
    assert viz.output_suffix("traversal-animation") == ".gif"
    assert viz.output_suffix("manifold") == ".png"
    kinds = viz.applicable_figures(model, digits, fake_metrics())
    assert "latent-comparison" not in kinds and "attribute-accuracy" in kinds
    assert "training-curves" not in viz.applicable_figures(model, digits, [])
    assert set(viz.applicable_figures(model)) == {
        "manifold",
        "samples",
        "traversal",
        "traversal-animation",
    }


def test_figures_leave_the_model_mode_alone(model, digits):
    model.train()
    try:
        viz.reconstructions(model, digits, n=4)
        assert model.training
    finally:
        model.eval()


def test_import_vaelab_does_not_import_matplotlib():
    code = (
        "import sys, vaelab, vaelab.report, vaelab.cli, vaelab.cli.plot, vaelab.cli.report;"
        "vaelab.cli.build_parser();"
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ other data


def _with(data, images=None, labels=None, **info):
    """``data`` with its images and/or labels replaced (train and test), and info fields set."""
    from dataclasses import replace

    from vaelab.data import DataSplits, ImageSet

    new_info = replace(data.info, **info)

    def conv(s):
        return ImageSet(
            s.images if images is None else images(s.images),
            s.labels if labels is None else labels(s.labels),
            new_info,
        )

    return DataSplits(new_info, conv(data.train), conv(data.valid), conv(data.test))


def test_attribute_labels(model, digits):
    """(N, A) attribute labels, as CelebA's: probes per column, colouring by attribute."""

    def attrs(y):
        return torch.stack([(y % 2 == 0).long(), y, torch.zeros_like(y)], 1)

    data = _with(
        digits,
        labels=attrs,
        num_classes=None,
        label_names=None,
        attribute_names=("Even", "Value", "Constant"),
    )
    names = [d.name for d in viz.probe_attributes(model, data)]
    assert names == ["Even", "Value high"]
    fig = viz.render("attribute-traversal", model=model, data=data, attribute="even", steps=3)
    assert image_array(fig).shape == (9 + 1, 3 * 9 + 1)
    assert fig.axes[0].get_yticklabels()[0].get_text().startswith("Even (")
    fig = viz.latent_scatter(model, data, n=100, attribute="Even")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["Even=0", "Even=1"]
    with pytest.raises(ValueError, match="unknown attribute"):
        viz.latent_scatter(model, data, n=100, attribute="Smiling")
    assert "attribute-add" in viz.applicable_figures(model, data)
    unlabelled = _with(digits, labels=lambda y: None)
    assert not [k for k in viz.applicable_figures(model, unlabelled) if "attribute" in k]
    fig = viz.latent_scatter(model, unlabelled, n=50)
    assert fig.axes[0].get_legend() is None


def test_colour_images(digits, tmp_path):
    """Three-channel data: RGB grids (no grey colormap) and an RGB GIF."""
    rgb = _with(digits, images=lambda x: torch.cat([x, 255 - x, x // 2], 1), shape=(3, 8, 8))
    model = build_model(ModelConfig(latent_dim=3, hidden=(32,)), (3, 8, 8)).eval()
    fig = viz.reconstructions(model, rgb, n=8)
    assert image_array(fig).shape == (4 * 9 + 1, 4 * 9 + 1, 3)
    assert image_array(viz.samples(model, n=4)).shape[-1] == 3
    anim = viz.traversal_animation(model, rgb, steps=3)
    path = viz.save_figure(anim, tmp_path / "t.gif")
    im = Image.open(path)
    assert im.n_frames == 4
    colours = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(colours[..., 0] - colours[..., 1]).max() > 30  # not grey
