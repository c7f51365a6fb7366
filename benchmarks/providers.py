"""Who can compute per-example gradient norms ||grad_theta l_i||, behind one interface, and the
anchors they are checked and timed against (a training step, float64 per-example gradients).

A provider is built for a model (`provider.build(model)`) and returns `norms(x, y) -> (B,)`, the L2
norms over all trainable parameters of the gradients of the per-example cross-entropy losses l_i
(never of a mean: that would scale every norm by 1/B). Builders work on a deep copy of the model,
since Opacus and BackPACK attach hooks to the modules they are given.

Providers (`providers(device)`, the `field` group): isgd_kernels' GradNormScorer per backend; naive
autograd (a per-example loop, and torch.func vmap(grad)); Opacus (materialized per-sample gradients,
and ghost clipping); BackPACK (BatchL2Grad). Opacus and BackPACK are optional:
`bash scripts/install_bench_deps.sh` installs them. `scorer_providers` are the `scorer` group's.
Both runners, `python -m benchmarks` and the pytest-benchmark files, take them from here.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

import isgd_kernels
from isgd_kernels._backend import backend_unavailable_reason
from isgd_kernels.scorer.reference import per_example_grad_norms_loop, per_example_grad_norms_vmap

XENT = nn.CrossEntropyLoss(reduction="none")
Norms = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
STEP = "training step (fwd+bwd+SGD)"  # the anchor every provider is a ratio to


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


# ------------------------------------------------------------------------------------- anchors
def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A plain training step (forward, backward, Nesterov SGD step) of a copy of the model on (x, y)."""
    trained = copy.deepcopy(model)  # the step changes its parameters: the scored model stays fixed
    opt = torch.optim.SGD(trained.parameters(), lr=0.01, momentum=0.95, nesterov=True)

    def step():
        opt.zero_grad(set_to_none=True)
        XENT(trained(x), y).mean().backward()
        opt.step()

    return step


def reference_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 per-example gradient norms by one autograd backward per example."""
    model64 = copy.deepcopy(model).double()
    return per_example_grad_norms_loop(model64, XENT, x.double() if x.is_floating_point() else x, y).double()


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative error of got against ref over ref's examples (NaN if got has a NaN)."""
    return float(((got[:len(ref)].double() - ref).abs() / ref).max())


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
    for backend in isgd_kernels.BACKENDS:
        if backend == "triton" and device.type != "cuda":
            left_out[backend] = ("not timed: without a GPU Triton runs in its interpreter, a test tool whose "
                                 "timings mean nothing")
        elif backend == "cuda" and device.type != "cuda":
            left_out[backend] = "needs a CUDA device"
        elif isgd_kernels.backend_available(backend, device, "_linear_sq_norms_ghost"):
            out.append(backend)
        else:
            left_out[backend] = backend_unavailable_reason(backend, device, "_linear_sq_norms_ghost")
    return out, left_out


# ------------------------------------------------------------------------------ naive autograd
def loop_norms(model, x, y):
    return per_example_grad_norms_loop(model, XENT, x, y)


def vmap_norms(model, x, y, chunk_size=None):
    """torch.func per-example gradients reduced to norms, chunk_size examples at a time (None: the
    whole slice at once; vmap over a whole batch holds B copies of the parameters: 56 GB for the
    paper MLP at B = 512)."""
    return per_example_grad_norms_vmap(model, XENT, x, y, chunk_size=chunk_size)


def _loop(model):
    return functools.partial(loop_norms, model)


def _vmap(model):
    # vmap over the whole slice at once: the runner hands it a slice small enough to materialize.
    return functools.partial(vmap_norms, model)


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


# ---------------------------------------------------------------------------------- scorer group
NAIVE = ("torch.func vmap(grad)", "per-example loop")  # timed on a few examples, without warm-up
SCORER_PROVIDERS = (STEP, "isgd_kernels GradNormScorer", "isgd_kernels GradNormScorer (torch backend)", *NAIVE)


def scorer_providers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, vmap_chunk: int,
                     naive_examples: int) -> dict[str, tuple[Callable[[], object], int]]:
    """The `scorer` group, SCORER_PROVIDERS: name -> (call, examples it runs on) for the training
    step, GradNormScorer (default backend, and the torch backend built in the call) and the naive
    providers on the first naive_examples examples."""
    batch, n = x.shape[0], naive_examples
    scorer = isgd_kernels.GradNormScorer(model)
    calls = [(train_step(model, x, y), batch),
             (lambda: scorer.norms(x, y, XENT), batch),
             (lambda: isgd_kernels.GradNormScorer(model, backend="torch").norms(x, y, XENT), batch),
             (lambda: vmap_norms(model, x[:n], y[:n], vmap_chunk), n),
             (lambda: loop_norms(model, x[:n], y[:n]), n)]
    return dict(zip(SCORER_PROVIDERS, calls, strict=True))
