"""A character-level transformer language model on a text file, trained with importance-sampled SGD through
the library API, in your own training loop.

    python examples/char_lm.py                                # this repository's README.md, scored inline
    python examples/char_lm.py --text my.txt --workers 2      # two scoring worker processes
    python examples/char_lm.py --score last_layer             # cheaper scores: the output layer's gradient

An example is a window of ``--context`` characters (bytes: the vocabulary is the 256 byte values) and its
loss is the mean next-character cross-entropy over the window. Attention is written with nn.Linear
projections and F.scaled_dot_product_attention, which the scorer handles with its fast rules.

From the command line, the factories ``model`` and ``dataset`` below serve `issgd train` too:
``issgd train --model examples.char_lm:model --dataset examples.char_lm:dataset --steps 100`` (from the
repository root; the text is the README).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import issgd

README = Path(__file__).resolve().parent.parent / "README.md"
VOCAB = 256  # byte values


class TextWindows(Dataset):
    """Windows of ``context + 1`` bytes of a text, every ``stride`` bytes: item i is (bytes t..t+T-1, bytes
    t+1..t+T) as int64 tensors."""

    def __init__(self, path: str | Path, context: int = 64, stride: int | None = None):
        self.path = str(path)
        self.data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8).long()
        self.context, self.stride = context, stride or context
        if len(self.data) < context + 1:
            raise ValueError(f"{path}: {len(self.data)} bytes, fewer than --context + 1 = {context + 1}")

    def __len__(self) -> int:
        return (len(self.data) - self.context - 1) // self.stride + 1

    def __getitem__(self, i: int):
        start = i * self.stride
        chunk = self.data[start:start + self.context + 1]
        return chunk[:-1], chunk[1:]


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    def __init__(self, context: int = 64, d: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens):  # (B, T) -> logits (B, T, VOCAB)
        # Positions indexed per example ((B, T), not (T,)): every scored layer sees the batch in dim 0.
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.tok(tokens) + self.pos(positions)
        return self.head(self.ln(self.blocks(x)))


def sequence_loss(logits, targets):
    """Per-example loss, shape (B,): the mean next-character cross-entropy of each window."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


def model() -> CharLM:
    """Zero-argument factory (for `issgd train --model examples.char_lm:model`)."""
    return CharLM()


def dataset():
    """Zero-argument factory: (train, valid) windows of the README, its last tenth held out."""
    return split(TextWindows(README))


def split(windows: TextWindows, valid_fraction: float = 0.1):
    n_valid = max(1, int(len(windows) * valid_fraction))
    return (torch.utils.data.Subset(windows, range(len(windows) - n_valid)),
            torch.utils.data.Subset(windows, range(len(windows) - n_valid, len(windows))))


@torch.no_grad()
def sample_text(lm: CharLM, prompt: str, n: int, context: int) -> str:
    lm.eval()
    tokens = torch.tensor([list(prompt.encode())], dtype=torch.long)
    for _ in range(n):
        logits = lm(tokens[:, -context:])[:, -1]
        tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    lm.train()
    return bytes(tokens[0].tolist()).decode(errors="replace")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", default=str(README), help="text file to model")
    p.add_argument("--context", type=int, default=64, help="characters per example")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--score", choices=issgd.SIGNALS, default="grad_norm")
    p.add_argument("--workers", type=int, default=0, help="scoring worker processes (0: score inline)")
    p.add_argument("--refresh-every", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=256, help="examples scored inline per refresh")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train, valid = split(TextWindows(args.text, args.context, stride=args.context // 2))
    lm = CharLM(args.context, args.d_model, layers=args.layers)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=args.lr)
    print(f"{args.text}: {len(train)} training windows of {args.context} characters; "
          f"{sum(p.numel() for p in lm.parameters()):,} parameters; score={args.score}, workers={args.workers}")

    # Your own loop: the sampler yields batches with their weights 1/(N q_i) and keeps the weights fresh.
    started = time.perf_counter()
    with issgd.ImportanceSampler(lm, train, sequence_loss, batch_size=args.batch_size, score=args.score,
                                 workers=args.workers, refresh_every=args.refresh_every,
                                 chunk_size=args.chunk_size, seed=args.seed) as sampler:
        from tqdm import tqdm

        bar = tqdm(sampler.batches(args.steps), total=args.steps, disable=args.no_progress, desc="train")
        for step, batch in enumerate(bar):
            losses = sequence_loss(lm(batch.inputs), batch.targets)
            loss = batch.weighted_mean(losses)  # unbiased: mean of w_i * l_i
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(losses.detach().mean()):.3f}", refresh=False)
        stats = sampler.stats()
    seconds = time.perf_counter() - started

    lm.eval()
    with torch.no_grad():
        x, y = torch.utils.data.default_collate([valid[i] for i in range(len(valid))])
        valid_loss = float(sequence_loss(lm(x), y).mean())
    print(f"trained {args.steps} steps in {seconds:.1f} s; validation loss {valid_loss:.3f} nats/character"
          + (f"; workers scored {stats['scored_examples']} windows" if stats else ""))
    print("sample:", repr(sample_text(lm, "The ", 60, args.context)))


if __name__ == "__main__":  # required with workers: they are spawned processes, which import this file again
    main()
