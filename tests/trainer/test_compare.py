"""The evidence of a comparison: steps-to-loss ratios, √Tr Σ ratios after warm-up, validation-error
windows and their median and range over paired seeds, on synthetic curves with known answers; then one
tiny `issgd train --mode both --seeds 2` end to end."""
import json
import math
import random

import pytest

from issgd.cli import main
from issgd.report import (FRACTIONS, WARMUP_STEPS, aggregate, comparison, median_range, smoothed_log_loss,
                          sqrt_tr_ratio, steps_to_loss, window_means)

STEPS = list(range(0, 2001, 50))


def records(loss, steps=STEPS, **extra):
    """Diagnostics records with training loss loss(step) and any other key given as a function of step."""
    return [{"step": s, "train_loss": loss(s), **{k: f(s) for k, f in extra.items()}} for s in steps]


def exponential(tau):
    return lambda s: 2.0 * math.exp(-s / tau)


def ratios(result):
    return [r["ratio"] for r in result]


# ------------------------------------------------------------------ steps to loss
def test_smoothing_keeps_an_exponential_decay_exactly():
    losses = [exponential(700)(s) for s in STEPS]
    smoothed = smoothed_log_loss(STEPS, losses)
    assert smoothed == pytest.approx([math.log(v) for v in losses], abs=1e-12)


def test_twice_as_fast_is_half_the_steps_at_every_fraction():
    got = steps_to_loss(records(exponential(1000)), records(exponential(500)))
    assert [r["fraction"] for r in got] == list(FRACTIONS) == [0.25, 0.5, 1.0]
    assert ratios(got) == pytest.approx([0.5, 0.5, 0.5], abs=1e-9)
    assert [r["issgd_step"] for r in got] == pytest.approx([250, 500, 1000], abs=1e-6)
    assert [r["usgd_step"] for r in got] == [500, 1000, 2000]
    assert [r["train_loss"] for r in got] == pytest.approx([2 * math.exp(-f * 2) for f in FRACTIONS], rel=1e-9)


def test_crossings_between_diagnostics_are_interpolated():
    # ISSGD at 0.73x the steps: 365, 730, 1460 are not diagnostic steps (multiples of 50).
    got = steps_to_loss(records(exponential(1000)), records(exponential(730)))
    assert ratios(got) == pytest.approx([0.73, 0.73, 0.73], abs=1e-9)


def test_one_noisy_point_does_not_decide():
    # The same curve for both runs, except that one ISSGD diagnostic at step 1500 dips to the loss uniform
    # SGD ends with: the raw first crossing would put ISSGD there (0.75x); the smoothed curve does not.
    dip = exponential(1000)(2000)
    issgd = records(lambda s: dip if s == 1500 else exponential(1000)(s))
    assert ratios(steps_to_loss(records(exponential(1000)), issgd)) == pytest.approx([1.0, 1.0, 1.0], abs=1e-9)
    assert ratios(steps_to_loss(records(exponential(1000)), issgd, points=1))[-1] == pytest.approx(0.75)


def test_smoothing_halves_the_error_of_noisy_curves():
    # Both training-loss curves with 5 % multiplicative noise at every diagnostic, ISSGD at 0.6x the steps:
    # the mean error of the ratio over 40 noise draws, smoothed (5 points) and from the raw points.
    def mean_errors(points):
        rng = random.Random(0)
        errors = [0.0] * len(FRACTIONS)
        for _ in range(40):
            noisy = [records(lambda s, tau=tau: exponential(tau)(s) * math.exp(rng.gauss(0, 0.05))) for tau in (1000, 600)]
            for k, r in enumerate(steps_to_loss(*noisy, points=points)):
                errors[k] += abs((r["ratio"] if r["ratio"] is not None else 2.0) - 0.6) / 40
        return errors

    smoothed, raw = mean_errors(5), mean_errors(1)
    assert smoothed == [pytest.approx(0.0, abs=tol) for tol in (0.045, 0.02, 0.015)]
    assert all(s < 0.75 * r for s, r in zip(smoothed, raw)), (smoothed, raw)


def test_a_loss_never_reached_is_none():
    got = steps_to_loss(records(exponential(500)), records(exponential(900)))  # ISSGD 1.8x slower
    assert got[0]["ratio"] == pytest.approx(1.8)  # uniform's loss at step 500 is ISSGD's at step 900
    assert got[1]["ratio"] == pytest.approx(1.8)  # ... at step 1000, ISSGD's at step 1800, within its run
    assert got[2]["issgd_step"] is None and got[2]["ratio"] is None


def test_too_few_diagnostics_give_no_steps_figures():
    assert steps_to_loss(records(exponential(500), steps=[0]), records(exponential(500))) == []
    assert steps_to_loss([], []) == []


# ------------------------------------------------------------------ √Tr Σ ratios and windows
def test_sqrt_tr_ratio_counts_only_steps_after_the_warm_up():
    assert WARMUP_STEPS == 100
    recs = [{"step": s, "sqrt_tr_uniform": 4.0, "sqrt_tr_actual": 4.0 if s <= 100 else 2.0,
             "sqrt_tr_ideal": 1.0} for s in STEPS]
    assert sqrt_tr_ratio(recs, "sqrt_tr_actual") == pytest.approx(0.5, abs=1e-12)
    assert sqrt_tr_ratio(recs, "sqrt_tr_ideal") == pytest.approx(0.25)
    assert sqrt_tr_ratio(recs[:3], "sqrt_tr_actual") is None  # steps 0, 50, 100 only


def test_window_means():
    recs = [{"step": s, "valid_error": s / 1000} for s in (0, 100, 200, 300, 400)]
    # windows (0, 100], (100, 200], (200, 300], (300, 400]; step 0 belongs to none
    assert window_means(recs, "valid_error", 400) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert window_means(recs, "valid_error", 400, windows=2) == pytest.approx([0.15, 0.35])
    assert window_means(recs[:2], "valid_error", 400) == [pytest.approx(0.1), None, None, None]


# ------------------------------------------------------------------ over seeds
def test_median_range():
    assert median_range([3.0, 1.0, 2.0]) == {"median": 2.0, "low": 1.0, "high": 3.0, "values": [3.0, 1.0, 2.0],
                                             "missing": 0}
    assert median_range([4.0, 1.0, 2.0, 3.0])["median"] == 2.5
    # None is dropped, or, for a loss not reached, larger than every value
    assert median_range([1.0, None, 3.0])["median"] == 2.0
    high = median_range([0.5, None, 0.7], missing_is_high=True)
    assert (high["median"], high["low"], high["high"], high["missing"]) == (0.7, 0.5, math.inf, 1)
    assert median_range([0.5, None, None], missing_is_high=True)["median"] == math.inf
    assert median_range([None, None])["median"] is None


def _pair(tau_usgd, tau_issgd, actual, valid_usgd, valid_issgd):
    recs = {"usgd": records(exponential(tau_usgd), valid_error=lambda s: valid_usgd, sqrt_tr_uniform=lambda s: 1.0),
            "issgd": records(exponential(tau_issgd), valid_error=lambda s: valid_issgd, sqrt_tr_uniform=lambda s: 1.0,
                             sqrt_tr_actual=lambda s: actual, sqrt_tr_ideal=lambda s: actual / 2)}
    summaries = {mode: {"final": r[-1] | {"train_error": 0.0}, "steps_per_second": 100.0} for mode, r in recs.items()}
    return comparison(recs, summaries)


def test_aggregate_over_seeds():
    pairs = [_pair(1000, 500, 0.4, 0.10, 0.09), _pair(1000, 800, 0.6, 0.12, 0.12), _pair(1000, 2000, 0.5, 0.11, 0.13)]
    agg = aggregate(pairs)
    assert agg["seeds"] == 3
    end = agg["steps_to_loss"][-1]["ratio"]
    assert (end["median"], end["low"], end["high"], end["missing"]) == (pytest.approx(0.8), pytest.approx(0.5),
                                                                        math.inf, 1)
    quarter = agg["steps_to_loss"][0]["ratio"]  # uniform's loss at step 500: reached at 250, 400, 1000
    assert quarter["median"] == pytest.approx(0.8) and quarter["high"] == pytest.approx(2.0)
    assert agg["sqrt_tr_actual_to_uniform"]["median"] == pytest.approx(0.5)
    assert agg["sqrt_tr_ideal_to_uniform"]["low"] == pytest.approx(0.2)
    windows = agg["valid_error_windows"]
    assert [w["steps"] for w in windows] == [[0, 500], [500, 1000], [1000, 1500], [1500, 2000]]
    assert windows[0]["issgd_minus_usgd"]["values"] == pytest.approx([-0.01, 0.0, 0.02])
    assert windows[0]["usgd"]["median"] == pytest.approx(0.11)


# ------------------------------------------------------------------ the command line
def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_two_paired_seeds_end_to_end(tmp_path, capsys):
    out = tmp_path / "seeds"
    code, printed, err = _run(["train", "--mode", "both", "--seeds", "2", "--seed", "3", "--steps", "150",
                               "--diag-every", "25", "--hidden", "16", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    result = json.loads((out / "summary.json").read_text())
    assert result["seeds"] == [3, 4]
    assert [p["seed"] for p in result["per_seed"]] == [3, 4]
    agg = result["aggregate"]
    assert [s["fraction"] for s in agg["steps_to_loss"]] == [0.25, 0.5, 1.0]
    for s in agg["steps_to_loss"]:
        assert len(s["ratio"]["values"]) == 2 and {"median", "low", "high"} <= set(s["ratio"])
    assert agg["sqrt_tr_actual_to_uniform"]["median"] is not None  # diagnostics at steps 125 and 150
    assert len(agg["valid_error_windows"]) == 4 and agg["valid_error_windows"][0]["issgd_minus_usgd"]["median"] is not None
    for seed in (3, 4):
        pair = json.loads((out / f"seed{seed}" / "summary.json").read_text())
        assert pair["runs"]["usgd"]["config"]["seed"] == pair["runs"]["issgd"]["config"]["seed"] == seed
        assert (out / f"seed{seed}" / "issgd" / "metrics.jsonl").exists()
    assert (out / "compare.png").stat().st_size > 20_000
    assert "over 2 paired seeds" in printed and "median" in (out / "summary.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--mode", "both", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
    (["--seeds", "3"], "argument --seeds: paired seeds compare ISSGD with uniform SGD: use it with --mode both"),
])
def test_seeds_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    code, _, err = _run(["train", *argv, "--out", str(tmp_path / "x"), "--no-progress"], capsys)
    assert code == 2 and message in err and "Traceback" not in err
