"""docs/CONFIG.md is the reference of every config key: it must be what the config models say today."""

from __future__ import annotations

from pathlib import Path

from fedmq.config_reference import reference_markdown

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_config_reference_in_docs_is_up_to_date() -> None:
    # Regenerate with: python3 -m fedmq config-reference > docs/CONFIG.md
    assert (REPO_ROOT / "docs" / "CONFIG.md").read_text() == reference_markdown()


def test_the_reference_lists_every_key_of_both_files_with_its_default() -> None:
    text = reference_markdown()

    for key in ("`update_prefetch` | `16`", "`max_staleness` | `20`", "`port` | `9464`", "`slowdown` | `1.0`"):
        assert key in text
    assert '### [strategy.server_optimizer] (name = "adam")' in text
    assert "## site.toml" in text and "`site_id` | required" in text
