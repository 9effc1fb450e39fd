"""One generic name -> object registry.

Ops, search spaces and methods are each looked up by name through a `Registry`; an unknown name
is an error that lists the known ones, so a typo in `params.yaml` never becomes a traceback.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that is not in a registry. The message names every allowed value."""


class Registry(Generic[T]):
    """A mapping from lower-snake-case names to entries, filled by `register`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """Register `entry` under `name`; used bare (`reg.register("x", obj)`) or as a decorator."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        if entry is not None:
            return add(entry)
        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def import_submodules(package_name: str, package_path: list[str]) -> None:
    """Import every module of a package so that their `register` calls run.

    Adding a method or a space is then one new file: nothing else lists it.
    """
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(package_path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")


Factory = Callable[..., T]
