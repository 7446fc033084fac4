"""The fault campaign (issue 12): each case a real fault against a real broker and a real coordinator process.

Each test asserts what a hospital's operator would check afterwards: every update the broker confirmed to a site
was applied (lost == 0), none twice, none wrongly rejected, the run's own count agrees and the audit chain
verifies. The suite runs the short campaign (~4 min together); ``FEDMQ_CAMPAIGN=full`` runs the long one
(30 s cuts, 20 s alarm, 40 s storage faults, the systemd unit's 10 s restart delay). The cases themselves live in
tests/faults/cases.py so a benchmark runs the same code.

Cases marked xfail(strict=True) lose updates on the current code for the reason given (issue 12): they pass while
the bug is there and turn red when it is fixed, so the fix must remove the marker.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.cases import (
    CAMPAIGN_ENV,
    CampaignSettings,
    broker_kill,
    broker_memory_alarm,
    checkpoint_read_only,
    coordinator_crash_loop,
    coordinator_sigkill,
    site_connection_cut,
    state_dir_full,
)
from tests.faults.figures import CampaignFigures
from tests.faults.tools import MountUnavailable
from tests.integration.conftest import BrokerEnv

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SETTINGS = CampaignSettings.from_name(os.environ.get(CAMPAIGN_ENV))


def assert_nothing_lost(figures: CampaignFigures, *, site_side_fault: bool = False) -> None:
    print(figures.summary())  # the table's row, in the test's output (pytest -s or -rA)
    assert figures.confirmed > 0, figures.summary()
    if not site_side_fault:
        assert figures.confirmed == figures.attempted, figures.summary()
    assert figures.lost == 0, f"{figures.summary()}; first lost ids {figures.lost_ids}"
    assert figures.applied_twice == 0, figures.summary()
    assert figures.rejected == 0, figures.summary()
    assert figures.applied == figures.confirmed + figures.unconfirmed_applied, figures.summary()
    assert figures.checkpoint_accepted == figures.applied, figures.summary()
    assert figures.chain_ok, figures.summary()


def test_coordinator_sigkilled_at_random_moments_loses_no_confirmed_update(
    broker_env: BrokerEnv, tmp_path: Path
) -> None:
    figures = coordinator_sigkill(broker_env, tmp_path, SETTINGS)
    assert_nothing_lost(figures)
    assert figures.coordinator_kills >= 10


@pytest.mark.xfail(
    strict=True,
    reason="issue 12: x-delivery-limit 5 on the update queue dead-letters the prefetched window that every killed "
    "coordinator returned unacked (FedBuff K=50, prefetch 100: ~100 confirmed updates, x-first-death-reason "
    "delivery_limit, no audit record)",
)
def test_coordinator_crash_loop_loses_no_confirmed_update(broker_env: BrokerEnv, tmp_path: Path) -> None:
    figures = coordinator_crash_loop(broker_env, tmp_path, SETTINGS)
    assert figures.coordinator_kills >= 8 + 1, figures.summary()  # the first kill starts the loop
    assert_nothing_lost(figures)


def test_broker_killed_mid_burst_loses_no_confirmed_update(tmp_path: Path) -> None:
    figures = broker_kill(tmp_path, SETTINGS)
    assert_nothing_lost(figures)
    assert figures.publish_failures > 0, "the broker's death never reached a site"


def test_memory_alarm_loses_no_confirmed_update(broker_env: BrokerEnv, tmp_path: Path) -> None:
    figures = broker_memory_alarm(broker_env, tmp_path, SETTINGS)
    assert_nothing_lost(figures)
    assert figures.longest_publish_seconds >= SETTINGS.memory_alarm_seconds / 2, "the alarm blocked no publisher"


def test_site_connection_cut_loses_no_confirmed_update(broker_env: BrokerEnv, tmp_path: Path) -> None:
    figures = site_connection_cut(broker_env, tmp_path, SETTINGS)
    assert_nothing_lost(figures, site_side_fault=True)
    assert figures.publish_failures > 0, "the cut never reached the site"


@pytest.mark.xfail(
    strict=True,
    reason="issue 12: the EROFS from the checkpoint write is taken for a connection error; the transport reconnects, "
    "the in-memory duplicate filter acks the redeliveries as already-applied with no checkpoint written, and the "
    "next start loads the older checkpoint (updates acked but lost; a resend rejected as duplicate)",
)
def test_checkpoint_filesystem_read_only_loses_no_confirmed_update(broker_env: BrokerEnv, tmp_path: Path) -> None:
    try:
        figures = checkpoint_read_only(broker_env, tmp_path, SETTINGS)
    except MountUnavailable as exc:
        pytest.skip(f"needs a tmpfs mount (root): {exc}")
    assert_nothing_lost(figures)


@pytest.mark.xfail(
    strict=True,
    reason="issue 12: an ENOSPC append leaves a torn record in the middle of audit.jsonl (chain broken) and no "
    "accepted record for updates the checkpoint counts; the OSError is taken for a connection error and the "
    "redeliveries are acked as already-applied (in one run 12 copies were dead-lettered by x-delivery-limit)",
)
def test_state_dir_full_loses_no_confirmed_update(broker_env: BrokerEnv, tmp_path: Path) -> None:
    try:
        figures = state_dir_full(broker_env, tmp_path, SETTINGS)
    except MountUnavailable as exc:
        pytest.skip(f"needs a tmpfs mount (root): {exc}")
    assert_nothing_lost(figures)
