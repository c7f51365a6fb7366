"""CPU thread counts that never oversubscribe the cores this process may actually use."""
from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers, CI
    runners, `docker --cpus`), never below 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.floor(quota)) if quota else cores)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs granted by the cgroup quota (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def master_threads(requested: int | None, workers_on_this_cpu: int, worker_threads: int) -> int:
    """The master's CPU threads: as requested, else the usable cores that local scoring workers leave free."""
    if requested is not None:
        return requested
    return max(1, usable_cores() - workers_on_this_cpu * worker_threads)
