"""``tabular-csv``: binary risk prediction from a hospital's own CSV export (EHR-style tabular data).

Constructor arguments (the architecture; in the ``[task]`` table shared by the coordinator and every site):
``num_features`` (required: the width after encoding, see below), ``model`` (``"logistic"`` or ``"mlp"``),
``hidden`` (MLP hidden units, default 32). The coordinator cannot read any CSV, so it learns the input width
from ``num_features``; every site's ``load_data`` checks its encoded width against it and says what it found.

``[task]`` options read by ``load_data``:

- ``path``: the CSV file (header row first; read with the stdlib ``csv`` module, UTF-8, BOM tolerated);
  ``delimiter`` (default ``","``).
- ``target``: the label column. Binary: ``0``/``1`` (also ``0.0``/``1.0``), or any two distinct values mapped
  to 0 and 1 in sorted order (numeric order if both are numbers, else string order), or ``positive_label``
  naming the value that means 1 (needed when a site's file happens to hold only one class).
- ``features``: the columns to use, in order (default: every column but the target, in header order).
- ``categorical``: a table ``{column = ["category", ...]}``. Each such column becomes one 0/1 column per listed
  category, in place, in the listed order; a value not in the list encodes as all zeros. The list is part of
  the shared config rather than read from the data because every site must produce the same columns in the
  same order, and a site cannot see which categories other sites have. Width = numeric features + the sum of
  the category list lengths.
- ``missing``: what an empty cell (or ``NA``, ``N/A``, ``NaN``, ``null``, ``None``, ``?``) in a used column
  does: ``"error"`` (default: refuse the file, naming the line and column, so nobody trains on silently
  shrunken data) or ``"drop"`` (drop the row).
- ``test_fraction`` (default 0.2) and ``split_seed`` (default 0): a seeded random train/test split per site.

Numeric columns are z-scored with the site's own train mean and sample standard deviation (a constant column
is only centred); one-hot columns are left as 0/1.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from tasks._options import option_float, option_int, option_path, option_str, option_str_list
from tasks.base import SiteData, Task
from tasks.errors import TaskConfigError, TaskDataError
from tasks.splits import shuffled_split

MODELS = ("logistic", "mlp")
MISSING_POLICIES = ("error", "drop")
MISSING_MARKERS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})


@dataclass(frozen=True)
class TabularSpec:
    """How to turn CSV rows into features and a binary label; see the module docstring."""

    target: str
    features: tuple[str, ...] | None = None
    categorical: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    missing: str = "error"
    positive_label: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TabularSpec:
        features = option_str_list(options, "features", None)
        raw_categorical = options.get("categorical", {})
        if isinstance(raw_categorical, (list, tuple)):
            raise TaskConfigError(
                "[task] categorical: give each column's category list, e.g. categorical = { sex = ['F', 'M'] }, "
                "so every site encodes the same columns"
            )
        if not isinstance(raw_categorical, Mapping):
            raise TaskConfigError(
                f"[task] categorical: expected a table of column -> categories, got {raw_categorical!r}"
            )
        categorical: dict[str, tuple[str, ...]] = {}
        for column, categories in raw_categorical.items():
            if not isinstance(categories, (list, tuple)) or not categories:
                raise TaskConfigError(f"[task] categorical.{column}: expected a non-empty list of categories")
            names = tuple(str(category).strip() for category in categories)
            if len(set(names)) != len(names):
                raise TaskConfigError(f"[task] categorical.{column}: a category is listed twice")
            categorical[str(column)] = names
        missing = option_str(options, "missing", "error")
        if missing not in MISSING_POLICIES:
            raise TaskConfigError(f"[task] missing: expected one of {list(MISSING_POLICIES)}, got {missing!r}")
        positive_label = options.get("positive_label")
        return cls(
            target=option_str(options, "target"),
            features=None if features is None else tuple(features),
            categorical=categorical,
            missing=missing,
            positive_label=None if positive_label is None else str(positive_label).strip(),
        )


@dataclass(frozen=True)
class CsvTable:
    """A CSV file's header and data rows, each row with the file line it came from (for error messages)."""

    source: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    line_numbers: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class EncodedTable:
    """Encoded rows before the split: ``features[n, width]``, 0/1 ``labels[n]``, and what each column is."""

    features: NDArray[np.float64]
    labels: NDArray[np.float32]
    column_names: tuple[str, ...]
    numeric_columns: NDArray[np.bool_]


def read_csv_table(path: Path, delimiter: str = ",") -> CsvTable:
    """Header and data rows (blank lines skipped); a row of the wrong length is an error naming its line."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            lines = [(reader.line_num, row) for row in reader if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TaskDataError(f"cannot read {path} as CSV: {exc}") from exc
    if not lines:
        raise TaskDataError(f"{path} is empty; expected a header row")
    header = [name.strip() for name in lines[0][1]]
    if len(set(header)) != len(header):
        raise TaskDataError(f"{path}: the header names a column twice: {header}")
    for line_number, row in lines[1:]:
        if len(row) != len(header):
            raise TaskDataError(f"{path} line {line_number}: {len(row)} values, the header has {len(header)}")
    return CsvTable(
        source=str(path),
        header=tuple(header),
        rows=tuple(tuple(value.strip() for value in row) for _, row in lines[1:]),
        line_numbers=tuple(line_number for line_number, _ in lines[1:]),
    )


def _label_mapping(values: Sequence[str], spec: TabularSpec, where: str) -> dict[str, float]:
    distinct = sorted(set(values))
    if spec.positive_label is not None:
        if len(distinct) > 2:
            raise TaskDataError(f"{where}: target {spec.target!r} has {len(distinct)} values {distinct}; need 2")
        return {value: 1.0 if value == spec.positive_label else 0.0 for value in distinct}
    try:
        numeric = {value: float(value) for value in distinct}
    except ValueError:
        numeric = {}
    if numeric and set(numeric.values()) <= {0.0, 1.0}:
        return numeric
    if len(distinct) != 2:
        raise TaskDataError(
            f"{where}: target {spec.target!r} has values {distinct[:10]}; expected 0/1 or two distinct values "
            "(set positive_label if this site's file holds one class only)"
        )
    ordered = sorted(distinct, key=lambda value: numeric[value]) if numeric else distinct
    return {ordered[0]: 0.0, ordered[1]: 1.0}


def encode_table(table: CsvTable, spec: TabularSpec) -> EncodedTable:
    """One-hot the categorical columns, parse the numeric ones, map the label; rows with gaps per ``missing``."""
    header, where = table.header, table.source
    if spec.target not in header:
        raise TaskDataError(f"{where}: no target column {spec.target!r}; columns: {list(header)}")
    features = spec.features if spec.features is not None else tuple(name for name in header if name != spec.target)
    unknown = [name for name in (*features, *spec.categorical) if name not in header]
    if unknown:
        raise TaskDataError(f"{where}: no column(s) {unknown}; columns: {list(header)}")
    if spec.target in features:
        raise TaskConfigError(f"[task] features: the target {spec.target!r} cannot also be a feature")
    not_used = [name for name in spec.categorical if name not in features]
    if not_used:
        raise TaskConfigError(f"[task] categorical: column(s) {not_used} are not among the features")
    position = {name: index for index, name in enumerate(header)}
    used = [position[name] for name in (*features, spec.target)]

    kept: list[tuple[int, tuple[str, ...]]] = []
    for line_number, row in zip(table.line_numbers, table.rows, strict=True):
        gaps = [header[column] for column in used if row[column].lower() in MISSING_MARKERS]
        if not gaps:
            kept.append((line_number, row))
        elif spec.missing == "error":
            raise TaskDataError(f"{where} line {line_number}: missing value in {gaps} (set missing = 'drop' to skip)")
    if not kept:
        raise TaskDataError(f"{where}: no complete rows")

    column_names: list[str] = []
    numeric_columns: list[bool] = []
    for name in features:
        if name in spec.categorical:
            column_names += [f"{name}={category}" for category in spec.categorical[name]]
            numeric_columns += [False] * len(spec.categorical[name])
        else:
            column_names.append(name)
            numeric_columns.append(True)
    encoded = np.zeros((len(kept), len(column_names)), dtype=np.float64)
    for row_index, (line_number, row) in enumerate(kept):
        column = 0
        for name in features:
            value = row[position[name]]
            if name in spec.categorical:
                categories = spec.categorical[name]
                if value in categories:
                    encoded[row_index, column + categories.index(value)] = 1.0
                column += len(categories)
                continue
            try:
                number = float(value)
            except ValueError:
                raise TaskDataError(
                    f"{where} line {line_number}: column {name!r} = {value!r} is not a number "
                    "(list it under categorical if it is a category)"
                ) from None
            if not math.isfinite(number):
                raise TaskDataError(f"{where} line {line_number}: column {name!r} = {value!r} is not finite")
            encoded[row_index, column] = number
            column += 1
    target_values = [row[position[spec.target]] for _, row in kept]
    mapping = _label_mapping(target_values, spec, where)
    labels = np.asarray([mapping[value] for value in target_values], dtype=np.float32)
    return EncodedTable(encoded, labels, tuple(column_names), np.asarray(numeric_columns, dtype=np.bool_))


def standardize(
    train: NDArray[np.float64], test: NDArray[np.float64], numeric_columns: NDArray[np.bool_]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """z-score the numeric columns of both splits with the train mean and sample std (ddof=1)."""
    mean = np.zeros(train.shape[1])
    scale = np.ones(train.shape[1])
    if train.shape[0] > 0:
        mean[numeric_columns] = train[:, numeric_columns].mean(axis=0)
    if train.shape[0] > 1:
        std = train[:, numeric_columns].std(axis=0, ddof=1)
        scale[numeric_columns] = np.where(std > 0, std, 1.0)
    return ((train - mean) / scale).astype(np.float32), ((test - mean) / scale).astype(np.float32)


class TabularCsvTask(Task):
    """Logistic regression or a one-hidden-layer MLP with BCE loss on a hospital's CSV."""

    name: ClassVar[str] = "tabular-csv"

    def __init__(self, *, num_features: int, model: str = "logistic", hidden: int = 32) -> None:
        if type(num_features) is not int or num_features < 1:
            raise TaskConfigError(f"[task] num_features: must be an integer >= 1, got {num_features!r}")
        if model not in MODELS:
            raise TaskConfigError(f"[task] model: expected one of {list(MODELS)}, got {model!r}")
        if type(hidden) is not int or hidden < 1:
            raise TaskConfigError(f"[task] hidden: must be an integer >= 1, got {hidden!r}")
        self.num_features = num_features
        self.model = model
        self.hidden = hidden

    def build_model(self) -> nn.Module:
        if self.model == "logistic":
            return nn.Sequential(nn.Linear(self.num_features, 1))
        return nn.Sequential(nn.Linear(self.num_features, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))

    def loss(self, model: nn.Module, features: Tensor, labels: Tensor) -> Tensor:
        logits = model(features).reshape(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.reshape(-1).to(logits.dtype))

    def load_data(self, site_id: str, options: Mapping[str, Any]) -> SiteData:
        path = option_path(options, "path")
        spec = TabularSpec.from_options(options)
        table = encode_table(read_csv_table(path, option_str(options, "delimiter", ",")), spec)
        if table.features.shape[1] != self.num_features:
            raise TaskDataError(
                f"{path}: the features encode to {table.features.shape[1]} columns {list(table.column_names)}, "
                f"but the task was built with num_features = {self.num_features}; set num_features = "
                f"{table.features.shape[1]} in the [task] table of the coordinator and every site"
            )
        test_fraction = option_float(options, "test_fraction", 0.2)
        train_rows, test_rows = shuffled_split(len(table.labels), test_fraction, option_int(options, "split_seed", 0))
        train, test = standardize(table.features[train_rows], table.features[test_rows], table.numeric_columns)
        return SiteData(
            torch.from_numpy(train),
            torch.from_numpy(table.labels[train_rows]),
            torch.from_numpy(test),
            torch.from_numpy(table.labels[test_rows]),
        )
