"""The package layout's promises: one-way imports with no cycles, every module importable on its own, the
public API where users find it."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import isgd_kernels

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """pyproject's [tool.importlinter] contracts: layers (trainer -> scorer -> rules -> ops -> kernels ->
    references) and no cycle among the modules of any package."""
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports not found: `pip install import-linter` (scripts/install.sh does)")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.parametrize("module", ["isgd_kernels.scorer.rules.conv", "isgd_kernels.alias.sampler",
                                    "issgd.distributed", "issgd.job", "issgd.sampler", "issgd.fitting"])
def test_modules_that_were_in_cycles_import_first_in_a_fresh_interpreter(module):
    """A rule module, the sampler and the worker's entry modules load when imported first in a new process
    (a worker imports issgd.distributed first; the rules once needed the scorer imported before them)."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_public_api():
    import torch

    for name in ("linear_grad_sq_norms", "conv_grad_sq_norms", "AliasTable", "AliasSampler", "GradNormScorer",
                 "per_example_grad_norms", "UnsupportedModuleError"):
        assert hasattr(isgd_kernels, name), name
    for op in ("linear_grad_sq_norms", "conv_grad_sq_norms"):
        assert hasattr(torch.ops.isgd_kernels, op), op
    from isgd_kernels.scorer import evaluating, register_rule  # noqa: F401
