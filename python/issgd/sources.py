"""Where a job's model and data come from, in the master and in every scoring worker alike.

A *model* is given as an ``nn.Module``, a zero-argument callable that returns one, or an import string
``"package.module:attribute"`` naming either (as torchrun and uvicorn name an application). A *dataset*
is a map-style ``torch.utils.data.Dataset`` whose items are ``(input, target)`` pairs, a pair of
tensors ``(inputs, targets)`` (rows are examples), or a zero-argument callable / import string that
returns a Dataset or a ``(train, valid)`` pair of them. An item's input is a tensor, or a tuple of
tensors that the model takes as positional arguments.

Scoring workers are spawned processes: what they need travels pickled, so a factory must be defined at
module level (not a lambda or a local function), and a module or dataset instance must be picklable.
``Built`` carries a value already built here together with the factory that builds it again elsewhere, so
that a worker rebuilds its data rather than receiving a pickled copy.
"""
from __future__ import annotations

import importlib
import pickle
import re
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class SpecError(ValueError):
    """A model or dataset that cannot be used: a bad import string, a factory returning the wrong thing,
    an object that cannot reach the workers. ``argument`` names it (``model``, ``dataset``...; the CLI turns
    it into its --flag); ``detail`` says what is wrong and what to do."""

    def __init__(self, argument: str, detail: str):
        super().__init__(f"{argument}: {detail}")
        self.argument = argument
        self.detail = detail


def is_import_string(text) -> bool:
    return isinstance(text, str) and bool(IMPORT_STRING.match(text))


def load_object(text: str, argument: str):
    """The object an import string "package.module:attribute" names (the attribute may be dotted)."""
    if not is_import_string(text):
        raise SpecError(argument, f"expected an import string 'package.module:factory', got {text!r}")
    module_name, attribute = text.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name) and module_name[len(exc.name):][:1] in ("", "."):
            raise SpecError(argument, f"cannot import {module_name!r} (no module named {exc.name!r}): run from the "
                                      "folder that holds it or put that folder on PYTHONPATH") from None
        raise SpecError(argument, f"importing {module_name!r} failed: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001  (whatever the module raised, the answer names the flag)
        raise SpecError(argument, f"importing {module_name!r} failed: {_one_line(exc)}") from None
    value = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise SpecError(argument, f"module {module_name!r} has no attribute {attribute!r}")
        value = getattr(value, part)
    return value


class Built:
    """A value built in this process and the zero-argument factory that builds it anew; pickling keeps the
    factory only, so a spawned worker builds its own (e.g. reads its data from disk) instead of receiving
    a pickled copy."""

    def __init__(self, value, factory):
        self.value, self.factory = value, factory

    def __getstate__(self):
        return {"value": None, "factory": self.factory}


def _unwrap(spec, argument: str):
    """(the value already built, or None; the spec with an import string loaded; the spec as given, for
    messages)."""
    if isinstance(spec, Built):
        if spec.value is not None:
            return spec.value, spec, spec
        spec = spec.factory
    what = spec
    if isinstance(spec, str):
        spec = load_object(spec, argument)
    return None, spec, what


def resolve_model(spec, argument: str = "model") -> nn.Module:
    """The nn.Module that ``spec`` gives (see the module docstring)."""
    built, spec, what = _unwrap(spec, argument)
    if built is not None:
        return built
    if isinstance(spec, nn.Module):
        return spec
    if callable(spec):
        model = _call_factory(spec, what, argument)
        if isinstance(model, nn.Module):
            return model
        raise SpecError(argument, f"the factory {_name(what)} returned {type(model).__name__}, expected an "
                                  "nn.Module")
    raise SpecError(argument, f"expected an nn.Module, a zero-argument factory returning one, or an import string "
                              f"'package.module:factory', got {type(spec).__name__}")


def resolve_datasets(spec, argument: str = "dataset") -> tuple[Dataset, Dataset | None]:
    """(train, valid or None) from ``spec`` (see the module docstring)."""
    built, spec, what = _unwrap(spec, argument)
    if built is not None:
        return built
    if callable(spec) and not isinstance(spec, (Dataset, nn.Module)):
        spec = _call_factory(spec, what, argument)
        if _is_dataset(spec):
            return spec, None
        if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(_is_dataset(d) for d in spec):
            return spec[0], spec[1]
        raise SpecError(argument, f"the factory {_name(what)} returned {_describe(spec)}; expected a map-style "
                                  "torch.utils.data.Dataset of (input, target) items, or a (train, valid) pair of them")
    if _is_dataset(spec):
        return spec, None
    if (isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(t, torch.Tensor) for t in spec)):
        x, y = spec
        if len(x) != len(y):
            raise SpecError(argument, f"inputs and targets have {len(x)} and {len(y)} rows; one row per example")
        return TensorDataset(x, y), None
    raise SpecError(argument, f"expected a map-style torch.utils.data.Dataset of (input, target) items, a pair of "
                              f"tensors (inputs, targets), a zero-argument factory or an import string "
                              f"'package.module:factory', got {_describe(spec)}")


def _is_dataset(obj) -> bool:
    """Map-style: indexable and sized (an IterableDataset cannot be sampled by index)."""
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, (str, bytes, tuple, list,
                                                                                            torch.Tensor, dict))


def _call_factory(factory: Callable, what, argument: str):
    try:
        return factory()
    except TypeError as exc:
        if "argument" in str(exc) and "missing" in str(exc):
            raise SpecError(argument, f"{_name(what)} must be callable with no arguments ({_one_line(exc)})") from None
        raise


def ensure_picklable(obj, argument: str) -> bytes:
    """pickle.dumps(obj), or SpecError saying how to make it reach spawned workers."""
    try:
        return pickle.dumps(obj)
    except Exception as exc:  # noqa: BLE001  (pickling errors come in many types)
        raise SpecError(argument, f"cannot be sent to the scoring worker processes ({_one_line(exc)}); define "
                                  "classes and factories at module level (not lambdas or local functions), or give "
                                  "an import string 'package.module:factory'") from None


# ------------------------------------------------------------------------------ batches of examples
def as_args(inputs) -> tuple:
    """The model's positional arguments: the input tensor, or the elements of a tuple/list of them."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def forward(model: nn.Module, inputs):
    return model(*as_args(inputs))


def to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def rows(value, start: int, stop: int):
    """Rows start:stop of a batch (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    if isinstance(value, (tuple, list)):
        return type(value)(rows(v, start, stop) for v in value)
    if isinstance(value, dict):
        return {k: rows(v, start, stop) for k, v in value.items()}
    return value


class IndexedData:
    """Batches of a map-style dataset by example index, on ``device``. A TensorDataset of (inputs, targets)
    is held on the device and indexed directly; any other dataset is read item by item and collated."""

    def __init__(self, dataset: Dataset, device: torch.device | str, collate_fn: Callable | None = None,
                 argument: str = "dataset"):
        self.dataset = dataset
        self.device = torch.device(device)
        self.collate_fn = collate_fn or default_collate
        n = len(dataset)
        if n == 0:
            raise SpecError(argument, "is empty")
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2 and collate_fn is None:
            self.tensors = tuple(t.to(self.device) for t in dataset.tensors)
        else:
            self.tensors = None
            item = dataset[0]
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise SpecError(argument, f"item 0 is {_describe(item)}; every item must be an (input, target) pair")

    def __len__(self) -> int:
        return len(self.dataset)

    def fetch(self, index: torch.Tensor):
        """(inputs, targets) of the examples ``index`` (int64, any device), on this data's device."""
        if self.tensors is not None:
            index = index.to(self.device)
            return self.tensors[0][index], self.tensors[1][index]
        batch = self.collate_fn([self.dataset[i] for i in index.tolist()])
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise SpecError("collate_fn", f"must return an (inputs, targets) pair, got {_describe(batch)}")
        return to_device(batch[0], self.device), to_device(batch[1], self.device)


def _name(obj) -> str:
    if isinstance(obj, str):
        return repr(obj)
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(type(o).__name__ for o in obj[:4])})"
    return f"a {type(obj).__name__}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


__all__ = ["Built", "IndexedData", "SpecError", "as_args", "ensure_picklable", "forward", "is_import_string",
           "load_object", "resolve_datasets", "resolve_model", "rows", "to_device"]
