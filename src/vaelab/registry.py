"""A tiny named registry: ``register`` with a decorator, ``get`` by name, ``names`` to list.

Every pluggable piece of vaelab (architectures, likelihoods, datasets, objectives, metrics,
figures) lives in one of these, so adding one means one file plus one decorator line, and
``vaelab list`` shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to objects, with errors that list the valid choices."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` stores the decorated object under ``name``."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            doc = help if help is not None else (getattr(obj, "__doc__", None) or "")
            self._help[name] = doc.strip().splitlines()[0] if doc.strip() else ""
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; a ``ValueError`` lists the choices."""
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self, name: str) -> str:
        """First line of the registered object's docstring (for ``vaelab list``)."""
        self.get(name)
        return self._help[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
