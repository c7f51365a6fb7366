"""pytest-benchmark collection of benchmarks/bench_*.py: `pytest benchmarks --benchmark-only`.

The collection pattern lives here, not in pyproject.toml's python_files, so that the test run
(`pytest tests`, or plain `pytest`) never sees the benchmark files. The bench files are thin
parametrizations over the cases and providers `python -m benchmarks` uses (workloads.py,
providers.py, the group modules) and time with pytest-benchmark.
"""
from fnmatch import fnmatch

import pytest

BENCH_FILES = "bench_*.py"


def pytest_collect_file(file_path, parent):
    if not fnmatch(file_path.name, BENCH_FILES):
        return None
    # A file named on the command line, or one the ini's python_files already matches, is collected
    # by pytest's own python plugin: collecting it here too would run it twice.
    if parent.session.isinitpath(file_path) or any(
            fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)
