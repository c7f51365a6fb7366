"""Who can compute per-example gradient norms ||grad_theta l_i||, behind one interface.

A provider is built for a model (`provider.build(model)`) and returns `norms(x, y) -> (B,)`, the L2
norms over all trainable parameters of the gradients of the per-example cross-entropy losses l_i
(never of a mean: that would scale every norm by 1/B). Builders work on a deep copy of the model,
since Opacus and BackPACK attach hooks to the modules they are given.

Providers: isgd_kernels' GradNormScorer per backend; naive autograd (a per-example loop, and
torch.func vmap(grad)); Opacus (materialized per-sample gradients, and ghost clipping); BackPACK
(BatchL2Grad). Opacus and BackPACK are optional: `bash scripts/install_bench_deps.sh` installs them.
"""
from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

import isgd_kernels
from isgd_kernels import _backend
from isgd_kernels.scorer.reference import per_example_grad_norms_loop, per_example_grad_norms_vmap

XENT = nn.CrossEntropyLoss(reduction="none")
Norms = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Unsupported(Exception):
    """The provider cannot score this model (a layer it has no rule for)."""


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[nn.Module], Norms]
    package: str  # distribution whose version the rows carry
    # How it is timed (benchmarks/field.py): "batch": on the whole batch; "micro_batch": it holds a
    # gradient per example, so the batch runs in micro-batches that fit a memory budget and one of
    # them is timed; "per_example": its cost per example does not depend on the batch and is slow,
    # so it is timed on a few examples. The last two are scaled to the batch.
    cost: str = "batch"
    requires: str | None = None  # module that must import, else the provider is skipped

    def skip_reason(self, device: torch.device) -> str | None:
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.package} is not installed (bash scripts/install_bench_deps.sh)"
        return None

    def version(self) -> str:
        try:
            return f"{self.package} {version(self.package)}"
        except PackageNotFoundError:
            return f"{self.package} (source tree)" if self.package == "isgd_kernels" else "absent"


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------- isgd_kernels
def _scorer(backend: str) -> Callable[[nn.Module], Norms]:
    def build(model):
        try:
            scorer = isgd_kernels.GradNormScorer(model, backend=backend)
        except isgd_kernels.UnsupportedModuleError as exc:
            raise Unsupported(str(exc)) from exc

        def norms(x, y):
            try:
                return scorer.norms(x, y, XENT)
            except RuntimeError as exc:  # a layer's op has no kernel for this backend (e.g. conv on "cuda")
                if "is unavailable" in str(exc):
                    raise Unsupported(str(exc)) from exc
                raise

        return norms

    return build


def timed_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """isgd_kernels backends worth timing on `device`, and why each of the others is not."""
    out, left_out = [], {}
    for backend in _backend.BACKENDS:
        if backend == "triton" and device.type != "cuda":
            left_out[backend] = ("not timed: without a GPU Triton runs in its interpreter, a test tool whose "
                                 "timings mean nothing")
        elif backend == "cuda" and device.type != "cuda":
            left_out[backend] = "needs a CUDA device"
        elif _backend.backend_available(backend, device, "_linear_sq_norms_ghost"):
            out.append(backend)
        else:
            left_out[backend] = _backend.backend_unavailable_reason(backend, device, "_linear_sq_norms_ghost")
    return out, left_out


# ------------------------------------------------------------------------------ naive autograd
def _loop(model):
    return lambda x, y: per_example_grad_norms_loop(model, XENT, x, y)


def _vmap(model):
    # vmap over the whole slice at once: the runner hands it a slice small enough to materialize.
    return lambda x, y: per_example_grad_norms_vmap(model, XENT, x, y)


# ------------------------------------------------------------------------------------------ Opacus
def _opacus_materialized(model):
    """GradSampleModule: per-sample gradients p.grad_sample (B x |p|) of the summed loss, then norms."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(copy.deepcopy(model).train(), batch_first=True, loss_reduction="sum")
    params = _trainable(gsm)

    def norms(x, y):
        gsm.zero_grad(set_to_none=True)  # also clears grad_sample
        XENT(gsm(x), y).sum().backward()
        sq = sum(torch.linalg.vector_norm(p.grad_sample.flatten(1), dim=1).square() for p in params)
        gsm.zero_grad(set_to_none=True)
        return sq.sqrt()

    return norms


def _opacus_ghost(model):
    """GradSampleModuleFastGradientClipping with ghost clipping: the first backward of Opacus' two
    stores each parameter's per-sample norm (ghost norm for Linear/Embedding, materialized
    per-sample gradients for the other layers); get_norm_sample() combines them. The second
    backward (of the clipped loss) is training, not scoring, so it is not run here."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model).train(), batch_first=True,
                                               loss_reduction="sum", use_ghost_clipping=True)

    def norms(x, y):
        XENT(gsm(x), y).sum().backward()
        out = gsm.get_norm_sample()
        gsm.zero_grad(set_to_none=True)
        return out

    return norms


# ---------------------------------------------------------------------------------------- BackPACK
def _backpack(model):
    """BatchL2Grad stores ||per-sample gradient||^2 of the loss it is given in p.batch_l2. Its doc:
    for a mean loss that is the gradient of l_i / B; so the loss here is a sum (reduction='sum')."""
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    net = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    owners = [(m, p) for m in net.modules() for p in m.parameters(recurse=False) if p.requires_grad]

    def norms(x, y):
        with warnings.catch_warnings():  # BackPACK warns, and leaves batch_l2 unset, for layers it lacks
            warnings.simplefilter("ignore", UserWarning)
            with backpack(BatchL2Grad()):
                loss_fn(net(x), y).backward()
        missing = sorted({type(m).__name__ for m, p in owners if not hasattr(p, "batch_l2")})
        if missing:
            raise Unsupported(f"BackPACK BatchL2Grad has no extension for {', '.join(missing)}")
        sq = sum(p.batch_l2 for _, p in owners)
        for _, p in owners:
            del p.batch_l2
            p.grad = None
        return sq.sqrt()

    return norms


# ---------------------------------------------------------------------------------------- registry
def providers(device: torch.device) -> tuple[list[Provider], list[str]]:
    """The providers to compare on `device`, and notes on the ones left out."""
    backends, left_out = timed_backends(device)
    notes = [f"GradNormScorer[{b}]: {why}." for b, why in left_out.items()]
    out = [Provider(f"isgd_kernels GradNormScorer[{b}]", _scorer(b), "isgd_kernels") for b in backends]
    out += [
        Provider("per-example loop", _loop, "torch", cost="per_example"),
        Provider("torch.func vmap(grad)", _vmap, "torch", cost="per_example"),
        Provider("Opacus GradSampleModule", _opacus_materialized, "opacus", cost="micro_batch", requires="opacus"),
        Provider("Opacus ghost clipping", _opacus_ghost, "opacus", requires="opacus"),
        Provider("BackPACK BatchL2Grad", _backpack, "backpack-for-pytorch", requires="backpack"),
    ]
    return out, notes
