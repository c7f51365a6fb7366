"""The distributed scoring driver: 2 gloo scoring workers spawned on this machine (CPU)."""
import logging
import time

import pytest
import torch
import torch.distributed as dist
from issgd.scoring import shard_of
from issgd.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def config(tmp_path, **kw) -> TrainConfig:
    base = {"dataset": "synthetic", "hidden": (16,), "batch_size": 32, "refresh_every": 4, "workers": 2,
            "chunk_size": 256, "diag_every": 0, "progress": False, "master_threads": 1, "out": str(tmp_path / "run")}
    base.update(kw)
    return TrainConfig(**base)


def wait_for_scores(trainer, step, index, *, until_step, timeout=60.0):
    """Test hook: hold the master at ``until_step`` until every example has been scored once,
    so that the assertions below do not depend on how fast the workers start."""
    if step == until_step:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for r in trainer.pool.collect():
                trainer.board.update(r.index, r.norms, r.version)
            if bool(trainer.board.scored.all()):
                return
            time.sleep(0.05)


def test_weights_arrive_with_versions_and_a_dead_worker_does_not_stop_training(tmp_path, caplog):
    killed = {}

    def on_step(trainer, step, index):
        wait_for_scores(trainer, step, index, until_step=20)
        if step == 399:  # let the live worker deliver norms of post-kill parameters (or time out)
            deadline = time.time() + 60
            while time.time() < deadline and int(trainer.board.version[shard_of(2, 2, trainer.n)].min()) <= 48:
                for r in trainer.pool.collect():
                    trainer.board.update(r.index, r.norms, r.version)
                time.sleep(0.05)
        if step == 40:
            trainer.pool.processes[0].kill()  # worker rank 1
            trainer.pool.processes[0].join(10)
            killed["step"] = step

    trainer = Trainer(config(tmp_path, steps=400), on_step=on_step)
    with caplog.at_level(logging.WARNING, logger="issgd"):
        summary = trainer.run()
    assert trainer.step == 400 and killed["step"] == 40
    assert any("worker 1 exited" in r.getMessage() for r in caplog.records)
    n = trainer.n
    dead, alive = shard_of(1, 2, n), shard_of(2, 2, n)
    versions = trainer.board.version
    assert bool((versions >= 0).all())
    # Every version is one the master published (a multiple of K), never from the future.
    assert bool((versions % 4 == 0).all()) and int(versions.max()) <= 400
    # The dead worker's shard stopped aging forward at the kill; the live one kept up.
    assert int(versions[dead].max()) <= 48
    assert int(versions[alive].min()) > 48
    assert summary["scored_examples"] >= n


def test_master_keeps_stepping_while_a_worker_is_slow(tmp_path):
    slow = 60.0  # seconds worker 2 sleeps after each chunk
    started = time.time()

    def on_step(trainer, step, index):  # hold the master until the fast worker's norms are in
        deadline = time.time() + 30
        while step == 100 and time.time() < deadline and not bool(trainer.board.scored[shard_of(1, 2, trainer.n)].all()):
            for r in trainer.pool.collect():
                trainer.board.update(r.index, r.norms, r.version)
            time.sleep(0.05)

    trainer = Trainer(config(tmp_path, steps=300, slow_workers=((2, slow),), worker_timeout=1.0), on_step=on_step)
    trainer.run()
    took = time.time() - started
    assert trainer.step == 300
    assert took < slow, f"the master waited for the slow worker ({took:.0f} s)"
    n = trainer.n
    fast, slow_shard = shard_of(1, 2, n), shard_of(2, 2, n)
    assert int(trainer.board.version[fast].max()) > 0  # the fast worker's norms arrived
    # Nothing from the slow worker yet: its shard keeps the default (mean) weight, never 0.
    weights = trainer.board.weights()
    assert bool((trainer.board.version[slow_shard] <= 0).all())
    assert bool((weights > 0).all())


def test_workers_score_with_the_published_parameters(tmp_path):
    """Norms that come back match the master's own scoring with the parameters of their version."""
    from issgd.scoring import XENT

    import isgd_kernels

    snapshots = {}

    def on_step(trainer, step, index):
        wait_for_scores(trainer, step, index, until_step=0)
        if step % 4 == 3:  # parameters that will be published at the next refresh
            snapshots[step + 1] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    trainer = Trainer(config(tmp_path, steps=24), on_step=on_step)
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    snapshots[0] = init
    versions = trainer.board.version
    probe = torch.arange(0, trainer.n, max(1, trainer.n // 50))
    for v in versions[probe].unique().tolist():
        idx = probe[versions[probe] == v]
        trainer.model.load_state_dict(snapshots[v])
        expected = isgd_kernels.GradNormScorer(trainer.model).norms(trainer.data.x_train[idx], trainer.data.y_train[idx], XENT)
        torch.testing.assert_close(trainer.board.norms[idx].float(), expected, rtol=1e-4, atol=1e-6)
