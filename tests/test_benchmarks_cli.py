"""`python -m benchmarks`: where results go (quick runs never overwrite the committed tables), and
the shared timer (issgd.timing) the benchmarks and the demo use."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("benchmarks") is None:  # the benchmarks package is not installed
    sys.path.insert(0, str(REPO))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import harness, norms  # noqa: E402
from issgd.timing import measure, measure_side_by_side  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Committed and scratch results folders redirected to tmp_path, and a one-shape linear group."""
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(harness, "SCRATCH_DIR", tmp_path / "runs", raising=False)
    monkeypatch.setattr(norms, "linear_shapes", lambda device, quick: [(2, 4, 8, 8)])
    monkeypatch.setattr(norms, "measure", lambda fn, device: measure(fn, device, min_time=0.0, min_reps=1))
    return tmp_path


def test_default_output_is_the_scratch_folder_not_the_committed_results():
    args = cli.parse_args(["--quick", "--device", "cpu"])
    out = harness.output_dir(CPU, out=args.out, publish=args.publish)
    assert out == harness.SCRATCH_DIR / "cpu"
    assert not harness.is_published(out)
    assert harness.is_published(harness.output_dir(CPU, publish=True))
    assert harness.output_dir(CPU, publish=True) == REPO / "benchmarks" / "results" / "cpu"


def test_quick_run_leaves_the_committed_results_alone(folders, capsys):
    cli.main(["--quick", "--device", "cpu", "--only", "linear"])
    assert not (folders / "results").exists()
    written = folders / "runs" / "cpu"
    assert {p.name for p in written.iterdir()} >= {"linear.csv", "linear.json", "linear.md", "linear.png"}
    assert str(written) in capsys.readouterr().out  # the run says where its results went


def test_out_and_publish_choose_the_folder(folders):
    cli.main(["--device", "cpu", "--only", "linear", "--out", str(folders / "mine")])
    assert (folders / "mine" / "linear.csv").exists()
    cli.main(["--device", "cpu", "--only", "linear", "--publish"])
    assert (folders / "results" / "cpu" / "linear.csv").exists()
    assert not (folders / "runs").exists()


@pytest.mark.parametrize("argv", [["--quick", "--publish"], ["--publish", "--out", "x"]])
def test_publish_refuses_quick_runs_and_an_out_folder(argv, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cpu", *argv])
    assert "--publish" in capsys.readouterr().err


def test_measure_warms_up_then_times_at_least_min_reps():
    calls = []
    t = measure(lambda: calls.append(1), CPU, min_time=0.0, min_reps=4, max_reps=4)
    assert len(calls) == 5  # one warm-up call and four timed ones
    assert 0 <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]


def test_measure_side_by_side_gives_ratios_to_the_reference():
    calls = {"a": 0, "b": 0}

    def bump(k):
        calls[k] += 1

    out = measure_side_by_side({"a": lambda: bump("a"), "b": lambda: bump("b")}, CPU, reference="a",
                               min_time=0.0, min_rounds=3, max_rounds=3, warmup=True)
    assert calls == {"a": 4, "b": 4}  # one warm-up call each, then one per round
    assert out["a"]["ratio"] == 1.0 and out["b"]["ratio"] > 0


def test_demo_microbenchmarks_time_with_the_shared_timer(monkeypatch):
    from issgd import demo, timing
    from issgd.models import mlp

    used = []

    def quick_side_by_side(fns, device, **kwargs):
        used.append(sorted(fns))
        return timing.measure_side_by_side(fns, device, **{**kwargs, "min_time": 0.0, "min_rounds": 1})

    monkeypatch.setattr(demo, "measure_side_by_side", quick_side_by_side)
    monkeypatch.setattr(demo, "paper_mlp", lambda: mlp(3072, [16], 10))  # a small stand-in
    torch.manual_seed(0)
    rows = demo.microbenchmarks(CPU, "auto", torch.randn(64, 64), torch.randint(0, 10, (64,)))
    assert len(used) == 2 and len(rows) == 4 + 2
    for _model, _batch, provider, ms, ratio in rows:
        assert ms > 0 and ratio > 0
        if provider == demo.STEP:
            assert ratio == 1.0
