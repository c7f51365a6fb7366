"""Parameters wherever they are used: the ops of a scoring pass that consume a trainable parameter
outside the call of the module whose rule accounts for it, and the batch-layout probe.

A parameter's per-example gradient is the sum over all its uses. Uses inside its module's call are the
rule's (captured by the scorer's module hooks). Every other use is an op seen by ``ParameterUses``, a
``TorchFunctionMode`` that also knows which module is running: logits ``F.linear(h, wte.weight)`` of a
tied head, ``h @ emb.weight.T``, a bare ``nn.Parameter`` of a module with submodules and no rule (a
positional embedding, a class token, a LayerScale gamma, a learnable temperature, LoRA factors).

Such an op runs on a per-pass leaf standing in for the parameter. Its output either holds no batch yet
(``self.pos[:T]``, ``W.t()``, ``temp.exp()``): it is *derived*, and ops consuming it are uses too; or it is
batch-first: it is tapped like a module output, and in backward one batched backward pass through the
op (and the derived ops before it) gives each example's gradient of the parameters from this use.

Which of the two an op output is, and whether every scored module's output really holds example i in
row i of its batch dim, is not decided by shapes (a sequence-first (T, B, ...) activation passes any
shape test when T == B) but by the probe: on the first pass for a set of trainable parameters, the
model also runs on the batch in another order; a batch-first output is permuted the same way, a derived
one is unchanged, anything else is refused. Later passes reuse the probe's verdicts, op by op; a pass
whose ops differ from the probe's is probed again.
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode, _get_current_function_mode, _pop_mode_temporarily
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from isgd_kernels.scorer.registry import LayerCapture

BATCHED, DERIVED = "batched", "derived"


class Reprobe(Exception):
    """This pass's ops differ from the probed pass's (data-dependent control flow): probe again."""


@dataclass
class Use:
    """One op-level use: its output (batch-first, with a graph to the leaves) and the stand-ins it reads."""

    what: str
    output: torch.Tensor | list  # a list: a module call's floating outputs, with the batch in `batch_dims`
    leaves: list  # (id(parameter), stand-in leaf) pairs; a parameter read twice has two leaves
    # F.linear(x, W, b) with W (and b) stand-ins and x free of parameters: (x, W's pair, b's pair or None), so
    # W's per-example gradients stay factored (scorer/parts.py) instead of going through a batched backward
    linear: tuple | None = None
    batch_dims: list | None = None
    # the op itself: (func, flat inputs, their pytree spec, ids of the inputs that carry parameters), so that
    # its per-example gradients can be taken by vmap over the examples (rules/fallback.op_by_vmap)
    op: tuple | None = None


@dataclass
class Probe:
    """A forward on the batch in another order: a fingerprint of what each op downstream of a parameter
    use and each scored module call gave, in order."""

    perm: torch.Tensor
    ops: list = field(default_factory=list)  # (op name, fingerprint)
    calls: list = field(default_factory=list)  # (module name, [fingerprint per output])
    losses: tuple | None = None  # fingerprint of the per-example losses

    def losses_follow(self, losses: torch.Tensor) -> bool:
        """The probe's losses are `losses` in the probe's order (True when it recorded none)."""
        return self.losses is None or _same(self.losses, fingerprint(losses), self.perm.to(losses.device),
                                            losses.dtype)


_PROJECTIONS: dict = {}


def fingerprint(t: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One number per index of `dim` (a random projection of that slice, in float64) and the rounding
    scale each may carry: enough to tell whether two tensors are equal, or permuted copies along `dim`,
    without keeping them. None for a tensor without that dim."""
    if not (t.is_floating_point() or t.is_complex()):
        t = t.double()
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() <= dim:
        return None
    rows = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1)
    if rows.is_complex():
        rows = torch.view_as_real(rows).reshape(rows.shape[0], -1)
    key = (rows.shape[1], rows.device)
    if key not in _PROJECTIONS:
        gen = torch.Generator(device=rows.device).manual_seed(rows.shape[1])
        _PROJECTIONS[key] = torch.randn(rows.shape[1], generator=gen, device=rows.device, dtype=torch.float64)
    r = _PROJECTIONS[key]
    rows = rows.double()
    return rows @ r, rows.abs() @ r.abs()


def _same(a, b, perm: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Fingerprints a and b agree, b's rows taken in the order `perm` when given."""
    if a is None or b is None or a[0].shape != b[0].shape:
        return False
    fb, sb = (b[0][perm], b[1][perm]) if perm is not None else b
    if not (torch.isfinite(a[0]).all() and torch.isfinite(fb).all()):
        return bool(torch.equal(a[0].nan_to_num(), fb.nan_to_num()))  # NaN/inf inputs: exact agreement only
    rtol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)
    return bool(((a[0] - fb).abs() <= rtol * torch.maximum(a[1], sb) + 1e-300).all())


class ParameterUses(TorchFunctionMode):
    """Watches the ops of one forward pass (and the loss) for uses of trainable parameters outside their
    rule's module call; see the module docstring.

    Modes: `record` (a Probe to fill: the permuted forward, no taps); `against` (the probed pass: judge
    each op output against the probe's); `verdicts` (a later pass: the probed pass's verdicts, op by op);
    none of them (no probe possible: one example, or dropout active): shapes decide.
    While probing, every op downstream of a parameter use is followed (so that both forwards count
    the same ops); `found` keeps the verdicts of the ops that use parameters, which later passes follow.
    """

    def __init__(self, model: nn.Module, captures: list[LayerCapture], batch: int, *, tap=None,
                 record: Probe | None = None, against: Probe | None = None, verdicts: list | None = None,
                 tables: tuple | None = None):
        super().__init__()
        self.batch = batch
        self.tap, self.record, self.against, self.verdicts = tap, record, against, verdicts
        self.follow = record is not None or against is not None  # follow every op downstream of a use
        # owners: id(param) -> the modules whose calls cover its uses (rules); label: id(param) -> its name;
        # names: module -> its name. The same for every pass of a plan: the scorer keeps them (watch_tables).
        self.owners, self.label, self.names = tables if tables is not None else watch_tables(model, captures)
        self.model = model
        self.active: Counter = Counter()  # modules whose forward is running
        self.stack: list[nn.Module] = []
        # tensor -> (id(param), stand-in leaf) pairs it was computed from, for a tensor without the batch in order
        self.derived = WeakIdKeyDictionary()
        self.stand_ins: list = []  # every (id(param), leaf) of this pass, for the accounting check
        self.seen = WeakIdKeyDictionary()  # while probing: every tensor downstream of a use
        self.ops_seen = 0
        self.uses: Counter = Counter()  # id(param) -> op-level uses in this pass
        self.found: list = []  # (op name, verdict) of each op that uses parameters, in order
        self.paused = False
        self.handles = []

    # -- module stack -------------------------------------------------------------------------------
    def __enter__(self):
        # Global module hooks (two registrations, not two per module), which only this thread's calls move:
        # another thread's model runs outside this pass.
        thread = threading.get_ident()

        def enter(module, args):
            if threading.get_ident() == thread:
                self.active[module] += 1
                self.stack.append(module)

        def leave(module, args, output):
            if threading.get_ident() == thread:
                self.active[module] -= 1
                self.stack.pop()

        self.handles = [register_module_forward_pre_hook(enter),
                        register_module_forward_hook(leave, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return super().__exit__(*exc)

    def where(self) -> str:
        """The innermost running module of the model (a loss module is not one), for messages."""
        inner = next((m for m in reversed(self.stack) if m in self.names), None)
        return f"module '{self.names[inner]}'" if inner is not None else "the model's or the loss's code"

    @contextlib.contextmanager
    def pause(self):
        """The scorer's own ops in its hooks: not the model's, not watched. The mode leaves the torch function
        stack meanwhile (it is on top when a module's hook runs), so they do not even call it, which every
        tensor method would; tensor subclasses keep their own __torch_function__."""
        paused, self.paused = self.paused, True
        try:
            if _get_current_function_mode() is self:
                with _pop_mode_temporarily():
                    yield
            else:
                yield
        finally:
            self.paused = paused

    def mark(self, outputs: list, sources: list | None = None) -> None:
        """A scored call's outputs: followed while probing; derived from `sources` ((id, leaf) pairs) if given."""
        for t in outputs:
            if isinstance(t, torch.Tensor):
                if self.follow:
                    self.seen[t] = True
                if sources:
                    self.derived[t] = tuple(sources)

    def sources_of(self, tree) -> list:
        """The (id(param), leaf) pairs the tensors in `tree` (a call's inputs) were computed from."""
        if not len(self.derived):  # no tensor of this pass comes from parameters outside their modules
            return []
        pairs, known = [], set()
        for t in tree_leaves(tree):
            if isinstance(t, torch.Tensor):
                for pair in self.derived.get(t, ()):
                    if id(pair[1]) not in known:
                        known.add(id(pair[1]))
                        pairs.append(pair)
        return pairs

    def labels(self, pairs: list) -> str:
        return ", ".join(sorted({f"'{self.label.get(pid, '?')}'" for pid, _ in pairs}))

    def use_at(self, what: str, outputs: list, batch_dims: list, tapped, sources: list):
        """A scored call's outputs (floating, their batch in `batch_dims`; `tapped` the call's output as tapped)
        that parameters reach through its input: a use of them there."""
        for pid in {pid for pid, _ in sources}:
            self.uses[pid] += 1
        return self.tap(Use(f"the call of {what}", outputs, list(sources), batch_dims=batch_dims), tapped)

    def stand_in(self, p: nn.Parameter) -> torch.Tensor:
        """A fresh leaf for one use of `p`: each use's graph reaches its own leaf only, so the batched backward
        that takes one use's per-example gradients runs through that use's ops and no others."""
        leaf = p.detach().requires_grad_(True)
        self.stand_ins.append((id(p), leaf))
        return leaf

    def swap_parameters(self, tree) -> tuple:
        """`tree` with each trainable parameter used outside its rule's call replaced by a fresh stand-in, and
        the (id(param), leaf) pairs of those stand-ins."""
        pairs: list = []

        def swap(value):
            leaf = self._stand_in(value)
            if leaf is None:
                return value
            pairs.append((id(value), leaf))
            return leaf

        return tree_map(swap, tree), pairs

    # -- ops ------------------------------------------------------------------------------------------
    def _stand_in(self, t):
        """The pass's leaf for a parameter used outside its rule's call, else None."""
        if id(t) not in self.owners or not isinstance(t, nn.Parameter):  # the dict lookup first: it is cheaper
            return None
        if any(self.active[m] > 0 for m in self.owners[id(t)]):
            return None  # inside the call of a module that has it: that module's rule accounts for it
        return self.stand_in(t)

    def _watched(self, values) -> bool:
        """Whether a tensor among `values` (nested in lists and tuples as swap() sees them) is a trainable
        parameter, carries one or is followed; when none is, the op is not the watch's business."""
        for v in values:
            if isinstance(v, torch.Tensor):
                if id(v) in self.owners or (self.follow and v in self.seen) or (len(self.derived) and v in self.derived):
                    return True
            elif isinstance(v, (list, tuple)) and self._watched(v):
                return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused or not torch.is_grad_enabled() or not (self._watched(args) or (kwargs and self._watched(kwargs.values()))):
            return func(*args, **kwargs)  # the scorer's own ops; no graph, so no gradient; or no parameter
        sources: list = []  # (id(param), leaf) pairs this op reads
        carriers: set[int] = set()  # ids of the inputs that carry them (stand-ins, derived tensors)
        followed = [False]

        def swap(value):
            if isinstance(value, (list, tuple)):
                items = [swap(v) for v in value]
                return type(value)(items) if isinstance(value, tuple) else items
            leaf = self._stand_in(value)
            if leaf is not None:
                sources.append((id(value), leaf))
                carriers.add(id(leaf))
                return leaf
            if isinstance(value, torch.Tensor):
                from_params = self.derived.get(value)
                if from_params:
                    carriers.add(id(value))
                    known = {id(leaf) for _, leaf in sources}
                    sources.extend(pair for pair in from_params if id(pair[1]) not in known)
                if self.follow and value in self.seen:
                    followed[0] = True
            return value

        new_args = tuple(swap(a) for a in args)
        new_kwargs = {k: swap(v) for k, v in kwargs.items()}
        if not sources and not followed[0]:
            return func(*args, **kwargs)
        output = func(*new_args, **new_kwargs)
        if isinstance(output, torch.Tensor):
            factors = _linear_factors(func, new_args, new_kwargs, sources)
            # Use.op, built only for an output that becomes a use
            op = None if factors is not None else lambda: (func, *tree_flatten((new_args, new_kwargs)), carriers)
            return self._classify(func, output, sources, factors, op)
        # Any nesting (F.multi_head_attention_forward returns (output, None)): each tensor in it; a shape, a
        # bool, None: nothing to differentiate.
        leaves, spec = tree_flatten(output)
        return tree_unflatten([self._classify(func, t, sources) if isinstance(t, torch.Tensor) else t
                               for t in leaves], spec)

    def _classify(self, func, output: torch.Tensor, sources: list, factors=None, op=None):
        name = getattr(func, "__name__", str(func))
        if not (output.is_floating_point() or output.is_complex()):
            return output
        if self.follow:
            index, self.ops_seen = self.ops_seen, self.ops_seen + 1
            self.seen[output] = True
        if self.record is not None:
            self.record.ops.append((name, fingerprint(output)))
            self.derived[output] = tuple(sources)
            return output
        if not sources or not output.requires_grad:
            return output  # downstream of a use only (followed while probing), or detached
        key = (name, tuple(sorted({pid for pid, _ in sources})), output.dim())
        if self.verdicts is not None:
            if len(self.found) >= len(self.verdicts) or self.verdicts[len(self.found)][0] != key:
                raise Reprobe()
            verdict = self.verdicts[len(self.found)][1]
            if verdict == BATCHED and output.shape[0] != self.batch:
                raise Reprobe()
        elif self.against is not None:
            verdict = self._judge(name, output, index, sources)
        else:  # no probe possible (one example, or randomness in the forward): shapes decide
            verdict = BATCHED if output.dim() > 0 and output.shape[0] == self.batch else DERIVED
        self.found.append((key, verdict))
        if verdict == DERIVED:
            self.derived[output] = tuple(sources)
            return output
        for pid in {pid for pid, _ in sources}:
            self.uses[pid] += 1
        use = Use(f"{name} in {self.where()}", output, list(sources), factors, op=op() if op else None)
        tapped = self.tap(use, output)
        if self.follow:
            self.seen[tapped] = True
        return tapped

    def _judge(self, name: str, output: torch.Tensor, index: int, sources: list) -> str:
        if index >= len(self.against.ops) or self.against.ops[index][0] != name:
            raise ValueError(
                f"GradNormScorer: the model runs different operations when the examples of the batch come in "
                f"another order ({name} in {self.where()}); per-example gradients are then not well defined. "
                "Pass check_examples_separate=False to score it anyway, unchecked.")
        recorded, mine = self.against.ops[index][1], fingerprint(output)
        if output.dim() > 0 and output.shape[0] == self.batch and _same(recorded, mine, self.against.perm,
                                                                       output.dtype):
            return BATCHED
        # Unchanged (a positional table, a transposed weight) or batched elsewhere (a sequence-first activation):
        # followed until an op's output is batch-first, where its per-example gradient is taken.
        return DERIVED


def watch_tables(model: nn.Module, captures: list[LayerCapture]) -> tuple[dict, dict, dict]:
    """(owners, label, names) of ParameterUses for these captures: id(param) -> the modules whose calls
    cover its uses (rules), id(param) -> its name in messages, module -> its name."""
    owners: dict[int, list] = {}
    label: dict[int, str] = {}
    for cap in captures:
        for name, p in cap.trainable_parameters().items():
            owners.setdefault(id(p), [])
            if not cap.per_use:
                owners[id(p)].append(cap.module)
            label.setdefault(id(p), f"{cap.name}.{name}")
    return owners, label, {m: (n or "<root>") for n, m in model.named_modules()}


def record_call(probe: Probe, cap: LayerCapture, outputs: list, dims: list) -> None:
    probe.calls.append((cap.name, [fingerprint(o, d) if d is not None else None for o, d in zip(outputs, dims)]))


_LINEAR_FUNCS = {torch.nn.functional.linear, torch._C._nn.linear}


def _linear_factors(func, args: tuple, kwargs: dict, sources: list):
    """(x, weight pair, bias pair or None) of F.linear whose weight (and bias) are this op's only sources."""
    if func not in _LINEAR_FUNCS or len(args) < 2 or kwargs:
        return None
    x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else None
    by_leaf = {id(leaf): pair for pair in sources for leaf in (pair[1],)}
    if id(weight) not in by_leaf or x.dim() < 2:
        return None
    if bias is not None and id(bias) not in by_leaf and bias.requires_grad:
        return None
    if len(sources) != 1 + (bias is not None and id(bias) in by_leaf):
        return None  # x carries parameters too: the general batched backward
    return x.detach(), by_leaf[id(weight)], by_leaf.get(id(bias)) if bias is not None else None


def judge_call(cap: LayerCapture, outputs: list, dims: list, batch: int, probe: Probe | None, index: int) -> str:
    """BATCHED when every output of a scored call holds example i at index i of its declared batch dim (the
    call is then scored by its rule), else DERIVED (its outputs are followed to the first batch-first op)."""
    if probe is None:
        return BATCHED if all(d is None or (o.dim() > d and o.shape[d] == batch) for o, d in zip(outputs, dims)) \
            else DERIVED
    if index >= len(probe.calls) or probe.calls[index][0] != cap.name:
        raise ValueError(
            f"GradNormScorer: {cap.label} is called in a different order when the examples of the batch come in "
            "another order; per-example gradients are then not well defined. Pass check_examples_separate=False "
            "to score it anyway, unchecked.")
    for out, old, dim in zip(outputs, probe.calls[index][1], dims):
        if dim is None:
            continue
        if out.dim() <= dim or out.shape[dim] != batch or not _same(old, fingerprint(out, dim),
                                                                    probe.perm.to(out.device), out.dtype):
            return DERIVED
    return BATCHED


def tensor_outputs(output) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
