"""pytest-benchmark: the model scorer vs a training step vs naive autograd on the paper's MLP.

The naive providers (vmap(grad), per-example loop) run on the first 32 examples only: their cost
is per example, and the full batch would take minutes. `python -m benchmarks` reports scaled ratios.
"""
import copy

import pytest
import torch

import isgd_kernels
from benchmarks.norms import XENT, loop_norms, vmap_norms
from benchmarks.workloads import TokenMLP, paper_mlp


def workload(name, device):
    torch.manual_seed(0)
    if name == "paper_mlp":
        return paper_mlp().to(device), torch.randn(512, 3072, device=device), torch.randint(0, 10, (512,), device=device)
    return TokenMLP().to(device), torch.randn(32, 128, 64, device=device), torch.randint(0, 10, (32,), device=device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("model_name", ["paper_mlp", "token_mlp"])
@pytest.mark.parametrize("provider", ["training_step", "scorer", "vmap_grad", "per_example_loop"])
def test_scoring(benchmark, device, model_name, provider):
    model, x, y = workload(model_name, device)
    if provider == "training_step":
        trained = copy.deepcopy(model)
        opt = torch.optim.SGD(trained.parameters(), lr=0.01, momentum=0.95, nesterov=True)

        def fn():
            opt.zero_grad(set_to_none=True)
            XENT(trained(x), y).mean().backward()
            opt.step()
    elif provider == "scorer":
        scorer = isgd_kernels.GradNormScorer(model)

        def fn():
            return scorer.norms(x, y, XENT)
    elif provider == "vmap_grad":
        def fn():
            return vmap_norms(model, x[:32], y[:32], chunk_size=16)
    else:
        def fn():
            return loop_norms(model, x[:32], y[:32])

    def run():
        out = fn()
        sync(device)
        return out

    slow = provider in ("vmap_grad", "per_example_loop")
    if slow:
        benchmark.pedantic(run, rounds=1, iterations=1)
    else:
        benchmark(run)
