"""Feature networks: the cached FD-LeNet trained on a labeled dataset, and the FID Inception
loader's file handling (no network here: a missing file must give a clear error)."""

import json

import pytest
import torch

from vaelab.data import load_dataset
from vaelab.metrics import MetricUnavailable, inception
from vaelab.metrics import features as feats


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def one_thread():
    """Tiny convolutions run faster (and steadier on a busy machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lenet_is_trained_once_cached_and_verified(digits, tmp_path, monkeypatch, one_thread):
    net = feats.lenet_feature_net(digits, tmp_path, min_steps=150)
    weights, meta = feats.lenet_paths(digits, tmp_path)
    assert weights.is_file() and weights.parent.name == "vaelab-features"
    facts = json.loads(meta.read_text())
    assert facts["test_accuracy"] > 0.8 and facts["dataset"] == "digits"
    assert net.key == "fd_lenet" and net.display == "FD-LeNet" and not net.comparable
    assert "not FID" in net.notes()[0]
    x = digits.test.to_float(digits.test.images[:5])
    f = net(x)
    assert f.shape == (5, feats.LENET_FEATURES)

    # The second call loads the cache: same features, no training.
    monkeypatch.setattr(feats, "train_lenet", lambda *a, **k: pytest.fail("retrained"))
    again = feats.lenet_feature_net(digits, tmp_path)
    assert torch.allclose(again(x), f)

    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        feats.lenet_feature_net(digits, tmp_path)


def test_lenet_needs_labels(digits):
    unlabeled = type(digits)(
        digits.info,
        digits.train.__class__(digits.train.images, None, digits.info),
        digits.valid,
        digits.test,
    )
    with pytest.raises(MetricUnavailable, match="no labels"):
        feats.lenet_feature_net(unlabeled, "/nonexistent")


def test_unknown_feature_net(digits):
    with pytest.raises(ValueError, match="lenet"):
        feats.resolve_feature_net("resnet", digits)


# ---------------------------------------------------------------------------- Inception


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    """An empty data dir and torch hub dir, offline."""
    monkeypatch.setenv("VAELAB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "data"


def test_missing_inception_weights_give_a_clear_error(no_cache):
    with pytest.raises(FileNotFoundError) as err:
        inception.find_weights(data_dir=no_cache)
    msg = str(err.value)
    assert inception.WEIGHTS_NAME in msg and inception.WEIGHTS_SHA256 in msg
    assert inception.WEIGHTS_URL in msg and "lenet" in msg
    with pytest.raises(FileNotFoundError, match="do not exist"):
        inception.find_weights(no_cache / "nope.pth")


def test_inception_weights_with_another_sha256_are_refused(no_cache):
    path = no_cache / "vaelab-features" / inception.WEIGHTS_NAME
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="sha256"):
        inception.find_weights(data_dir=no_cache)


def test_fid_inception_loads_a_pytorch_fid_state_dict(tmp_path):
    net = inception.FIDInceptionV3()
    # 21,785,568 = torchvision's Inception-v3 without aux head (23,834,568) minus its fc.
    assert sum(p.numel() for p in net.parameters()) == 21_785_568
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.zeros(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, tmp_path / "w.pth")
    loaded = inception.load_fid_inception(tmp_path / "w.pth")
    assert torch.equal(
        loaded.Mixed_7c.branch_pool.conv.weight, net.Mixed_7c.branch_pool.conv.weight
    )
    del state["Mixed_6e.branch7x7_2.bn.running_var"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing"):
        inception.load_fid_inception(tmp_path / "bad.pth")


def test_fid_inception_features_shape(one_thread):
    net = inception.FIDInceptionV3().eval()
    with torch.inference_mode():
        assert net(torch.rand(1, 1, 28, 28)).shape == (1, 2048)
