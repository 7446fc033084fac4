"""Checks an update passes before it may touch the global model. Pure: no broker, no I/O.

Order matters only for which reason is reported first; cheap checks come before decoding. Every refusal is a
``Rejection`` value (a reason from a fixed vocabulary plus a sentence), never an exception: a failed site is data.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from broker.transport import Delivery
from coordinator.reasons import Reason
from schemas import DecodeLimits, MessageTooLarge, ModelUpdate, SchemaError, first_non_finite


@dataclass(frozen=True)
class Rejection:
    reason: Reason
    detail: str
    site_id: str
    update: ModelUpdate | None = None


@dataclass(frozen=True)
class ValidUpdate:
    update: ModelUpdate
    staleness: int
    norm: float
    num_examples: int = -1  # the count aggregation may use: the claim, or the cap it was clipped to (-1: the claim)

    @property
    def examples_clipped(self) -> bool:
        return 0 <= self.num_examples < self.update.num_examples


class DuplicateFilter:
    """Remembers applied update ids (the most recent ``capacity``) and each site's last applied seq."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.recent_ids: OrderedDict[str, None] = OrderedDict()
        self.last_seq: dict[str, int] = {}

    def applied(self, update_id: str) -> bool:
        """This very update was applied (as opposed to a new one reusing a seq)."""
        return update_id in self.recent_ids

    def is_duplicate(self, update: ModelUpdate) -> str | None:
        if update.update_id in self.recent_ids:
            return f"update {update.update_id} was already applied"
        last = self.last_seq.get(update.site_id)
        if last is not None and update.seq <= last:
            return f"seq {update.seq} is at or below the site's last applied seq {last}"
        return None

    def remember(self, update: ModelUpdate) -> None:
        self.recent_ids[update.update_id] = None
        while len(self.recent_ids) > self.capacity:
            self.recent_ids.popitem(last=False)
        self.last_seq[update.site_id] = max(update.seq, self.last_seq.get(update.site_id, -1))

    def state_dict(self) -> dict[str, object]:
        return {"recent_ids": list(self.recent_ids), "last_seq": dict(self.last_seq)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.recent_ids = OrderedDict((str(update_id), None) for update_id in state["recent_ids"])  # type: ignore[attr-defined]
        self.last_seq = {str(site): int(seq) for site, seq in state["last_seq"].items()}  # type: ignore[attr-defined]


def site_from_routing_key(routing_key: str) -> str | None:
    parts = routing_key.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "site" else None


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over the floating-point tensors: NaN or inf when any value is (or the squares overflow).

    One read of the data per tensor, with no temporary: this is also the finiteness check, and only a non-finite
    result pays for ``first_non_finite`` to name the tensor.
    """
    squares = 0.0
    for tensor in delta.values():
        if tensor.is_floating_point():
            squares += float(torch.linalg.vector_norm(tensor, dtype=torch.float32)) ** 2
    return math.sqrt(squares)


def validate_update(
    delivery: Delivery,
    *,
    known_sites: Collection[str],
    model: Mapping[str, torch.Tensor],
    version: int,
    max_staleness: int,
    max_norm: float,
    duplicates: DuplicateFilter,
    limits: DecodeLimits,
    max_num_examples: int | None = None,
    clip_num_examples: bool = True,
) -> ValidUpdate | Rejection:
    """``max_num_examples`` bounds the site's claim (None: unbounded): a claim above it is clipped to it, or, with
    ``clip_num_examples=False``, rejected as ``num-examples-too-large``."""
    routed_site = site_from_routing_key(delivery.routing_key) or "unknown"
    site_label = routed_site if routed_site in known_sites else "unknown"
    if routed_site not in known_sites:
        return Rejection(Reason.UNKNOWN_SITE, f"no site {routed_site!r} is registered", site_label)
    if delivery.user_id != routed_site:
        return Rejection(
            Reason.IDENTITY_MISMATCH,
            f"message user_id {delivery.user_id!r} is not the routing key's site {routed_site!r}",
            site_label,
        )
    try:
        update = ModelUpdate.decode(delivery.body, limits)
    except MessageTooLarge as exc:
        return Rejection(Reason.OVERSIZED, str(exc), site_label)
    except SchemaError as exc:
        return Rejection(Reason.MALFORMED, str(exc), site_label)
    if update.site_id != routed_site:
        return Rejection(
            Reason.IDENTITY_MISMATCH,
            f"update claims site {update.site_id!r} but was sent by {routed_site!r}",
            site_label,
            update,
        )
    duplicate = duplicates.is_duplicate(update)
    if duplicate:
        return Rejection(Reason.DUPLICATE, duplicate, site_label, update)
    if update.base_version > version:
        return Rejection(
            Reason.MALFORMED,
            f"base_version {update.base_version} is newer than the current {version}",
            site_label,
            update,
        )
    staleness = version - update.base_version
    if staleness > max_staleness:
        return Rejection(Reason.STALE, f"staleness {staleness} exceeds the bound {max_staleness}", site_label, update)
    shape_problem = _shape_problem(update.delta, model)
    if shape_problem:
        return Rejection(Reason.WRONG_SHAPE, shape_problem, site_label, update)
    norm = update_norm(update.delta)
    bad_tensor = first_non_finite(update.delta) if not math.isfinite(norm) else None
    if bad_tensor is not None:
        return Rejection(Reason.NON_FINITE, f"delta[{bad_tensor!r}] holds NaN or inf", site_label, update)
    if not norm <= max_norm:  # also an overflowing (inf) norm of finite values
        return Rejection(Reason.NORM_TOO_LARGE, f"L2 norm {norm:.4g} exceeds {max_norm:.4g}", site_label, update)
    num_examples = update.num_examples
    if max_num_examples is not None and num_examples > max_num_examples:
        if not clip_num_examples:
            detail = f"num_examples {num_examples} exceeds the site's cap {max_num_examples}"
            return Rejection(Reason.NUM_EXAMPLES_TOO_LARGE, detail, site_label, update)
        num_examples = max_num_examples
    return ValidUpdate(update, staleness, norm, num_examples)


def _shape_problem(delta: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]) -> str | None:
    if delta.keys() != model.keys():  # order-insensitive: aggregation looks tensors up by name
        missing = [name for name in model if name not in delta]
        extra = [name for name in delta if name not in model]
        return f"tensor names differ from the model: missing {missing}, unexpected {extra}"
    for name, tensor in delta.items():
        expected = model[name]
        if tensor.shape != expected.shape:
            return f"delta[{name!r}] has shape {list(tensor.shape)}, the model has {list(expected.shape)}"
        # A lossy-compressed delta of a float parameter arrives as float16/float32; anything else must match.
        same_kind = tensor.is_floating_point() and expected.is_floating_point()
        if tensor.dtype != expected.dtype and not same_kind:
            return f"delta[{name!r}] has dtype {tensor.dtype}, the model has {expected.dtype}"
    return None
