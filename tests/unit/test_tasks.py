"""The pluggable tasks: FLamby-exact heart-disease data, the shared training loop, partitions, CSV/npz loading,
and the registry a hospital uses to plug in its own task."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from schemas.messages import TrainingConfig
from tasks import (
    SiteData,
    TaskConfigError,
    TaskDataError,
    TaskError,
    TaskRegistry,
    TrainingDivergedError,
    UnknownTaskError,
    get_task,
    task_from_options,
)
from tasks.base import architecture_digest, minibatch_indices
from tasks.heart_disease import (
    FEATURE_NAMES,
    SITE_FILES,
    HeartDiseaseTask,
    load_pooled,
    load_raw_site,
    load_site,
    read_flamby_baselines,
)
from tasks.image_cnn import ImageCnnTask, dirichlet_partition
from tasks.splits import train_test_split_indices
from tasks.tabular_csv import TabularCsvTask

FLAMBY_COUNTS = {"cleveland": (199, 104), "hungary": (172, 89), "switzerland": (30, 16), "long-beach": (85, 45)}


def trained_copy(task: HeartDiseaseTask, data: SiteData, config: TrainingConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = task.build_model()
    task.train(model, data, config, torch.Generator().manual_seed(seed))
    return model


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([parameter.detach().reshape(-1) for parameter in model.parameters()])


# ------------------------------------------------------------------------------------------- heart-disease


@pytest.mark.parametrize("site", list(FLAMBY_COUNTS))
def test_heart_disease_site_has_flambys_split_sizes_and_13_features(site: str) -> None:
    # Execute
    data = HeartDiseaseTask().load_data(site, {})

    # Assert
    assert (data.num_train, data.num_test) == FLAMBY_COUNTS[site]
    assert data.train_features.shape[1] == data.test_features.shape[1] == len(FEATURE_NAMES) == 13
    assert set(torch.unique(torch.cat([data.train_labels, data.test_labels])).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("site", list(SITE_FILES))
def test_heart_disease_split_equals_scikit_learns(site: str) -> None:
    # Prepare
    model_selection = pytest.importorskip("sklearn.model_selection")
    raw = load_raw_site(site)
    levels, counts = np.unique(raw.labels, return_counts=True)
    stratify = raw.labels if len(levels) > 1 and all(counts > 2) else None

    # Execute: FLamby's exact call
    expected_train, expected_test = model_selection.train_test_split(
        np.arange(len(raw.labels)),
        test_size=1.0 - 0.66,
        train_size=0.66,
        random_state=43,
        shuffle=True,
        stratify=stratify,
    )

    # Assert: same indices in the same order
    np.testing.assert_array_equal(raw.train_indices, expected_train)
    np.testing.assert_array_equal(raw.test_indices, expected_test)


def test_stratified_and_plain_splits_match_scikit_learn_on_random_inputs() -> None:
    # Prepare
    model_selection = pytest.importorskip("sklearn.model_selection")
    rng = np.random.default_rng(7)
    for trial in range(40):
        num_samples = int(rng.integers(10, 300))
        labels = rng.integers(0, 3, num_samples)
        stratify = labels if trial % 2 == 0 and np.bincount(labels).min() >= 2 else None
        train_fraction = float(rng.uniform(0.3, 0.7))

        # Execute
        expected = model_selection.train_test_split(
            np.arange(num_samples), train_size=train_fraction, random_state=trial, stratify=stratify
        )
        ours = train_test_split_indices(num_samples, train_size=train_fraction, random_state=trial, stratify=stratify)

        # Assert
        np.testing.assert_array_equal(ours[0], expected[0])
        np.testing.assert_array_equal(ours[1], expected[1])


def test_heart_disease_encodes_the_first_cleveland_row_like_flamby() -> None:
    # Prepare: "63.0,1.0,1.0,145.0,233.0,1.0,2.0,150.0,0.0,2.3,3.0,0.0,6.0,0" (cp = 1, restecg = 2, num = 0)
    expected = [63.0, 1.0, 145.0, 233.0, 1.0, 150.0, 0.0, 2.3, 0.0, 0.0, 0.0, 0.0, 1.0]

    # Execute
    raw = load_raw_site("cleveland")

    # Assert
    np.testing.assert_allclose(raw.features[0], np.asarray(expected, dtype=np.float32))
    assert raw.labels[0] == 0.0
    assert [len(load_raw_site(site).labels) for site in SITE_FILES] == [303, 261, 46, 130]


@pytest.mark.parametrize("site", list(SITE_FILES))
def test_heart_disease_is_normalised_with_the_sites_train_statistics(site: str) -> None:
    # Prepare
    raw = load_raw_site(site)
    raw_train = torch.from_numpy(raw.features[np.sort(raw.train_indices)])
    raw_test = torch.from_numpy(raw.features[np.sort(raw.test_indices)])

    # Execute
    data = load_site(site)

    # Assert: train columns are standardised (a constant column, e.g. Switzerland's all-zero chol, stays 0)
    constant = raw_train.std(dim=0) == 0
    assert torch.allclose(data.train_features.mean(dim=0), torch.zeros(13), atol=1e-5)
    train_std = data.train_features.std(dim=0)
    assert torch.allclose(train_std[~constant], torch.ones(int((~constant).sum())), atol=1e-5)
    assert torch.all(data.train_features[:, constant] == 0)
    # and the test rows used the TRAIN mean/std, not their own
    expected_test = (raw_test - raw_train.mean(dim=0)) / (raw_train.std(dim=0) + 1e-9)
    assert torch.equal(data.test_features, expected_test)


def test_pooled_data_holds_every_sites_rows_normalised_with_pooled_train_statistics() -> None:
    # Execute
    pooled = load_pooled()

    # Assert
    assert (pooled.num_train, pooled.num_test) == (486, 254)
    assert torch.allclose(pooled.train_features.mean(dim=0), torch.zeros(13), atol=1e-5)


def test_flamby_baselines_are_read_from_the_shipped_summary() -> None:
    # Execute
    baselines = read_flamby_baselines()

    # Assert
    assert baselines["FedAvg100"].client_average_mean == pytest.approx(0.685)
    assert baselines["FedAdam100"].client_average_mean == pytest.approx(0.7255)
    assert baselines["Pooled Training"].pooled_test_mean == pytest.approx(0.7953)
    assert baselines["Local 0"].site_test_means["cleveland"] == pytest.approx(0.7462)


def test_heart_disease_refuses_an_unknown_site_naming_the_real_ones() -> None:
    with pytest.raises(TaskConfigError, match="cleveland"):
        HeartDiseaseTask().load_data("hospital-a", {})


def test_site_option_maps_an_agent_id_to_a_heart_disease_site() -> None:
    # Execute
    data = HeartDiseaseTask().load_data("hospital-a", {"site": "long-beach"})

    # Assert
    assert (data.num_train, data.num_test) == FLAMBY_COUNTS["long-beach"]


# ------------------------------------------------------------------------------------------- training loop


def test_sgd_training_on_cleveland_lowers_the_loss_and_reports_accuracy() -> None:
    # Prepare
    task = HeartDiseaseTask()
    data = task.load_data("cleveland", {})
    torch.manual_seed(0)
    model = task.build_model()
    before = task.evaluate_split(model, data.train_features, data.train_labels)["loss"]
    config = TrainingConfig(local_steps=100, learning_rate=0.01, batch_size=4, optimizer="sgd")

    # Execute
    result = task.train(model, data, config, torch.Generator().manual_seed(1))
    metrics = task.evaluate(model, data)

    # Assert
    after = task.evaluate_split(model, data.train_features, data.train_labels)["loss"]
    assert after < before - 0.1
    assert (result.steps, result.num_examples) == (100, 199)
    assert math.isfinite(result.loss)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["accuracy"] > 0.6  # a majority-class guess scores 0.54 on cleveland's test split
    assert metrics["num_examples"] == 104


def test_fedprox_with_a_huge_mu_keeps_the_weights_near_the_start() -> None:
    # Prepare
    task = HeartDiseaseTask()
    data = task.load_data("cleveland", {})
    torch.manual_seed(0)
    start = flat_parameters(task.build_model())
    plain = TrainingConfig(local_steps=100, learning_rate=0.01)
    proximal = TrainingConfig(local_steps=100, learning_rate=0.01, proximal_mu=100.0)

    # Execute
    moved_plain = (flat_parameters(trained_copy(task, data, plain, seed=3)) - start).norm()
    moved_proximal = (flat_parameters(trained_copy(task, data, proximal, seed=3)) - start).norm()

    # Assert
    assert moved_proximal < 0.1 * moved_plain
    assert moved_proximal < 0.05


def test_training_is_deterministic_given_the_seeds() -> None:
    # Prepare
    task = HeartDiseaseTask()
    data = task.load_data("hungary", {})
    config = TrainingConfig(local_steps=30, learning_rate=0.05, optimizer="adam")

    # Execute
    first = trained_copy(task, data, config, seed=11)
    second = trained_copy(task, data, config, seed=11)
    other = trained_copy(task, data, config, seed=12)

    # Assert
    assert torch.equal(flat_parameters(first), flat_parameters(second))
    assert not torch.equal(flat_parameters(first), flat_parameters(other))


def test_local_epochs_train_full_passes_over_the_data() -> None:
    # Prepare
    task = HeartDiseaseTask()
    data = task.load_data("switzerland", {})
    torch.manual_seed(0)
    model = task.build_model()

    # Execute
    result = task.train(model, data, TrainingConfig(local_epochs=3, batch_size=4), torch.Generator().manual_seed(0))

    # Assert: 30 examples in batches of 4 -> 8 steps per epoch
    assert result.steps == 24


def test_minibatches_visit_every_example_once_per_epoch() -> None:
    # Execute
    batches = list(minibatch_indices(10, 4, 6, torch.Generator().manual_seed(0)))

    # Assert: two epochs of sizes 4, 4, 2
    assert [len(batch) for batch in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(batches[3:]).tolist()) == list(range(10))


def test_architecture_digest_depends_on_architecture_not_on_weights() -> None:
    # Prepare
    torch.manual_seed(0)
    heart_a = HeartDiseaseTask().build_model()
    torch.manual_seed(1)
    heart_b = HeartDiseaseTask().build_model()
    tabular_logistic = TabularCsvTask(num_features=13).build_model()
    tabular_mlp = TabularCsvTask(num_features=13, model="mlp").build_model()

    # Execute / Assert
    assert architecture_digest(heart_a) == architecture_digest(heart_b)
    assert architecture_digest(tabular_logistic) != architecture_digest(tabular_mlp)
    assert architecture_digest(heart_a) != architecture_digest(tabular_logistic)


# ------------------------------------------------------------------------------------------- partitions


def total_variation_skew(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean over sites of the total-variation distance between a site's label mix and the global one."""
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[part], minlength=num_classes) / len(part) - overall).sum() for part in parts
    ]
    return float(np.mean(distances))


@pytest.mark.parametrize("alpha", [0.01, 0.5, 100.0])
def test_dirichlet_partition_covers_every_index_exactly_once_with_no_empty_site(alpha: float) -> None:
    # Prepare
    labels = np.random.default_rng(0).integers(0, 5, 300)

    # Execute
    parts = dirichlet_partition(labels, num_sites=8, alpha=alpha, seed=4)

    # Assert
    assert len(parts) == 8
    assert all(len(part) > 0 for part in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(300))
    again = dirichlet_partition(labels, num_sites=8, alpha=alpha, seed=4)
    assert all(np.array_equal(first, second) for first, second in zip(parts, again, strict=True))


def test_smaller_dirichlet_alpha_gives_more_label_skew() -> None:
    # Prepare
    labels = np.random.default_rng(1).integers(0, 10, 2000)

    # Execute: mean skew over 5 seeds for each alpha
    skew = {
        alpha: np.mean(
            [total_variation_skew(labels, dirichlet_partition(labels, 10, alpha, seed), 10) for seed in range(5)]
        )
        for alpha in (0.1, 1.0, 100.0)
    }

    # Assert
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.5
    assert skew[100.0] < 0.1


# ------------------------------------------------------------------------------------------- image-cnn


def write_npz(path: Path, channels: int, num_train: int = 40, num_test: int = 20, num_classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    shape = (28, 28) if channels == 1 else (28, 28, channels)
    arrays: dict[str, Any] = {}
    for split, count in (("train", num_train), ("val", 4), ("test", num_test)):
        images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        images[0] = 255
        labels = rng.integers(0, num_classes, count)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels[:, None] if channels == 1 else labels
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_image_cnn_loads_a_site_share_trains_a_step_and_evaluates(tmp_path: Path, channels: int) -> None:
    # Prepare
    npz = write_npz(tmp_path / "mnist.npz", channels)
    task = get_task("image-cnn", num_classes=3, in_channels=channels)
    options = {"npz": str(npz), "sites": ["a", "b"], "dirichlet_alpha": 1.0, "partition_seed": 5}
    torch.manual_seed(0)
    model = task.build_model()
    start = flat_parameters(model)

    # Execute
    site_a = task.load_data("a", options)
    site_b = task.load_data("b", options)
    result = task.train(model, site_a, TrainingConfig(local_steps=1, batch_size=8), torch.Generator().manual_seed(0))
    metrics = task.evaluate(model, site_a)

    # Assert
    assert site_a.train_features.shape[1:] == (channels, 28, 28)
    assert site_a.num_train + site_b.num_train == 40
    assert site_a.num_test + site_b.num_test == 20
    all_pixels = torch.cat([site_a.train_features, site_b.train_features])
    assert (float(all_pixels.min()), float(all_pixels.max())) == (0.0, 1.0)
    assert site_a.train_labels.dtype == torch.int64
    assert result.steps == 1
    assert not torch.equal(flat_parameters(model), start)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and math.isfinite(metrics["loss"])


def test_image_cnn_scales_pixels_to_unit_range_channels_first(tmp_path: Path) -> None:
    # Prepare: one RGB image, red channel 255, green 51, blue 0
    image = np.zeros((1, 28, 28, 3), dtype=np.uint8)
    image[..., 0], image[..., 1] = 255, 51
    labels = np.array([1])
    np.savez(tmp_path / "one.npz", train_images=image, train_labels=labels, test_images=image, test_labels=labels)

    # Execute
    data = ImageCnnTask(num_classes=2, in_channels=3).load_data("only", {"npz": str(tmp_path / "one.npz")})

    # Assert
    assert data.train_features.shape == (1, 3, 28, 28)
    assert data.train_features[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.2, 0.0])


def test_image_cnn_uses_a_partition_file_when_given(tmp_path: Path) -> None:
    # Prepare
    npz = write_npz(tmp_path / "d.npz", 1)
    (tmp_path / "parts.json").write_text(json.dumps({"north": [0, 5, 7], "south": [1, 2]}))
    options = {"npz": str(npz), "partition_file": str(tmp_path / "parts.json")}

    # Execute
    data = ImageCnnTask(num_classes=3).load_data("north", options)

    # Assert: listed train rows only; the whole test split (no test share in the file)
    assert (data.num_train, data.num_test) == (3, 20)


def test_image_cnn_refuses_data_that_does_not_fit_the_agreed_model(tmp_path: Path) -> None:
    # Prepare
    npz = write_npz(tmp_path / "rgb.npz", 3)

    # Execute / Assert
    with pytest.raises(TaskDataError, match="in_channels = 1"):
        ImageCnnTask(num_classes=3, in_channels=1).load_data("a", {"npz": str(npz)})
    with pytest.raises(TaskDataError, match="num_classes = 2"):
        ImageCnnTask(num_classes=2, in_channels=3).load_data("a", {"npz": str(npz)})


def test_image_cnn_never_unpickles_an_npz(tmp_path: Path) -> None:
    # Prepare: an object array can only be stored by pickling it
    objects = np.array([{"not": "pixels"}], dtype=object)
    np.savez(tmp_path / "evil.npz", train_images=objects, train_labels=np.array([0]))

    # Execute / Assert
    with pytest.raises(TaskDataError):
        ImageCnnTask(num_classes=2).load_data("a", {"npz": str(tmp_path / "evil.npz")})


# ------------------------------------------------------------------------------------------- tabular-csv

TINY_CSV = """\
age,sex,smoker,outcome
30,F,no,0
50,M,yes,1
99,X,no,0
40,F,yes,1
60,M,no,0
"""
TINY_OPTIONS = {
    "target": "outcome",
    "categorical": {"sex": ["F", "M"], "smoker": ["no", "yes"]},
    "test_fraction": 0.2,
    "split_seed": 0,
}


def test_tabular_csv_one_hot_encodes_and_standardises_with_train_statistics(tmp_path: Path) -> None:
    # Prepare: split_seed 0 puts data row 3 (age 99, sex X) in test; train ages 30, 50, 40, 60:
    # mean 45, sample std sqrt(500 / 3) = 12.9099; sex X is not a listed category -> all zeros.
    (tmp_path / "site.csv").write_text(TINY_CSV)
    std = math.sqrt(500 / 3)

    # Execute
    data = TabularCsvTask(num_features=5).load_data("a", {"path": str(tmp_path / "site.csv"), **TINY_OPTIONS})

    # Assert: columns age, sex=F, sex=M, smoker=no, smoker=yes
    expected_train = [
        [-15 / std, 1, 0, 1, 0],
        [5 / std, 0, 1, 0, 1],
        [-5 / std, 1, 0, 0, 1],
        [15 / std, 0, 1, 1, 0],
    ]
    np.testing.assert_allclose(data.train_features.numpy(), np.asarray(expected_train, dtype=np.float32), rtol=1e-6)
    np.testing.assert_allclose(
        data.test_features.numpy(), np.asarray([[54 / std, 0, 0, 1, 0]], dtype=np.float32), rtol=1e-6
    )
    assert data.train_labels.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert data.test_labels.tolist() == [0.0]


def test_tabular_csv_maps_two_text_labels_in_sorted_order(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "site.csv").write_text("x,label\n1,yes\n2,no\n3,yes\n4,no\n")

    # Execute
    data = TabularCsvTask(num_features=1).load_data(
        "a", {"path": str(tmp_path / "site.csv"), "target": "label", "test_fraction": 0.0}
    )

    # Assert: "no" < "yes"
    assert data.train_labels.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_tabular_csv_missing_values_are_an_error_or_dropped(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "gaps.csv").write_text(TINY_CSV.replace("40,F", ",F"))
    options = {"path": str(tmp_path / "gaps.csv"), **TINY_OPTIONS}

    # Execute / Assert
    with pytest.raises(TaskDataError, match=r"line 5: missing value in \['age'\]"):
        TabularCsvTask(num_features=5).load_data("a", options)
    dropped = TabularCsvTask(num_features=5).load_data("a", {**options, "missing": "drop"})
    assert dropped.num_train + dropped.num_test == 4


def test_tabular_csv_says_which_width_to_configure(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "site.csv").write_text(TINY_CSV)

    # Execute / Assert
    with pytest.raises(TaskDataError, match="set num_features = 5"):
        TabularCsvTask(num_features=4).load_data("a", {"path": str(tmp_path / "site.csv"), **TINY_OPTIONS})


def test_tabular_csv_mlp_trains(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "site.csv").write_text(TINY_CSV)
    task = TabularCsvTask(num_features=5, model="mlp", hidden=8)
    data = task.load_data("a", {"path": str(tmp_path / "site.csv"), **TINY_OPTIONS})
    torch.manual_seed(0)
    model = task.build_model()

    # Execute
    result = task.train(model, data, TrainingConfig(local_steps=5, batch_size=2), torch.Generator().manual_seed(0))

    # Assert
    assert result.steps == 5 and result.num_examples == 4
    assert 0.0 <= task.evaluate(model, data)["accuracy"] <= 1.0


# ------------------------------------------------------------------------------------------- registry


def test_unknown_task_error_lists_the_available_names() -> None:
    # Execute
    with pytest.raises(UnknownTaskError) as caught:
        get_task("lung-ct")

    # Assert
    message = str(caught.value)
    assert isinstance(caught.value, TaskError)
    assert "heart-disease" in message and "image-cnn" in message and "tabular-csv" in message


def write_plugin_module(directory: Path, module_name: str) -> None:
    (directory / f"{module_name}.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from tasks.heart_disease import HeartDiseaseTask

            class WiderTask(HeartDiseaseTask):
                name = "wider"

                def __init__(self, *, width: int = 2) -> None:
                    self.width = width

                def build_model(self) -> nn.Module:
                    return nn.Linear(13, self.width)
            """
        )
    )


def test_a_dotted_path_plugin_loads_with_its_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    write_plugin_module(tmp_path, "fedmq_dotted_plugin")
    monkeypatch.syspath_prepend(str(tmp_path))

    # Execute
    task = get_task("fedmq_dotted_plugin:WiderTask", width=5)

    # Assert
    assert task.name == "wider"
    assert task.build_model()(torch.zeros(1, 13)).shape == (1, 5)


def test_an_entry_point_plugin_is_found_and_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: an installed distribution declaring [project.entry-points."fedmq.tasks"]
    write_plugin_module(tmp_path, "fedmq_entry_point_plugin")
    dist_info = tmp_path / "fedmq_entry_point_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedmq-entry-point-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[fedmq.tasks]\nwider-plugin = fedmq_entry_point_plugin:WiderTask\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = TaskRegistry()

    # Execute
    task = registry.create("wider-plugin", width=3)

    # Assert
    assert "wider-plugin" in registry.available()
    assert task.build_model()(torch.zeros(1, 13)).shape == (1, 3)


def test_a_registered_task_resolves_and_bad_arguments_are_named() -> None:
    # Prepare
    registry = TaskRegistry()
    registry.register("cardio", HeartDiseaseTask)

    # Execute / Assert
    assert isinstance(registry.create("cardio"), HeartDiseaseTask)
    assert "cardio" in registry.available()
    with pytest.raises(TaskConfigError, match="num_classes"):
        registry.create("image-cnn", in_channels=3)
    with pytest.raises(UnknownTaskError, match="no_such_module"):
        registry.create("no_such_module:Task")


def test_task_from_options_passes_only_constructor_keys(tmp_path: Path) -> None:
    # Prepare: one [task] table for coordinator and site; path/target are site data options
    options = {"name": "tabular-csv", "num_features": 5, "model": "mlp", "path": "x.csv", "target": "outcome"}

    # Execute
    task = task_from_options(options)

    # Assert
    assert isinstance(task, TabularCsvTask)
    assert (task.num_features, task.model) == (5, "mlp")
    with pytest.raises(TaskConfigError, match="name"):
        task_from_options({"num_features": 5})


def test_a_diverging_run_raises_instead_of_returning_poisoned_weights() -> None:
    # Prepare: a model whose weights already went NaN (what too large a learning rate ends in)
    task = HeartDiseaseTask()
    data = task.load_data("cleveland", {})
    model = task.build_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))

    # Execute / Assert
    with pytest.raises(TrainingDivergedError, match="step 1 of 10"):
        task.train(model, data, TrainingConfig(local_steps=10), torch.Generator().manual_seed(0))
