"""A tiny name -> factory registry, shared by compressors, feedback and algorithms.

The CLI and configs resolve names through a registry, never through if/elif chains, and
read options from specs (``parse_spec('powersgd:rank=2', COMPRESSORS)``)::

    ALGORITHMS = Registry[type[Algorithm]]("algorithm")

    @ALGORITHMS.register("diloco")
    class DiLoCo(Algorithm): ...

    ALGORITHMS.get("diloco")      # -> DiLoCo
    ALGORITHMS.get("dilco")       # ValueError: unknown algorithm 'dilco'; choose one of: ddp, diloco
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps short names to objects (usually classes); lookups fail with the valid names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a name can be registered once."""

        def decorate(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_submodules(package: str, path: list[str]) -> None:
    """Import every module of a package so that each registers itself (one algorithm per file).

    Called from a package's ``__init__``: ``import_submodules(__name__, __path__)``. Private modules (a leading
    underscore: ``compress/_numba_loops.py``, which needs an optional dependency) are left to their importers.
    """
    for module in pkgutil.iter_modules(path):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")


def parse_spec(spec: str, registry: "Registry[Any]") -> tuple[type, dict[str, Any]]:
    """``'powersgd:rank=2,warmup=10'`` -> (PowerSGD class, {'rank': 2, 'warmup': 10}).

    Values are converted to the type of the options field of the same name; unknown
    options fail with the valid ones.
    """
    name, _, rest = spec.partition(":")
    cls = registry.get(name.strip())
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            valid = ", ".join(fields) or "none"
            raise ValueError(f"{registry.kind} {name!r}: cannot read option {item!r}; options are: {valid}")
        kwargs[key] = _convert(value.strip(), fields[key].type, f"{name}:{key}")
    return cls, kwargs


def _convert(value: str, annotation: Any, where: str) -> Any:
    kind = str(annotation)
    try:
        if "bool" in kind:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if "int" in kind and "float" not in kind:
            return int(value)
        if "float" in kind:
            return value if "str" in kind and not _is_number(value) else float(value)
    except ValueError:
        raise ValueError(f"{where} must be a {kind}, got {value!r}") from None
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build(spec: str, registry: "Registry[Any]") -> Any:
    """An instance from a spec string (``'qsgd:bits=4'``), options validated on construction."""
    return resolve(spec, registry)


def resolve(value: Any, registry: "Registry[Any]", **options: Any) -> Any:
    """An instance from whatever a user gives: a name or spec string (``"powersgd"``,
    ``"powersgd:rank=2"``) with ``options`` as keyword arguments on top, a registered class, or an
    instance (as it is: options then go to its constructor, not here)."""
    if isinstance(value, str):
        cls, kwargs = parse_spec(value, registry)
        return cls(cls.Options(**{**kwargs, **options}))
    if isinstance(value, type):
        return value(value.Options(**options))
    if options:
        raise ValueError(f"{registry.kind} options {', '.join(sorted(options))} go with a name or a class, not with "
                         f"an instance ({type(value).__name__}): give them to its constructor")
    return value


def options_from(cls: type, options: Any, kwargs: dict[str, Any]) -> Any:
    """An options dataclass from ``options`` or keyword arguments (not both); defaults when neither."""
    if options is not None and kwargs:
        raise ValueError(f"give {cls.__name__} or keyword options, not both (got {', '.join(sorted(kwargs))})")
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        valid = ", ".join(f.name for f in dataclasses.fields(cls)) or "none"
        raise ValueError(f"{cls.__name__} has no option {', '.join(unknown)}; options are: {valid}")
    return options if options is not None else cls(**kwargs)


def class_named(registry: "Registry[Any]", name: str) -> Any:
    """The registered class called ``name`` (``PowerSGD``): a package's ``__getattr__`` exports them all."""
    for key in registry.names():
        if registry.get(key).__name__ == name:
            return registry.get(key)
    raise AttributeError(name)

