"""issgd: the reference importance-sampled SGD trainer built on isgd_kernels.

Command line: `issgd demo` (or `python -m issgd demo`).
"""
__version__ = "0.1.0"
