"""isgd_kernels: per-example gradient norms, alias-table sampling and importance-sampled SGD.

    import isgd_kernels
    sq = isgd_kernels.linear_grad_sq_norms(x, grad_out)             # one layer, (B,)
    norms = isgd_kernels.per_example_grad_norms(model, inputs, targets, loss_fn)  # whole model, (B,)

The package is one directory per op family (linear_norms, conv_norms, alias), each with its public
op, its Triton kernels and its pure-torch reference, and the scorer on top of them; see
docs/design.md for the math and the layout.
"""
from isgd_kernels._backend import BACKENDS, backend_available
from isgd_kernels.alias import AliasTable
from isgd_kernels.alias.sampler import AliasSampler
from isgd_kernels.conv_norms import conv_grad_sq_norms
from isgd_kernels.cost import choose_method, use_ghost_norm
from isgd_kernels.linear_norms import linear_grad_sq_norms
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
