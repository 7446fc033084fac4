"""Why an update or a status message was rejected: one vocabulary for the validation, the strategies, the status
checks and the handlers' guards.

A reason's value is what operators see: the ``reason`` label of ``fedmq_updates_rejected_total`` and
``fedmq_status_rejected_total``, the audit record's ``reason`` and the dead letter's ``x-fedmq-reject-reason``
header.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    # checked by the coordinator before a strategy sees the update (coordinator.validation)
    UNKNOWN_SITE = "unknown-site"
    IDENTITY_MISMATCH = "identity-mismatch"
    BAD_SIGNATURE = "bad-signature"  # missing, or not made by the key the site registered (schemas.signing)
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    WRONG_SHAPE = "wrong-shape"
    NON_FINITE = "non-finite"
    NORM_TOO_LARGE = "norm-too-large"
    STALE = "stale"
    DUPLICATE = "duplicate"
    TOO_MANY_EXAMPLES = "too-many-examples"  # a num_examples claim above the cap ([validation]; reports too)
    # refused by a strategy (Strategy.check)
    SITE_SHARE = "site-share"
    WRONG_ROUND = "wrong-round"
    ALREADY_IN_ROUND = "already-in-round"
    NO_EXAMPLES = "no-examples"
    ANOMALOUS = "anomalous"  # points against the recent updates ([strategy.robust] min_anomaly_score)
    # a version the coordinator never made: an update's base_version, an evaluation report's model_version
    UNKNOWN_VERSION = "unknown-version"
    # checked on evaluation reports (coordinator.status); unknown-site, identity-mismatch, oversized, malformed and
    # non-finite apply to status messages too
    OUT_OF_RANGE = "out-of-range"
    # an unexpected exception while handling the update (the handler's guard): a bug, not the site's doing
    INTERNAL_ERROR = "internal-error"
