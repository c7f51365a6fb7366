"""The cost rule that picks how a layer's per-example gradient norms are computed.

For one example, with T positions, input width d and output width p:
  * ghost norm       sum_{t,s} (a_t . a_s)(delta_t . delta_s):  2 T^2 (d + p) FLOPs
  * tile-materialize ||G^T A||_F^2:                              2 T d p FLOPs
Ghost wins iff T (d + p) < d p. This is the FLOP rule, not the memory rule 2T^2 < dp used by other
libraries: the fused kernels never store either intermediate, so memory does not enter the choice.
"""
from __future__ import annotations

METHODS = ("auto", "ghost", "materialize")


def use_ghost_norm(T: int, d_in: int, d_out: int) -> bool:
    """True when the ghost norm costs fewer FLOPs than materializing per-example gradient tiles."""
    return T * (d_in + d_out) < d_in * d_out


def choose_method(T: int, d_in: int, d_out: int, method: str = "auto") -> str:
    """Resolve `method` for a (T, d_in, d_out) problem: "outer" for T == 1, else ghost/materialize.

    An explicit "ghost" or "materialize" overrides the cost rule (T == 1 always uses the outer
    product, which both reduce to).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if T == 1:
        return "outer"
    if method != "auto":
        return method
    return "ghost" if use_ghost_norm(T, d_in, d_out) else "materialize"
