"""Why a task could not be found, configured, loaded or trained.

Everything in ``tasks`` raises only these, so a site agent can catch one root and report the reason::

    TaskError                        root of tasks
    ├── UnknownTaskError             no built-in, registered, entry-point or dotted-path task of that name
    ├── TaskConfigError              a bad constructor argument or [task] option (a ValueError)
    ├── TaskDataError                a data file missing, unreadable or malformed, or not matching the model shape
    └── TrainingDivergedError        the local loss became NaN or infinite, so the update must not be sent
"""

from __future__ import annotations


class TaskError(Exception):
    """Root of every error raised by the pluggable tasks."""


class UnknownTaskError(TaskError, LookupError):
    """The task name resolves to nothing; the message lists the names that do."""


class TaskConfigError(TaskError, ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names it."""


class TaskDataError(TaskError):
    """The site's data cannot be read or does not fit the model the federation agreed on."""


class TrainingDivergedError(TaskError):
    """Local training produced a non-finite loss; sending those weights would poison the global model."""
