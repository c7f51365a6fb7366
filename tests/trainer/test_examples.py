"""The examples run as scripts on tiny settings, scoring inline and with two spawned workers."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(script: str, *args, cwd) -> str:
    # One thread: tiny models gain nothing from a second, and on a loaded machine OpenMP's waiting threads
    # slow them down many times over.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")]), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args), "--no-progress"], cwd=cwd,
                          capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def write_pngs(root: Path, per_class: int = 12, size: int = 12) -> Path:
    """Two classes of PNG files told apart by their brightness."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, base in (("dark", 40), ("light", 200)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(base + rng.integers(-40, 41, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_cnn(tmp_path, workers):
    root = write_pngs(tmp_path / "images")
    out = run_example("image_folder_cnn.py", "--data", root, "--size", 12, "--width", 4, "--steps", 40,
                      "--batch-size", 8, "--chunk-size", 8, "--refresh-every", 4, "--workers", workers, cwd=tmp_path)
    assert "20 training / 4 validation images of 2 classes (dark, light)" in out
    error = float(re.search(r"validation error ([\d.]+)", out).group(1))
    assert error <= 0.2, out  # brightness is easy to learn
    assert ("workers scored" in out) == bool(workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_char_lm(tmp_path, workers):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 80)
    out = run_example("char_lm.py", "--text", text, "--context", 16, "--d-model", 16, "--layers", 1, "--steps", 60,
                      "--batch-size", 16, "--chunk-size", 32, "--refresh-every", 4, "--lr", 0.01, "--workers", workers,
                      cwd=tmp_path)
    loss = float(re.search(r"validation loss ([\d.]+) nats/character", out).group(1))
    assert loss < 3.0, out  # log(256) = 5.5 untrained; a repeated sentence is quickly learned
    assert ("workers scored" in out) == bool(workers)
