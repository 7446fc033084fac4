"""The Task interface: what a hospital trains, seen from the site agent and the coordinator.

A task owns four things a federation must agree on: the model architecture (``build_model``), how a site reads
its own data (``load_data``), the loss, and the metrics. The training loop is shared: the default ``train`` runs
minibatch SGD or Adam for a fixed number of optimiser steps (or epochs) with an optional FedProx term, so a new
task normally overrides only ``build_model``, ``load_data`` and ``loss``.

Contract for implementers:

- ``build_model`` must need no data, because the coordinator builds global model version 0 before any site
  has connected. Everything that fixes the architecture (input width, channels, classes) is a constructor
  keyword argument, given in the ``[task]`` table shared by the coordinator and every site.
- ``build_model`` draws its initial weights from torch's global RNG, so ``torch.manual_seed(s)`` before the call
  makes it reproducible.
- ``loss`` returns the *mean* over the batch; ``evaluate`` weights batch means by batch size.
- Features and labels live on the CPU; batches are moved to the model's device when they are used.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from schemas.messages import TrainingConfig
from tasks.errors import TaskDataError, TrainingDivergedError


@dataclass(frozen=True, eq=False)
class SiteData:
    """One site's data, already split and preprocessed; row i of features goes with element i of labels."""

    train_features: Tensor
    train_labels: Tensor
    test_features: Tensor
    test_labels: Tensor

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            features: Tensor = getattr(self, f"{split}_features")
            labels: Tensor = getattr(self, f"{split}_labels")
            if features.shape[0] != labels.shape[0]:
                raise TaskDataError(f"{split} split: {features.shape[0]} feature rows but {labels.shape[0]} labels")

    @property
    def num_train(self) -> int:
        return int(self.train_features.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_features.shape[0])


@dataclass(frozen=True)
class TrainResult:
    """What one local training run reports.

    ``loss`` is the mean data loss over the run's minibatches (without the proximal term, so it is comparable
    with and without FedProx); ``num_examples`` is the site's training-set size, the FedAvg weight.
    """

    loss: float
    steps: int
    num_examples: int


def count_training_steps(num_examples: int, config: TrainingConfig) -> int:
    """Optimiser steps one local run takes: ``local_steps``, or ``local_epochs`` full passes (last batch partial)."""
    if config.local_epochs is None:
        return config.local_steps
    return config.local_epochs * math.ceil(num_examples / config.batch_size)


def minibatch_indices(
    num_examples: int, batch_size: int, num_steps: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Yield ``num_steps`` index batches from shuffled epochs, like a shuffling DataLoader that is restarted.

    Each epoch is a fresh permutation drawn from ``generator``; its last batch may be smaller than
    ``batch_size`` (no example is dropped). Steps continue across epoch boundaries.
    """
    produced = 0
    while produced < num_steps:
        permutation = torch.randperm(num_examples, generator=generator)
        for batch in torch.split(permutation, batch_size):
            if produced == num_steps:
                return
            yield batch
            produced += 1


def architecture_digest(model: nn.Module) -> str:
    """sha256 over the (name, shape, dtype) of every state-dict entry: equal digests load into each other."""
    description = [
        [name, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")]
        for name, tensor in model.state_dict().items()
    ]
    return hashlib.sha256(json.dumps(description, separators=(",", ":")).encode("utf-8")).hexdigest()


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


class Task(ABC):
    """A medical learning task: model, data loading, loss and metrics. See the module docstring."""

    name: ClassVar[str] = "task"
    eval_batch_size: ClassVar[int] = 1024

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model; deterministic given ``torch.manual_seed`` and the constructor arguments, no data needed."""

    @abstractmethod
    def load_data(self, site_id: str, options: Mapping[str, Any]) -> SiteData:
        """Read this site's data; ``options`` is the ``[task]`` table of the site's config (paths etc.)."""

    @abstractmethod
    def loss(self, model: nn.Module, features: Tensor, labels: Tensor) -> Tensor:
        """Mean loss of ``model`` over one batch (a scalar tensor that can be back-propagated)."""

    def predict(self, model: nn.Module, features: Tensor) -> Tensor:
        """Class predictions. Default: one output -> logit, positive when sigmoid > 0.5; several -> argmax."""
        outputs = model(features)
        if outputs.dim() == 1 or outputs.shape[-1] == 1:
            return (torch.sigmoid(outputs.reshape(-1)) > 0.5).long()
        return outputs.argmax(dim=-1)

    def evaluate_split(self, model: nn.Module, features: Tensor, labels: Tensor) -> dict[str, float]:
        """Accuracy, mean loss and example count of ``model`` on any labelled set (e.g. a pooled test set)."""
        num_examples = int(features.shape[0])
        if num_examples == 0:
            return {"accuracy": math.nan, "loss": math.nan, "num_examples": 0.0}
        device = _model_device(model)
        was_training = model.training
        model.eval()
        loss_total = 0.0
        correct = 0
        try:
            with torch.no_grad():
                for start in range(0, num_examples, self.eval_batch_size):
                    batch_features = features[start : start + self.eval_batch_size].to(device)
                    batch_labels = labels[start : start + self.eval_batch_size].to(device)
                    batch_size = int(batch_features.shape[0])
                    loss_total += float(self.loss(model, batch_features, batch_labels)) * batch_size
                    predictions = self.predict(model, batch_features)
                    correct += int((predictions == batch_labels.reshape(-1).long()).sum())
        finally:
            model.train(was_training)
        return {
            "accuracy": correct / num_examples,
            "loss": loss_total / num_examples,
            "num_examples": float(num_examples),
        }

    def evaluate(self, model: nn.Module, data: SiteData) -> dict[str, float]:
        """Metrics on the site's test split: ``accuracy``, ``loss`` and ``num_examples`` (NaN metrics if empty)."""
        return self.evaluate_split(model, data.test_features, data.test_labels)

    def train(
        self, model: nn.Module, data: SiteData, config: TrainingConfig, generator: torch.Generator
    ) -> TrainResult:
        """Train ``model`` in place on the site's train split; all randomness comes from ``generator``.

        With ``config.proximal_mu`` set, the objective gains FedProx's ``mu/2 * ||w - w_start||^2`` where
        ``w_start`` are the parameters the model had when this call started (the global model it came from).
        """
        if data.num_train == 0:
            raise TaskDataError("the site has no training examples")
        device = _model_device(model)
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = self._make_optimizer(trainable, config)
        mu = config.proximal_mu or 0.0
        anchor = [parameter.detach().clone() for parameter in trainable] if mu > 0 else []
        num_steps = count_training_steps(data.num_train, config)
        was_training = model.training
        model.train()
        loss_sum = 0.0
        try:
            for step, batch in enumerate(minibatch_indices(data.num_train, config.batch_size, num_steps, generator)):
                features = data.train_features[batch].to(device)
                labels = data.train_labels[batch].to(device)
                optimizer.zero_grad(set_to_none=True)
                data_loss = self.loss(model, features, labels)
                loss_value = float(data_loss.detach())
                if not math.isfinite(loss_value):
                    raise TrainingDivergedError(
                        f"{self.name}: loss became {loss_value} at step {step + 1} of {num_steps}; "
                        "lower the learning rate"
                    )
                objective = data_loss
                if anchor:
                    squared_distance = sum(
                        ((parameter - start).pow(2).sum() for parameter, start in zip(trainable, anchor, strict=True)),
                        torch.zeros((), device=device),
                    )
                    objective = data_loss + (mu / 2.0) * squared_distance
                objective.backward()
                optimizer.step()
                loss_sum += loss_value
        finally:
            model.train(was_training)
        return TrainResult(loss=loss_sum / num_steps, steps=num_steps, num_examples=data.num_train)

    @staticmethod
    def _make_optimizer(parameters: list[nn.Parameter], config: TrainingConfig) -> torch.optim.Optimizer:
        """One of ``schemas.messages.TRAINING_OPTIMIZERS``: a TrainingConfig holds no other (it checks when made)."""
        if config.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=config.learning_rate)
        return torch.optim.SGD(parameters, lr=config.learning_rate)
