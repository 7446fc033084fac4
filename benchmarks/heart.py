"""One referee for every system in the heart-disease benchmarks: score a global model on the four hospitals.

The straggler and wire benchmarks compare fedmq and Flower, so neither system's own evaluation is used: every
global model either produces is scored here, three ways. ``pooled`` is FLamby's "pooled test" accuracy: all four
test splits together, normalised with the pooled train statistics; it is the figure FLamby publishes (FedAvg
0.748) and the one the README's demo table reports, so targets and comparisons use it. ``mean`` is the plain
mean over hospitals, each scored on its own test split normalised with its own train statistics (as its site
agent does; FLamby's "client average"). ``site_weighted`` is the example-weighted mean of those per-hospital
scores, what the coordinator's federated evaluation calls pooled. The same hospitals, the same rows, the same
model code as ``tasks.heart_disease``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from schemas import TrainingConfig
from tasks.base import SiteData
from tasks.heart_disease import HeartDiseaseTask, load_pooled, load_site

HEART_SITES = ("cleveland", "hungary", "switzerland", "long-beach")


@dataclass(frozen=True)
class Scores:
    """Accuracy of one global model (see the module docstring for the three ways it is summarised)."""

    pooled: float
    mean: float
    per_site: dict[str, float]
    site_weighted: float | None = None


class HeartReferee:
    """Loads the test splits once; ``score`` takes a state dict (name -> tensor)."""

    def __init__(self) -> None:
        self.task = HeartDiseaseTask()
        self.model = self.task.build_model()
        self.data: dict[str, SiteData] = {site: load_site(site) for site in HEART_SITES}
        self.pooled = load_pooled()

    def score(self, tensors: Mapping[str, torch.Tensor]) -> Scores:
        self.model.load_state_dict({name: tensor.clone() for name, tensor in tensors.items()})
        accuracies: dict[str, float] = {}
        correct = 0.0
        total = 0
        for site, data in self.data.items():
            accuracy = self.task.evaluate(self.model, data)["accuracy"]
            accuracies[site] = accuracy
            correct += accuracy * data.num_test
            total += data.num_test
        pooled = self.task.evaluate_split(self.model, self.pooled.test_features, self.pooled.test_labels)
        return Scores(
            pooled=float(pooled["accuracy"]),
            mean=sum(accuracies.values()) / len(accuracies),
            per_site=accuracies,
            site_weighted=correct / total,
        )


class WarmedHeartDiseaseTask(HeartDiseaseTask):
    """``heart-disease`` (same name, model and data) that runs one throwaway local training when a site loads
    its data, before it connects. torch's first optimiser step costs seconds of one-off initialisation; with
    ``slowdown = 10`` a site agent would sleep nine times that after its first update, a penalty no real slow
    hospital pays on every job. The benchmarks warm every system's sites the same way."""

    def load_data(self, site_id: str, options: Mapping[str, Any]) -> SiteData:
        data = super().load_data(site_id, options)
        warm_up(self, data)
        return data


def warm_up(task: HeartDiseaseTask, data: SiteData) -> None:
    model = task.build_model()
    task.train(model, data, TrainingConfig(local_steps=2, batch_size=4), torch.Generator().manual_seed(0))


def initial_heart_model(seed: int) -> dict[str, torch.Tensor]:
    """Version 0 exactly as the coordinator builds it (``torch.manual_seed(seed)`` then the task's model)."""
    torch.manual_seed(seed)
    model = HeartDiseaseTask().build_model()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def train_like_a_site_agent(
    site: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    seed: int,
    seq: int,
    training: TrainingConfig,
    slowdown: float,
    data: SiteData,
) -> tuple[dict[str, torch.Tensor], int]:
    """Local training as ``site_agent.agent.LocalTrainer.train`` does it (same task loop, same seeding rule,
    same slowdown: sleep ``busy * (slowdown - 1)``), for systems that are not fedmq. Returns the new weights
    and the number of training examples."""
    started = time.perf_counter()
    task = HeartDiseaseTask()
    model = task.build_model()
    model.load_state_dict({name: tensor.clone() for name, tensor in tensors.items()})
    digest = hashlib.sha256(f"{seed}:{site}:{seq}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    result = task.train(model, data, training, generator)
    busy = time.perf_counter() - started
    if slowdown > 1.0:
        time.sleep(busy * (slowdown - 1.0))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}, result.num_examples
