"""The parameter transport of distributed scoring: models whose parameters exceed what the key-value store
takes in one value (8 MiB), workers killed or stopped while a push is in flight, and where the transport
listens. Two gloo scoring workers spawned on this machine (CPU)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from issgd.distributed import ParameterLayout
from issgd.models import build_model
from issgd.scoring import shard_of
from issgd.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

BIG = (1024, 1024, 1024, 1024)  # 64 -> 1024 x 4 -> 10: 3.2 M float32 parameters, 12.9 MB
STORE_VALUE_LIMIT = 8 * 2**20  # the largest value torch's TCPStore accepts


def config(tmp_path, **kw) -> TrainConfig:
    base = {"dataset": "synthetic", "hidden": BIG, "batch_size": 32, "refresh_every": 4, "workers": 2,
            "chunk_size": 256, "diag_every": 0, "progress": False, "master_threads": 1,
            "out": str(tmp_path / "run"), "startup_timeout": 60.0}
    base.update(kw)
    return TrainConfig(**base)


def drain_until(trainer, done, timeout: float) -> bool:
    """Test hook: hold the master (no training step) until ``done(trainer)``, taking in the workers' norms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in trainer.pool.collect():
            trainer.board.update(r.index, r.norms, r.version)
        if done(trainer):
            return True
        time.sleep(0.05)
    return False


def test_layout_round_trip_and_mismatch():
    a, b = build_model("cnn", (1, 8, 8), 10), build_model("cnn", (1, 8, 8), 10)
    layout = ParameterLayout(a)
    buf = layout.buffer()
    layout.pack(a, 33, buf)
    assert ParameterLayout(b).unpack(buf, b) == 33
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert layout.describe() == ParameterLayout(b).describe()
    other = ParameterLayout(build_model("mlp", (1, 8, 8), 10))
    assert other.describe() != layout.describe()
    with pytest.raises(ValueError, match="different models"):
        other.unpack(buf, build_model("mlp", (1, 8, 8), 10))


def taken(trainer, rank: int) -> bool:
    """Whether every push posted to worker ``rank`` has arrived (the next refresh pushes to it again)."""
    in_flight = trainer.pool.pusher.in_flight.get(rank)
    return in_flight is None or in_flight[0].is_completed()


def newest(trainer, rank: int) -> int:
    return int(trainer.board.version[shard_of(rank, 2, trainer.n)].max())


def test_model_above_the_store_value_limit_trains_and_workers_score_pushed_parameters(tmp_path, capfd):
    seen, snapshots = {}, {}

    def on_step(trainer, step, index):
        if (step + 1) % 4 == 0:  # what the refresh at step + 1 pushes
            snapshots[step + 1] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        if step % 4 == 0 and "fresh" not in seen:  # right after a refresh
            if step == 0:  # hold the master until both workers have taken in what start-up pushed...
                seen["taken"] = drain_until(trainer, lambda t: taken(t, 1) and taken(t, 2), 45)
            else:  # ... so that this refresh pushed version 4 to both: wait for norms computed with it
                seen["fresh"] = drain_until(trainer, lambda t: min(newest(t, 1), newest(t, 2)) >= 4, 45)

    started = time.monotonic()
    trainer = Trainer(config(tmp_path, steps=40), on_step=on_step)
    snapshots[0] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.run()
    took = time.monotonic() - started
    assert trainer.pool.layout.nbytes > STORE_VALUE_LIMIT, "the model must not fit in one store value"
    assert summary["steps"] == 40 and seen.get("fresh"), "no norms computed with parameters pushed after start-up"
    versions = trainer.board.version
    assert bool((versions[versions >= 0] % 4 == 0).all()) and int(versions.max()) <= 40
    # The norms that came back are those of the parameters of their version: the 12.9 MB arrived intact.
    probe = torch.arange(0, trainer.n, max(1, trainer.n // 40))
    probe = probe[versions[probe] > 0]
    assert probe.numel() > 0
    from isgd_kernels import GradNormScorer
    from issgd.scoring import XENT
    for v in versions[probe].unique().tolist():
        idx = probe[versions[probe] == v]
        trainer.model.load_state_dict(snapshots[v])
        expected = GradNormScorer(trainer.model).norms(trainer.data.x_train[idx], trainer.data.y_train[idx], XENT)
        torch.testing.assert_close(trainer.board.norms[idx].float(), expected, rtol=1e-4, atol=1e-6)
    assert summary["push_bytes"] == trainer.pool.layout.nbytes and summary["pushes"] >= 5
    assert summary["push_ms_per_refresh"] > 0 and summary["push_mb_per_second"] > 0
    assert 0 < summary["push_fraction"] < 1
    assert took < 60, f"took {took:.0f} s"
    assert "Traceback" not in capfd.readouterr().err


KILL_SCRIPT = """
import json, logging, os, signal, sys
sys.path.insert(0, {tests!r})
from test_transport import config, drain_until, newest, taken
from pathlib import Path
from issgd.trainer import Trainer

seen = {{}}

def on_step(trainer, step, index):
    pusher = trainer.pool.pusher
    if step == 3:  # both workers have taken in their pushes; worker 1 stops before step 4's refresh
        drain_until(trainer, lambda t: taken(t, 1) and taken(t, 2), 45)
        os.kill(trainer.pool.processes[0].pid, signal.SIGSTOP)
    if step == 4:  # step 4's push to the stopped worker is in flight: kill it
        seen["in_flight"] = 1 in pusher.in_flight and not pusher.in_flight[1][0].is_completed()
        proc = trainer.pool.processes[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        seen["exitcode"] = proc.exitcode
        drain_until(trainer, lambda t: taken(t, 2), 45)  # so that step 8's refresh pushes to worker 2
    if step == 8:  # the live worker still gets parameters after the kill
        seen["fresh"] = drain_until(trainer, lambda t: newest(t, 2) >= 8, 45)

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    trainer = Trainer(config(Path({tmp!r}), steps=60), on_step=on_step)
    summary = trainer.run()
    seen.update(steps=summary["steps"], lost=sorted(trainer.pool.pusher.lost))
    print(json.dumps(seen))
"""


def test_worker_killed_while_a_push_is_in_flight(tmp_path):
    """SIGKILL to a worker with a push in flight (it was stopped when the push was posted, the case where gloo
    never fails the push): the master logs it once, the other worker keeps getting parameters, training
    finishes and the process exits at once, without a traceback."""
    script = tmp_path / "kill_mid_push.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path)))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["in_flight"] and seen["exitcode"] == -signal.SIGKILL
    assert seen["steps"] == 60 and seen["fresh"] and seen["lost"] == [1]
    assert took < 90, f"took {took:.0f} s"
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert sum("scoring worker 1" in w for w in warnings) == 1, warnings  # once, and it says it exited
    assert any("scoring worker 1 exited" in w for w in warnings), warnings
    assert not any("worker 2" in w for w in warnings), warnings
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr[-3000:]


def test_stopped_worker_is_skipped_and_close_does_not_hang(tmp_path, capfd):
    stopped = {}

    def on_step(trainer, step, index):
        if step == 4:
            os.kill(trainer.pool.processes[0].pid, signal.SIGSTOP)
            stopped["at"] = time.monotonic()

    trainer = Trainer(config(tmp_path, steps=60), on_step=on_step)
    summary = trainer.run()
    closed = time.monotonic()
    assert summary["steps"] == 60
    # Pushes to the stopped worker stay in flight: the master skips it instead of queueing newer ones.
    assert summary["push_skipped"] >= 5
    assert closed - stopped["at"] < 45
    assert trainer.pool.processes[0].exitcode == -signal.SIGKILL  # killed at exit: stopped to the end
    assert "Traceback" not in capfd.readouterr().err


def _listening_addresses_of_this_process() -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the listening TCP sockets this process owns."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # TCP_LISTEN
                found.add(fields[1].rsplit(":", 1)[0])
    return found


def test_spawned_transport_listens_on_loopback_only(tmp_path):
    seen = {}

    def on_step(trainer, step, index):
        if step == 5:
            seen["addresses"] = _listening_addresses_of_this_process()

    Trainer(config(tmp_path, hidden=(16,), steps=8), on_step=on_step).run()
    assert seen["addresses"] and seen["addresses"] <= {"0100007F"}, seen["addresses"]  # 127.0.0.1 only
