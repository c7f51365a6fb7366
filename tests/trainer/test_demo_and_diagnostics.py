"""`issgd demo` end to end (tiny), and the variance diagnostics against brute force."""
import json

import pytest
import torch

from issgd.cli import main
from issgd.diagnostics import sqrt_trace_covariances


def test_sqrt_trace_covariances_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    N, D = 50, 7
    grads = torch.randn(N, D, generator=gen, dtype=torch.float64) * torch.rand(N, 1, generator=gen, dtype=torch.float64) * 5
    norms = grads.norm(dim=1)
    gbar = grads.mean(0)
    weights = norms + 0.3  # stale-ish, smoothed weights

    def trace_cov(q):  # estimator g_i / (N q_i), i ~ q: E = g_bar; Tr Cov = E||.||^2 - ||g_bar||^2
        est = grads / (N * q[:, None])
        return float((q[:, None] * est.square()).sum() - gbar.square().sum())

    uniform = torch.full((N,), 1.0 / N, dtype=torch.float64)
    got = sqrt_trace_covariances(norms, gbar.square().sum(), weights)
    assert got["uniform"] == pytest.approx(trace_cov(uniform) ** 0.5, rel=1e-10)
    assert got["ideal"] == pytest.approx(trace_cov(norms / norms.sum()) ** 0.5, rel=1e-10)
    assert got["actual"] == pytest.approx(trace_cov(weights / weights.sum()) ** 0.5, rel=1e-10)
    assert got["ideal"] <= got["actual"] <= got["uniform"] + 1e-12


def test_sqrt_trace_covariances_refuses_non_positive_weights():
    with pytest.raises(ValueError, match="positive"):
        sqrt_trace_covariances(torch.ones(3), 0.0, torch.tensor([1.0, 0.0, 1.0]))


def test_demo_runs_and_writes_outputs(tmp_path, capsys):
    pytest.importorskip("sklearn")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--epochs", "1", "--no-bench", "--out", str(tmp_path)])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "sqrtTr uniform" in printed and "max relative error" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["history"]) == 2 and summary["scorer_vs_vmap_max_rel_err"] < 1e-8
    assert all(h["sqrt_tr_ideal"] <= h["sqrt_tr_uniform"] + 1e-9 for h in summary["history"])
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_demo_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "--batch-size" in capsys.readouterr().err
