"""What the trainer writes and prints: strict JSON, no 'nan' figures, plots found from the output folder."""
import json

import pytest

from issgd.cli import main


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"non-JSON constant {constant} written")

    return json.loads(text, parse_constant=refuse)


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return captured.out


def test_zero_steps_write_strict_json_and_print_no_nan(tmp_path, capsys):
    out = tmp_path / "zero"
    printed = _run(["train", "--steps", "0", "--hidden", "16", "--out", str(out), "--no-progress"], capsys)
    assert "nan" not in printed.lower()
    summary = _strict_json((out / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["steps_per_second"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)


def test_no_diagnostics_still_writes_a_summary(tmp_path, capsys):
    out = tmp_path / "nodiag"
    printed = _run(["train", "--mode", "both", "--steps", "30", "--diag-every", "0", "--hidden", "16",
                    "--out", str(out), "--no-progress"], capsys)
    assert "no loss comparison" in printed
    result = _strict_json((out / "summary.json").read_text())
    assert result["runs"]["issgd"]["steps"] == 30 and result["runs"]["usgd"]["steps"] == 30


def test_plot_finds_the_runs_of_a_comparison_folder(tmp_path, capsys):
    out = tmp_path / "both"
    _run(["train", "--mode", "both", "--steps", "40", "--diag-every", "20", "--hidden", "16", "--out", str(out),
          "--no-progress"], capsys)
    printed = _run(["plot", str(out), "--out", str(tmp_path / "p.png")], capsys)
    assert "p.png" in printed and (tmp_path / "p.png").stat().st_size > 20_000
    # A metrics.jsonl path is labelled by its run, not by the file's name.
    from issgd.cli import run_label
    from issgd.report import run_folders

    assert [run_label(p) for p in run_folders(out)] == ["usgd", "issgd"]
    assert [run_label(p) for p in run_folders(out / "issgd" / "metrics.jsonl")] == ["issgd"]


def test_plot_redraws_the_figure_and_table_of_a_multi_seed_folder(tmp_path, capsys):
    out = tmp_path / "seeds"
    trained = _run(["train", "--mode", "both", "--seeds", "2", "--steps", "40", "--diag-every", "20",
                    "--hidden", "16", "--out", str(out), "--no-progress"], capsys)
    printed = _run(["plot", str(out), "--out", str(tmp_path / "p.png")], capsys)
    assert "p.png" in printed
    assert (tmp_path / "p.png").read_bytes() == (out / "compare.png").read_bytes()  # the training run's
    table = trained.split("\nwrote ")[0].strip()
    assert "over 2 paired seeds" in table and table in printed


def test_plot_of_a_folder_without_runs_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"issgd plot: error: no metrics at {tmp_path / 'metrics.jsonl'} "
                                    "(written by `issgd train`)")
