"""One place builds a training job's data, model and scorer, for the master and every scoring worker alike."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import isgd_kernels
from issgd.config import TrainConfig
from issgd.data import Dataset, load_dataset
from issgd.models import build_model
from issgd.scoring import XENT


@dataclass
class Job:
    data: Dataset
    model: nn.Module
    scorer: isgd_kernels.GradNormScorer


def build_job(config: TrainConfig, device: torch.device) -> Job:
    """The data on `device`, the model initialized from `config.seed` (a worker's copy is overwritten by the
    master's parameters before it scores), and a scorer that has paid its one-time warm-up (~1 s on the
    first call), so that no timing includes it."""
    torch.manual_seed(config.seed)
    data = load_dataset(config.dataset, data_dir=config.data_dir, flatten=config.model == "mlp",
                        seed=config.seed).to(device)
    model = build_model(config.model, data.image_shape, data.classes, config.hidden).to(device)
    scorer = isgd_kernels.GradNormScorer(model, backend=config.backend)
    scorer.norms(data.x_train[:2], data.y_train[:2], XENT)
    return Job(data, model, scorer)
