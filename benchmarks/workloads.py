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


class _Conv1D(nn.Module):
    """GPT-2's Conv1D (Hugging Face transformers): a Linear with the weight transposed, a third-party layer
    the scorer has no rule for (it goes through the exact fallback)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class _GPTBlock(nn.Module):
    """A GPT-2 block (pre-LayerNorm, causal self-attention with a fused qkv projection, 4x MLP)."""

    def __init__(self, d: int, heads: int, linear=nn.Linear):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        if linear is nn.Linear:
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        else:
            self.c_attn, self.c_proj = linear(3 * d, d), linear(d, d)
            self.mlp = nn.Sequential(linear(4 * d, d), nn.GELU(approximate="tanh"), linear(d, 4 * d))

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.ln_2(x))


class GPT2Stack(nn.Module):
    """GPT-2-small-shaped: token embedding, learned positions (a bare parameter, as in nanoGPT's wpe table
    sliced to T), `layers` of GPT-2 small's 12 blocks (d 768, 12 heads), final LayerNorm, a classifier on
    the mean token (the benchmarks' loss is per-example cross-entropy over classes)."""

    def __init__(self, vocab: int = 50257, d: int = 768, heads: int = 12, layers: int = 2, max_T: int = 1024,
                 classes: int = CLASSES, linear=nn.Linear):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Parameter(torch.randn(max_T, d) * 0.01)
        self.h = nn.ModuleList(_GPTBlock(d, heads, linear) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe[:idx.shape[1]]
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x).mean(1))


class ViT(nn.Module):
    """ViT-tiny-shaped: 16x16 patches of 224x224 images by a Conv2d, class token and positions as bare
    parameters, `depth` of ViT-Ti's 12 nn.TransformerEncoder layers (d 192, 3 heads, MLP 768, pre-norm,
    GELU), a head on the class token."""

    def __init__(self, depth: int = 4, d: int = 192, heads: int = 3, image: int = 224, patch: int = 16,
                 classes: int = CLASSES):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


class LSTMClassifier(nn.Module):
    """Token embedding, a 2-layer LSTM (batch_first), a classifier on the last hidden state."""

    def __init__(self, vocab: int = 10000, d: int = 256, hidden: int = 512, layers: int = 2, classes: int = CLASSES):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        _, (h_n, _) = self.lstm(self.embed(tokens))
        return self.head(h_n[-1])


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


def model_workloads(device: torch.device, quick: bool) -> list[Workload]:
    """The models people train, at real widths (depth cut on CPU, where every provider of the `field`
    group is run on them): GPT-2-small-shaped blocks at a short and a long T, a ViT-tiny-shaped model,
    an LSTM, and GPT-2 blocks made of its third-party Conv1D layer (the scorer's exact fallback)."""
    gpu = device.type == "cuda"
    layers, depth = (12, 12) if gpu else (2, 4)
    out = []
    for T, batch in ((128, 32 if gpu else 8), (1024, 8 if gpu else 2)):
        if quick and T == 1024:
            continue
        out.append(Workload(f"GPT-2-small-shaped, {layers} blocks, T{T}", lambda layers=layers: GPT2Stack(layers=layers),
                            batch, lambda b, T=T: torch.randint(0, 50257, (b, T)), f"T={T} tokens"))
    out.append(Workload(f"ViT-tiny-shaped, {depth} layers", lambda: ViT(depth=depth), 64 if gpu else 8,
                        lambda b: torch.randn(b, 3, 224, 224), "3x224x224"))
    out.append(Workload("LSTM 2x512 T64", LSTMClassifier, 128 if gpu else 32,
                        lambda b: torch.randint(0, 10000, (b, 64)), "T=64 tokens"))
    out.append(Workload("GPT-2 Conv1D blocks (fallback), T128", lambda: GPT2Stack(vocab=8192, d=256, heads=4,
                                                                                layers=2, linear=_Conv1D),
                        16, lambda b: torch.randint(0, 8192, (b, 128)), "T=128 tokens"))
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
