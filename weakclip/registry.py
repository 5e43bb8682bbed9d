"""Named, listable registries of swappable parts (backbones, co-attention types), as timm lists its models."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import WeakclipError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """Builders by name. ``what`` names the config entry that picks one, for the error line."""

    def __init__(self, what: str):
        self.what = what
        self._builders: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@BACKBONES.register("clip-vit")`` over a builder function or class."""

        def add(builder: T) -> T:
            if name in self._builders:
                raise ValueError(f"{self.what}: '{name}' is registered twice")
            self._builders[name] = builder
            return builder

        return add

    def names(self) -> list[str]:
        return sorted(self._builders)

    def describe(self, name: str) -> str:
        """The first line of the builder's docstring."""
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""

    def get(self, name: str) -> T:
        if name not in self._builders:
            raise WeakclipError(f"{self.what}: unknown '{name}' (registered: {', '.join(self.names())})")
        return self._builders[name]

    def __contains__(self, name: str) -> bool:
        return name in self._builders
