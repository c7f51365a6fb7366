"""The generated `longtail` data set: deterministic, the documented shape and long tail."""
import torch

from issgd.data import DATASETS, _longtail, load_dataset


def test_longtail_is_deterministic_with_the_documented_shape():
    assert "longtail" in DATASETS
    a, b = load_dataset("longtail", flatten=False), load_dataset("longtail", flatten=False)
    for x, y in ((a.x_train, b.x_train), (a.y_train, b.y_train), (a.x_valid, b.x_valid), (a.y_valid, b.y_valid)):
        assert torch.equal(x, y)
    assert a.x_train.shape == (24_000, 1, 8, 8) and a.x_valid.shape == (6_000, 1, 8, 8)
    assert a.image_shape == (1, 8, 8) and a.classes == 10
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert load_dataset("longtail").x_train.shape == (24_000, 64)


def test_longtail_examples_are_the_same_for_every_seed_and_the_split_is_not():
    x, y = _longtail()
    x2, y2 = _longtail()
    assert torch.equal(x, x2) and torch.equal(y, y2)
    one, other = load_dataset("longtail", seed=0), load_dataset("longtail", seed=1)
    counts = [torch.bincount(torch.cat([d.y_train, d.y_valid]), minlength=10) for d in (one, other)]
    assert torch.equal(counts[0], counts[1]) and torch.equal(counts[0], torch.bincount(y, minlength=10))
    assert not torch.equal(one.y_valid, other.y_valid)


def test_longtail_has_the_documented_long_tail():
    # What the docstring of _longtail says: the largest sub-cluster holds 13 % of the examples, half of
    # them fall in the largest 24 sub-clusters, and the classes hold 6.2 % to 17.3 % each.
    _, y, cluster = _longtail(return_clusters=True)
    sizes = torch.bincount(cluster, minlength=1000)
    assert round(float(sizes[0]) / 30_000, 2) == 0.13
    assert int((sizes.cumsum(0) < 15_000).sum()) + 1 == 24
    assert int((sizes <= 10).sum()) == 610
    share = torch.bincount(y, minlength=10).double() / 30_000
    assert round(float(share.min()), 3) == 0.062 and round(float(share.max()), 3) == 0.173
