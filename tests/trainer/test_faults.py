"""Fault injection: real signals to real processes (the master, its spawned scoring workers), corrupt
checkpoints, forged store messages and user mistakes; each test asserts the outcome docs/reliability.md
promises. Run alone with `pytest -m faults`."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from issgd.cli import main
from issgd.scoring import ScoreResult, shard_of
from issgd.trainer import TrainConfig, Trainer

pytestmark = [pytest.mark.faults,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is needed")]


def config(tmp_path, **kw) -> TrainConfig:
    base = {"dataset": "synthetic", "hidden": (16,), "batch_size": 32, "refresh_every": 4, "workers": 2,
            "chunk_size": 256, "diag_every": 0, "progress": False, "master_threads": 1, "out": str(tmp_path / "run"),
            "startup_timeout": 60.0}
    base.update(kw)
    return TrainConfig(**base)


def train_argv(out, *extra) -> list[str]:
    return ["train", "--dataset", "synthetic", "--hidden", "16", "--batch-size", "32", "--refresh-every", "4",
            "--master-threads", "1", "--no-progress", "--out", str(out), *extra]


def cli(out, *extra, timeout=120, **popen) -> subprocess.Popen:
    """`issgd train` in a new session (so a signal to its process group reaches only it)."""
    return subprocess.Popen([sys.executable, "-m", "issgd", *train_argv(out, *extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(predicate, timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


@pytest.fixture
def spawned(monkeypatch):
    """Every worker process the trainer spawns in this test (SIGKILLed at teardown, whatever happened),
    and a hook ``spawned.after`` run on the ProcessContext right after the spawn."""
    import issgd.distributed as driver

    real = driver.mp.start_processes
    procs = []

    class Spawned:
        after = None

    def start_processes(*args, **kwargs):
        ctx = real(*args, **kwargs)
        procs.extend(ctx.processes)
        if Spawned.after is not None:
            Spawned.after(ctx)
        return ctx

    monkeypatch.setattr(driver.mp, "start_processes", start_processes)
    Spawned.procs = procs
    yield Spawned
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)


# ------------------------------------------------------------------------------ start-up
def test_worker_killed_during_startup_is_a_clear_error_within_seconds(tmp_path, spawned):
    spawned.after = lambda ctx: os.kill(ctx.processes[0].pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"scoring worker 1 exited during start-up \(killed by SIGKILL\)"):
        Trainer(config(tmp_path, steps=20, startup_timeout=30.0)).run()
    assert time.monotonic() - started < 30
    assert all(p.exitcode is not None for p in spawned.procs)  # the other worker was stopped too


def test_worker_that_never_arrives_times_out_and_is_reaped(tmp_path, spawned):
    spawned.after = lambda ctx: os.kill(ctx.processes[1].pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker\(s\) 2 did not report ready within 4 s \(--startup-timeout\)"):
        Trainer(config(tmp_path, steps=20, startup_timeout=4.0)).run()
    took = time.monotonic() - started
    assert took < 4 + 20, f"start-up failure took {took:.0f} s"
    assert spawned.procs[1].exitcode == -signal.SIGKILL  # a stopped worker is killed, not waited for


def test_script_without_main_guard_is_named_as_the_cause(tmp_path):
    script = tmp_path / "train_unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from issgd.trainer import TrainConfig, Trainer
        Trainer(TrainConfig(dataset="synthetic", hidden=(8,), steps=20, workers=2, diag_every=0, progress=False,
                            master_threads=1, out={str(tmp_path / "run")!r}, startup_timeout=60.0)).run()
    """))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150)
    assert proc.returncode != 0
    assert time.monotonic() - started < 100
    # The master's own error (the children's tracebacks say it too, but not "scoring worker N exited").
    assert "scoring worker 1 exited during start-up (exit code 1): the script that starts training has no " \
           '`if __name__ == "__main__":` guard' in proc.stderr \
        or "scoring worker 2 exited during start-up (exit code 1): the script that starts training has no " \
           '`if __name__ == "__main__":` guard' in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------------ mid-run
def test_worker_killed_mid_run_training_goes_on(tmp_path, spawned, caplog):
    def on_step(trainer, step, index):
        if step == 8:
            os.kill(trainer.pool.processes[0].pid, signal.SIGKILL)
            trainer.pool.processes[0].join(10)

    with caplog.at_level(logging.WARNING, logger="issgd"):
        summary = Trainer(config(tmp_path, steps=60), on_step=on_step).run()
    assert summary["steps"] == 60
    assert any("worker 1 exited (exit code -9)" in r.getMessage() for r in caplog.records)


def test_stopped_worker_does_not_keep_the_master_from_finishing(tmp_path, spawned):
    def on_step(trainer, step, index):
        if step == 8:
            os.kill(trainer.pool.processes[0].pid, signal.SIGSTOP)

    started = time.monotonic()
    trainer = Trainer(config(tmp_path, steps=60), on_step=on_step)
    summary = trainer.run()
    assert summary["steps"] == 60 and (tmp_path / "run" / "summary.json").exists()
    assert time.monotonic() - started < 60
    # Nothing is left for multiprocessing's exit handler to join: the stopped worker was SIGKILLed.
    assert spawned.procs[0].exitcode == -signal.SIGKILL
    assert all(p.exitcode is not None for p in spawned.procs)


def test_master_killed_mid_run_workers_exit_and_the_checkpoint_resumes(tmp_path):
    out = tmp_path / "run"
    proc = cli(out, "--workers", "2", "--steps", "1000000", "--diag-every", "0", "--checkpoint-every", "40",
               "--worker-threads", "1")
    try:
        assert wait_until(lambda: (out / "checkpoint.pt").exists() or proc.poll() is not None, 90), "no checkpoint"
        assert proc.poll() is None, proc.stderr.read()
        workers = children(proc.pid)
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The workers see the store go and exit by themselves: no orphans.
    assert wait_until(lambda: not any(alive(p) for p in workers), 30), "orphaned workers"
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    trainer = Trainer(config(tmp_path, steps=step + 20, resume="auto", checkpoint_every=40))
    summary = trainer.run()
    assert summary["steps"] == step + 20 and trainer.step == step + 20


# ------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_writes_a_checkpoint_and_a_partial_summary_and_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = cli(out, "--workers", "2", "--steps", "1000000", "--diag-every", "40", "--diag-examples", "500",
               "--checkpoint-every", "100000")
    try:
        metrics = out / "metrics.jsonl"
        assert wait_until(lambda: proc.poll() is not None or (metrics.exists() and
                                                              len(metrics.read_text().splitlines()) >= 3), 90)
        assert proc.poll() is None, proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the master and its workers
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted at step" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] > 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == summary["steps"]


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "directory", "pickled-object"])
def test_damaged_checkpoint_is_refused_in_one_line_and_the_previous_one_resumes(tmp_path, capsys, damage):
    out = tmp_path / "run"
    argv = train_argv(out, "--steps", "20", "--diag-every", "0", "--checkpoint-every", "10")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    ckpt, prev = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    assert prev.is_file()
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "garbage":
        ckpt.write_bytes(os.urandom(4096))
    elif damage == "directory":
        ckpt.unlink()
        ckpt.mkdir()
    else:  # a pickle that names arbitrary code: weights_only refuses to run it
        import argparse
        torch.save({"config": argparse.Namespace(x=1)}, ckpt)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(out, "--steps", "30", "--diag-every", "0", "--checkpoint-every", "10", "--resume"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(ckpt) in err and f"--resume {prev}" in err and "fresh run" in err
    assert "weights_only=False" not in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(out / "from-prev", "--steps", "30", "--diag-every", "0", "--resume", str(prev)))
    assert exit_info.value.code == 0
    assert json.loads((out / "from-prev" / "summary.json").read_text())["steps"] == 30


def test_resume_applies_a_changed_lr_and_momentum_and_records_it(tmp_path):
    Trainer(config(tmp_path, workers=0, steps=10, checkpoint_every=10, lr=0.01, momentum=0.9)).run()
    trainer = Trainer(config(tmp_path, workers=0, steps=20, resume="auto", lr=0.05, momentum=0.5))
    summary = trainer.run()
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"]) == (0.05, 0.5)
    assert summary["resume_changes"] == [{"step": 10, "lr": [0.01, 0.05], "momentum": [0.9, 0.5]}]
    assert summary["config"]["lr"] == 0.05


# ------------------------------------------------------------------------------ the store
def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            address, p = local.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":  # TCP_LISTEN
                found.append(address)
    return found


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_store_listens_on_loopback_only_and_forged_messages_are_dropped(tmp_path, spawned, caplog):
    from issgd.distributed import QUEUE

    seen = {}

    def forged(trainer) -> list[bytes]:
        n, v = trainer.n, max(0, trainer.step - trainer.step % 4)
        ok_index = shard_of(1, 2, n)[:3]
        good = lambda **kw: ScoreResult(**{"rank": 1, "version": v, "index": ok_index,
                                           "norms": torch.ones(3), "seconds": 0.01, **kw}).to_bytes()
        return [good(index=torch.tensor([0, 1_000_000_000, 2])),  # the index of the crash
                good(index=torch.tensor([-1, 0, 2])), good(norms=torch.tensor([1.0, float("nan"), 1.0])),
                good(norms=torch.tensor([1.0, float("inf"), 1.0])), good(norms=torch.tensor([1.0, -2.0, 1.0])),
                good(version=10 ** 9), good(version=-5), good(rank=0), good(rank=99),
                good(index=shard_of(2, 2, n)[:3]),  # rank 1 claiming rank 2's examples
                good(seconds=float("nan")), good()[:-3], b"", b"\x00" * 7]

    def on_step(trainer, step, index):
        if step == 10:
            port = int(os.environ["MASTER_PORT"])
            seen["listening"] = _listening(port)
            seen["address"] = _non_loopback_address()
            if seen["address"]:
                with socket.socket() as s:
                    s.settimeout(2)
                    seen["remote"] = s.connect_ex((seen["address"], port))
            client = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=10))
            messages = forged(trainer)
            seen["forged"] = len(messages)
            for m in messages:
                client.queue_push(QUEUE, m)
            del client

    trainer = Trainer(config(tmp_path, steps=40), on_step=on_step)
    with caplog.at_level(logging.WARNING, logger="issgd"):
        summary = trainer.run()
    assert summary["steps"] == 40
    assert seen["listening"] and set(seen["listening"]) == {"0100007F"}, seen["listening"]  # 127.0.0.1 only
    if seen["address"]:
        assert seen["remote"] != 0, f"the store accepted a connection on {seen['address']}"
    assert summary["rejected_messages"] == seen["forged"]
    dropped = [r.getMessage() for r in caplog.records if "dropped score message" in r.getMessage()]
    assert len(dropped) == seen["forged"] and any("out of range" in m for m in dropped)
    board = trainer.board
    assert int(board.version.max()) <= 40 and bool(torch.isfinite(board.norms).all())
    assert bool((board.norms >= 0).all())


# ------------------------------------------------------------------------------ diagnostics pause the workers
def test_workers_start_no_chunk_while_the_master_runs_diagnostics(tmp_path, spawned):
    growth = {}
    trainer = Trainer(config(tmp_path, steps=24, diag_every=12, diag_examples=200, chunk_size=32,
                             slow_workers=((1, 0.1), (2, 0.1))))
    real = trainer._diagnose

    def slow_diagnose():
        if trainer.step == 12:  # workers are mid-shard: ~60 chunks of 0.1 s each are left
            from issgd.distributed import QUEUE

            time.sleep(0.8)
            before = trainer.pool.store.queue_len(QUEUE)
            time.sleep(1.5)
            growth["during"] = trainer.pool.store.queue_len(QUEUE) - before
            growth["states"] = [Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                                for p in trainer.pool.processes]
        return real()

    trainer._diagnose = slow_diagnose
    trainer.run()
    assert growth["during"] == 0, f"workers pushed {growth['during']} chunks during diagnostics"
    assert growth["states"] == ["T", "T"]  # local workers are frozen (SIGSTOP), mid-chunk if need be


# ------------------------------------------------------------------------------ user mistakes
@pytest.mark.parametrize("where", ["existing-file", "under-a-file", "unwritable"])
def test_bad_out_is_one_line_and_exit_2(tmp_path, capsys, where):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out = {"existing-file": a_file, "under-a-file": a_file / "run",
           "unwritable": Path("/sys/issgd-cannot-write-here/run")}[where]  # sysfs: no mkdir, even for root
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(out, "--steps", "5", "--diag-every", "0"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("issgd train: error: argument --out:") and str(out) in err
    assert "Traceback" not in err


def test_triton_backend_without_cuda_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can run --backend triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(tmp_path / "run", "--steps", "5", "--diag-every", "0", "--backend", "triton"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --backend" in err and "triton" in err


def test_diag_every_0_trains_and_writes_a_summary(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(tmp_path / "run", "--steps", "12", "--diag-every", "0"))
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 12
