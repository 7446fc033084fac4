"""The README is the front door: its set-up commands, its CI hook and its code example must stay true."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from schemas import TrainingConfig
from tasks.registry import get_task

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_has_exactly_the_two_setup_commands_and_ci_runs_the_test_one() -> None:
    setup = README.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^    (\S.*)$", setup, flags=re.MULTILINE)
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for script in ("scripts/demo.sh", "scripts/test.sh", "scripts/install.sh"):
        assert (ROOT / script).exists()


def test_the_bring_your_own_task_example_trains_through_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the README's example module, importable, and a CSV with 20 features and a label.
    example = re.search(r"```python\n(# mypackage/tasks.py\n.*?)```", README, flags=re.DOTALL)
    assert example is not None
    package = tmp_path / "mypackage"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(example.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(50, 20, generator=generator)
    labels = (features[:, 0] > 0).float()
    rows = [",".join(f"f{i}" for i in range(20)) + ",label"]
    rows += [
        ",".join(f"{value:.5f}" for value in row.tolist()) + f",{label:.0f}"
        for row, label in zip(features, labels, strict=True)
    ]
    data = tmp_path / "site.csv"
    data.write_text("\n".join(rows) + "\n")

    # Execute: load it the way a site agent does, train, evaluate.
    task = get_task("mypackage.tasks:MyTask")
    site_data = task.load_data("hospital-a", {"path": str(data)})
    model = task.build_model()
    result = task.train(model, site_data, TrainingConfig(local_steps=50, learning_rate=0.1, batch_size=8), generator)
    metrics = task.evaluate(model, site_data)

    # Assert
    assert task.name == "my-risk-model"
    assert (site_data.num_train, site_data.num_test) == (40, 10)
    assert result.steps == 50 and 0.0 <= metrics["accuracy"] <= 1.0
    sys.modules.pop("mypackage.tasks", None)
    sys.modules.pop("mypackage", None)


def test_the_config_examples_in_the_readme_and_the_deployment_guide_are_valid(tmp_path: Path) -> None:
    """Every ``toml`` block that is a whole coordinator.toml or site file must load as one."""
    from coordinator.config import load_config
    from site_agent.config import load_site_config

    documents = README + (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", documents, flags=re.DOTALL)
    coordinator_files = [block for block in blocks if "coordinator.toml" in block.split("\n", 1)[0]]
    site_files = [block for block in blocks if block.startswith("site_id = ")]
    assert coordinator_files and site_files

    for index, block in enumerate(coordinator_files):
        path = tmp_path / f"coordinator-{index}.toml"
        path.write_text(block)
        load_config(path)
    for index, block in enumerate(site_files):
        path = tmp_path / f"site-{index}.toml"
        path.write_text(block)
        load_site_config(path)
