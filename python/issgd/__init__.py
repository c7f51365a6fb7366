"""issgd: importance-sampled SGD on isgd_kernels, for any model and data.

Library: ``issgd.ImportanceSampler`` (importance-sampled batches with their unbiasing weights, and the
scoring that keeps the weights fresh: inline, spawned workers or torchrun ranks), ``issgd.fit`` (a training
loop on it), ``issgd.train_step``, ``issgd.SIGNALS``. Command line: `issgd train`, `issgd plot`, `issgd demo`
(or `python -m issgd ...`).
"""
__version__ = "0.1.0"

# Loaded on first use: a spawned scoring worker imports this package, and should not pay for what it does
# not use before it has lowered its priority.
_EXPORTS = {"ImportanceSampler": "issgd.sampler", "Batch": "issgd.sampler", "train_step": "issgd.sampler",
            "fit": "issgd.fitting", "FitResult": "issgd.fitting", "SIGNALS": "issgd.signals",
            "SpecError": "issgd.sources", "StartupError": "issgd.distributed"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'issgd' has no attribute {name!r}")
