"""``heart-disease``: FLamby's Fed-Heart-Disease, four real hospitals, logistic regression on 13 features.

The UCI files ship inside the package (``data/fed_heart_disease``, CC BY 4.0, see ATTRIBUTION.md there), so a
fresh clone trains without a download. The preprocessing reproduces FLamby's ``FedHeartDisease``
(owkin/FLamby @ edacf54, ``flamby/datasets/fed_heart_disease/dataset.py``) exactly, without pandas or
scikit-learn:

1. per file: '?' -> NaN, drop columns 10, 11, 12 (slope, ca, thal), drop rows with any NaN;
   label = ``num > 0``. Kept rows: cleveland 303, hungary 261, switzerland 46, long-beach 130.
2. split per site: scikit-learn's ``train_test_split(np.arange(n), train_size=0.66, test_size=1 - 0.66,
   random_state=43, shuffle=True, stratify=label if both classes have > 2 rows else None)``
   (reimplemented in ``splits.py``) -> train/test 199/104, 172/89, 30/16, 85/45.
3. features: FLamby runs ``pd.get_dummies(columns=[2, 6], drop_first=True)`` on the *concatenation* of all four
   files, so every site gets the same 13 columns: the 8 numeric ones in file order, then cp = 2, 3, 4 and
   restecg = 1, 2 (the union of categories over the four files is cp {1..4}, restecg {0, 1, 2}; a value outside
   these sets is refused, because it would have changed FLamby's columns).
4. each site's train and test rows are z-scored with that site's TRAIN mean and std (float32, torch ``std``
   with ddof=1, ``+ 1e-9``). ``load_pooled`` uses the pooled-train statistics instead, as FLamby's
   ``pooled=True`` does. Rows keep file order within each split, as in FLamby's dataset.

Model: ``Linear(13, 1)`` returning a logit (FLamby's ``Baseline`` applies the sigmoid in ``forward``; we fold it
into ``BCEWithLogitsLoss``, which is the same loss, computed stably). Accuracy: ``(sigmoid > 0.5) == y``.

``[task]`` options read by ``load_data``: ``site`` (one of the four site names; defaults to the agent's site id,
so a site agent whose id is not a FLamby site name sets it), ``data_dir`` (defaults to the packaged copy).
The task takes no constructor arguments: the architecture is fixed.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from tasks._options import option_path, option_str
from tasks.base import SiteData, Task
from tasks.errors import TaskConfigError, TaskDataError
from tasks.splits import IndexArray, train_test_split_indices

DATA_DIR = Path(__file__).resolve().parent / "data" / "fed_heart_disease"

SITE_FILES: Mapping[str, str] = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "long-beach": "processed.va.data",
}
"""Site name -> UCI file, in FLamby's client order (client 0 .. 3)."""

SITE_ALIASES: Mapping[str, str] = {"hungarian": "hungary", "va": "long-beach", "long_beach": "long-beach"}

NUMERIC_COLUMNS = (0, 1, 3, 4, 5, 7, 8, 9)
CHEST_PAIN_COLUMN, CHEST_PAIN_TYPES = 2, (1.0, 2.0, 3.0, 4.0)
RESTING_ECG_COLUMN, RESTING_ECG_TYPES = 6, (0.0, 1.0, 2.0)
DROPPED_COLUMNS = (10, 11, 12)
LABEL_COLUMN = 13
KEPT_COLUMNS = tuple(column for column in range(14) if column not in DROPPED_COLUMNS)
FEATURE_NAMES = (
    "age",
    "sex",
    "trestbps",
    "chol",
    "fbs",
    "thalach",
    "exang",
    "oldpeak",
    "cp_2",
    "cp_3",
    "cp_4",
    "restecg_1",
    "restecg_2",
)
NUM_FEATURES = len(FEATURE_NAMES)
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43
NORMALIZATION_EPSILON = 1e-9


@dataclass(frozen=True, eq=False)
class RawHeartDiseaseSite:
    """One site before normalisation: encoded features, labels, and the split in scikit-learn's order."""

    site: str
    features: NDArray[np.float32]
    labels: NDArray[np.float32]
    train_indices: IndexArray
    test_indices: IndexArray


def canonical_site(site: str) -> str:
    """The site's canonical name (accepts the UCI file stems ``hungarian`` and ``va`` too)."""
    name = SITE_ALIASES.get(site, site)
    if name not in SITE_FILES:
        raise TaskConfigError(
            f"[task] site: {site!r} is not a Fed-Heart-Disease site; expected one of {list(SITE_FILES)}"
        )
    return name


def _one_hot_drop_first(value: float, categories: tuple[float, ...], column: int, where: str) -> list[float]:
    if value not in categories:
        raise TaskDataError(f"{where}: column {column} has value {value}, expected one of {list(categories)}")
    return [1.0 if value == category else 0.0 for category in categories[1:]]


def read_site_file(path: Path) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Parse one UCI ``processed.*.data`` file into (features[n, 13], labels[n]) following FLamby's steps 1 and 3."""
    try:
        with path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except OSError as exc:
        raise TaskDataError(f"cannot read {path}: {exc}") from exc
    features: list[list[float]] = []
    labels: list[float] = []
    for line_number, row in enumerate(rows, start=1):
        where = f"{path.name} line {line_number}"
        if len(row) != 14:
            raise TaskDataError(f"{where}: expected 14 comma-separated values, got {len(row)}")
        kept = [value.strip() for column, value in enumerate(row) if column not in DROPPED_COLUMNS]
        if "?" in kept:
            continue
        try:
            values = [float(value) for value in kept]
        except ValueError as exc:
            raise TaskDataError(f"{where}: {exc}") from exc
        if any(math.isnan(value) for value in values):
            continue
        record = dict(zip(KEPT_COLUMNS, values, strict=True))
        encoded = [record[column] for column in NUMERIC_COLUMNS]
        encoded += _one_hot_drop_first(record[CHEST_PAIN_COLUMN], CHEST_PAIN_TYPES, CHEST_PAIN_COLUMN, where)
        encoded += _one_hot_drop_first(record[RESTING_ECG_COLUMN], RESTING_ECG_TYPES, RESTING_ECG_COLUMN, where)
        features.append(encoded)
        labels.append(0.0 if record[LABEL_COLUMN] == 0 else 1.0)
    if not features:
        raise TaskDataError(f"{path}: no complete rows")
    return np.asarray(features, dtype=np.float64).astype(np.float32), np.asarray(labels, dtype=np.float32)


def flamby_split(labels: NDArray[np.float32]) -> tuple[IndexArray, IndexArray]:
    """FLamby's per-site split: stratified by label unless a class has 2 rows or fewer (then plain shuffle)."""
    levels, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(levels) > 1 and bool(np.all(counts > 2)) else None
    return train_test_split_indices(
        len(labels),
        train_size=TRAIN_FRACTION,
        test_size=1.0 - TRAIN_FRACTION,
        random_state=SPLIT_SEED,
        stratify=stratify,
    )


def load_raw_site(site: str, data_dir: Path | None = None) -> RawHeartDiseaseSite:
    """Read, encode and split one site without normalising (for tests and pooled baselines)."""
    name = canonical_site(site)
    features, labels = read_site_file((data_dir or DATA_DIR) / SITE_FILES[name])
    train_indices, test_indices = flamby_split(labels)
    return RawHeartDiseaseSite(name, features, labels, train_indices, test_indices)


def _normalized(features: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (features - mean) / (std + NORMALIZATION_EPSILON)


def _split_tensors(raw: RawHeartDiseaseSite) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test rows in file order (as FLamby's dataset lists them), unnormalised."""
    train_rows, test_rows = np.sort(raw.train_indices), np.sort(raw.test_indices)
    return (
        torch.from_numpy(raw.features[train_rows]),
        torch.from_numpy(raw.labels[train_rows]),
        torch.from_numpy(raw.features[test_rows]),
        torch.from_numpy(raw.labels[test_rows]),
    )


def load_site(site: str, data_dir: Path | None = None) -> SiteData:
    """One site's data, z-scored with its own train statistics (FLamby ``FedHeartDisease(center=i)``)."""
    train_features, train_labels, test_features, test_labels = _split_tensors(load_raw_site(site, data_dir))
    mean, std = train_features.mean(dim=0), train_features.std(dim=0)
    return SiteData(
        _normalized(train_features, mean, std),
        train_labels,
        _normalized(test_features, mean, std),
        test_labels,
    )


def load_pooled(data_dir: Path | None = None) -> SiteData:
    """All four sites' train (and test) rows, z-scored with the pooled-train statistics (FLamby ``pooled=True``).

    For the centralised baseline. Note FLamby's per-site scores of its pooled model use *site*-normalised test
    inputs (``load_site``), while its "pooled test" score uses this pooled normalisation.
    """
    parts = [_split_tensors(load_raw_site(site, data_dir)) for site in SITE_FILES]
    train_features = torch.cat([part[0] for part in parts])
    test_features = torch.cat([part[2] for part in parts])
    mean, std = train_features.mean(dim=0), train_features.std(dim=0)
    return SiteData(
        _normalized(train_features, mean, std),
        torch.cat([part[1] for part in parts]),
        _normalized(test_features, mean, std),
        torch.cat([part[3] for part in parts]),
    )


@dataclass(frozen=True)
class FlambyBaseline:
    """One row of ``flamby_baselines_summary.csv``: FLamby's published accuracy, mean over seeds 42-46."""

    method: str
    client_average_mean: float
    client_average_std: float
    pooled_test_mean: float
    pooled_test_std: float
    site_test_means: Mapping[str, float]


def read_flamby_baselines(path: Path | None = None) -> dict[str, FlambyBaseline]:
    """FLamby's results by method name (``"FedAvg100"``, ``"FedAdam100"``, ``"Pooled Training"``, ``"Local 0"``...)."""
    csv_path = path or DATA_DIR / "flamby_baselines_summary.csv"
    try:
        with csv_path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise TaskDataError(f"cannot read {csv_path}: {exc}") from exc
    baselines: dict[str, FlambyBaseline] = {}
    for row in rows:
        try:
            baselines[row["Method"]] = FlambyBaseline(
                method=row["Method"],
                client_average_mean=float(row["client_avg_mean"]),
                client_average_std=float(row["client_avg_std_over_seeds"]),
                pooled_test_mean=float(row["pooled_test_mean"]),
                pooled_test_std=float(row["pooled_test_std"]),
                site_test_means={
                    site: float(row[f"client_test_{client}_mean"]) for client, site in enumerate(SITE_FILES)
                },
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise TaskDataError(f"{csv_path}: malformed row {row!r}: {exc}") from exc
    return baselines


class HeartDiseaseModel(nn.Module):
    """FLamby's ``Baseline`` (same parameter names, ``linear.weight``/``linear.bias``) returning logits."""

    def __init__(self, num_features: int = NUM_FEATURES) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)


class HeartDiseaseTask(Task):
    """Fed-Heart-Disease with FLamby's split, preprocessing, model, loss and metric."""

    name: ClassVar[str] = "heart-disease"
    sites: ClassVar[tuple[str, ...]] = tuple(SITE_FILES)

    def build_model(self) -> nn.Module:
        return HeartDiseaseModel()

    def load_data(self, site_id: str, options: Mapping[str, Any]) -> SiteData:
        site = option_str(options, "site", site_id)
        data_dir = option_path(options, "data_dir", DATA_DIR)
        if not data_dir.is_dir():
            raise TaskConfigError(f"[task] data_dir: {data_dir} is not a directory")
        return load_site(site, data_dir)

    def loss(self, model: nn.Module, features: Tensor, labels: Tensor) -> Tensor:
        logits = model(features).reshape(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.reshape(-1).to(logits.dtype))
