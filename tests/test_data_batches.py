"""BatchIterator: coverage, fresh shuffles, determinism per (seed, epoch), resume, binarization."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vaelab.data import BatchIterator, DataInfo, ImageSet, binarized_info, mean_image, to_float

INFO = DataInfo("toy", (1, 4, 4), "8bit", 10)


def toy(n: int = 103) -> ImageSet:
    """Image i holds the value i % 256 everywhere, so a batch tells which images it holds."""
    images = (
        (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    )
    return ImageSet(images, torch.arange(n) % 10, INFO)


def ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0, 0, 0] * 255).round().long().tolist()


def test_each_epoch_covers_every_image_once_in_a_fresh_order():
    it = BatchIterator(toy(), 10, seed=3)
    assert len(it) == 11
    epochs = [[i for b in it.epoch(e) for i in ids(b)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(103))
    assert epochs[0] != epochs[1] != epochs[2]
    assert [i for b in it.epoch(1) for i in ids(b)] == epochs[1]  # pure function of (seed, epoch)
    other = BatchIterator(toy(), 10, seed=4)
    assert [i for b in other.epoch(1) for i in ids(b)] != epochs[1]


def test_resume_from_start_batch_reproduces_the_rest_of_the_epoch():
    data = replace(INFO, name="toy-dynamic")
    it = BatchIterator(toy().with_info(binarized_info(data, "dynamic")), 8, seed=11)
    full = list(it.epoch(5))
    resumed = list(BatchIterator(it.data, 8, seed=11).epoch(5, start_batch=7))
    assert len(resumed) == len(full) - 7
    for a, b in zip(full[7:], resumed, strict=True):
        assert torch.equal(a, b)  # same images and the same Bernoulli draws


def test_drop_last_labels_and_no_shuffle():
    it = BatchIterator(toy(), 10, shuffle=False, drop_last=True, with_labels=True)
    batches = list(it.epoch(0))
    assert len(it) == len(batches) == 10
    x, y = batches[2]
    assert x.shape == (10, 1, 4, 4) and x.dtype == torch.float32
    assert ids(x) == list(range(20, 30)) and y.tolist() == [i % 10 for i in range(20, 30)]
    unlabeled = ImageSet(toy().images, None, INFO)
    assert next(iter(BatchIterator(unlabeled, 5, with_labels=True)))[1] is None


def test_iter_counts_epochs_up():
    it = BatchIterator(toy(), 50, seed=1)
    first = [ids(b) for b in it]
    second = [ids(b) for b in it]
    assert first == [ids(b) for b in it.epoch(0)] and second == [ids(b) for b in it.epoch(1)]


def test_dynamic_binarization_is_fresh_each_epoch_with_the_right_mean():
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (2000, 1, 8, 8), generator=g, dtype=torch.uint8)
    info = binarized_info(DataInfo("grey", (1, 8, 8), "8bit"), "dynamic")
    it = BatchIterator(ImageSet(grey, None, info), 500, shuffle=False, seed=0)
    e0 = torch.cat(list(it.epoch(0)))
    e1 = torch.cat(list(it.epoch(1)))
    assert set(e0.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(e0, e1)
    target = grey.double().mean().item() / 255
    assert e0.double().mean().item() == pytest.approx(target, abs=0.005)  # 128k draws: sd 0.0014
    per_pixel = ((e0.double() + e1.double()) / 2).flatten()
    corr = torch.corrcoef(torch.stack([per_pixel, grey.double().flatten()]))[0, 1]
    assert corr > 0.6  # each pixel is drawn from its own grey level (expected corr 0.71)
    assert torch.equal(e0, torch.cat(list(it.epoch(0))))


def test_to_float_for_each_value_kind():
    x = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).view(1, 1, 2, 2)
    grey = DataInfo("g", (1, 2, 2), "8bit")
    assert torch.allclose(to_float(x, grey).flatten(), torch.tensor([0, 127, 128, 255]) / 255)
    thr = to_float(x, binarized_info(grey, "threshold")).flatten()
    assert thr.tolist() == [0.0, 0.0, 1.0, 1.0]
    static = DataInfo("s", (1, 2, 2), "binary", binarization="static")
    assert to_float(x.clamp(max=1), static).flatten().tolist() == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_on_cuda_match_cpu_order():
    cpu = BatchIterator(toy(), 16, seed=2)
    gpu = BatchIterator(toy(), 16, seed=2, device="cuda")
    assert gpu._images.device.type == "cuda"
    for a, b in zip(cpu.epoch(3), gpu.epoch(3), strict=True):
        assert b.device.type == "cuda" and torch.equal(a, b.cpu())


def test_mean_image_is_the_expected_training_image():
    """Grey levels: the mean of x / 255; dynamic binarization: the same expectation, with no
    random draws (the global RNG is untouched); threshold: the mean of the 0/1 images; a
    cap on images reads evenly spaced ones."""
    data = toy(103)  # image i is i / 255 everywhere
    expect = torch.arange(103, dtype=torch.float64).mean() / 255
    got = mean_image(data)
    assert got.shape == (1, 4, 4) and got.dtype == torch.float64
    assert torch.allclose(got, expect.expand(1, 4, 4))
    state = torch.random.get_rng_state()
    dyn = ImageSet(data.images, None, binarized_info(INFO, "dynamic"))
    assert torch.allclose(mean_image(dyn), got)
    assert torch.equal(torch.random.get_rng_state(), state)
    bright = ImageSet(data.images * 2, None, binarized_info(INFO, "threshold"))  # 2i > 127.5
    assert torch.allclose(mean_image(bright), torch.full((1, 4, 4), 39 / 103, dtype=torch.float64))
    assert torch.allclose(
        mean_image(data, max_images=3), torch.full((1, 4, 4), 51 / 255.0, dtype=torch.float64)
    )
    assert torch.allclose(mean_image(data, max_images=50, chunk=7), mean_image(data, max_images=50))
    with pytest.raises(ValueError, match="empty"):
        mean_image(data.subset(slice(0, 0)))
