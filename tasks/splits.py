"""Deterministic train/test splits and federated partitions, in numpy only (no scikit-learn at run time).

``train_test_split_indices`` reproduces ``sklearn.model_selection.train_test_split(np.arange(n), ...)`` with an
integer ``random_state`` index for index, so the FLamby Fed-Heart-Disease split is exact without shipping
scikit-learn to hospitals (the unit tests compare against scikit-learn when it is installed).

``dirichlet_partition`` is the usual label-skew partition (Hsu et al. 2019): for every class, the share each site
gets is drawn from Dirichlet(alpha); small alpha -> each site sees few classes, large alpha -> close to IID.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from tasks.errors import TaskConfigError

IndexArray = NDArray[np.int64]


def _split_sizes(num_samples: int, train_size: float | int | None, test_size: float | int | None) -> tuple[int, int]:
    """sklearn's ``_validate_shuffle_split``: a float fraction rounds the test size up and the train size down."""
    if train_size is None and test_size is None:
        test_size = 0.25
    sizes: dict[str, int | None] = {}
    for label, size in (("train_size", train_size), ("test_size", test_size)):
        if size is None:
            sizes[label] = None
        elif isinstance(size, float):
            if not 0.0 < size < 1.0:
                raise TaskConfigError(f"{label}: a fraction must be in (0, 1), got {size}")
            fraction = size * num_samples
            sizes[label] = math.ceil(fraction) if label == "test_size" else math.floor(fraction)
        else:
            if not 0 < size < num_samples:
                raise TaskConfigError(f"{label}: a count must be in (0, {num_samples}), got {size}")
            sizes[label] = int(size)
    num_train, num_test = sizes["train_size"], sizes["test_size"]
    if num_train is None:
        assert num_test is not None
        num_train = num_samples - num_test
    if num_test is None:
        num_test = num_samples - num_train
    if num_train + num_test > num_samples:
        raise TaskConfigError(f"train ({num_train}) + test ({num_test}) is more than the {num_samples} samples")
    if num_train == 0:
        raise TaskConfigError(f"with {num_samples} samples the train split would be empty")
    return num_train, num_test


def _approximate_mode(class_counts: IndexArray, num_draws: int, rng: np.random.RandomState) -> IndexArray:
    """sklearn's ``_approximate_mode``: floor the proportional shares, then hand out the rest by remainder."""
    continuous = class_counts / class_counts.sum() * num_draws
    floored = np.floor(continuous)
    need_to_add = int(num_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (candidates,) = np.where(remainder == value)
            add_now = min(len(candidates), need_to_add)
            chosen = rng.choice(candidates, size=add_now, replace=False)
            floored[chosen] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(np.int64)


def train_test_split_indices(
    num_samples: int,
    *,
    train_size: float | int | None = None,
    test_size: float | int | None = None,
    random_state: int,
    stratify: ArrayLike | None = None,
) -> tuple[IndexArray, IndexArray]:
    """``train_test_split(np.arange(num_samples), ...)`` of scikit-learn, same indices in the same order."""
    num_train, num_test = _split_sizes(num_samples, train_size, test_size)
    rng = np.random.RandomState(random_state)
    if stratify is None:
        permutation = rng.permutation(num_samples)
        return permutation[num_test : num_test + num_train].astype(np.int64), permutation[:num_test].astype(np.int64)

    labels = np.asarray(stratify)
    if labels.shape[0] != num_samples:
        raise TaskConfigError(f"stratify: {labels.shape[0]} labels for {num_samples} samples")
    classes, label_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        raise TaskConfigError("stratify: the least populated class has only 1 member")
    if num_train < len(classes) or num_test < len(classes):
        raise TaskConfigError(f"stratify: train and test need at least one sample of each of {len(classes)} classes")
    class_indices = np.split(np.argsort(label_indices.reshape(-1), kind="stable"), np.cumsum(class_counts)[:-1])
    train_per_class = _approximate_mode(class_counts, num_train, rng)
    test_per_class = _approximate_mode(class_counts - train_per_class, num_test, rng)
    train: list[int] = []
    test: list[int] = []
    for class_position in range(len(classes)):
        permutation = rng.permutation(class_counts[class_position])
        shuffled = class_indices[class_position].take(permutation, mode="clip")
        num_class_train = train_per_class[class_position]
        train.extend(shuffled[:num_class_train])
        test.extend(shuffled[num_class_train : num_class_train + test_per_class[class_position]])
    return rng.permutation(train).astype(np.int64), rng.permutation(test).astype(np.int64)


def dirichlet_proportions(num_classes: int, num_sites: int, alpha: float, seed: int) -> NDArray[np.float64]:
    """Row c = the share of class c that each site receives, drawn from Dirichlet(alpha, ..., alpha)."""
    if not (math.isfinite(alpha) and alpha > 0):
        raise TaskConfigError(f"dirichlet_alpha: must be a positive number, got {alpha}")
    if num_sites < 1 or num_classes < 1:
        raise TaskConfigError(f"need at least one site and one class, got {num_sites} sites, {num_classes} classes")
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(num_sites, alpha), size=num_classes)


def partition_by_proportions(labels: ArrayLike, proportions: NDArray[np.float64], seed: int) -> list[IndexArray]:
    """Split the indices of each class among sites in the given proportions; no site is left empty.

    Within a class the indices are shuffled, then cut at the rounded cumulative shares. If a site ends up with
    nothing, it takes one example from the largest site (deterministically), so every site can train.
    """
    label_array = np.asarray(labels).reshape(-1).astype(np.int64)
    num_classes, num_sites = proportions.shape
    if label_array.size < num_sites:
        raise TaskConfigError(f"cannot give {num_sites} sites at least one example each from {label_array.size}")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= num_classes):
        raise TaskConfigError(f"labels must lie in [0, {num_classes}), got [{label_array.min()}, {label_array.max()}]")
    rng = np.random.default_rng(seed)
    site_members: list[list[int]] = [[] for _ in range(num_sites)]
    for class_label in range(num_classes):
        members = rng.permutation(np.flatnonzero(label_array == class_label))
        cut_points = np.round(np.cumsum(proportions[class_label]) * members.size).astype(np.int64)[:-1]
        for site, share in enumerate(np.split(members, cut_points)):
            site_members[site].extend(int(index) for index in share)
    for site in range(num_sites):
        if not site_members[site]:
            largest = max(range(num_sites), key=lambda other: len(site_members[other]))
            site_members[site].append(site_members[largest].pop())
    return [np.sort(np.asarray(members, dtype=np.int64)) for members in site_members]


def dirichlet_partition(
    labels: ArrayLike, num_sites: int, alpha: float, seed: int, num_classes: int | None = None
) -> list[IndexArray]:
    """Label-skewed partition of ``range(len(labels))`` into ``num_sites`` sorted, non-empty, disjoint parts.

    Deterministic in ``seed``. Give ``num_classes`` when a split may miss the highest class, so two splits
    (train and test) drawn with the same seed get the same per-site class shares.
    """
    label_array = np.asarray(labels).reshape(-1).astype(np.int64)
    classes = num_classes if num_classes is not None else int(label_array.max(initial=-1)) + 1
    proportions = dirichlet_proportions(max(classes, 1), num_sites, alpha, seed)
    return partition_by_proportions(label_array, proportions, seed)


def iid_partition(num_examples: int, num_sites: int, seed: int) -> list[IndexArray]:
    """Uniformly random partition into ``num_sites`` parts whose sizes differ by at most one."""
    if num_examples < num_sites:
        raise TaskConfigError(f"cannot give {num_sites} sites at least one example each from {num_examples}")
    permutation = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part.astype(np.int64)) for part in np.array_split(permutation, num_sites)]


def shuffled_split(num_examples: int, test_fraction: float, seed: int) -> tuple[IndexArray, IndexArray]:
    """Random train/test split (sorted indices); the test size is ``round(test_fraction * n)``, at least 1 if n > 1."""
    if not 0.0 <= test_fraction < 1.0:
        raise TaskConfigError(f"test_fraction: must be in [0, 1), got {test_fraction}")
    num_test = round(test_fraction * num_examples)
    if test_fraction > 0 and num_examples > 1:
        num_test = min(max(num_test, 1), num_examples - 1)
    permutation = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(permutation[num_test:]).astype(np.int64), np.sort(permutation[:num_test]).astype(np.int64)
