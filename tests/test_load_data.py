"""The data section of a config reaches the loader (subsets of every split)."""

from vaelab.config import load_preset, override
from vaelab.train import load_data


def test_subsets_of_every_split_reach_the_loader():
    cfg = override(
        load_preset("quickstart"),
        ["data.subset_train=300", "data.subset_valid=50", "data.subset_test=40"],
    )
    data = load_data(cfg)
    assert (len(data.train), len(data.valid), len(data.test)) == (300, 50, 40)
