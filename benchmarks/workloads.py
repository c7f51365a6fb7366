"""Every workload and shape set the benchmarks run, in one place, on CPU and on CUDA: both
`python -m benchmarks` and the pytest-benchmark files (benchmarks/bench_*.py) take their cases from here.

A Workload is a model, a batch size and an input maker. `field_workloads` lists the models the
`field` group compares providers on, `scorer_workloads` those of the `scorer` group; `linear_shapes`,
`conv_shapes` and `sampler_sizes` are the op-level cases of the `linear`, `conv` and `sampler` groups.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from issgd.models import paper_mlp
from torch import nn

CLASSES = 10


# --------------------------------------------------------------------------------------- models
class TokenMLP(nn.Module):
    """A sequence model made of 3-D Linear layers: embed, two residual MLP blocks, mean-pool, head."""

    def __init__(self, d_in: int = 64, d: int = 256, hidden: int = 1024, classes: int = CLASSES, blocks: int = 2):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                                    for _ in range(blocks))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.mean(1))


def cnn(classes: int = CLASSES) -> nn.Sequential:
    """Conv2d 3 -> 32 -> 64 -> 64 on 32x32 images (CIFAR-sized), max-pooling between, a Linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 8 * 8, classes))


def grouped_cnn(classes: int = CLASSES) -> nn.Sequential:
    """A MobileNet-style net on 32x32 images: a depthwise conv (groups = channels), a 1x1 conv and a
    strided grouped conv (groups = 4), the layers whose per-example norms must be summed per group."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
        nn.Conv2d(32, 64, 1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


class TransformerBlock(nn.Module):
    """Token embedding, one pre-LayerNorm block (attention with its projections as nn.Linear, an MLP),
    mean-pool, classifier. No positional encoding: it changes nothing about the cost measured, and a
    position table would be a parameter that no layer sees batch-first."""

    def __init__(self, vocab: int, d: int, heads: int, hidden: int, classes: int = CLASSES):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.embed(tokens)
        B, T, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(B, T, d))
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


# ------------------------------------------------------------------------------------ workloads
@dataclass(frozen=True)
class Workload:
    name: str
    model: Callable[[], nn.Module]
    batch: int
    inputs: Callable[[int], torch.Tensor]  # batch -> inputs (targets are random classes)
    shape: str  # one example's input, for the tables

    def make(self, device: torch.device, seed: int = 0):
        """(model, inputs, targets) on `device`, the same for every provider."""
        torch.manual_seed(seed)
        model = self.model().to(device)
        return model, self.inputs(self.batch).to(device), torch.randint(0, CLASSES, (self.batch,)).to(device)


def _vectors(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3072)


def _images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32)


def _paper_mlp(batch: int) -> Workload:
    return Workload("paper MLP 3072-2048x4-10", paper_mlp, batch, _vectors, "3072")


def field_workloads(device: torch.device, quick: bool) -> list[Workload]:
    """The models the providers are compared on. Batches as the paper and the brief give them; the
    transformer is narrow on CPU (d = 64) and B*T is held constant over T so each row moves similar data."""
    gpu = device.type == "cuda"
    out = [_paper_mlp(b) for b in (128, 2048)]  # 128: the master's batch; 2048: a scoring worker's chunk
    out += [Workload("CNN conv 3-32-64-64", cnn, b, _images, "3x32x32") for b in (64, 256)]
    vocab, d, heads, hidden = (8192, 256, 4, 1024) if gpu else (1024, 64, 4, 256)
    tokens_per_batch = 32768 if gpu else 4096
    for T in (128, 512, 2048):
        out.append(Workload(f"transformer block d{d} T{T}", lambda: TransformerBlock(vocab, d, heads, hidden),
                            max(2, tokens_per_batch // T), lambda b, T=T: torch.randint(0, vocab, (b, T)),
                            f"T={T} tokens"))
    out += [Workload("grouped/depthwise CNN", grouped_cnn, b, _images, "3x32x32")
            for b in ((64,) if quick and not gpu else (64, 256))]
    return out


@dataclass(frozen=True)
class ScorerWorkload:
    """A workload of the `scorer` group, with the vmap chunk and the number of examples the naive
    providers (vmap, per-example loop) are timed on: their cost per example does not depend on the batch."""
    workload: Workload
    vmap_chunk: int
    naive_examples: int


def scorer_workloads(device: torch.device, quick: bool) -> list[ScorerWorkload]:
    naive = 32 if quick else 64  # the naive providers cost ~0.2 s per paper-MLP example on 2 cores
    out = [ScorerWorkload(_paper_mlp(512), 16, naive)]
    if not quick:
        out.append(ScorerWorkload(_paper_mlp(128), 16, naive))
    token = Workload("token MLP d256 T128", TokenMLP, 32, lambda b: torch.randn(b, 128, 64), "T=128 x 64")
    return out + [ScorerWorkload(token, 8, 32)]


# ---------------------------------------------------------------------------------- op-level cases
def linear_shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int, int]]:
    """(B, T, d_in, d_out) of linear_grad_sq_norms: roughly constant B*T so every row moves similar bytes."""
    d = 1024 if device.type == "cuda" else 256
    big = device.type == "cuda"
    out = []
    for T, B in ((1, 65536 if big else 8192), (64, 1024 if big else 64), (512, 128 if big else 16),
                 (2048, 32 if big else 4)):
        if quick and T == 2048 and not big:
            continue
        out.append((B, T, d, d))
    return out


def conv_shapes(device: torch.device, quick: bool) -> list[tuple[str, tuple[int, ...], int, int, dict]]:
    """(name, x shape, C_out, kernel size, F.convNd arguments): a CNN's layers, and the grouped kinds."""
    B = 256 if device.type == "cuda" else 32
    out = [("2-D 3x3", (B, 64, 32, 32), 64, 3, {"padding": 1}),
           ("2-D 3x3 stride 2", (B, 64, 32, 32), 128, 3, {"stride": 2, "padding": 1}),
           ("2-D depthwise 3x3", (B, 128, 16, 16), 128, 3, {"padding": 1, "groups": 128}),
           ("2-D grouped 3x3 g=4", (B, 64, 16, 16), 64, 3, {"padding": 1, "groups": 4}),
           ("1-D k=5", (B, 32, 512), 32, 5, {"padding": 2})]
    if not quick:
        out.append(("3-D 3x3x3", (B // 4, 16, 8, 16, 16), 16, 3, {"padding": 1}))
    return out


def sampler_sizes(device: torch.device, quick: bool) -> list[int]:
    """N (categories) of the sampler group; 1e8 on GPUs only."""
    if quick:
        return [10**5, 10**6]
    return [10**5, 10**6, 10**7] + ([10**8] if device.type == "cuda" else [])


def sampler_weights(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Gradient-norm-like weights: heavy-tailed, plus the smoothing constant ISSGD adds."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) ** 4 + 0.01).to(device)
