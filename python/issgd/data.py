"""Data sets for the trainer. `digits` ships with scikit-learn: the embedded default."""
from __future__ import annotations

import torch


def load_digits(seed: int = 0, valid_fraction: float = 0.2):
    """scikit-learn's 8x8 digits (1797 x 64, 10 classes), standardized, split train/valid.

    Returns (x_train, y_train, x_valid, y_valid) as float32 / int64 tensors.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError("the digits data set comes with scikit-learn: `pip install scikit-learn`") from exc
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_valid = int(len(x) * valid_fraction)
    x_train, y_train, x_valid, y_valid = x[n_valid:], y[n_valid:], x[:n_valid], y[:n_valid]
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-3)
    return (x_train - mean) / std, y_train, (x_valid - mean) / std, y_valid
