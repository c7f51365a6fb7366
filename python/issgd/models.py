"""Models used by the trainer, the demo and the benchmarks."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(d_in: int, widths: Sequence[int], classes: int) -> nn.Sequential:
    """Linear -> ReLU blocks then a Linear classifier."""
    layers, d = [], d_in
    for width in widths:
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def paper_mlp(d_in: int = 3072, classes: int = 10) -> nn.Sequential:
    """The permutation-invariant SVHN MLP of Alain et al. (2015): 3072 -> 2048 x 4 -> 10, ReLU."""
    return mlp(d_in, [2048] * 4, classes)
