"""Benchmarks of isgd_kernels: `python -m benchmarks` (see benchmarks/README.md)."""
import importlib.util
import sys
from pathlib import Path

# The trainer package `issgd` (the paper's MLP) lives in python/ of the source tree: an editable
# install puts it on the path, a checkout run as `PYTHONPATH=<repo> python -m benchmarks` does not.
if importlib.util.find_spec("issgd") is None:
    sys.path.append(str(Path(__file__).resolve().parent.parent / "python"))
