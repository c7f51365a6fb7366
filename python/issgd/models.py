"""Models used by the trainer, the demo and the benchmarks."""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

MODELS = ("mlp", "cnn")


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


def cnn(image_shape: Sequence[int], classes: int, channels: Sequence[int] = (32, 64, 64)) -> nn.Sequential:
    """3x3 convolutions (stride 1, then stride 2) with ReLU, then a Linear classifier on the
    flattened feature map. Every layer has a per-example norm rule, so the whole model is scored."""
    c, h, w = image_shape
    layers = []
    for i, width in enumerate(channels):
        stride = 1 if i == 0 else 2
        layers += [nn.Conv2d(c, width, 3, stride=stride, padding=1), nn.ReLU()]
        c, h, w = width, math.ceil(h / stride), math.ceil(w / stride)
    layers += [nn.Flatten(), nn.Linear(c * h * w, classes)]
    return nn.Sequential(*layers)


def build_model(name: str, image_shape: Sequence[int], classes: int, hidden: Sequence[int] = (256, 256)) -> nn.Module:
    """``mlp`` on flattened inputs (widths ``hidden``) or ``cnn`` on (C, H, W) images."""
    if name == "mlp":
        return mlp(math.prod(image_shape), hidden, classes)
    if name == "cnn":
        return cnn(image_shape, classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
