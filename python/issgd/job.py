"""What a job is made of, built in one place: for the master (``build_job``, from the CLI's configuration) and
for every scoring worker (``WorkerJob.build``, from what the sampler sends it)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from issgd.config import TrainConfig
from issgd.data import Dataset, load_dataset
from issgd.models import build_model
from issgd.scoring import cross_entropy
from issgd.signals import make_signal
from issgd.sources import Built, IndexedData, SpecError, is_import_string, resolve_datasets, resolve_model


@dataclass
class WorkerJob:
    """How a scoring worker builds its model, data and signal. Spawned workers receive it pickled; under
    torchrun every rank builds it itself. ``model`` and ``dataset`` are anything ``issgd.sources`` resolves."""

    model: Any
    dataset: Any
    loss_fn: Callable
    score: str = "grad_norm"
    device: str = "cpu"
    backend: str = "auto"
    chunk_size: int = 2048
    worker_threads: int = 1
    startup_timeout: float = 120.0
    collate_fn: Callable | None = None
    slow_workers: tuple = field(default=())  # (rank, seconds per chunk): fault tests

    def build(self, device: torch.device):
        """(data, model, signal) on ``device``; the signal has paid its one-time warm-up, so that no timing
        includes it. The model's parameters are overwritten by the master's before it scores."""
        train, _ = resolve_datasets(self.dataset)
        data = IndexedData(train, device, self.collate_fn)
        model = resolve_model(self.model).to(device)
        signal = make_signal(self.score, model, backend=self.backend)
        inputs, targets = data.fetch(torch.arange(min(2, len(data))))
        signal(inputs, targets, self.loss_fn)
        return data, model, signal


@dataclass
class Job:
    """The master's side of a CLI job: model and data built here, each with the factory a worker rebuilds
    it from; ``data`` holds the tensors of a built-in data set (None for an imported one)."""

    model: Built
    dataset: Built
    data: Dataset | None
    loss_fn: Callable = cross_entropy


class BuiltinData:
    """A built-in data set (issgd.data) as (train, valid) TensorDatasets: a picklable zero-argument factory."""

    def __init__(self, name: str, data_dir: str | None, flatten: bool, seed: int):
        self.name, self.data_dir, self.flatten, self.seed = name, data_dir, flatten, seed

    def load(self) -> Dataset:
        return load_dataset(self.name, data_dir=self.data_dir, flatten=self.flatten, seed=self.seed)

    def __call__(self):
        return pair(self.load())


class BuiltinModel:
    """A built-in model (issgd.models) for a data set's shape: a picklable zero-argument factory."""

    def __init__(self, name: str, image_shape, classes: int, hidden):
        self.name, self.image_shape, self.classes, self.hidden = name, tuple(image_shape), classes, tuple(hidden)

    def __call__(self) -> nn.Module:
        return build_model(self.name, self.image_shape, self.classes, self.hidden)


def pair(data: Dataset) -> tuple[TensorDataset, TensorDataset]:
    return TensorDataset(data.x_train, data.y_train), TensorDataset(data.x_valid, data.y_valid)


def build_job(config: TrainConfig) -> Job:
    """The data, then the model initialized from ``config.seed``. ``config.model`` / ``config.dataset`` name a
    built-in or give an import string (see issgd.sources); a built-in model needs a built-in data set, whose
    shape it takes (images are flattened for the MLP, kept (C, H, W) for any other model)."""
    torch.manual_seed(config.seed)
    imported_model = is_import_string(config.model)
    if is_import_string(config.dataset):
        if not imported_model:
            raise SpecError("model", f"the built-in model {config.model!r} takes a built-in --dataset; with an "
                                     "imported --dataset give --model package.module:factory too")
        data = None
        dataset = Built(resolve_datasets(config.dataset, "dataset"), config.dataset)
    else:
        source = BuiltinData(config.dataset, config.data_dir, flatten=config.model == "mlp", seed=config.seed)
        data = source.load()
        dataset = Built(pair(data), source)
    if imported_model:
        model = Built(resolve_model(config.model, "model"), config.model)
    else:
        factory = BuiltinModel(config.model, data.image_shape, data.classes, config.hidden)
        model = Built(factory(), factory)
    return Job(model, dataset, data)
