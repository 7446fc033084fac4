"""What ``fedmq`` costs before it does anything: help imports nothing heavy, benchmarks only from a checkout."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedmq.bench
from fedmq.cli import main
from fedmq.safe_path import drop_working_directory

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "matplotlib")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter finding this checkout's packages, as an installed fedmq would find its own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("command", [[], ["status"], ["broker"], ["coordinator"], ["site"]], ids=repr)
def test_help_imports_neither_torch_nor_matplotlib(command: list[str], tmp_path: Path) -> None:
    # Execute: --help, then the heavy modules the interpreter holds
    result = run_python(
        "import sys\n"
        "from fedmq.cli import main\n"
        "try:\n"
        f"    main({[*command, '--help']!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted({{name.split('.')[0] for name in sys.modules}} & {set(HEAVY)!r}))\n",
        cwd=tmp_path,
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert "usage: fedmq" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])

    # Assert
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedmq {importlib.metadata.version('fedmq')}"


def test_bench_without_the_benchmarks_folder_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: an installed fedmq, without the checkout's benchmarks/ beside it
    monkeypatch.setattr(fedmq.bench, "benchmarks_dir", lambda: None)

    # Execute
    exit_code = main(["bench", "codec"])

    # Assert
    err = capsys.readouterr().err
    assert exit_code == 1
    assert "not part of the installed package" in err and "python -m benchmarks NAME" in err


def test_the_benchmarks_run_as_a_module_of_the_checkout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    from benchmarks import main as benchmarks_main

    # Execute
    exit_code = benchmarks_main(["--state-dir", str(tmp_path), "codec", "--params", "1000", "--repeat", "1"])

    # Assert
    assert exit_code == 0
    assert "float16" in capsys.readouterr().out


def test_a_working_directory_with_modules_named_like_fedmqs_cannot_shadow_them(tmp_path: Path) -> None:
    # Prepare: a user's own broker.py, schemas.py, tasks.py and coordinator.py that fail loudly when imported
    for name in ("broker", "schemas", "tasks", "coordinator", "site_agent"):
        (tmp_path / f"{name}.py").write_text(f"raise RuntimeError('the working directory shadowed {name}')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # fedmq from this checkout, as if installed

    # Execute
    results = [
        subprocess.run(
            [sys.executable, "-m", "fedmq", *command, "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        for command in ([], ["broker"], ["status"])
    ]

    # Assert
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "usage: fedmq" in result.stdout
        assert "shadowed" not in result.stderr


def test_the_working_directory_stays_on_the_path_only_for_a_source_checkout_run_from_it(tmp_path: Path) -> None:
    # Prepare
    checkout = tmp_path / "checkout"
    (checkout / "fedmq").mkdir(parents=True)
    package_file = str(checkout / "fedmq" / "__main__.py")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = ["", str(elsewhere), str(checkout), "/usr/lib/python3/dist-packages"]

    # Execute
    from_checkout = drop_working_directory(path, package_file, str(checkout))
    from_elsewhere = drop_working_directory(path, package_file, str(elsewhere))

    # Assert: in the checkout its own directory is fedmq's; anywhere else the working directory ('' too) goes
    assert from_checkout == path
    assert from_elsewhere == [str(checkout), "/usr/lib/python3/dist-packages"]
