"""issgd: the reference importance-sampled SGD trainer built on isgd_kernels.

Command line: `issgd train`, `issgd plot`, `issgd demo` (or `python -m issgd ...`).
"""
__version__ = "0.1.0"
