"""Per-example gradient norms of a whole model, by a norms-only backward pass.

A scoring pass needs, for every layer with trainable parameters, its input `A` (captured by a
forward hook) and the gradient of the per-example losses w.r.t. its output `G`. The pass takes
gradients w.r.t. the layer outputs only, with every parameter temporarily not requiring grad, so
autograd never runs the weight-gradient GEMMs: scoring costs about a forward plus an input-gradient
backward. Each layer's rule turns (A, G) into per-example squared norms; their sum over layers is
||grad_theta l_i||^2.

The rules run inside the backward pass, as each layer's G arrives (an identity autograd "tap" on
every scored output), and free that layer's A right away: at no point are all layers' G held at
once, so the pass needs no more memory than a training step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from isgd_kernels._checks import accumulation_dtype
from isgd_kernels.scorer import rules  # noqa: F401  (registers the built-in rules)
from isgd_kernels.scorer.rules.fallback import (autograd_fallback_rule, batched_vjp, in_batched_vjp, op_by_vmap,
                                                per_example_grads, replaying, replaying_call, warn_once)
from isgd_kernels.scorer.parts import LinearPart, sq_norm_of_sum
from isgd_kernels.scorer.registry import (RULES, LayerCapture, Rule, Scoring, UnsupportedModuleError, register_rule,
                                          rules_version, supported_names)
from isgd_kernels.scorer.uses import (DERIVED, ParameterUses, Probe, Reprobe, Use, fingerprint, judge_call,
                                     record_call, tensor_outputs, watch_tables)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["GradNormScorer", "LayerCapture", "Rule", "UnsupportedModuleError", "VerifyReport", "evaluating",
           "per_example_grad_norms", "register_rule"]


@contextlib.contextmanager
def evaluating(model: nn.Module, enabled: bool = True):
    """Run the block with `model` in eval mode (when `enabled`), then give every module back its own
    mode. Unlike ``model.train(was_training)``, this keeps modules that were in eval mode on purpose
    inside a training model (frozen BatchNorm statistics when fine-tuning) in eval mode."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if enabled and any(training for _, training in modes):
            model.eval()
        yield model
    finally:
        for m, training in modes:
            if m.training != training:  # setting it goes through nn.Module.__setattr__: only where it changed
                m.training = training


class _CallDirectly:
    """Stands in for torch.utils.checkpoint's reentrant CheckpointFunction during a scoring pass."""

    @staticmethod
    def apply(function, preserve_rng_state, *args):
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            # As torch's reentrant checkpoint: with no input that requires grad, nothing inside gets a gradient.
            with torch.no_grad():
                return function(*args)
        return function(*args)


def _no_recomputation(function, preserve_rng_state, context_fn, *args, **kwargs):
    """Stands in for the non-reentrant checkpoint's set-up during a scoring pass: nothing to set up."""
    yield


@contextlib.contextmanager
def _checkpoints_run_plainly():
    """torch.utils.checkpoint regions run as plain calls during a scoring pass: the values and gradients are
    the same, and the pass's own substitutions (parameter stand-ins, taps) would not be redone by a
    recomputation in backward. The cost is memory: the regions' activations are kept, as without
    checkpointing."""
    module = torch.utils.checkpoint
    names = {"CheckpointFunction": _CallDirectly, "_checkpoint_without_reentrant_generator": _no_recomputation}
    originals = {name: getattr(module, name, None) for name in names}
    if None in originals.values():  # another torch: checkpoints then run as they are
        yield
        return
    for name, stand_in in names.items():
        setattr(module, name, stand_in)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(module, name, original)


class _NormTap(torch.autograd.Function):
    """Identity on a scored call's output tensors whose backward hands their arriving gradients to the
    scorer (the module's rule, or an op-level use's batched backward).

    Every tap also takes the pass's scalar `anchor` leaf: differentiating the loss w.r.t. the anchor
    reaches every tap (and only the taps), so autograd runs nothing below the first scored layer and
    returns nothing big. The tap returns `output.detach()` (same storage, not an autograd view) so that
    in-place ops after the layer (ReLU(inplace=True)) behave exactly as in the plain model.
    """

    @staticmethod
    def forward(ctx, anchor, call, norm_fn, *outputs):
        ctx.call, ctx.norm_fn = call, norm_fn
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        if in_batched_vjp():
            # A use's batched backward reached another scored output on its way to the use's leaves: that
            # path belongs to the other use, which counts it itself.
            return (None, None, None, *(None for _ in grads))
        ctx.norm_fn(ctx.call, grads)
        return (None, None, None, *grads)


@dataclass
class _Piece:
    """A tensor inside a scored call that a rule's scoring forward tapped: what its gradient adds, and the call
    it belongs to (set when the call is scored; a piece of a call that is not scored adds nothing)."""

    norm: Callable
    grads: Callable
    call: LayerCapture | None = None
    sink: Callable | None = None


class _PieceTap(torch.autograd.Function):
    """Identity on a tensor inside a scored call whose backward hands its gradient to the piece. Unlike a call's
    tap it passes the gradient on in a batched backward too: such a backward reaches it only through its own
    call's output (parameters carried into the call), and the path through the call is that use's."""

    @staticmethod
    def forward(ctx, anchor, piece, tensor):
        ctx.piece = piece
        return tensor.detach()

    @staticmethod
    def backward(ctx, grad):
        piece = ctx.piece
        if piece.sink is not None and not in_batched_vjp():
            piece.sink(piece, grad)
        return None, None, grad


class _ScoringForwards:
    """For the length of a pass, the modules whose rule has a scoring forward (RuleSpec.forward) run it in place
    of their own forward; the pieces it taps wait for the call's hook, which gives them the call to score.
    Only a call through the module (its hooks run) runs the scoring forward: a direct `module.forward(...)`
    runs the module's own, whose parameter uses the op watch scores as uses outside a call."""

    def __init__(self, captures: list[LayerCapture]):
        self.captures = [cap for cap in captures
                         if not cap.per_use and getattr(RULES.get(type(cap.module)), "forward", None) is not None]
        self.anchor: torch.Tensor | None = None  # None: pieces are not tapped
        self.pending: dict = {}  # module -> its running call's pieces
        self.calling: Counter = Counter()  # module -> calls of it running
        self.saved: list = []
        self.handles: list = []

    def __enter__(self):
        def enter(module, args):
            self.calling[module] += 1

        def leave(module, args, output):
            self.calling[module] -= 1

        for cap in self.captures:
            module = cap.module
            self.saved.append((module, module.__dict__.get("forward")))
            scoring = Scoring(functools.partial(self.score, module), cap.trainable, cap.label)
            module.forward = functools.partial(self.forward, module, scoring)
            self.handles += [module.register_forward_pre_hook(enter),
                             module.register_forward_hook(leave, always_call=True)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for module, forward in self.saved:
            del module.forward
            if forward is not None:
                module.forward = forward
        self.saved, self.handles = [], []

    def forward(self, module, scoring, *args, **kwargs):
        if self.calling[module]:
            return RULES[type(module)].forward(module, scoring, *args, **kwargs)
        return type(module).forward(module, *args, **kwargs)

    def score(self, module, tensor, norm, grads):
        if self.anchor is None or replaying() or not torch.is_grad_enabled():
            return tensor
        piece = _Piece(norm, grads)
        self.pending.setdefault(module, []).append(piece)
        return _PieceTap.apply(self.anchor, piece, tensor)

    def take(self, module) -> list[_Piece]:
        return self.pending.pop(module, [])


def _tap(anchor, call, norm_fn, output):
    """`output` (a tensor or a nesting of them) with its floating tensors tapped."""
    if isinstance(output, torch.Tensor) and (output.is_floating_point() or output.is_complex()):
        return _NormTap.apply(anchor, call, norm_fn, output)[0]
    leaves, spec = tree_flatten(output)
    where = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    tapped = _NormTap.apply(anchor, call, norm_fn, *(leaves[i] for i in where))
    for i, t in zip(where, tapped):
        leaves[i] = t
    return tree_unflatten(leaves, spec)


class GradNormScorer:
    """Computes ||grad_theta l_i|| for every example i of a batch, for all trainable parameters.

    Args:
        model: the network. Activations must hold the batch in dim 0 (B, ...), except the outputs of
            modules that declare another layout (batch_first=False recurrent and attention layers).
        eval_mode: run the scoring pass in eval mode (dropout off, BatchNorm on running stats);
            the model's mode is restored afterwards.
        backend: kernel backend for the per-layer norms ("auto", "triton", "cuda", "cpu", "torch").
        check_examples_separate: check that per-example gradients are what the scorer computes: on the
            first pass with each loss function (and whenever the model is probed), through the loss alone
            (two backward passes, no model layer), that example i's loss depends on row i of the outputs
            only (refuses losses that couple examples, such as InfoNCE);
            and once per set of trainable parameters, by running the model on the batch in another order,
            that every scored activation holds example i in row i of its batch dim (refuses sequence-first
            activations even when T == B), and by one more backward with the losses weighted by random r_i,
            that every scored activation's gradient is then r_i times the plain one row by row (refuses models
            that mix the examples after a scored layer: batch statistics outside a BatchNorm module, an op along
            dim 0). Tensor inputs whose dim 0 has size B are taken as batched.
        fallback: a module with trainable parameters and no rule (a custom or third-party layer) is scored
            by the exact autograd fallback (isgd_kernels.scorer.rules.fallback), with a one-time warning;
            False refuses it instead.

    Parameters may be used anywhere: a layer called several times, a weight tied across modules or used
    functionally (``F.linear(h, wte.weight)``), a bare ``nn.Parameter`` of a module with submodules: the
    norm is that of the sum of all uses' gradients. `.grad` of the parameters is never touched; the
    model's requires_grad flags are restored.
    """

    def __init__(self, model: nn.Module, *, eval_mode: bool = True, backend: str = "auto",
                 check_examples_separate: bool = True, fallback: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradNormScorer: model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.eval_mode = eval_mode
        self.backend = backend
        self.check_examples_separate = check_examples_separate
        self.fallback = fallback
        self._probed: tuple | None = None  # (trainable signature, verdicts of its op-level uses and calls)
        self._warned_no_probe = False
        self._loss_checked = None  # the loss function the last loss check passed
        self._per_layer: dict | None = None  # set by verify() to record each layer's share
        self._planned: tuple | None = None  # (key, captures, the op watch's tables): see _plan_pass
        self.layers: list[LayerCapture] = self._plan()  # fail early on unsupported modules

    def _plan_pass(self, params: list, requires_grad: list) -> tuple[list[LayerCapture], tuple]:
        """This pass's captures and the op watch's tables: planned anew only when the modules, the parameters,
        their requires_grad flags or the registered rules changed since the last pass (planning walks every
        module and parameter, which costs as much as a small model's forward)."""
        key = (tuple(map(id, self.model.modules())), tuple(map(id, params)), tuple(requires_grad), rules_version())
        if self._planned is None or self._planned[0] != key:
            captures = self._plan()
            self._planned = (key, captures, watch_tables(self.model, captures))
        _, captures, tables = self._planned
        for cap in captures:
            cap.calls = 0
        return captures, tables

    def _plan(self) -> list[LayerCapture]:
        """The modules with trainable parameters, each with its rule; refuses what it cannot do."""
        captures, owned_below = [], []
        for name, module in self.model.named_modules():
            if any(name.startswith(prefix) for prefix in owned_below):
                continue  # a rule above accounts for these parameters
            spec = RULES.get(type(module))
            recurse = spec is not None and spec.owns(module)
            params = dict(module.named_parameters(recurse=recurse))
            trainable = {pname: p.requires_grad for pname, p in params.items()}
            if recurse:
                owned_below.append(f"{name}." if name else "")
            if not any(trainable.values()):
                continue
            label = name or "<root>"
            has_children = next(module.children(), None) is not None
            per_use = spec is None and has_children
            if spec is None and not per_use and not self.fallback:
                raise UnsupportedModuleError(
                    f"GradNormScorer: module '{label}' ({type(module).__name__}) has trainable parameters "
                    f"{[p for p, t in trainable.items() if t]} and no per-example norm rule. Supported: "
                    f"{supported_names()}. Freeze it (requires_grad_(False)) to leave it out, add a rule with "
                    "isgd_kernels.scorer.register_rule, or allow the slow exact fallback (fallback=True).")
            captures.append(LayerCapture(label, module, trainable, per_use=per_use))
            if spec is None and not per_use:
                warn_once(captures[-1])
        return captures

    def norms(self, inputs, targets, loss_fn: LossFn, *, return_losses: bool = False):
        """Per-example gradient norms, shape (B,), float32 (float64 for a float64 model).

        Args:
            inputs: the model's input tensor (B, ...), or a tuple/list of positional inputs whose first
                element is the batched tensor.
            targets: passed to `loss_fn` as is.
            loss_fn: `loss_fn(outputs, targets)` -> per-example losses of shape (B,)
                (e.g. ``nn.CrossEntropyLoss(reduction="none")``).
            return_losses: also return the per-example losses (detached).

        The loss function may also come first, ``norms(loss_fn, inputs, targets)`` (the order of
        ``per_example_grad_norms`` before 0.2): inputs are never callable, so the two orders cannot be
        confused.
        """
        inputs, targets, loss_fn = _canonical_order(inputs, targets, loss_fn, "GradNormScorer.norms")
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        try:
            sq, losses = self._pass(args, targets, loss_fn)
        except Reprobe:  # this batch ran other ops on parameters than the probed one: check it too
            self._probed = None
            sq, losses = self._pass(args, targets, loss_fn)
        norms = sq.sqrt()
        return (norms, losses.detach()) if return_losses else norms

    __call__ = norms

    def _pass(self, args: tuple, targets, loss_fn: LossFn):
        batch = args[0].shape[0]
        model = self.model
        params = list(model.parameters())
        requires_grad = [p.requires_grad for p in params]
        # Planned again when requires_grad (or the model) changed; `layers` shows what the pass holds.
        captures, tables = self._plan_pass(params, requires_grad)
        self.layers = captures
        handles = []
        forwards = _ScoringForwards(captures)
        with evaluating(model, enabled=self.eval_mode), forwards:
            try:
                self._refuse_batch_mixing()
                for p in params:  # no parameter in the graph: autograd runs no weight-gradient GEMM
                    p.requires_grad_(False)
                anchor = torch.zeros((), device=args[0].device, requires_grad=True)
                total = _NormTotal(self.backend, self._per_layer)
                signature = tuple(id(p) for p, flag in zip(params, requires_grad) if flag)
                with torch.inference_mode(False), torch.enable_grad(), _checkpoints_run_plainly():
                    probe, verdicts, call_verdicts = None, None, None
                    if self._probed is not None and self._probed[0] == signature:
                        _, verdicts, call_verdicts = self._probed
                    elif self.check_examples_separate and self._can_probe(batch):
                        probe = self._run_probe(args, targets, loss_fn, captures, batch, forwards)
                    elif self.check_examples_separate and batch >= 2 and not self._warned_no_probe:
                        self._warned_no_probe = True
                        warnings.warn(
                            "GradNormScorer: dropout is active (eval_mode=False), so the layout probe cannot run "
                            "(a permuted batch draws other masks): activations are taken as batch-first by their "
                            "shapes alone, which a sequence-first (T, B, ...) activation with T == B would pass. "
                            "Score in eval mode, or check the model once with scorer.verify.", stacklevel=3)
                    uses = ParameterUses(model, captures, batch, against=probe, verdicts=verdicts, tables=tables,
                                         tap=lambda use, on: _tap(anchor, use, total.add_use, on))
                    state = _PassState(batch, anchor, total, probe, uses, forwards, call_verdicts)
                    forwards.anchor = anchor
                    total.checking = probe is not None
                    # Parameters scored op by op reach the graph only through their stand-ins; on a probed pass
                    # they require grad, so that a use the op watch cannot see (a custom autograd.Function, an
                    # extension op) shows as a gradient of the parameter itself.
                    unseen = [p for cap in captures if cap.per_use for p in cap.trainable_parameters().values()]
                    unseen = unseen if probe is not None else []
                    for p in unseen:
                        p.requires_grad_(True)
                    for cap in captures:
                        if not cap.per_use:
                            handles.append(cap.module.register_forward_hook(self._make_hook(cap, state),
                                                                            with_kwargs=True))
                    with uses:
                        outputs = model(*args)
                        losses = loss_fn(outputs, targets)
                    if probe is not None or not self.check_examples_separate:
                        self._probed = (signature, list(uses.found), list(state.calls_found))
                    total.count_uses(captures, uses.uses)
                    self._check_losses(losses, batch)
                    if probe is not None and not probe.losses_follow(losses.detach()):
                        raise ValueError(
                            "GradNormScorer: with the examples of the batch in reverse order, the per-example losses "
                            "are not the same losses in reverse order: example i's loss depends on other examples, or "
                            "dim 0 of the inputs is not the batch (an unbatched input, a sequence-first one). Pass "
                            "batch-first inputs and a loss whose i-th entry depends on example i alone.")
                    if self.check_examples_separate and (probe is not None or loss_fn is not self._loss_checked):
                        _check_examples_separate(outputs, losses, batch)
                        self._loss_checked = loss_fn
                    if losses.requires_grad:
                        total.backward_started = state.backward_started = True
                        if probe is not None:
                            total.record_weighted(losses, anchor)
                        # On a probed pass the backward also takes the batch gradient of every stand-in leaf,
                        # which the uses' per-example gradients must add up to: nothing left out.
                        leaves = [leaf for _, leaf in uses.stand_ins] if probe is not None else []
                        full = torch.autograd.grad(losses.sum(), [anchor, *leaves, *unseen], allow_unused=True)[1:]
                        if leaves:
                            total.check_accounted(uses, full[:len(leaves)])
                        _refuse_unseen_uses(uses, unseen, full[len(leaves):])
                sq = total.value(batch, args[0].device, accumulation_dtype(losses.dtype))
            finally:
                for h in handles:
                    h.remove()
                for p, flag in zip(params, requires_grad):
                    p.requires_grad_(flag)
        return sq, losses

    def _can_probe(self, batch: int) -> bool:
        """The permuted forward must see the same computation: two examples at least, no active dropout."""
        return batch >= 2 and not any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
                                      for m in self.model.modules())

    def _run_probe(self, args: tuple, targets, loss_fn: LossFn, captures: list[LayerCapture], batch: int,
                   forwards: _ScoringForwards) -> Probe:
        """The forward and the loss on the batch in reverse order (tensors whose dim 0 is the batch, inputs and
        targets, reordered), recording what each candidate op and scored call gave, and the losses."""
        perm = torch.arange(batch - 1, -1, -1, device=args[0].device)
        probe = Probe(perm)

        def reorder(a):
            if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch:
                return a.index_select(0, perm.to(a.device))
            return a

        permuted = tuple(reorder(a) for a in args)
        permuted_targets = tree_map(reorder, targets)
        handles = []

        uses = ParameterUses(self.model, captures, batch, record=probe)
        anchor = forwards.anchor = torch.zeros((), device=args[0].device, requires_grad=True)

        def record(cap):
            def hook(module, inputs, output):
                if not replaying() and torch.is_grad_enabled():  # the calls the pass will score
                    outs = tensor_outputs(output)
                    with uses.pause():
                        record_call(probe, cap, outs, _batch_dims(module, outs))
                        # requires grad downstream as in the scoring pass, where the output is tapped
                        output = _tap(anchor, None, None, output)
                    uses.mark(tensor_outputs(output))
                    return output
            return hook

        try:
            for cap in captures:
                if not cap.per_use:
                    handles.append(cap.module.register_forward_hook(record(cap)))
            with torch.random.fork_rng(devices=[args[0].device] if args[0].is_cuda else []):
                with uses:
                    try:
                        losses = loss_fn(self.model(*permuted), permuted_targets)
                        if isinstance(losses, torch.Tensor):
                            probe.losses = fingerprint(losses.detach())
                    except (ValueError, RuntimeError) as exc:
                        if isinstance(exc, UnsupportedModuleError) or str(exc).startswith("GradNormScorer"):
                            raise
                        raise ValueError(
                            "GradNormScorer: the layout probe runs the model once on the batch in reverse order "
                            f"(first pass only), and the model refused it: {exc}. If the model needs its batch in "
                            "a particular order (pack_padded_sequence with enforce_sorted=True), pass "
                            "enforce_sorted=False, or check_examples_separate=False to skip the probe.") from exc
        finally:
            for h in handles:
                h.remove()
            forwards.anchor, forwards.pending = None, {}  # the probe's pieces are never scored
        return probe

    def verify(self, inputs, targets, loss_fn: LossFn, n: int = 4) -> "VerifyReport":
        """Check the scorer on the first `n` examples of your own model and data against float64
        per-example gradients (one autograd backward per example on a float64 copy of the model), layer
        by layer. Returns a VerifyReport; ``report.ok`` is False and ``str(report)`` names the modules
        that disagree. Run it once before a long job: it catches a layout or loss the scorer's own checks
        cannot see. Targets are sliced per example when they are tensors (or tuples of tensors) with the
        batch in dim 0."""
        inputs, targets, loss_fn = _canonical_order(inputs, targets, loss_fn, "GradNormScorer.verify")
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        n = min(n, args[0].shape[0])
        if n < 1:
            raise ValueError("GradNormScorer.verify: n must be >= 1 and the batch non-empty")
        first = tuple(_rows(a, 0, n) for a in args)
        tgt = _rows(targets, 0, n)
        self._per_layer = {}
        try:
            total = self.norms(first, tgt, loss_fn).double()
            got = self._per_layer
        finally:
            self._per_layer = None
        expected = _reference_per_layer(self.model, self.layers, first, tgt, loss_fn, n, self.eval_mode)
        dtype = next((p.dtype for p in self.model.parameters()), torch.float32)
        rtol = {torch.float64: 1e-8, torch.float32: 2e-3}.get(dtype, 5e-2)
        rows = []
        for cap in self.layers:
            ref = expected.get(cap.name, torch.zeros(n, dtype=torch.float64))
            mine = got.get(cap.name, torch.zeros(n, dtype=torch.float64)).cpu()
            rows.append((cap.name, type(cap.module).__name__, mine.sqrt(), ref.sqrt()))
        ref_total = sum(expected.values(), torch.zeros(n, dtype=torch.float64)).sqrt()
        return VerifyReport(rows, total.cpu(), ref_total, rtol)

    def _refuse_batch_mixing(self) -> None:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                raise ValueError(
                    f"GradNormScorer: '{name}' ({type(module).__name__}) is in training mode, where it normalizes "
                    "with batch statistics and so mixes examples: per-example gradients are not defined. Score "
                    "with eval_mode=True (running statistics), or replace it with GroupNorm/LayerNorm.")

    @staticmethod
    def _make_hook(cap: LayerCapture, state: "_PassState"):
        def hook(module, inputs, kwargs, output):
            with state.uses.pause():  # the scorer's own ops are not the model's
                return scored_call(module, inputs, kwargs, output)

        def scored_call(module, inputs, kwargs, output):
            pieces = state.forwards.take(module)  # tapped inside this call by a scoring forward
            if replaying():  # a fallback rule re-running a module's forward in backward: not a new call
                return None
            if state.backward_started:
                # Non-reentrant activation checkpointing recomputes the forward inside backward to rebuild
                # saved tensors; the graph, and this call's tap, are the original forward's.
                return None
            if not torch.is_grad_enabled():
                # No graph here (torch.no_grad): autograd gives these parameters no gradient from this call.
                return None
            outs = tensor_outputs(output)
            dims = _batch_dims(module, outs)
            index, state.calls_seen = state.calls_seen, state.calls_seen + 1
            if state.call_verdicts is not None:
                if index >= len(state.call_verdicts) or state.call_verdicts[index][0] != cap.name:
                    raise Reprobe()
                verdict = state.call_verdicts[index][1]
                if verdict != DERIVED and judge_call(cap, outs, dims, state.batch, None, index) == DERIVED:
                    raise Reprobe()  # the probed pass had the batch where this one has not
            else:
                verdict = judge_call(cap, outs, dims, state.batch, state.probe, index)
            state.calls_found.append((cap.name, verdict))
            if verdict == DERIVED:
                # No batch in order here (a positional Embedding on arange(T), a sequence-first activation): run
                # the call again on the pass's stand-ins for its parameters and follow its outputs, like an op's.
                params = cap.trainable_parameters()
                leaves = {name: state.uses.stand_in(p) for name, p in params.items()}
                # A parameter passed as an input itself (a bare query table) is read through a leaf of its own too.
                (inputs, kwargs), passed = state.uses.swap_parameters((inputs, kwargs))
                with replaying_call(), torch.enable_grad():
                    output = functional_call(module, leaves, inputs, kwargs, strict=False)
                own = [(id(params[n]), leaf) for n, leaf in leaves.items()]
                state.uses.mark(tensor_outputs(output), own + passed + state.uses.sources_of((inputs, kwargs)))
                return output
            carried = state.uses.sources_of((inputs, kwargs))
            cap.calls += 1
            # Activations are data for the norm kernels, not part of the graph to differentiate.
            call = cap.for_call()  # this call's capture
            call.inputs = tuple(i.detach() if isinstance(i, torch.Tensor) else i for i in inputs)
            call.kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            floating = [d for t, d in zip(outs, dims) if t.is_floating_point() or t.is_complex()]
            call.batch_dims, call.single_output = floating, isinstance(output, torch.Tensor)
            if type(module) not in RULES:  # the fallback checks its vmapped forward against them
                call.outputs = [t.detach() for t in outs if t.is_floating_point() or t.is_complex()]
            tapped = _tap(state.anchor, call, state.total.add_call, output)
            for piece in pieces:
                piece.call, piece.sink = call, state.total.add_piece
            if carried:
                # Parameters reach this call through its input (a followed activation): their per-example
                # gradients are taken here, by a batched backward through the call.
                tapped = state.uses.use_at(cap.label, [t for t in outs if t.is_floating_point() or t.is_complex()],
                                           floating, tapped, carried)
            state.uses.mark(tensor_outputs(tapped))
            return tapped

        return hook

    @staticmethod
    def _check_losses(losses, batch: int) -> None:
        if not isinstance(losses, torch.Tensor) or losses.shape != (batch,):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"GradNormScorer: loss_fn must return per-example losses of shape (B,) = ({batch},), got {shape}. "
                "Use reduction='none' (a 'mean' would scale every norm by 1/B), and sum any other dims per example.")
        bad = ~torch.isfinite(losses.detach())
        if bad.any():
            idx = bad.nonzero().flatten()[:10].tolist()
            raise ValueError(f"GradNormScorer: loss_fn returned non-finite losses for examples {idx}")


def _batch_dims(module: nn.Module, outputs: list) -> list:
    """Where each output of a scored module holds the batch: its rule's declaration, else dim 0."""
    spec = RULES.get(type(module))
    return spec.batch_dims(module, outputs) if spec is not None and spec.batch_dims else [0] * len(outputs)


def _refuse_unseen_uses(uses: ParameterUses, params: list, grads: tuple) -> None:
    for p, g in zip(params, grads):
        if g is not None and bool(g.ne(0).any()):
            raise UnsupportedModuleError(
                f"GradNormScorer: parameter '{uses.label.get(id(p), '?')}' is used by an operation that does not go "
                "through torch's Python dispatch (a custom torch.autograd.Function, an extension op), so its "
                "per-example gradient cannot be taken there. Move that use into a module of its own (it is then "
                "scored by the exact fallback or a rule you register), or freeze the parameter.")


@dataclass
class _PassState:
    batch: int
    anchor: torch.Tensor
    total: "_NormTotal"
    probe: Probe | None
    uses: ParameterUses
    forwards: _ScoringForwards
    call_verdicts: list | None = None  # the probed pass's verdict per scored call, which later passes follow
    calls_seen: int = 0
    calls_found: list = dataclasses.field(default_factory=list)
    backward_started: bool = False


def _check_examples_separate(outputs, losses: torch.Tensor, batch: int) -> None:
    """Refuse outputs/losses whose per-example gradients would not be per-example.

    With per-example losses of batch-first outputs, d(sum_i r_i l_i)/d out[j] = r_j * d(sum_i l_i)/d out[j]
    for any weights r: example j's loss only reads row j. Two backward passes through the loss function
    (not the model) with r = 1 and random r check it. It fails when the loss couples examples, and when
    dim 0 of an output is not the batch (a sequence-first (T, B, ...) output, whatever T is)."""
    outs = [t for t in (outputs if isinstance(outputs, (tuple, list)) else (outputs,))
            if isinstance(t, torch.Tensor) and t.requires_grad and t.dim() > 0 and t.shape[0] == batch]
    if not outs or not losses.requires_grad or batch < 2:
        return
    gen = torch.Generator(device=losses.device).manual_seed(0)
    r = torch.rand(batch, generator=gen, device=losses.device, dtype=losses.dtype) + 0.5
    plain = torch.autograd.grad(losses.sum(), outs, retain_graph=True, allow_unused=True)
    weighted = torch.autograd.grad((losses * r).sum(), outs, retain_graph=True, allow_unused=True)
    rtol = 1e-9 if losses.dtype == torch.float64 else 1e-4 if losses.dtype == torch.float32 else 1e-2
    for out, g, gw in zip(outs, plain, weighted):
        if g is None or gw is None:
            continue
        expected = g * r.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
        err = (gw - expected).abs().max()
        if err > rtol * expected.abs().max().clamp_min(torch.finfo(g.dtype).tiny) * 10:
            raise ValueError(
                f"GradNormScorer: example i's loss depends on more than row i of the model's output {tuple(out.shape)}, "
                "so its gradient is not a per-example gradient. Either loss_fn couples the examples of a batch "
                "(contrastive losses such as InfoNCE, losses normalised over the batch): pass a loss whose i-th "
                "entry depends on example i alone; or the output is not batch-first (a sequence-first (T, B, ...) "
                "output): permute it to (B, T, ...) in the model. (check_examples_separate=False skips this check.)")


class _NormTotal:
    """Running sum of the per-example squared norms, filled by the taps during backward.

    A parameter with one use in the pass adds its squared norm straight away (the rule's, or the norm of
    the use's per-example gradients). A parameter with several uses (module calls and op-level uses) has
    its uses' per-example gradients summed first, cross terms and all, and its norm taken at the end.
    A use that does not reach the loss never gets a gradient and adds nothing."""

    def __init__(self, backend: str, per_layer: dict | None = None):
        self.backend = backend
        self.terms: list[torch.Tensor] = []  # (B,) squared norms of layers and parameters
        self.per_layer = per_layer  # name -> (B,) squared norm, when the caller wants the breakdown
        self.backward_started = False
        self.multi: set[int] = set()  # ids of parameters with several uses in this pass
        self.owner: dict[int, str] = {}  # id(param) -> name of the scored module it belongs to
        self.parts: dict[int, list] = {}  # id(param) -> its uses' per-example gradients (scorer/parts.py)
        self.leaf_sums: dict[int, torch.Tensor] = {}  # id(stand-in leaf) -> its per-example gradients' sum
        self.checking = False  # a probed pass: the sums are checked against the batch gradients
        # The examples-separate check of a probed pass (_rows_checked): per tap, the fingerprint of its gradient in
        # a backward of the losses weighted by `weights`; while `recording`, taps only record it.
        self.weights: torch.Tensor | None = None
        self.weighted: dict = {}
        self.recording = False

    def count_uses(self, captures: list[LayerCapture], op_uses) -> None:
        uses = dict(op_uses)
        for cap in captures:
            for p in cap.trainable_parameters().values():
                self.owner.setdefault(id(p), cap.name)
                uses[id(p)] = uses.get(id(p), 0) + cap.calls
        self.multi = {pid for pid, n in uses.items() if n > 1}

    def _add(self, name: str, sq: torch.Tensor) -> None:
        self.terms.append(sq)  # summed once, in float64, by value()
        if self.per_layer is not None:
            self.per_layer[name] = self.per_layer.get(name, 0) + sq.detach().double()

    def _add_grads(self, grads: dict) -> None:
        """Per-example gradients of one use (dense (B, *shape), or a LinearPart / EmbeddingPart)."""
        for pid, g in grads.items():
            if pid in self.multi:
                self.parts.setdefault(pid, []).append(g)
            else:
                self._add(self.owner[pid], sq_norm_of_sum([g], self.backend))

    def _rows_checked(self, key, label: str, grads: tuple, dims: list) -> bool:
        """In the weighted backward, record the tap's gradient (True: nothing else to do); in the scoring backward,
        check that the weighted one was this one scaled row by row by the weights."""
        if self.weights is None:
            return False
        prints = [fingerprint(g, d) if g is not None and d is not None else None for g, d in zip(grads, dims)]
        if self.recording:
            self.weighted[key] = prints
            return True
        for g, plain, weighted in zip(grads, prints, self.weighted.get(key, ())):
            if plain is None or weighted is None:
                continue
            r = self.weights.to(plain[0])
            rtol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(g.dtype, 1e-2)
            if not bool(((weighted[0] - r * plain[0]).abs() <= rtol * torch.maximum(weighted[1], r * plain[1])
                         + 1e-300).all()):
                raise ValueError(
                    f"GradNormScorer: the output gradients of {label} are not per-example: example i's loss depends "
                    "on other examples through an operation after it, which mixes the examples of the batch "
                    "(statistics over the batch outside a BatchNorm module, an operation along dim 0), so the "
                    "backward does not give per-example gradients there. Compute such statistics per example, or "
                    "use running statistics. (check_examples_separate=False skips this check.)")
        return False

    def add_call(self, call: LayerCapture, grads: tuple) -> None:
        """A scored module call's output gradients arrived."""
        if self._rows_checked(id(call), call.label, grads, call.batch_dims):
            return
        spec = RULES.get(type(call.module))
        grad_output = grads[0] if call.single_output else tuple(grads)
        params = call.trainable_parameters()
        if spec is not None and spec.norm is None:
            pass  # scored by the pieces its scoring forward tapped (add_piece)
        elif any(id(p) in self.multi for p in params.values()):
            if spec is not None and spec.grads is not None:
                by_name = spec.grads(call, grad_output)
            else:
                by_name = per_example_grads(call, grad_output, call.batch_dims)
            self._add_grads({id(params[n]): g for n, g in by_name.items()})
        elif spec is not None:
            self._add(call.name, spec.norm(call, grad_output, self.backend))
        else:
            self._add(call.name, autograd_fallback_rule(call, grad_output, self.backend, call.batch_dims))
        call.inputs, call.kwargs, call.outputs = (), {}, []  # free the call's activations once its norm is known

    def add_piece(self, piece: _Piece, grad: torch.Tensor) -> None:
        """The gradient of a tensor a scoring forward tapped inside a scored call arrived."""
        if self.recording:
            return
        call = piece.call
        params = call.trainable_parameters()
        if any(id(p) in self.multi for p in params.values()):
            self._add_grads({id(params[n]): g for n, g in piece.grads(call, grad).items()})
        else:
            sq = piece.norm(call, grad, self.backend)
            if sq is not None:
                self._add(call.name, sq)

    def add_use(self, use: Use, grads: tuple) -> None:
        """An op-level use's output gradient arrived: one batched backward through the op (and the ops without
        the batch before it) to its stand-in leaves; a parameter read through several leaves sums them."""
        outputs = use.output if isinstance(use.output, list) else [use.output]
        if self._rows_checked(id(use), use.what, grads, use.batch_dims or [0] * len(outputs)):
            return
        grad = grads[0]  # an op's use: its one output's gradient
        if use.linear is not None:  # F.linear on a weight: factored, no batched backward
            x, (wid, wleaf), bias = use.linear
            A, G = x.reshape(x.shape[0], -1, x.shape[-1]), grad.reshape(grad.shape[0], -1, grad.shape[-1])
            result = {wid: LinearPart(A, G)}
            if bias is not None:
                result[bias[0]] = G.sum(1)
            if self.checking:
                self.leaf_sums[id(wleaf)] = torch.einsum("bto,bti->oi", G.double(), A.double())
                if bias is not None:
                    self.leaf_sums[id(bias[1])] = G.double().sum((0, 1))
            use.output = None
            self._add_grads(result)
            return

        def consume(rows, chunk_grads):
            for (pid, leaf), g in zip(use.leaves, chunk_grads):
                if g is not None:
                    result[pid][rows] += g.to(grad.dtype)
                    self.leaf_sums[id(leaf)] = self.leaf_sums.get(id(leaf), 0) + g.double().sum(0)

        dims = use.batch_dims or [0] * len(outputs)
        batch = next(g.shape[d] for g, d in zip(grads, dims) if d is not None)
        result = {pid: grad.new_zeros((batch,) + tuple(leaf.shape)) for pid, leaf in use.leaves}  # (B, *param)
        leaves = [leaf for _, leaf in use.leaves]
        chunks = op_by_vmap(use.op, use.output, grad, leaves) if use.op is not None else None
        if chunks is None:
            batched_vjp(outputs, list(grads), dims, leaves, consume)
        for rows, chunk_grads in chunks or ():
            consume(rows, chunk_grads)
        use.output = use.op = None  # the op's graph and inputs are no longer needed for this use
        self._add_grads(result)

    def record_weighted(self, losses: torch.Tensor, anchor: torch.Tensor) -> None:
        """The first half of the examples-separate check (_rows_checked): a backward of the losses weighted by
        random r to every tap. With examples that do not mix, each tap's gradient is then r_i times the one
        the scoring backward brings, row by row."""
        gen = torch.Generator(device=losses.device).manual_seed(1)
        self.weights = (torch.rand(losses.shape[0], generator=gen, device=losses.device, dtype=torch.float64)
                        + 0.5)
        self.recording = True
        try:
            torch.autograd.grad((losses * self.weights.to(losses.dtype)).sum(), [anchor], retain_graph=True,
                                allow_unused=True)
        finally:
            self.recording = False

    def check_accounted(self, uses: ParameterUses, full: tuple) -> None:
        """The per-example gradients the uses took of each stand-in leaf add up to the leaf's batch gradient:
        a use the scorer failed to tap would otherwise be a silently missing term."""
        for (pid, leaf), g in zip(uses.stand_ins, full):
            if g is None:
                continue
            got = self.leaf_sums.get(id(leaf))
            g = g.double()
            scale = g.abs().max()
            rtol = 1e-9 if leaf.dtype == torch.float64 else 1e-3
            if scale > 0 and (got is None or (got - g).abs().max() > rtol * scale):
                raise RuntimeError(
                    f"GradNormScorer: internal check failed: the per-example gradients of parameter "
                    f"'{uses.label.get(pid, '?')}' do not add up to its batch gradient, so a use of it was not "
                    "scored. Please report this model; check_examples_separate=False skips the check.")

    def value(self, batch: int, device, dtype) -> torch.Tensor:
        for pid, parts in self.parts.items():
            self._add(self.owner[pid], sq_norm_of_sum(parts, self.backend))
        self.parts = {}
        if not self.terms:
            return torch.zeros(batch, device=device, dtype=dtype)
        by_dtype: dict = {}
        for t in self.terms:
            by_dtype.setdefault(t.dtype, []).append(t)
        total = sum(torch.stack(ts).sum(0, dtype=torch.float64) for ts in by_dtype.values())
        return total.to(dtype)


@dataclass
class VerifyReport:
    """The result of GradNormScorer.verify: per scored layer, the scorer's and the float64 reference's
    per-example norms of that layer's parameters; the whole model's norms."""

    layers: list  # (name, type, scorer (n,), reference (n,))
    total: torch.Tensor
    reference_total: torch.Tensor
    rtol: float

    @staticmethod
    def _bad(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
        scale = ref.abs().max().clamp_min(1e-30)
        return bool(((got - ref).abs() > rtol * (ref.abs() + scale)).any())

    @property
    def disagreeing(self) -> list[str]:
        return [f"{name} ({kind})" for name, kind, got, ref in self.layers if self._bad(got, ref, self.rtol)]

    @property
    def ok(self) -> bool:
        return not self.disagreeing and not self._bad(self.total, self.reference_total, self.rtol)

    def __str__(self) -> str:
        lines = [f"GradNormScorer.verify on {len(self.total)} examples (relative tolerance {self.rtol:g}): "
                 + ("all layers agree" if self.ok else "DISAGREES")]
        for name, kind, got, ref in self.layers:
            err = float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())
            flag = "  <-- disagrees" if self._bad(got, ref, self.rtol) else ""
            lines.append(f"  {name} ({kind}): max relative error {err:.2e}{flag}")
        err = float(((self.total - self.reference_total).abs() / self.reference_total.clamp_min(1e-30)).max())
        lines.append(f"  whole model: max relative error {err:.2e}")
        return "\n".join(lines)


def _rows(value, start: int, stop: int):
    """Examples start..stop-1 of a batched tensor (or of each tensor of a tuple/list); anything else as is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[start:stop]
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, start, stop) for v in value)
    return value


def _to_double(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_double(v) for v in value)
    return value


def _reference_per_layer(model: nn.Module, layers: list[LayerCapture], args: tuple, targets, loss_fn, n: int,
                         eval_mode: bool) -> dict[str, torch.Tensor]:
    """Per scored layer, the squared norm of each example's gradient, from one float64 autograd backward
    per example (inputs sliced along dim 0, the batch-first contract) on a copy of the model."""
    model64 = copy.deepcopy(model).double()
    owners = {}  # parameter of the copy -> scored layer name
    by_name = dict(model64.named_modules())
    for cap in layers:
        module = by_name["" if cap.name == "<root>" else cap.name]
        for pname, trainable in cap.trainable.items():
            if trainable:
                owners.setdefault(module.get_parameter(pname), cap.name)
    params = list(owners)
    out = {cap.name: torch.zeros(n, dtype=torch.float64) for cap in layers}
    with evaluating(model64, enabled=eval_mode), torch.inference_mode(False), torch.enable_grad():
        for i in range(n):
            one = tuple(_to_double(_rows(a, i, i + 1)) for a in args)
            loss = loss_fn(model64(*one), _rows(targets, i, i + 1)).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    out[owners[p]][i] += g.to_dense().double().square().sum().cpu()
    return out


def per_example_grad_norms(model: nn.Module, inputs, targets, loss_fn: LossFn, *, backend: str = "auto",
                           eval_mode: bool = True) -> torch.Tensor:
    """||grad_theta l_i|| for each example, shape (B,): ``GradNormScorer(model).norms(inputs, targets, loss_fn)``.

    The arguments come in the order of ``GradNormScorer.norms``; the earlier order
    ``(model, loss_fn, inputs, targets)`` is still accepted (inputs are never callable)."""
    inputs, targets, loss_fn = _canonical_order(inputs, targets, loss_fn, "per_example_grad_norms")
    return GradNormScorer(model, eval_mode=eval_mode, backend=backend).norms(inputs, targets, loss_fn)


def _canonical_order(inputs, targets, loss_fn, where: str):
    """(inputs, targets, loss_fn), also from the loss-first order (loss_fn, inputs, targets); checks types."""
    if not callable(loss_fn) and callable(inputs) and not isinstance(inputs, torch.Tensor):
        inputs, targets, loss_fn = targets, loss_fn, inputs
    if not callable(loss_fn) or isinstance(loss_fn, torch.Tensor):
        raise TypeError(f"{where}: loss_fn must be callable, loss_fn(outputs, targets) -> per-example losses (B,), "
                        f"got {type(loss_fn).__name__}. Pass (inputs, targets, loss_fn).")
    first = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        got = type(first).__name__ if not isinstance(first, torch.Tensor) else "a 0-d tensor"
        raise TypeError(f"{where}: inputs must be a batched tensor (B, ...) or a tuple/list whose first element is "
                        f"one, got {got}")
    return inputs, targets, loss_fn
