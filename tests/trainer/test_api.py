"""The library API: ImportanceSampler and fit on a user's own model, map-style Dataset and loss; unbiased
weights; import strings on the command line; the spawn guard."""
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from issgd import ImportanceSampler, SpecError, fit, train_step
from issgd.cli import main
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset, default_collate

ROOT = Path(__file__).resolve().parents[2]
LOSS = nn.CrossEntropyLoss(reduction="none")


class Spirals(Dataset):
    """A map-style data set read item by item (not a TensorDataset): 3 interleaved spirals, 5 % flipped labels."""

    def __init__(self, n: int = 480, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=gen)
        r = torch.rand(n, generator=gen)
        angle = 4 * r + self.y * 2.1 + 0.2 * torch.randn(n, generator=gen)
        self.x = torch.stack([r * angle.cos(), r * angle.sin()], 1)
        flip = torch.rand(n, generator=gen) < 0.05
        self.y = torch.where(flip, torch.randint(0, 3, (n,), generator=gen), self.y)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class Net(nn.Module):
    """A user's own module with its own forward."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        return self.out(self.body(x) + 0.0)


def make_net():
    torch.manual_seed(0)
    return Net()


def make_data():
    return Spirals(480, seed=0), Spirals(120, seed=1)


def full_loss(model, data) -> float:
    x, y = data.x, data.y
    with torch.no_grad():
        return float(LOSS(model(x), y).mean())


@pytest.fixture
def one_thread():
    """Small models on a shared 2-core machine: a second thread only waits for the other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ custom model and data
@pytest.mark.parametrize("workers", [0, 2])
def test_custom_model_and_dataset_train_through_the_sampler(workers, one_thread):
    torch.manual_seed(0)
    model, data = Net(), Spirals()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = full_loss(model, data)
    with ImportanceSampler(model, data, LOSS, batch_size=32, workers=workers, refresh_every=4, chunk_size=160,
                           startup_timeout=60.0) as sampler:
        for batch in sampler.batches(150):
            assert batch.inputs.shape == (32, 2) and batch.weights.shape == (32,) and batch.index.dtype == torch.int64
            train_step(model, LOSS, optimizer, batch)
        deadline = time.monotonic() + 60  # with workers: until every example has a score of its own
        while not bool(sampler.board.scored.all()) and time.monotonic() < deadline:
            sampler.refresh()
            time.sleep(0.05)
        assert bool(sampler.board.scored.all())
        weights = sampler.weights()
        index, iw = sampler.draw(4096)
        stats = sampler.stats()
    # Each batch weight is 1/(N q_i) for the weights in use.
    expected = weights.sum() / (len(data) * weights[index])
    torch.testing.assert_close(iw.double(), expected, rtol=1e-5, atol=0)
    assert float(weights.max() / weights.min()) > 3  # really importance sampling, not uniform
    assert full_loss(model, data) < 0.8 * before
    if workers:
        assert stats["workers_alive"] == 2 and stats["scored_examples"] >= len(data)
        assert int(sampler.board.version.min()) >= 0


def test_fit_with_factories_a_valid_set_and_an_optimizer_factory(one_thread):
    result = fit(make_net, make_data, LOSS, lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                 steps=200, batch_size=32, score="last_layer", refresh_every=8, chunk_size=120, progress=False)
    assert isinstance(result.model, Net) and result.steps == 200 and len(result.losses) == 200
    untrained = full_loss(make_net(), make_data()[1])
    assert result.valid_loss is not None and result.valid_loss < 0.9 * untrained and 0 <= result.valid_error < 0.6


@pytest.mark.parametrize("kwargs, error, message", [
    ({"dataset": "not a dataset"}, SpecError, "dataset: expected an import string"),
    ({"dataset": [1, 2, 3]}, SpecError, "dataset: expected a map-style torch.utils.data.Dataset"),
    ({"model": 3}, SpecError, "model: expected an nn.Module"),
    ({"model": lambda: "x"}, SpecError, "returned str, expected an nn.Module"),
    ({"loss_fn": nn.CrossEntropyLoss()}, ValueError, "per-example losses of shape (B,)"),
    ({"score": "entropy"}, ValueError, "score must be one of grad_norm, last_layer, loss"),
    ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
    ({"workers": 2, "model": lambda: Net()}, SpecError, "model: cannot be sent to the scoring worker processes"),
    ({"collate_fn": lambda items: {"batch": items}}, SpecError, "collate_fn: must return an (inputs, targets) pair, got a dict"),
    ({"workers": 2, "collate_fn": lambda items: default_collate(items)}, SpecError, "collate_fn: cannot be sent"),
])
def test_sampler_refuses_bad_arguments_naming_them(kwargs, error, message):
    args = {"model": Net(), "dataset": Spirals(40), "loss_fn": LOSS, "batch_size": 8, **kwargs}
    with pytest.raises(error) as info:
        ImportanceSampler(args.pop("model"), args.pop("dataset"), args.pop("loss_fn"), **args)
    assert message in str(info.value)


class UnreadableInWorkers(Spirals):
    """Data whose copy cannot be rebuilt in a worker (say, files the workers cannot read)."""

    def __setstate__(self, state):
        raise OSError("cannot read /data/spirals from this process")


def test_a_worker_that_fails_to_start_is_reported_with_its_error(one_thread):
    from issgd.distributed import StartupError

    sampler = ImportanceSampler(Net(), UnreadableInWorkers(64), LOSS, batch_size=8, workers=2, startup_timeout=60.0)
    started = time.monotonic()
    with sampler, pytest.raises(StartupError) as info:
        sampler.start()
    assert time.monotonic() - started < 45
    assert re.search(r"scoring worker \d exited during start-up \(exit code 1\): OSError: cannot read /data/spirals "
                     "from this process", str(info.value)), str(info.value)
    with pytest.raises(RuntimeError, match="the scoring workers did not start"):
        sampler.next_batch()


# ------------------------------------------------------------------------------ unbiasedness
def test_sampler_batches_give_unbiased_gradients(one_thread):
    """The mean of R importance-sampled batch gradients (through the public API: batches, their weights and
    Batch.weighted_mean) against the full gradient, coordinate by coordinate in units of the estimator's
    exact standard error; the same batches without their weights must fail the same test."""
    torch.manual_seed(0)
    n = 300
    # Inputs of heavy-tailed scale: gradient norms, hence weights, spread over orders of magnitude.
    x = torch.randn(n, 2) * torch.distributions.Pareto(1.0, 1.5).sample((n, 1))
    data = Spirals(n)
    data.x = x
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))  # ReLU: gradients grow with the input
    sampler = ImportanceSampler(model, (data.x, data.y), LOSS, batch_size=8, smoothing=0.0, refresh_every=10**9,
                                chunk_size=n, seed=3)
    params = dict(model.named_parameters())
    double = {k: v.detach().double() for k, v in params.items()}

    def example_loss(p, xi, yi):
        return LOSS(functional_call(model, p, (xi[None],)), yi[None]).sum()

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(double, data.x.double(), data.y)
    G = torch.cat([g.reshape(len(data), -1) for g in per_example.values()], 1)
    model.float()
    full = G.mean(0)
    R, total_is, total_plain = 1000, torch.zeros_like(full), torch.zeros_like(full)
    for batch in sampler.batches(R):
        losses = LOSS(model(batch.inputs), batch.targets)
        g_is = torch.autograd.grad(batch.weighted_mean(losses), list(params.values()), retain_graph=True)
        g_plain = torch.autograd.grad(losses.mean(), list(params.values()))
        total_is += torch.cat([g.reshape(-1) for g in g_is]).double()
        total_plain += torch.cat([g.reshape(-1) for g in g_plain]).double()
    weights = sampler.weights()
    assert float(weights.max() / weights.min()) > 20 and bool(sampler.board.scored.all())
    q = weights / weights.sum()
    var = (q[:, None] * (G / (n * q[:, None])).square()).sum(0) - full.square()
    se = (var / (R * 8)).sqrt().clamp_min(1e-12)
    keep = var > 1e-10
    z_is = ((total_is / R - full).abs() / se)[keep]
    z_plain = ((total_plain / R - full).abs() / se)[keep]
    assert z_is.max() < 5.0, f"importance-weighted batches biased: max z {z_is.max():.1f}"
    assert z_plain.max() > 5.0, "the same test must reject the unweighted batches"


# ------------------------------------------------------------------------------ the command line
USER_JOB = """
import torch
from torch import nn
from torch.utils.data import Dataset


class Rings(Dataset):
    def __init__(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=gen)
        angle = torch.rand(n, generator=gen) * 6.3
        radius = 1.0 + self.y + 0.3 * torch.randn(n, generator=gen)
        self.x = torch.stack([radius * angle.cos(), radius * angle.sin()], 1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def data():
    return Rings(600, 0), Rings(150, 1)


def model():
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))


not_a_factory = 3


def needs_args(n):
    return n


def returns_string():
    return "a string"
"""


@pytest.fixture
def user_job(tmp_path, monkeypatch):
    """A user's module in the current folder: user_job_<n>.py (a fresh name each test, as modules are cached)."""
    name = f"user_job_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_JOB)
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('the module itself fails')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return name


def test_cli_trains_an_imported_model_on_an_imported_dataset(tmp_path, user_job, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", f"{user_job}:model", "--dataset", f"{user_job}:data", "--score", "last_layer",
              "--steps", "60", "--batch-size", "32", "--lr", "0.1", "--diag-every", "30", "--out", str(out),
              "--no-progress"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["score"] == "last_layer" and summary["config"]["model"] == f"{user_job}:model"
    assert summary["steps"] == 60
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 30, 60]
    assert records[-1]["train_loss"] < records[0]["train_loss"] and records[-1]["valid_error"] < 0.6


def test_cli_import_strings_reach_spawned_workers(tmp_path, user_job):
    """Workers import the user's module themselves (the current folder is on their path too)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])}
    proc = subprocess.run([sys.executable, "-m", "issgd", "train", "--model", f"{user_job}:model", "--dataset",
                           f"{user_job}:data", "--workers", "2", "--score", "last_layer", "--steps", "150",
                           "--refresh-every", "4", "--chunk-size", "100", "--diag-every", "0", "--master-threads", "1",
                           "--out", str(tmp_path / "run"), "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["scored_examples"] > 0 and summary["rejected_messages"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "{job}:nothere", "--dataset", "{job}:data"], "argument --model: module '{job}' has no attribute 'nothere'"),
    (["--model", "no_such_module_xyz:model", "--dataset", "{job}:data"],
     "argument --model: cannot import 'no_such_module_xyz' (no module named 'no_such_module_xyz')"),
    (["--model", "{job}_broken:model", "--dataset", "{job}:data"],
     "argument --model: importing '{job}_broken' failed: RuntimeError: the module itself fails"),
    (["--model", "{job}:returns_string", "--dataset", "{job}:data"], "returned str, expected an nn.Module"),
    (["--model", "{job}:needs_args", "--dataset", "{job}:data"], "'{job}:needs_args' must be callable with no arguments"),
    (["--model", "{job}:not_a_factory", "--dataset", "{job}:data"], "argument --model: expected an nn.Module"),
    (["--model", "{job}:model", "--dataset", "{job}:returns_string"],
     "argument --dataset: the factory '{job}:returns_string' returned a str; expected a map-style"),
    (["--dataset", "{job}:data"], "argument --model: the built-in model 'mlp' takes a built-in --dataset"),
])
def test_cli_bad_import_strings_are_one_line_errors(tmp_path, user_job, capsys, argv, message):
    argv = [a.format(job=user_job) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv, "--steps", "5", "--out", str(tmp_path / "run"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("issgd train: error: argument --") and message.format(job=user_job) in err, err


def test_cli_refuses_an_import_string_without_a_colon(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "mypackage.models"])
    assert exit_info.value.code == 2
    assert ("argument --model: expected one of mlp, cnn or an import string 'package.module:factory', got "
            "'mypackage.models'") in capsys.readouterr().err


# ------------------------------------------------------------------------------ the spawn guard
UNGUARDED = {
    "sampler": """
        sampler = issgd.ImportanceSampler(model, (x, y), loss, batch_size=16, workers=2, startup_timeout=60.0)
        for batch in sampler.batches(5):
            pass
        sampler.close()
    """,
    "fit": """
        issgd.fit(model, (x, y), loss, torch.optim.SGD(model.parameters(), lr=0.1), steps=5, batch_size=16,
                  workers=2, startup_timeout=60.0, progress=False)
    """,
}


@pytest.mark.parametrize("entry", sorted(UNGUARDED))
def test_script_without_main_guard_fails_fast_and_says_so(tmp_path, entry):
    script = tmp_path / "train_unguarded.py"
    script.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        import issgd

        x, y = torch.randn(200, 4), torch.randint(0, 2, (200,))
        model, loss = nn.Linear(4, 2), nn.CrossEntropyLoss(reduction="none")
    """) + textwrap.dedent(UNGUARDED[entry]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert time.monotonic() - started < 90
    assert any(f"scoring worker {r} exited during start-up (exit code 1): the script that starts training has no "
               '`if __name__ == "__main__":` guard' in proc.stderr for r in (1, 2)), proc.stderr[-3000:]
