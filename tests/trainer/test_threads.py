"""Thread counts from the cores the process may use: affinity, capped by a cgroup quota."""
from issgd import threads


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert threads.cgroup_cpu_quota(v1) == 3.0
    assert threads.cgroup_cpu_quota(tmp_path / "nothing") is None


def test_master_threads_never_exceed_the_usable_cores(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 2.5)
    assert threads.usable_cores() == 2  # the quota caps the affinity
    assert threads.master_threads(None, workers_on_this_cpu=0, worker_threads=1) == 2
    assert threads.master_threads(None, workers_on_this_cpu=2, worker_threads=1) == 1  # never below 1
    assert threads.master_threads(3, workers_on_this_cpu=2, worker_threads=1) == 3  # an explicit request wins
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    assert threads.usable_cores() == 4
