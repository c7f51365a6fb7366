"""The models and batches the benchmarks score: one place for their shapes, on CPU and on CUDA.

Each Workload is a model, a batch size and an input maker; `field_workloads(device, quick)` lists
the ones `python -m benchmarks --only field` compares providers on.
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


def _images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32)


def field_workloads(device: torch.device, quick: bool) -> list[Workload]:
    """The models the providers are compared on. Batches as the paper and the brief give them; the
    transformer is narrow on CPU (d = 64) and B*T is held constant over T so each row moves similar data."""
    gpu = device.type == "cuda"
    out = [Workload("paper MLP 3072-2048x4-10", paper_mlp, b, lambda b: torch.randn(b, 3072), "3072")
           for b in (128, 2048)]  # 128: the master's batch; 2048: a scoring worker's chunk
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
