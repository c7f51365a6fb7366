"""The scorer's rule registry: what a rule receives, its signature, and the table of rules.

A leaf module (it imports nothing of the scorer), so the rule modules and the scorer both depend on
it and never on each other. A rule turns one scored module's captured inputs and the gradient of
the per-example losses w.r.t. its output into the (B,) squared norm of the gradient of the module's
trainable direct parameters.
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
    """What the forward pass recorded for one scored module."""

    name: str
    module: nn.Module
    trainable: dict[str, bool]  # direct parameter name -> requires_grad at the start of the pass
    inputs: tuple = ()
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the call
    calls: int = 0
    tapped: bool = False  # its output carries the norm tap of this pass

    @property
    def label(self) -> str:
        """How error messages name the module: ``module 'name' (Type)``."""
        return f"module '{self.name}' ({type(self.module).__name__})"

    def is_trainable(self, param: str) -> bool:
        """The module has a parameter `param` (not None) that required grad when the pass began."""
        return getattr(self.module, param, None) is not None and self.trainable.get(param, False)

    def argument(self, position: int, name: str, default=None):
        """The call's argument at `position`, or passed by keyword as `name`."""
        if len(self.inputs) > position:
            return self.inputs[position]
        return self.kwargs.get(name, default)

    def first_input(self) -> torch.Tensor:
        if not self.inputs or not isinstance(self.inputs[0], torch.Tensor):
            raise ValueError(f"GradNormScorer: {self.label} was called without a tensor as first input")
        return self.inputs[0]


# rule(capture, grad_output, backend) -> (B,) squared norm of the module's trainable direct parameters.
Rule = Callable[[LayerCapture, torch.Tensor, str], torch.Tensor]

# Exact types only: a subclass may use its parameters differently in forward (LoRA, quantized, ...).
RULES: dict[type, Rule] = {}


def register_rule(module_type: type, rule: Rule) -> None:
    """Teach the scorer a new module type. `rule(capture, grad_output, backend) -> (B,)` must return
    the exact per-example squared gradient norm of the module's trainable direct parameters."""
    RULES[module_type] = rule


def supported_names() -> str:
    return ", ".join(sorted(t.__name__ for t in RULES))
