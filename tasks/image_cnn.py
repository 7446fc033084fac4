"""``image-cnn``: a small CNN for medical image classification over MedMNIST-format ``.npz`` files.

File format (MedMNIST v2): keys ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
``test_images``, ``test_labels``; images uint8, grey ``(N, H, W)`` or colour ``(N, H, W, 3)``; labels integer
``(N, 1)`` or ``(N,)`` (single-label only; the multi-label ChestMNIST is refused). Pixels are scaled to [0, 1]
and put channels first. The validation arrays are not used. The file is read with ``allow_pickle=False``.

Constructor arguments (the architecture; put them in the ``[task]`` table shared by the coordinator and every
site, so the coordinator can build version 0 without the file): ``num_classes`` (required), ``in_channels``
(1 grey, 3 RGB; default 1), ``image_size`` (default 28), ``hidden`` (default 64). ``load_data`` refuses a file
whose images or labels do not fit them.

``[task]`` options read by ``load_data`` (which part of the file this site holds):

- ``npz``: path of the file (required).
- which site am I: ``sites`` (a list of site names; my position in it is my index) or ``site_index`` with
  ``num_sites``; the name looked up is the option ``site`` if given, else the agent's site id. With neither,
  the site holds the whole file (a hospital with its own data set).
- how the train split is cut: ``partition_file`` (JSON ``{site: [train indices]}`` or
  ``{site: {"train": [...], "test": [...]}}``), else ``dirichlet_alpha`` (label skew, deterministic in
  ``partition_seed``, default 0), else an IID random split (``partition_seed``).

Test split, the choice made: each site evaluates on *its share of the test split*, cut by the same rule as its
train share. With Dirichlet skew the class shares are drawn once per seed and reused for test, so a site's test
set has the label mix of its train set (a hospital judges the model on patients like its own; the coordinator
can still evaluate on the whole test split). With a partition file that lists only train indices, the site
evaluates on the whole test split, because no share can be inferred.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from tasks._options import option_float, option_int, option_path, option_str, option_str_list
from tasks.base import SiteData, Task
from tasks.errors import TaskConfigError, TaskDataError
from tasks.splits import (
    IndexArray,
    dirichlet_partition,
    dirichlet_proportions,
    iid_partition,
    partition_by_proportions,
)

__all__ = [
    "ImageCnnTask",
    "SmallCnn",
    "dirichlet_partition",
    "dirichlet_proportions",
    "load_npz_split",
    "partition_by_proportions",
]

NPZ_SPLITS = ("train", "val", "test")


class SmallCnn(nn.Module):
    """Two conv/ReLU/max-pool blocks and a two-layer head: ~100k parameters at 28x28, trains on a CPU.

    No batch norm: its running statistics are buffers that federated averaging handles poorly.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, hidden: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        pooled_size = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * pooled_size * pooled_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))


def load_npz_split(path: Path, split: str) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """``(images, labels)`` of one split, images as stored (uint8, channels last) and labels flattened."""
    if split not in NPZ_SPLITS:
        raise TaskConfigError(f"split: expected one of {list(NPZ_SPLITS)}, got {split!r}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in (f"{split}_images", f"{split}_labels") if key not in archive.files]
            if missing:
                raise TaskDataError(f"{path}: missing arrays {missing}; found {sorted(archive.files)}")
            images = archive[f"{split}_images"]
            labels = archive[f"{split}_labels"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise TaskDataError(f"cannot read {path} as a MedMNIST .npz file: {exc}") from exc
    if images.dtype != np.uint8:
        raise TaskDataError(f"{path}: {split}_images must be uint8 pixels, got {images.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TaskDataError(
            f"{path}: {split}_labels must be integer class ids of shape (N,) or (N, 1), "
            f"got {labels.dtype} {labels.shape} (multi-label data is not supported)"
        )
    if images.shape[0] != labels.shape[0]:
        raise TaskDataError(f"{path}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    return images, labels.astype(np.int64)


def _scaled_channels_first(images: NDArray[np.uint8]) -> Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in [0, 1]."""
    if images.ndim == 3:
        images = images[:, :, :, None]
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()


def _read_partition_file(path: Path, site: str, num_train: int, num_test: int) -> tuple[IndexArray, IndexArray | None]:
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TaskDataError(f"cannot read partition file {path}: {exc}") from exc
    if not isinstance(mapping, dict) or site not in mapping:
        known = sorted(mapping) if isinstance(mapping, dict) else []
        raise TaskDataError(f"partition file {path} has no entry for site {site!r}; sites in it: {known}")
    entry = mapping[site]
    train_entry, test_entry = (entry.get("train"), entry.get("test")) if isinstance(entry, dict) else (entry, None)

    def indices(values: Any, limit: int, what: str) -> IndexArray:
        if not isinstance(values, list) or not all(type(value) is int and 0 <= value < limit for value in values):
            raise TaskDataError(f"partition file {path}: {site!r} {what} must be a list of ints in [0, {limit})")
        if len(set(values)) != len(values):
            raise TaskDataError(f"partition file {path}: {site!r} {what} lists an index twice")
        return np.asarray(values, dtype=np.int64)

    train = indices(train_entry, num_train, "train indices")
    test = None if test_entry is None else indices(test_entry, num_test, "test indices")
    return train, test


def _site_position(site: str, options: Mapping[str, Any]) -> tuple[int, int]:
    """``(site_index, num_sites)`` from ``sites`` or ``site_index``/``num_sites``; ``(0, 1)`` if neither."""
    sites = option_str_list(options, "sites", None)
    num_sites = option_int(options, "num_sites", None, minimum=1)
    if sites is not None:
        if site not in sites:
            raise TaskConfigError(f"[task] sites: this site {site!r} is not in the list {sites}")
        if num_sites is not None and num_sites != len(sites):
            raise TaskConfigError(f"[task] num_sites = {num_sites} but sites lists {len(sites)} names")
        return sites.index(site), len(sites)
    site_index = option_int(options, "site_index", None, minimum=0)
    if site_index is None:
        if num_sites not in (None, 1):
            raise TaskConfigError("[task] num_sites is set: also give site_index or a sites list")
        return 0, 1
    if num_sites is None or site_index >= num_sites:
        raise TaskConfigError(f"[task] site_index = {site_index} needs num_sites > site_index, got {num_sites}")
    return site_index, num_sites


class ImageCnnTask(Task):
    """Image classification with ``SmallCnn`` and cross-entropy; see the module docstring for the options."""

    name: ClassVar[str] = "image-cnn"
    eval_batch_size: ClassVar[int] = 512

    def __init__(self, *, num_classes: int, in_channels: int = 1, image_size: int = 28, hidden: int = 64) -> None:
        for label, value, minimum in (
            ("num_classes", num_classes, 2),
            ("in_channels", in_channels, 1),
            ("image_size", image_size, 4),
            ("hidden", hidden, 1),
        ):
            if type(value) is not int or value < minimum:
                raise TaskConfigError(f"[task] {label}: must be an integer >= {minimum}, got {value!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.hidden = hidden

    def build_model(self) -> nn.Module:
        return SmallCnn(self.in_channels, self.num_classes, self.image_size, self.hidden)

    def loss(self, model: nn.Module, features: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(features), labels.long())

    def _check_fits(self, images: NDArray[np.uint8], labels: NDArray[np.int64], what: str) -> None:
        """Refuse images or labels that do not fit the architecture the federation agreed on."""
        if images.ndim not in (3, 4):
            raise TaskDataError(f"{what} images: expected (N, H, W) or (N, H, W, C), got shape {images.shape}")
        height, width = images.shape[1:3]
        channels = 1 if images.ndim == 3 else images.shape[3]
        if (height, width) != (self.image_size, self.image_size):
            raise TaskDataError(
                f"{what} images are {height}x{width}; the task was built for image_size = {self.image_size}"
            )
        if channels != self.in_channels:
            raise TaskDataError(
                f"{what} images have {channels} channels; the task was built for in_channels = {self.in_channels}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise TaskDataError(
                f"{what} labels span [{labels.min()}, {labels.max()}]; "
                f"the task was built for num_classes = {self.num_classes}"
            )

    def load_data(self, site_id: str, options: Mapping[str, Any]) -> SiteData:
        path = option_path(options, "npz")
        site = option_str(options, "site", site_id)
        train_images, train_labels = load_npz_split(path, "train")
        test_images, test_labels = load_npz_split(path, "test")
        self._check_fits(train_images, train_labels, "train")
        self._check_fits(test_images, test_labels, "test")
        partition_file = option_path(options, "partition_file", None)
        seed = option_int(options, "partition_seed", 0)
        if partition_file is not None:
            train_indices, maybe_test = _read_partition_file(partition_file, site, len(train_labels), len(test_labels))
            test_indices = np.arange(len(test_labels)) if maybe_test is None else maybe_test
        else:
            site_index, num_sites = _site_position(site, options)
            alpha = option_float(options, "dirichlet_alpha", None)
            if num_sites == 1:
                train_indices, test_indices = np.arange(len(train_labels)), np.arange(len(test_labels))
            elif alpha is not None:
                proportions = dirichlet_proportions(self.num_classes, num_sites, alpha, seed)
                train_indices = partition_by_proportions(train_labels, proportions, seed)[site_index]
                test_indices = partition_by_proportions(test_labels, proportions, seed)[site_index]
            else:
                train_indices = iid_partition(len(train_labels), num_sites, seed)[site_index]
                test_indices = iid_partition(len(test_labels), num_sites, seed)[site_index]
        return SiteData(
            _scaled_channels_first(train_images[train_indices]),
            torch.from_numpy(train_labels[train_indices]),
            _scaled_channels_first(test_images[test_indices]),
            torch.from_numpy(test_labels[test_indices]),
        )
