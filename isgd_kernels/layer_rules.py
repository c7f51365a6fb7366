"""Per-example gradient-norm rules for Embedding and the normalization layers.

Each rule has the scorer's signature `rule(capture, grad_output, backend) -> (B,)` and returns the
exact per-example squared norm of the gradient of the module's trainable direct parameters. They are
pure PyTorch, vectorized over the batch, and never form per-example weight gradients larger than the
parameter itself per example (B x |param|); `backend` is accepted for the common signature and unused.

- Embedding: g_i[v] = sum_{t: tok_t = v} delta_t, so ||g_i||^2 = sum over distinct tokens v of
  example i of ||sum_{t: tok_t = v} delta_t||^2 (DESIGN.md section 1). Rows are summed per
  (example, token) key found by one sort of the B*T keys; no (B, num_embeddings, dim) buffer.
- LayerNorm / RMSNorm / GroupNorm / InstanceNorm / BatchNorm (running statistics): the layer is
  y = x_hat * w + b with x_hat free of w and b, so per example dW = sum over the positions that
  share a parameter of delta * x_hat and db = sum of delta: a (B, |param|) tensor each. x_hat is
  recomputed from the captured input with the layer's own functional (no affine) in the
  accumulation dtype.

Accumulation is float32 (float64 when the input or grad_output is float64). Importing this module
registers every rule with `isgd_kernels.scorer.register_rule`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from isgd_kernels.scorer import LayerCapture, register_rule


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _module_label(cap: LayerCapture) -> str:
    return f"module '{cap.name}' ({type(cap.module).__name__})"


def _input(cap: LayerCapture) -> torch.Tensor:
    if not cap.inputs or not isinstance(cap.inputs[0], torch.Tensor):
        raise ValueError(f"GradNormScorer: {_module_label(cap)} was called without a tensor as first input")
    return cap.inputs[0]


def _check_same_shape(cap: LayerCapture, x: torch.Tensor, grad_output: torch.Tensor) -> None:
    if x.shape != grad_output.shape:
        raise ValueError(f"GradNormScorer: {_module_label(cap)}: input {tuple(x.shape)} and gradient of "
                         f"output {tuple(grad_output.shape)} differ in shape")


def _trainable(cap: LayerCapture, name: str) -> bool:
    return getattr(cap.module, name, None) is not None and cap.trainable.get(name, False)


def _affine_sq_norms(cap: LayerCapture, x_hat: torch.Tensor, delta: torch.Tensor,
                     reduce_dim: int) -> torch.Tensor:
    """Per-example ||dW||^2 + ||db||^2 of an elementwise affine y = x_hat * w + b.

    x_hat, delta: 3-D, (B, R, P) with reduce_dim=1 (parameter on the last dims, e.g. LayerNorm) or
    (B, P, R) with reduce_dim=2 (parameter per channel, e.g. GroupNorm); R indexes the positions that
    share one parameter element, P the parameter elements (flattened). Same dtype (accumulation).
    """
    total = delta.new_zeros(delta.shape[0])
    if _trainable(cap, "weight"):
        total += (delta * x_hat).sum(reduce_dim).square().sum(1)
    if _trainable(cap, "bias"):
        total += delta.sum(reduce_dim).square().sum(1)
    return total


# ---------------------------------------------------------------------------------------- Embedding

def embedding_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.Embedding: sum over distinct tokens v of example i of ||sum_{t: tok_t = v} delta_t||^2.

    Tokens equal to padding_idx get a zero gradient row in PyTorch and contribute nothing. With
    max_norm the forward renormalizes the looked-up rows in place without autograd, so the gradient
    is the same scatter of delta rows (w.r.t. the renormalized weight, as `.grad` is): exact.
    sparse=True changes the gradient's layout only. scale_grad_by_freq is refused: it divides each
    row's gradient by the token's count in the whole mini-batch, which couples examples.
    """
    module = cap.module
    if module.scale_grad_by_freq:
        raise ValueError(
            f"GradNormScorer: {_module_label(cap)} has scale_grad_by_freq=True: PyTorch divides each row's "
            "gradient by that token's frequency in the whole mini-batch, so one example's gradient depends "
            "on the other examples and per-example gradient norms are not defined. Build the embedding "
            "with scale_grad_by_freq=False to score it, or freeze it (requires_grad_(False)).")
    idx = _input(cap)
    batch, dim = idx.shape[0], module.embedding_dim
    if grad_output.shape != (*idx.shape, dim):
        raise ValueError(f"GradNormScorer: {_module_label(cap)}: indices {tuple(idx.shape)} and gradient "
                         f"of output {tuple(grad_output.shape)} do not match (expected indices shape + "
                         f"({dim},))")
    acc = _acc_dtype(grad_output)
    delta = grad_output.reshape(-1, dim).to(acc)  # (N, dim), N = B*T, rows in example-major order
    n = delta.shape[0]
    if n == 0:
        return delta.new_zeros(batch)
    tok = idx.reshape(-1).long()
    if module.padding_idx is not None:
        delta = delta * (tok != module.padding_idx).unsqueeze(1).to(acc)
    per_example = n // batch
    example = torch.arange(batch, device=tok.device).repeat_interleave(per_example)
    # One sort of the (example, token) keys; segment ids of equal keys. Static sizes throughout (at
    # most N segments), so no host synchronization, unlike torch.unique.
    keys = example * module.num_embeddings + tok
    sorted_keys, order = keys.sort()
    new_segment = torch.ones_like(sorted_keys, dtype=torch.long)
    new_segment[1:] = (sorted_keys[1:] != sorted_keys[:-1]).long()
    segment_sorted = new_segment.cumsum(0) - 1
    segment = torch.empty_like(segment_sorted).scatter_(0, order, segment_sorted)  # per row, original order
    rows = delta.new_zeros(n, dim).index_add_(0, segment, delta)  # summed gradient row per (example, token)
    seg_example = torch.zeros(n, dtype=torch.long, device=tok.device).scatter_(0, segment, example)
    # Unused segment slots are zero rows: they add 0 to example 0.
    return delta.new_zeros(batch).index_add_(0, seg_example, rows.square().sum(1))


# ---------------------------------------------------------------------------- LayerNorm / RMSNorm

def _last_dims_rule(cap: LayerCapture, grad_output: torch.Tensor, x_hat_fn) -> torch.Tensor:
    x = _input(cap)
    _check_same_shape(cap, x, grad_output)
    shape = tuple(cap.module.normalized_shape)
    if x.dim() <= len(shape):
        raise ValueError(
            f"GradNormScorer: {_module_label(cap)} normalizes over the last {len(shape)} dims {shape} of an "
            f"input {tuple(x.shape)} that has no batch dim outside them, so it mixes examples; feed it "
            f"(B, ..., {', '.join(map(str, shape))}).")
    acc = _acc_dtype(x, grad_output)
    x_hat = x_hat_fn(x.to(acc), list(shape))
    p = math.prod(shape)
    batch = x.shape[0]
    return _affine_sq_norms(cap, x_hat.reshape(batch, -1, p), grad_output.to(acc).reshape(batch, -1, p), 1)


def layer_norm_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.LayerNorm: dW_i = sum over the non-normalized positions of delta * x_hat, db_i = sum of delta."""
    eps = cap.module.eps
    return _last_dims_rule(cap, grad_output, lambda x, shape: F.layer_norm(x, shape, None, None, eps))


def rms_norm_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.RMSNorm: dW_i = sum over the non-normalized positions of delta * x / rms(x).

    eps=None is passed through on the upcast input: PyTorch then uses the epsilon of the op-math type
    (float32 for fp16/bf16/fp32 inputs, float64 for float64), which is what its forward used.
    """
    eps = cap.module.eps
    return _last_dims_rule(cap, grad_output, lambda x, shape: F.rms_norm(x, shape, None, eps))


# ------------------------------------------------------------------ GroupNorm / InstanceNorm / BatchNorm

def _channel_rule(cap: LayerCapture, grad_output: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor,
                  acc: torch.dtype) -> torch.Tensor:
    batch, channels = x.shape[0], x.shape[1]
    return _affine_sq_norms(cap, x_hat.reshape(batch, channels, -1),
                            grad_output.to(acc).reshape(batch, channels, -1), 2)


def _running_stats_x_hat(module: nn.Module, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.to(acc).view(view)
    var = module.running_var.to(acc).view(view)
    return (x - mean) * torch.rsqrt(var + module.eps)


def group_norm_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.GroupNorm: per channel c, dW_i[c] = sum over positions of delta * x_hat, db_i[c] = sum of delta."""
    x = _input(cap)
    _check_same_shape(cap, x, grad_output)
    acc = _acc_dtype(x, grad_output)
    x_hat = F.group_norm(x.to(acc), cap.module.num_groups, None, None, cap.module.eps)
    return _channel_rule(cap, grad_output, x, x_hat, acc)


_INSTANCE_NORM_DIMS = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}


def instance_norm_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.InstanceNorm{1,2,3}d, affine: per-channel dW/db as for GroupNorm.

    Both of PyTorch's modes are exact: per-(example, channel) statistics (training mode, or
    track_running_stats=False) and running statistics (eval mode with track_running_stats=True).
    """
    module = cap.module
    x = _input(cap)
    _check_same_shape(cap, x, grad_output)
    want = _INSTANCE_NORM_DIMS[type(module)]
    if x.dim() != want:
        raise ValueError(
            f"GradNormScorer: {_module_label(cap)} got a {x.dim()}-D input {tuple(x.shape)}; the scorer "
            f"needs the batched {want}-D form (B, C, ...): an unbatched input has no batch dim.")
    acc = _acc_dtype(x, grad_output)
    if module.training or not module.track_running_stats:
        x_hat = F.instance_norm(x.to(acc), None, None, None, None, True, 0.0, module.eps)
    else:
        x_hat = _running_stats_x_hat(module, x.to(acc), acc)
    return _channel_rule(cap, grad_output, x, x_hat, acc)


def batch_norm_rule(cap: LayerCapture, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """nn.BatchNorm{1,2,3}d with running statistics: x_hat = (x - running_mean) / sqrt(running_var + eps),
    per-channel dW/db as for GroupNorm. Batch statistics mix examples and are refused."""
    module = cap.module
    if module.running_mean is None or module.running_var is None:
        raise ValueError(
            f"GradNormScorer: {_module_label(cap)} has track_running_stats=False, so it normalizes with "
            "batch statistics even in eval mode: every example's output depends on the whole batch and "
            "per-example gradients are not defined. Use track_running_stats=True and score in eval mode, or "
            "replace it with GroupNorm/LayerNorm.")
    if module.training:
        raise ValueError(
            f"GradNormScorer: {_module_label(cap)} is in training mode, where it normalizes with batch "
            "statistics and so mixes examples: per-example gradients are not defined. Score in eval mode "
            "(running statistics), or replace it with GroupNorm/LayerNorm.")
    x = _input(cap)
    _check_same_shape(cap, x, grad_output)
    if x.dim() < 2:
        raise ValueError(f"GradNormScorer: {_module_label(cap)} needs a batched input (B, C, ...), got "
                         f"{tuple(x.shape)}")
    acc = _acc_dtype(x, grad_output)
    return _channel_rule(cap, grad_output, x, _running_stats_x_hat(module, x.to(acc), acc), acc)


def _register_all() -> None:
    register_rule(nn.Embedding, embedding_rule)
    register_rule(nn.LayerNorm, layer_norm_rule)
    if hasattr(nn, "RMSNorm"):  # torch >= 2.4
        register_rule(nn.RMSNorm, rms_norm_rule)
    register_rule(nn.GroupNorm, group_norm_rule)
    for cls in _INSTANCE_NORM_DIMS:
        register_rule(cls, instance_norm_rule)
    # SyncBatchNorm in eval mode is a plain BatchNorm on running statistics.
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        register_rule(cls, batch_norm_rule)


_register_all()
