"""Checks an update passes before it may touch the global model. Pure: no broker, no I/O.

Order matters only for which reason is reported first; cheap checks come before decoding. Every refusal is a
``Rejection`` value (a reason from a fixed vocabulary plus a sentence), never an exception: a failed site is data.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from broker.transport import Delivery
from coordinator.reasons import Reason
from schemas import DecodeLimits, MessageTooLarge, ModelUpdate, SchemaError, first_non_finite

SignatureCheck = Callable[[ModelUpdate], str | None]
"""Why an update's signature does not hold, or None (``coordinator.signatures.UpdateSignatures``)."""


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


OPEN_SEQS_PER_SITE = 512  # settled seqs kept above a missing one: 32 windows of the default prefetch (16)


@dataclass
class _SiteSeqs:
    """One site's settled seqs: all up to ``floor``, plus the applied (with their ids) and refused ones above it."""

    floor: int = 0
    applied: dict[int, str] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)


class DuplicateFilter:
    """Which updates were applied, exactly, whatever order the broker returns them in.

    A redelivered update, or a site's resend of one after a lost publisher confirm (same id, same seq), must be
    told apart from two other things: an update never applied (it goes through as usual, even when the site's
    newer updates came first) and a new message reusing an applied seq or id (a replay: refused as duplicate).
    A single "last applied seq" per site cannot do this: after a crash the broker may return seq 128 before the
    unapplied seq 123, and 123 would be refused. So, per site: a ``floor`` under which every seq is settled
    (applied, refused, or given up on), and above it the applied seqs (with their ids) and the refused ones. The
    floor climbs over settled seqs. A seq that never arrives (a gap) holds the floor until ``open_seqs`` seqs above
    it are settled; then the floor passes it, and an update with that seq arriving later is refused as a duplicate.
    The bound keeps the checkpoint small (nothing above the floor at all while a site's seqs arrive in order) and is
    far beyond how far the broker reorders a site's updates (those in flight when a consumer died come back, at
    most a prefetch window each time). The ids of the last ``capacity`` applied updates are kept as well, so a copy
    of one at or below the floor is still recognised as a copy.

    It is part of the checkpoint, so "applied" here is "durably applied" for anything acked: an ack happens only
    in a commit that made this filter durable with the rest of the state (``coordinator.commit``).
    """

    def __init__(self, capacity: int = 2_000, open_seqs: int = OPEN_SEQS_PER_SITE) -> None:
        self.capacity = capacity
        self.open_seqs = open_seqs
        self.recent_ids: OrderedDict[str, int | None] = OrderedDict()  # id -> its seq (None: from an older checkpoint)
        self.sites: dict[str, _SiteSeqs] = {}

    def applied_copy(self, update: ModelUpdate) -> bool:
        """This very update (same seq and id; the site is checked before, from the login) was applied: a copy of it
        is a no-op to acknowledge."""
        if update.update_id in self.recent_ids:
            seq = self.recent_ids[update.update_id]
            return seq is None or seq == update.seq
        site = self.sites.get(update.site_id)
        return site is not None and site.applied.get(update.seq) == update.update_id

    def is_duplicate(self, update: ModelUpdate) -> str | None:
        """Why ``update`` may not be applied as a new one (a copy of an applied update included), or None."""
        if self.applied_copy(update):
            return f"update {update.update_id} was already applied"
        if update.update_id in self.recent_ids:
            return f"update id {update.update_id} was applied before with another seq"
        site = self.sites.get(update.site_id)
        if site is None:
            return None
        if update.seq in site.applied:
            return f"seq {update.seq} was applied before as update {site.applied[update.seq]}"
        if update.seq <= site.floor:
            return f"seq {update.seq} is at or below the site's settled seq {site.floor}"
        return None

    def remember(self, update: ModelUpdate) -> None:
        """``update`` is applied."""
        self.recent_ids[update.update_id] = update.seq
        while len(self.recent_ids) > self.capacity:
            self.recent_ids.popitem(last=False)
        site = self.sites.setdefault(update.site_id, _SiteSeqs())
        if update.seq > site.floor:
            site.applied[update.seq] = update.update_id
            site.refused.discard(update.seq)
            self._climb(site)

    def settle_refused(self, update: ModelUpdate) -> None:
        """``update`` was refused for what it holds: its seq is settled (an update reusing it can wait no more)."""
        site = self.sites.setdefault(update.site_id, _SiteSeqs())
        if update.seq > site.floor and update.seq not in site.applied:
            site.refused.add(update.seq)
            self._climb(site)

    def _climb(self, site: _SiteSeqs) -> None:
        while True:
            following = site.floor + 1
            if following in site.applied:
                del site.applied[following]
            elif following in site.refused:
                site.refused.remove(following)
            elif len(site.applied) + len(site.refused) > self.open_seqs:
                site.floor = min(site.applied.keys() | site.refused) - 1
                continue  # past the gap: the lowest seq settled above it is next
            else:
                return
            site.floor = following

    def state_dict(self) -> dict[str, object]:
        """Flat lists (a checkpoint is written per commit: no per-entry Python objects to build)."""
        return {
            "recent_ids": list(self.recent_ids),
            "recent_seqs": list(self.recent_ids.values()),
            "sites": {
                name: {
                    "floor": site.floor,
                    "applied_seqs": list(site.applied),
                    "applied_ids": list(site.applied.values()),
                    "refused": list(site.refused),
                }
                for name, site in self.sites.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Also reads a checkpoint of the older form (ids only, and each site's last applied seq as its floor)."""
        ids = [str(update_id) for update_id in state["recent_ids"]]
        seqs = state.get("recent_seqs") or [None] * len(ids)
        self.recent_ids = OrderedDict(zip(ids, (None if seq is None else int(seq) for seq in seqs), strict=True))
        if "last_seq" in state:
            self.sites = {str(name): _SiteSeqs(floor=int(seq)) for name, seq in state["last_seq"].items()}
            return
        self.sites = {
            str(name): _SiteSeqs(
                floor=int(site["floor"]),
                applied=dict(zip(map(int, site["applied_seqs"]), map(str, site["applied_ids"]), strict=True)),
                refused={int(seq) for seq in site["refused"]},
            )
            for name, site in state["sites"].items()
        }


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
    signatures: SignatureCheck | None = None,
    max_num_examples: int | None = None,
    clip_num_examples: bool = True,
) -> ValidUpdate | Rejection:
    """``max_num_examples`` bounds the site's claim (None: unbounded): a claim above it is clipped to it, or, with
    ``clip_num_examples=False``, rejected as ``too-many-examples``."""
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
    # The broker vouched for the user_id above; the signature holds even against the broker's administrator.
    bad_signature = signatures(update) if signatures is not None else None
    if bad_signature:
        return Rejection(Reason.BAD_SIGNATURE, bad_signature, site_label, update)
    duplicate = duplicates.is_duplicate(update)
    if duplicate:
        return Rejection(Reason.DUPLICATE, duplicate, site_label, update)
    if update.base_version > version:  # e.g. trained on a model of a coordinator since restored from a backup
        return Rejection(
            Reason.UNKNOWN_VERSION,
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
            return Rejection(Reason.TOO_MANY_EXAMPLES, detail, site_label, update)
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
