"""Find a task by name, so a hospital can plug in its own without changing fedmq.

A name resolves, in this order, to:

1. a task registered on the registry (the built-ins ``heart-disease``, ``image-cnn``, ``tabular-csv``, plus any
   ``register_task`` call);
2. a Python entry point in the group ``fedmq.tasks`` of an installed distribution, e.g. in the plugin's
   pyproject.toml: ``[project.entry-points."fedmq.tasks"] my-task = "mypkg.mymodule:MyTask"``;
3. a dotted path ``"package.module:Attribute"``, imported on demand (nothing to install but the module).

The factory (usually the Task subclass itself) is called with the keyword arguments given to ``get_task``.

Constructor arguments vs data options: one ``[task]`` table is shared by the coordinator and every site. Its
keys that name a constructor parameter of the task (``num_features``, ``num_classes``, ``in_channels``,
``model``, ``hidden`` ...) fix the architecture, so they must be identical everywhere; the coordinator needs
only those to build version 0, with no data. All keys (including site-local ones such as ``path`` or
``data_dir``) are passed to ``load_data``. ``task_from_options`` does that split. A mismatch that slips
through is caught twice: ``load_data`` refuses data that does not fit the constructor's shape, and the model
fingerprint of a global model differs from the site's own.

The module-level functions use ``DEFAULT_REGISTRY``, which holds only the built-ins unless a plugin calls
``register_task``; tests and embedders that want isolation build their own ``TaskRegistry``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from tasks.base import Task
from tasks.errors import TaskConfigError, UnknownTaskError
from tasks.heart_disease import HeartDiseaseTask
from tasks.image_cnn import ImageCnnTask
from tasks.tabular_csv import TabularCsvTask

ENTRY_POINT_GROUP = "fedmq.tasks"

TaskFactory = Callable[..., Task]

BUILTIN_TASKS: Mapping[str, TaskFactory] = {
    HeartDiseaseTask.name: HeartDiseaseTask,
    ImageCnnTask.name: ImageCnnTask,
    TabularCsvTask.name: TabularCsvTask,
}


def _entry_point_factories() -> dict[str, Any]:
    return {entry_point.name: entry_point for entry_point in entry_points(group=ENTRY_POINT_GROUP)}


def _import_dotted(path: str) -> Any:
    module_name, _, attribute_path = path.partition(":")
    if not module_name or not attribute_path:
        raise UnknownTaskError(f"task {path!r}: a dotted path must look like 'package.module:TaskClass'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownTaskError(f"task {path!r}: cannot import module {module_name!r}: {exc}") from exc
    for attribute in attribute_path.split("."):
        try:
            target = getattr(target, attribute)
        except AttributeError as exc:
            raise UnknownTaskError(f"task {path!r}: {module_name!r} has no attribute {attribute_path!r}") from exc
    return target


class TaskRegistry:
    """Names -> task factories; entry points and dotted paths are looked up on demand, never cached."""

    def __init__(self, tasks: Mapping[str, TaskFactory] | None = None) -> None:
        self._factories: dict[str, TaskFactory] = dict(BUILTIN_TASKS if tasks is None else tasks)

    def register(self, name: str, factory: TaskFactory) -> None:
        """Make ``name`` resolve to ``factory``; re-registering a name replaces it (last one wins)."""
        if not name or ":" in name:
            raise TaskConfigError(f"task name {name!r}: must be non-empty and contain no ':'")
        if not callable(factory):
            raise TaskConfigError(f"task {name!r}: the factory must be callable, got {type(factory).__name__}")
        self._factories[name] = factory

    def available(self) -> list[str]:
        """Registered and entry-point names, sorted (dotted paths are open-ended, so not listed)."""
        return sorted(set(self._factories) | set(_entry_point_factories()))

    def resolve(self, name: str) -> TaskFactory:
        """The factory for ``name``, or ``UnknownTaskError`` listing what is available."""
        if name in self._factories:
            return self._factories[name]
        plugins = _entry_point_factories()
        if name in plugins:
            try:
                factory = plugins[name].load()
            except Exception as exc:  # a broken plugin must not look like a missing one
                raise UnknownTaskError(
                    f"task {name!r}: entry point {plugins[name].value!r} failed to load: {exc}"
                ) from exc
        elif ":" in name:
            factory = _import_dotted(name)
        else:
            raise UnknownTaskError(
                f"unknown task {name!r}; available: {', '.join(self.available())} "
                f"(or a dotted path 'package.module:TaskClass', or an entry point in group {ENTRY_POINT_GROUP!r})"
            )
        if not callable(factory):
            raise UnknownTaskError(f"task {name!r} resolves to {factory!r}, which is not callable")
        return factory

    def create(self, name: str, **kwargs: Any) -> Task:
        """Resolve ``name`` and call its factory with ``kwargs``; the result must be a ``Task``."""
        factory = self.resolve(name)
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):
            signature = None  # a builtin or C callable: let the call itself complain
        if signature is not None:
            try:
                signature.bind(**kwargs)
            except TypeError as exc:
                raise TaskConfigError(f"task {name!r}: bad constructor arguments {sorted(kwargs)}: {exc}") from exc
        task = factory(**kwargs)
        if not isinstance(task, Task):
            raise TaskConfigError(f"task {name!r}: factory returned {type(task).__name__}, not a Task")
        return task

    def create_from_options(self, options: Mapping[str, Any], name_key: str = "name") -> Task:
        """Build the task a ``[task]`` table names, passing it the keys its constructor accepts."""
        name = options.get(name_key)
        if not isinstance(name, str) or not name:
            raise TaskConfigError(f"[task] {name_key}: required option is missing (the task to run)")
        factory = self.resolve(name)
        return self.create(name, **constructor_arguments(factory, options, exclude=(name_key,)))


def constructor_arguments(
    factory: TaskFactory, options: Mapping[str, Any], exclude: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The subset of ``options`` whose keys are keyword parameters of ``factory`` (all, if it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return {key: value for key, value in options.items() if key not in exclude}
    accepted = {
        name
        for name, parameter in parameters.items()
        if parameter.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
    return {key: value for key, value in options.items() if key in accepted and key not in exclude}


DEFAULT_REGISTRY = TaskRegistry()


def register_task(name: str, factory: TaskFactory) -> None:
    """Register a task factory on the default registry (prefer an entry point: it needs no import-time call)."""
    DEFAULT_REGISTRY.register(name, factory)


def get_task(name: str, **kwargs: Any) -> Task:
    """The task ``name`` (built-in, registered, entry point or ``module:Class``) built with ``kwargs``."""
    return DEFAULT_REGISTRY.create(name, **kwargs)


def task_from_options(options: Mapping[str, Any]) -> Task:
    """The task of a ``[task]`` table: ``name`` picks it, keys naming constructor parameters configure it."""
    return DEFAULT_REGISTRY.create_from_options(options)
