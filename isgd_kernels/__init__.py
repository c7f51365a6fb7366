"""isgd_kernels: per-example gradient norms, alias-table sampling and importance-sampled SGD.

    import isgd_kernels
    sq = isgd_kernels.linear_grad_sq_norms(x, grad_out)             # one layer, (B,)
    norms = isgd_kernels.per_example_grad_norms(model, loss_fn, inputs, targets)  # whole model, (B,)
"""
from isgd_kernels._extension import BACKENDS, backend_available
from isgd_kernels.cost import choose_method, use_ghost_norm
from isgd_kernels.ops import linear_grad_sq_norms
from isgd_kernels.conv import conv_grad_sq_norms
from isgd_kernels.sampler import AliasSampler, AliasTable
from isgd_kernels.scorer import GradNormScorer, UnsupportedModuleError, per_example_grad_norms

__version__ = "0.1.0"

__all__ = [
    "AliasSampler",
    "AliasTable",
    "BACKENDS",
    "GradNormScorer",
    "UnsupportedModuleError",
    "backend_available",
    "choose_method",
    "conv_grad_sq_norms",
    "linear_grad_sq_norms",
    "per_example_grad_norms",
    "use_ghost_norm",
]
