"""Why an update was rejected: one vocabulary for the validation, the strategies and the handler's guard.

A reason's value is what operators see: the ``reason`` label of ``fedmq_updates_rejected_total``, the audit
record's ``reason`` and the dead letter's ``x-fedmq-reject-reason`` header.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    # checked by the coordinator before a strategy sees the update (coordinator.validation)
    UNKNOWN_SITE = "unknown-site"
    IDENTITY_MISMATCH = "identity-mismatch"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    WRONG_SHAPE = "wrong-shape"
    NON_FINITE = "non-finite"
    NORM_TOO_LARGE = "norm-too-large"
    STALE = "stale"
    DUPLICATE = "duplicate"
    NUM_EXAMPLES_TOO_LARGE = "num-examples-too-large"  # above the site's cap, with num_examples_above_cap = "reject"
    # refused by a strategy (Strategy.check)
    SITE_SHARE = "site-share"
    WRONG_ROUND = "wrong-round"
    ALREADY_IN_ROUND = "already-in-round"
    NO_EXAMPLES = "no-examples"
    ANOMALOUS = "anomalous"  # points against the recent updates ([strategy.robust] min_anomaly_score)
    # an unexpected exception while handling the update (the handler's guard): a bug, not the site's doing
    INTERNAL_ERROR = "internal-error"
