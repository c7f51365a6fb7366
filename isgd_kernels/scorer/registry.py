"""The scorer's rule registry: what a rule receives, its signature, and the table of rules.

A leaf module (it imports nothing of the scorer), so the rule modules and the scorer both depend on
it and never on each other. A rule turns one call of a scored module (its captured inputs and the
gradient of the per-example losses w.r.t. its output) into the (B,) squared norm of the gradient of
the module's trainable parameters from that call.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


class UnsupportedModuleError(TypeError):
    """A module with trainable parameters that the scorer has no exact rule for."""


@dataclass
class LayerCapture:
    """One scored module, and what the forward pass recorded for one call of it."""

    name: str
    module: nn.Module
    # parameter name (dotted below the module for a rule that owns its children) -> requires_grad at
    # the start of the pass
    trainable: dict[str, bool]
    inputs: tuple = ()
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the call
    calls: int = 0
    # Scored op by op (uses.py) rather than by a rule on the module's calls: direct parameters of a module
    # with submodules and no rule (a positional embedding or class token on the root, a LoRA wrapper).
    per_use: bool = False
    batch_dims: list = field(default_factory=list)  # of the call's floating outputs (None: no batch)
    single_output: bool = True  # the call returned one tensor (its rule gets one gradient, not a tuple)
    outputs: list = field(default_factory=list)  # its floating outputs, kept for a call without a rule
    # trainable_parameters(), looked up once (the copies of a capture made for each call share it)
    resolved: dict | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        """How error messages name the module: ``module 'name' (Type)``."""
        return f"module '{self.name}' ({type(self.module).__name__})"

    def parameter(self, name: str) -> torch.Tensor | None:
        """The module's parameter `name` (dotted for a child's), or None."""
        try:
            return self.module.get_parameter(name)
        except AttributeError:
            return None

    def is_trainable(self, param: str) -> bool:
        """The module has a parameter `param` (not None) that required grad when the pass began."""
        return param in self.trainable_parameters()

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """{name: parameter} of those that required grad when the pass began (do not modify: it is shared)."""
        if self.resolved is None:
            found = {name: self.parameter(name) for name, flag in self.trainable.items() if flag}
            self.resolved = {name: p for name, p in found.items() if p is not None}
        return self.resolved

    def for_call(self) -> "LayerCapture":
        """A shallow copy that records one call (cheaper than copy.copy or dataclasses.replace, and on the
        path of every scored call)."""
        call = LayerCapture.__new__(LayerCapture)
        call.__dict__.update(self.__dict__)
        return call

    def argument(self, position: int, name: str, default=None):
        """The call's argument at `position`, or passed by keyword as `name`."""
        if len(self.inputs) > position:
            return self.inputs[position]
        return self.kwargs.get(name, default)

    def first_input(self) -> torch.Tensor:
        if not self.inputs or not isinstance(self.inputs[0], torch.Tensor):
            raise ValueError(f"GradNormScorer: {self.label} was called without a tensor as first input")
        return self.inputs[0]


# rule(capture, grad_output, backend) -> (B,) squared norm of the module's trainable parameters' gradient
# from the captured call. grad_output is a tensor when the module returns one tensor; for a module that
# returns a tuple (or other nesting) of tensors, a tuple with the gradient of each tensor it returned, in
# torch.utils._pytree order, zeros where no gradient reached it.
Rule = Callable[[LayerCapture, "torch.Tensor | tuple", str], torch.Tensor]
# batch_dims(module, outputs) -> for each tensor the module returned, the dim that holds the batch (None for
# one that has none): how a sequence-first module (batch_first=False) declares its layout.
BatchDims = Callable[[nn.Module, list], list]
# grads(capture, grad_output) -> {parameter name: (B, *shape) per-example gradients} for a parameter that
# has several uses (a shared layer called twice, a tied weight), whose uses' gradients must be summed
# before the norm. Without it the scorer replays the module (the exact autograd fallback's way).
GradsRule = Callable[[LayerCapture, "torch.Tensor | tuple"], dict]
# forward(module, scoring, *args, **kwargs) -> what module(*args, **kwargs) returns: the module's forward
# written for a scoring pass, so that its rule reads every gradient it needs in the pass's own backward
# instead of replaying the module. ``scoring.tap(tensor, norm, grads) -> tensor`` returns `tensor` tapped
# (see Scoring); when its gradient G arrives, ``norm(capture, G, backend) -> (B,)`` (or None: nothing
# trainable) is added to the module's squared norm, or, for a parameter with other uses in the pass,
# ``grads(capture, G) -> {parameter name: per-example gradient (B, *shape) or scorer.parts.LinearPart}``
# joins its other uses.
ScoringForward = Callable[..., object]


@dataclass
class Scoring:
    """What a scoring forward receives besides the module and the call's arguments."""

    tap: Callable  # tap(tensor, norm, grads) -> tensor, tapped
    trainable: dict[str, bool]  # the module's parameters (dotted below it) -> required grad when the pass began
    label: str  # how error messages name the module: module 'name' (Type)

    def is_trainable(self, name: str) -> bool:
        return self.trainable.get(name, False)


@dataclass(frozen=True)
class RuleSpec:
    norm: Callable | None  # Rule; None when the scoring forward's pieces give the whole norm
    batch_dims: BatchDims | None = None
    owns_children: bool | Callable[[nn.Module], bool] = False
    grads: GradsRule | None = None
    forward: ScoringForward | None = None

    def owns(self, module: nn.Module) -> bool:
        """The rule accounts for the parameters of `module`'s submodules (decided per module when
        owns_children is a callable)."""
        return bool(self.owns_children(module)) if callable(self.owns_children) else bool(self.owns_children)


# Exact types only: a subclass may use its parameters differently in forward (LoRA, quantized, ...).
RULES: dict[type, RuleSpec] = {}
_VERSION = [0]  # bumped by every register_rule: a scorer's cached plan is stale once it changes


def rules_version() -> int:
    return _VERSION[0]


def register_rule(module_type: type, rule: Rule | None, *, batch_dims: BatchDims | None = None,
                  owns_children: bool | Callable[[nn.Module], bool] = False,
                  grads: GradsRule | None = None, forward: ScoringForward | None = None) -> None:
    """Teach the scorer a new module type. `rule(capture, grad_output, backend) -> (B,)` must return
    the exact per-example squared gradient norm of the module's trainable parameters from one call.

    batch_dims: for a module whose outputs are not batch-first, `batch_dims(module, outputs)` gives the
        batch dim of each tensor it returns (default: dim 0 of every one).
    owns_children: the rule accounts for the parameters of the module's submodules too (dotted names in
        `capture.trainable`); they are then not scored on their own. A callable `owns_children(module)`
        decides it per module (a layer that is scored through its children in one layout and as a whole in
        another); a module whose rule does not own its children is scored through them.
    grads: `grads(capture, grad_output) -> {name: (B, *shape)}` per-example gradients, used when a
        parameter has several uses in one pass (default: the exact replay of the module).
    forward: a scoring forward (see ScoringForward above) that runs in place of the module's forward during
        a scoring pass and scores the module's parameters piece by piece where their gradients arise (the
        attention rule's in- and out-projections); `rule` may then be None."""
    if rule is None and forward is None:
        raise TypeError(f"register_rule({module_type.__name__}): give a rule, a scoring forward, or both")
    RULES[module_type] = RuleSpec(rule, batch_dims, owns_children, grads, forward)
    _VERSION[0] += 1


def supported_names() -> str:
    return ", ".join(sorted(t.__name__ for t in RULES))
