"""Why a message could not be decoded.

Every decoder raises only these (the fuzz tests hold them to it)::

    SchemaError                      root: nothing from the wire is trusted until it decodes
    ├── MessageTooLarge              byte size above the configured limit, checked before unpacking
    ├── MalformedMessage             not msgpack, truncated, trailing bytes, or not a map
    ├── UnknownSchemaVersion         a schema version (or message type) this build does not speak
    ├── FieldError                   a field missing, extra, of the wrong type or out of range
    └── TensorError                  unsupported dtype, bad shape, or a shape that does not match the bytes

``TrainingConfig`` raises ``FieldError`` when it is made, too: a value a site could not train with is refused
alike in the coordinator's config and on the wire.

Each message names the offending field (``delta['fc.weight'].shape``), so a rejection reason is readable in
the audit log and the dead-letter header.
"""

from __future__ import annotations


class SchemaError(ValueError):
    """Root of every decoding error."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


class MessageTooLarge(SchemaError):
    pass


class MalformedMessage(SchemaError):
    pass


class UnknownSchemaVersion(SchemaError):
    pass


class FieldError(SchemaError):
    pass


class TensorError(SchemaError):
    pass
