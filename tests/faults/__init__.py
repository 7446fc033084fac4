"""The fault campaign (issue 12): real coordinator processes, scripted sites, real faults, figures from the audit log.

Two cases run real site agents (``fedmq site run``, signing end to end) instead of scripted sites: one SIGKILLs an
agent mid-publish, one restores the coordinator from an older backup while the agents run. Their ids are
``"<site>:<seq>"``, from the agent's own log ("update seq N on vM sent", after the confirm) and seq counter.

Layout:

``figures.py``   ``CampaignFigures`` and ``compute_figures`` (pure; unit-tested in tests/unit/test_campaign_figures.py)
``harness.py``   ``Campaign``: provisioned sites publishing with confirms, a supervised coordinator, the drain;
                 ``write_coordinator_config``, the one place the campaign's coordinator.toml is written
``tools.py``     the faults: SIGKILLs, crash loop, TCP proxy cuts, broker kill -9, memory alarm, small mounts
``cases.py``     one function per case, ``CampaignSettings`` (short for the suite, full for the benchmark)
``__main__.py``  ``python -m tests.faults [--full] [CASE ...]``: the cases outside pytest, on a node of its own,
                 printing the attempted/confirmed/applied/lost/applied-twice table

The tests that run the cases are in tests/integration/test_fault_campaign.py (marked ``faults``): they are
integration tests (real broker, real processes) and share the session's node and per-test vhost. The package
itself imports no pytest, so a benchmark can drive it.
"""
