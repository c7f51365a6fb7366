"""Data sets for the trainer: tensors in memory, images as (N, C, H, W) float32, labels int64.

* ``digits``    scikit-learn's bundled 8x8 digits (1797 images): the embedded default.
* ``mnist``     the official IDX files (``train-images-idx3-ubyte`` ... , optionally ``.gz``) in --data-dir.
* ``svhn``      the official cropped-digits ``train_32x32.mat`` / ``test_32x32.mat`` in --data-dir.
* ``synthetic`` a seeded Gaussian-mixture classification problem with label noise (no files).
* ``longtail``  a generated long-tailed mixture (no files): 30,000 examples in 64 dimensions (shaped
                1x8x8) from 1,000 Gaussian sub-clusters with Zipf sizes, each labelled with one of 10
                classes; the rarer a sub-cluster, the wider. Most examples lie in a few large, tight
                sub-clusters and are fitted early; the rest are few, spread out and hard, so
                per-example gradient norms stay heavy-tailed for the whole run. No label is flipped.
                The examples are the same for every seed (the seed picks the split); see ``_longtail``.

The validation split is a held-out 20 % of digits, synthetic and longtail, and the official test files
of mnist and svhn. Inputs are standardized with training-set statistics (per feature for digits,
synthetic and longtail, per channel for mnist and svhn). ``flatten=True`` gives the permutation-invariant
(N, C*H*W) view the paper's MLP uses.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "longtail", "mnist", "svhn", "synthetic")

MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
               "valid_images": "t10k-images-idx3-ubyte", "valid_labels": "t10k-labels-idx1-ubyte"}
SVHN_FILES = {"train": "train_32x32.mat", "valid": "test_32x32.mat"}


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    image_shape: tuple[int, int, int]  # (C, H, W) before any flattening
    classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> Dataset:
        return Dataset(self.name, self.x_train.to(device), self.y_train.to(device), self.x_valid.to(device),
                       self.y_valid.to(device), self.image_shape, self.classes)


def load_dataset(name: str, *, data_dir: str | Path | None = None, flatten: bool = True, seed: int = 0,
                 synthetic_size: int = 4096) -> Dataset:
    """Load one of DATASETS (see the module docstring). Raises FileNotFoundError naming the files
    expected for mnist / svhn, ValueError for an unknown name."""
    if name == "digits":
        x, y = _digits()
        data = _split_and_standardize(name, x, y, seed, per_channel=False)
    elif name == "synthetic":
        x, y = _synthetic(synthetic_size, seed)
        data = _split_and_standardize(name, x, y, seed, per_channel=False)
    elif name == "longtail":
        x, y = _longtail()
        data = _split_and_standardize(name, x, y, seed, per_channel=False)
    elif name == "mnist":
        root = _data_root(name, data_dir, list(MNIST_FILES.values()))
        x_tr, y_tr = _read_idx(root, MNIST_FILES["train_images"]), _read_idx(root, MNIST_FILES["train_labels"])
        x_va, y_va = _read_idx(root, MNIST_FILES["valid_images"]), _read_idx(root, MNIST_FILES["valid_labels"])
        data = _standardize(name, _images(x_tr[:, None]), _labels(y_tr), _images(x_va[:, None]), _labels(y_va))
    elif name == "svhn":
        root = _data_root(name, data_dir, list(SVHN_FILES.values()))
        data = _standardize(name, *_read_svhn(root / SVHN_FILES["train"]), *_read_svhn(root / SVHN_FILES["valid"]))
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if flatten:
        data.x_train, data.x_valid = data.x_train.flatten(1), data.x_valid.flatten(1)
    return data


def load_digits(seed: int = 0):
    """Flattened, standardized digits as (x_train, y_train, x_valid, y_valid)."""
    d = load_dataset("digits", seed=seed)
    return d.x_train, d.y_train, d.x_valid, d.y_valid


# ------------------------------------------------------------------------------------- sources
def _digits():
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError("the digits data set comes with scikit-learn: `pip install scikit-learn`") from exc
    data = sk_load_digits()
    return torch.tensor(data.images, dtype=torch.float32)[:, None], torch.tensor(data.target, dtype=torch.int64)


def _synthetic(n: int, seed: int, side: int = 8, classes: int = 10):
    """Class means of different spreads plus 5 % flipped labels: examples of very different
    difficulty, hence very different gradient norms (what importance sampling exploits)."""
    gen = torch.Generator().manual_seed(seed + 12345)
    d = side * side
    means = torch.randn(classes, d, generator=gen) * 1.5
    spread = torch.linspace(0.5, 2.5, classes)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = means[y] + torch.randn(n, d, generator=gen) * spread[y, None]
    flip = torch.rand(n, generator=gen) < 0.05
    y = torch.where(flip, torch.randint(0, classes, (n,), generator=gen), y)
    return x.reshape(n, 1, side, side), y


def _longtail(n: int = 30_000, clusters: int = 1_000, classes: int = 10, side: int = 8,
              sigma: tuple[float, float] = (0.5, 2.0), return_clusters: bool = False):
    """The ``longtail`` task. Sub-cluster c (c = 0 .. clusters-1, by decreasing size) has probability
    proportional to 1/(c+1) (Zipf, exponent 1), a mean drawn from N(0, I) in side*side dimensions, a
    label drawn uniformly from the classes, and standard deviation rising linearly from sigma[0] (the
    largest) to sigma[1] (the rarest). With these defaults the largest sub-cluster holds 13 % of the
    examples, half of all examples fall in the largest 24, and 610 sub-clusters have at most 10 examples
    each (12 % of the examples); the classes are imbalanced (6.2 % to 17.3 % of the examples). The
    generator's seed is fixed, so every run, whatever its seed, trains on the same examples.
    ``return_clusters=True`` also returns each example's sub-cluster."""
    gen = torch.Generator().manual_seed(20151120)
    d = side * side
    means = torch.randn(clusters, d, generator=gen)
    labels = torch.randint(0, classes, (clusters,), generator=gen)
    zipf = 1.0 / torch.arange(1, clusters + 1, dtype=torch.float64)
    cluster = torch.multinomial(zipf / zipf.sum(), n, replacement=True, generator=gen)
    spread = torch.linspace(sigma[0], sigma[1], clusters)
    x = means[cluster] + spread[cluster, None] * torch.randn(n, d, generator=gen)
    x, y = x.reshape(n, 1, side, side), labels[cluster]
    return (x, y, cluster) if return_clusters else (x, y)


def _data_root(name: str, data_dir, expected: list[str]) -> Path:
    hint = (f"--dataset {name} reads the official files from --data-dir: expected "
            + ", ".join(f"{f} (or {f}.gz)" if name == "mnist" else f for f in expected))
    if data_dir is None:
        raise FileNotFoundError(f"{hint}; no --data-dir was given")
    root = Path(data_dir)
    missing = [f for f in expected if not (root / f).exists() and not (root / f"{f}.gz").exists()]
    if missing:
        raise FileNotFoundError(f"{hint}; missing in {root}: {', '.join(missing)}")
    return root


def _read_idx(root: Path, stem: str) -> np.ndarray:
    """An IDX file (http://yann.lecun.com/exdb/mnist/): big-endian magic (0, 0, dtype code, ndim),
    ndim big-endian int32 sizes, then the data."""
    path = root / stem if (root / stem).exists() else root / f"{stem}.gz"
    raw = (gzip.decompress if path.suffix == ".gz" else bytes)(path.read_bytes())
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} = {int(np.prod(shape))} bytes, file holds {body.size}")
    return body.reshape(shape)


def _read_svhn(path: Path):
    from scipy.io import loadmat

    mat = loadmat(path)
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path} is not an SVHN cropped-digits .mat file (needs variables X and y)")
    x = np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1))  # (32, 32, 3, N) -> (N, 3, 32, 32)
    y = mat["y"].reshape(-1).astype(np.int64) % 10  # SVHN labels the digit 0 as 10
    return _images(x), torch.from_numpy(y)


def _images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32) / 255.0)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(y.astype(np.int64))


# ------------------------------------------------------------------------------ preprocessing
def _split_and_standardize(name, x, y, seed, per_channel, valid_fraction=0.2) -> Dataset:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_valid = int(len(x) * valid_fraction)
    return _standardize(name, x[n_valid:], y[n_valid:], x[:n_valid], y[:n_valid], per_channel)


def _standardize(name, x_train, y_train, x_valid, y_valid, per_channel=True) -> Dataset:
    dims = (0, 2, 3) if per_channel else (0,)
    mean = x_train.mean(dims, keepdim=True)
    std = x_train.std(dims, keepdim=True).clamp_min(1e-3)  # constant border pixels of digits
    classes = int(max(y_train.max(), y_valid.max())) + 1
    return Dataset(name, (x_train - mean) / std, y_train, (x_valid - mean) / std, y_valid,
                   tuple(x_train.shape[1:]), classes)
