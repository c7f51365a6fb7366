"""A small CNN on a folder of image files, trained with importance-sampled SGD by ``issgd.fit``.

    python examples/image_folder_cnn.py --make-data runs/shapes      # writes a folder of PNGs, then trains
    python examples/image_folder_cnn.py --data runs/shapes --workers 2 --score last_layer

The folder holds one sub-folder per class (``root/<class>/<image>.png``, the ImageFolder layout); images are
read with PIL, converted to RGB and resized to ``--size`` pixels square. ``--make-data DIR`` first writes a
data set of that layout: coloured discs, squares and triangles of random size and place on noisy
backgrounds, a few of them mislabelled (hard examples are what importance sampling finds).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset

import issgd

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SHAPES = ("disc", "square", "triangle")


class ImageFolder(Dataset):
    """(image, class) items of ``root/<class>/<file>``: images as float32 (3, size, size) tensors in [-1, 1]."""

    def __init__(self, root: str | Path, size: int = 32, files: list | None = None):
        self.root, self.size = Path(root), size
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir()) if self.root.is_dir() else []
        if not self.classes:
            raise FileNotFoundError(f"{root}: expected one sub-folder of images per class (root/<class>/<image>.png)")
        self.files = files if files is not None else [
            (path, label) for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir()) if path.suffix.lower() in EXTENSIONS]
        if not self.files:
            raise FileNotFoundError(f"{root}: no image files ({', '.join(EXTENSIONS)}) in its class folders")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize((self.size, self.size)), dtype=np.float32)
        return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0, label

    def split(self, valid_fraction: float = 0.2, seed: int = 0) -> tuple[ImageFolder, ImageFolder]:
        files = list(self.files)
        random.Random(seed).shuffle(files)
        n_valid = max(1, int(len(files) * valid_fraction))
        return (ImageFolder(self.root, self.size, files[n_valid:]), ImageFolder(self.root, self.size, files[:n_valid]))


def small_cnn(classes: int, width: int = 16) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(2 * width, classes))


def make_shapes(root: str | Path, per_class: int = 200, size: int = 32, noise: float = 0.05, seed: int = 0) -> Path:
    """Writes root/<shape>/<i>.png: a shape of random colour, size and place on a noisy background, with a
    fraction ``noise`` of the images put in a wrong class folder."""
    rng = random.Random(seed)
    root = Path(root)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
    for shape in SHAPES:
        for i in range(per_class):
            background = tuple(rng.randrange(0, 120) for _ in range(3))
            image = Image.new("RGB", (size, size), background)
            pixels = np.asarray(image, dtype=np.int16) + np.random.default_rng(rng.randrange(2**31)).integers(
                -30, 31, (size, size, 3))
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(image)
            r = rng.uniform(0.15, 0.4) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            colour = tuple(rng.randrange(120, 256) for _ in range(3))
            if shape == "disc":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
            elif shape == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            label = rng.choice(SHAPES) if rng.random() < noise else shape
            image.save(root / label / f"{shape}-{i:05d}.png")
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", help="image folder: one sub-folder per class")
    where.add_argument("--make-data", metavar="DIR", help="write a generated image folder to DIR, then train on it")
    p.add_argument("--per-class", type=int, default=400, help="images per class written by --make-data")
    p.add_argument("--size", type=int, default=32, help="images are resized to size x size")
    p.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--score", choices=issgd.SIGNALS, default="grad_norm")
    p.add_argument("--workers", type=int, default=0, help="scoring worker processes (0: score inline)")
    p.add_argument("--refresh-every", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=256, help="examples scored inline per refresh")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    root = make_shapes(args.make_data, args.per_class, args.size, seed=args.seed) if args.make_data else args.data
    train, valid = ImageFolder(root, args.size).split(seed=args.seed)
    torch.manual_seed(args.seed)
    model = small_cnn(len(train.classes), args.width)
    print(f"{root}: {len(train)} training / {len(valid)} validation images of {len(train.classes)} classes "
          f"({', '.join(train.classes)}); score={args.score}, workers={args.workers}")

    result = issgd.fit(model, train, nn.CrossEntropyLoss(reduction="none"),
                       torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
                       steps=args.steps, batch_size=args.batch_size, score=args.score, workers=args.workers,
                       refresh_every=args.refresh_every, chunk_size=args.chunk_size, seed=args.seed,
                       progress=not args.no_progress)

    x, y = torch.utils.data.default_collate([valid[i] for i in range(len(valid))])
    model.eval()
    with torch.no_grad():
        error = float((model(x).argmax(1) != y).float().mean())
    last = result.losses[-20:]
    print(f"trained {result.steps} steps in {result.seconds:.1f} s: training loss {sum(last) / len(last):.3f} "
          f"(the last {len(last)} batches' unbiased estimates), validation error {error:.3f}"
          + (f"; workers scored {result.scoring['scored_examples']} images" if result.scoring else ""))


if __name__ == "__main__":  # required with workers: they are spawned processes, which import this file again
    main()
