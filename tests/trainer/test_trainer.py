"""The ISSGD trainer: unbiased steps, the variance diagnostics, weights, checkpoints, data, CLI."""
import gzip
import json

import numpy as np
import pytest
import torch
from issgd.cli import main
from issgd.data import MNIST_FILES, SVHN_FILES, load_dataset
from issgd.diagnostics import variance_diagnostics
from issgd.distributed import ParameterLayout
from issgd.models import build_model
from issgd.scoring import WEIGHT_FLOOR, XENT, ChunkCursor, ScoreBoard, ScoreResult
from issgd.trainer import TrainConfig, Trainer
from torch.func import functional_call, grad, vmap

import isgd_kernels


def tiny_config(tmp_path, **kw) -> TrainConfig:
    base = {"dataset": "synthetic", "hidden": (8,), "steps": 40, "batch_size": 16, "diag_every": 20,
            "progress": False, "out": str(tmp_path / "run"), "chunk_size": 700}
    base.update(kw)
    return TrainConfig(**base)


def per_example_grads(model, x, y) -> torch.Tensor:
    """(N, P) float64 per-example gradients of the cross-entropy, the brute-force reference."""
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return XENT(functional_call(model, p, (xi[None],)), yi[None]).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    return torch.cat([t.reshape(len(x), -1) for t in g.values()], dim=1)


# ------------------------------------------------------------------------------ unbiasedness
def test_importance_sampled_gradient_is_unbiased(tmp_path):
    """Average of R importance-sampled batch gradients vs the full gradient, coordinate by
    coordinate, in units of the estimator's exact standard error; dropping the 1/(N q_i) scaling
    (the biased estimator) must fail the same test."""
    trainer = Trainer(tiny_config(tmp_path, batch_size=8))
    x, y = trainer.data.x_train, trainer.data.y_train
    torch.manual_seed(0)
    # Heavy-tailed weights unrelated to the gradients: unbiasedness must not depend on them.
    weights = torch.distributions.Pareto(1.0, 1.5).sample((trainer.n,)).double()
    trainer.board.norms.copy_(weights)
    trainer.board.version.fill_(0)
    trainer.board.smoothing = 0.0
    trainer.table = isgd_kernels.AliasTable(trainer.board.weights())
    trainer.generator.manual_seed(1)

    G = per_example_grads(_double_copy(trainer.model), x, y)
    q = weights / weights.sum()
    full = G.mean(0)
    var = (q[:, None] * (G / (trainer.n * q[:, None])).square()).sum(0) - full.square()  # one-sample estimator

    R = 1500
    params = list(trainer.model.parameters())
    total_is = torch.zeros_like(full)
    total_plain = torch.zeros_like(full)
    for _ in range(R):
        index, iw = trainer.draw_batch()
        losses = XENT(trainer.model(x[index]), y[index])
        g_is = torch.autograd.grad(Trainer.batch_loss(losses, iw), params, retain_graph=True)
        g_plain = torch.autograd.grad(Trainer.batch_loss(losses, None), params)
        total_is += torch.cat([t.reshape(-1) for t in g_is]).double()
        total_plain += torch.cat([t.reshape(-1) for t in g_plain]).double()
    se = (var / (R * trainer.config.batch_size)).sqrt().clamp_min(1e-12)
    keep = var > 1e-10  # coordinates that vary at all
    z_is = ((total_is / R - full).abs() / se)[keep]
    z_plain = ((total_plain / R - full).abs() / se)[keep]
    assert z_is.max() < 5.0, f"importance-weighted estimator biased: max z {z_is.max():.1f}"
    assert z_plain.max() > 5.0, "the same test must reject the biased estimator"


def _double_copy(model):
    import copy

    return copy.deepcopy(model).double()


# ------------------------------------------------------------------------------ diagnostics
def test_variance_diagnostics_match_brute_force(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    x, y = trainer.data.x_train[:300], trainer.data.y_train[:300]
    model = _double_copy(trainer.model)
    G = per_example_grads(_double_copy(trainer.model), x, y)
    N = len(x)
    full = G.mean(0)
    weights = G.norm(dim=1) * torch.rand(N, dtype=torch.float64) + 0.05  # stale, smoothed

    def sqrt_tr(q):
        est = G / (N * q[:, None])
        return float((q[:, None] * est.square()).sum() - full.square().sum()) ** 0.5

    got = variance_diagnostics(model, isgd_kernels.GradNormScorer(model), x.double(), y, weights)
    n = G.norm(dim=1)
    assert got["sqrt_tr_uniform"] == pytest.approx(sqrt_tr(torch.full((N,), 1.0 / N, dtype=torch.float64)), rel=1e-8)
    assert got["sqrt_tr_ideal"] == pytest.approx(sqrt_tr(n / n.sum()), rel=1e-8)
    assert got["sqrt_tr_actual"] == pytest.approx(sqrt_tr(weights / weights.sum()), rel=1e-8)
    assert got["sqrt_tr_ideal"] <= got["sqrt_tr_actual"] <= got["sqrt_tr_uniform"] * 1.5


@pytest.mark.parametrize("seed", range(5))
def test_ideal_never_exceeds_uniform(seed):
    from issgd.diagnostics import sqrt_trace_covariances

    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(40, 6, generator=gen, dtype=torch.float64) * torch.rand(40, 1, generator=gen, dtype=torch.float64) ** 3
    sd = sqrt_trace_covariances(G.norm(dim=1), G.mean(0).square().sum(), torch.rand(40, generator=gen, dtype=torch.float64) + 0.1)
    assert sd["ideal"] <= sd["uniform"] + 1e-12 and sd["ideal"] <= sd["actual"] + 1e-12


# ------------------------------------------------------------------------------ weights
def test_scoreboard_weights_defaults_floor_and_versions():
    board = ScoreBoard(5, smoothing=0.5)
    assert torch.equal(board.weights(), torch.ones(5, dtype=torch.float64))  # nothing scored: uniform
    board.update(torch.tensor([0, 1]), torch.tensor([1.5, 3.5]), version=4)
    w = board.weights()
    assert w[:2].tolist() == [2.0, 4.0] and w[2:].tolist() == [3.0] * 3  # unscored: mean scored weight
    assert board.update(torch.tensor([1]), torch.tensor([100.0]), version=2) == 0  # older result ignored
    assert board.weights()[1] == 4.0
    board.update(torch.tensor([2]), torch.tensor([0.0]), version=5)
    board.smoothing = 0.0
    w = board.weights()
    assert w[2] == pytest.approx(WEIGHT_FLOOR * (1.5 + 3.5 + 0.0) / 3, rel=1e-12)  # floored, never 0
    st = board.staleness(10)
    assert st["staleness_max"] == 6 and st["scored_fraction"] == 0.6
    with pytest.raises(FloatingPointError, match="example 3"):
        board.update(torch.tensor([3]), torch.tensor([float("nan")]), version=6)


def test_score_result_and_parameters_round_trip():
    r = ScoreResult(2, 17, torch.tensor([5, 9, 11]), torch.tensor([0.5, 1.25, 3.0]), 0.01)
    back = ScoreResult.from_bytes(r.to_bytes())
    assert (back.rank, back.version, back.seconds) == (2, 17, 0.01)
    assert torch.equal(back.index, r.index) and torch.equal(back.norms, r.norms)
    with pytest.raises(ValueError, match="malformed"):
        ScoreResult.from_bytes(r.to_bytes()[:-1])
    a, b = build_model("cnn", (1, 8, 8), 10), build_model("cnn", (1, 8, 8), 10)
    layout, buf = ParameterLayout(a), ParameterLayout(a).buffer()
    layout.pack(a, 33, buf)
    assert ParameterLayout(b).unpack(buf, b) == 33
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="different models"):
        ParameterLayout(build_model("mlp", (1, 8, 8), 10)).unpack(buf, build_model("mlp", (1, 8, 8), 10))


def test_chunk_cursor_wraps_around():
    cursor = ChunkCursor(torch.arange(5), 2)
    assert [cursor.next().tolist() for _ in range(4)] == [[0, 1], [2, 3], [4], [0, 1]]


# ------------------------------------------------------------------------------ checkpoints
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    batches = {}

    def record(name):
        def hook(trainer, step, index):
            batches.setdefault(name, {})[step] = index.clone()
        return hook

    kw = {"steps": 60, "refresh_every": 8, "checkpoint_every": 24, "diag_every": 12, "chunk_size": 300}
    full = Trainer(tiny_config(tmp_path, out=str(tmp_path / "a"), **kw), on_step=record("full"))
    full.run()
    # A run that dies after its step-24 checkpoint (at step 36), then is resumed to the end.
    Trainer(tiny_config(tmp_path, out=str(tmp_path / "b"), **{**kw, "steps": 36})).run()
    resumed = Trainer(tiny_config(tmp_path, out=str(tmp_path / "b"), resume="auto", **kw), on_step=record("resumed"))
    resumed.run()
    assert sorted(batches["resumed"]) == list(range(24, 60))
    for step in range(24, 60):
        assert torch.equal(batches["resumed"][step], batches["full"][step]), f"batch {step} differs"
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    drop = ("seconds",)
    lines = lambda run: [{k: v for k, v in json.loads(s).items() if k not in drop}
                         for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert lines("a") == lines("b") and len(lines("a")) == 6


def test_resume_refuses_missing_or_mismatched_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_config(tmp_path, resume="auto")).run()
    Trainer(tiny_config(tmp_path, steps=10, checkpoint_every=10)).run()
    with pytest.raises(ValueError, match="smoothing"):
        Trainer(tiny_config(tmp_path, steps=20, smoothing=3.0, resume="auto")).run()


# ------------------------------------------------------------------------------ data
def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_mnist_reads_official_idx_files_plain_and_gzipped(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (30, 28, 28)), "train_labels": rng.integers(0, 10, 30),
              "valid_images": rng.integers(0, 256, (10, 28, 28)), "valid_labels": rng.integers(0, 10, 10)}
    for key, name in MNIST_FILES.items():
        raw = _idx_bytes(arrays[key])
        if key.startswith("train"):
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (tmp_path / name).write_bytes(raw)
    d = load_dataset("mnist", data_dir=tmp_path, flatten=False)
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_valid.shape == (10, 1, 28, 28) and d.image_shape == (1, 28, 28)
    assert torch.equal(d.y_train, torch.from_numpy(arrays["train_labels"]))
    # Standardized with the training statistics: monotone in the raw pixel values.
    raw0 = torch.from_numpy(arrays["train_images"][0].astype(np.float32)).flatten()
    assert torch.equal(torch.argsort(d.x_train[0].flatten(), stable=True), torch.argsort(raw0, stable=True))
    (tmp_path / MNIST_FILES["valid_labels"]).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_dir=tmp_path)


def test_svhn_reads_official_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    for name, n in ((SVHN_FILES["train"], 12), (SVHN_FILES["valid"], 5)):
        scipy_io.savemat(tmp_path / name, {"X": rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8),
                                           "y": rng.integers(1, 11, (n, 1))})
    d = load_dataset("svhn", data_dir=tmp_path)
    assert d.x_train.shape == (12, 3 * 32 * 32) and d.image_shape == (3, 32, 32)
    assert 0 <= int(d.y_train.min()) and int(d.y_train.max()) <= 9  # label 10 is the digit 0
    with pytest.raises(FileNotFoundError, match="train_32x32.mat.*no --data-dir"):
        load_dataset("svhn")


# ------------------------------------------------------------------------------ CLI
def test_cli_runs_a_comparison_and_writes_metrics_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--mode", "both", "--steps", "40", "--diag-every", "20", "--dataset", "synthetic",
              "--hidden", "16", "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "ISSGD" in printed and "uniform SGD" in printed and "actual ISSGD / uniform" in printed
    for mode in ("usgd", "issgd"):
        records = [json.loads(s) for s in (out / mode / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 20, 40]
        assert all(r["sqrt_tr_ideal"] <= r["sqrt_tr_uniform"] + 1e-9 for r in records)
    assert (out / "compare.png").stat().st_size > 20_000 and "| ISSGD |" in (out / "summary.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(out / "usgd"), str(out / "issgd"), "--out", str(tmp_path / "p.png")])
    assert exit_info.value.code == 0 and (tmp_path / "p.png").stat().st_size > 20_000


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-1"], "issgd train: error: argument --steps: must be >= 0, got -1"),
    (["--refresh-every", "0"], "argument --refresh-every: must be >= 1, got 0"),
    (["--lr", "0"], "argument --lr: must be > 0, got 0.0"),
    (["--smoothing", "-1"], "argument --smoothing: must be >= 0, got -1.0"),
    (["--backend", "bogus"], "argument --backend: invalid choice: 'bogus'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--hidden", "64,x"], "comma-separated integers"),
    (["--dataset", "imagenet"], "argument --dataset: expected one of digits"),
    (["--model", "resnet"], "or an import string 'package.module:factory', got 'resnet'"),
    (["--score", "entropy"], "argument --score: invalid choice: 'entropy'"),
    (["--mode", "both", "--resume"], "--resume continues one run"),
])
def test_cli_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_missing_data_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and str(tmp_path) in err
