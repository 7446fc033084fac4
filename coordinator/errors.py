"""The coordinator's errors, one tree. A failed site is data (a ``Reason``), never one of these::

    CoordinatorError                   root
    ├── ConfigError (ValueError)       coordinator.toml cannot be used; one line naming the file, key and value
    ├── ModelFileError (ValueError)    a final model file that is not a readable safetensors file
    ├── AggregationError (ValueError)  a bad strategy configuration, a checkpoint from another strategy, or
    │                                  tensors that do not line up with the model; the strategy is left unchanged
    └── StorageError                   what should be durable may not be: nothing may be acked (as for OSError)
        ├── CheckpointError (RuntimeError)  a checkpoint that cannot be read back
        └── AuditError (ValueError)         an audit record that does not continue the chain

The state dir's writes raise ``StorageError`` for an ``OSError`` (``coordinator.storage.storage_writes``), so a
transport cannot take a failed write for a lost connection; a raw ``OSError`` from a handler stops the process
too (the transport lets a handler's exception through untranslated). The handlers' guards let both through
(``STORAGE_ERRORS``), nothing else catches them, and the process exits (``fedmq coordinator run`` with code 74)
rather than ack what is not durable. ``coordinator.config`` and ``coordinator.model_files`` re-export the two
errors they raise.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Root of the coordinator's errors."""


class ConfigError(CoordinatorError, ValueError):
    """A config file that cannot be used; the message (one line) names the file and the key."""


class ModelFileError(CoordinatorError, ValueError):
    """A model file that cannot be read back as one fedmq wrote."""


class AggregationError(CoordinatorError, ValueError):
    """Aggregation cannot proceed; raised before any state changes, so nothing is half-applied."""


class StorageError(CoordinatorError):
    """The run's durable state (checkpoint, audit log) cannot be written or read back as it should."""


class CheckpointError(StorageError, RuntimeError):
    """A checkpoint that cannot be read back."""


class AuditError(StorageError, ValueError):
    """An audit record sealed against another chain head than the log's."""


STORAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, StorageError)
"""Not caught by a handler's guard: a failed write means nothing is durable, so nothing may be acked."""
