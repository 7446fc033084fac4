"""Pluggable medical tasks: what a hospital trains (model, data loading, loss, metrics).

``get_task(name, **kwargs)`` finds a task by name (built-in, registered, entry point ``fedmq.tasks`` or
``"package.module:Class"``); ``task_from_options`` builds one from a ``[task]`` config table. Built-ins:
``heart-disease`` (FLamby Fed-Heart-Disease, shipped), ``image-cnn`` (MedMNIST .npz), ``tabular-csv``.
"""

from tasks.base import SiteData, Task, TrainResult, architecture_digest
from tasks.errors import (
    TaskConfigError,
    TaskDataError,
    TaskError,
    TrainingDivergedError,
    UnknownTaskError,
)
from tasks.registry import (
    TaskRegistry,
    get_task,
    register_task,
    task_from_options,
)

__all__ = [
    "SiteData",
    "Task",
    "TaskConfigError",
    "TaskDataError",
    "TaskError",
    "TaskRegistry",
    "TrainResult",
    "TrainingDivergedError",
    "UnknownTaskError",
    "architecture_digest",
    "get_task",
    "register_task",
    "task_from_options",
]
