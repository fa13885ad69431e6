"""Tiny name -> callable registries (the verl / TRL habit: look components up by name, fail loudly).

An unknown name raises :class:`UnknownNameError` (a ``KeyError`` *and* a ``ValueError``) whose
message lists the valid names and suggests the closest one (``difflib``).
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

__all__ = ["Registry", "UnknownNameError", "suggest"]

T = TypeVar("T", bound=Callable)


def suggest(name: object, valid) -> str:
    """" Did you mean 'x'?" for the valid name closest to `name` (difflib), or "" when none is close: the one
    spelling-hint helper every registry and config check uses."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


class UnknownNameError(KeyError, ValueError):
    """Raised by :meth:`Registry.get` for a name that was never registered."""

    def __str__(self) -> str:  # KeyError would repr() the message; print it plainly instead
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A name -> callable mapping with a ``register`` decorator.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("my_loss")
    ... def my_loss(x): ...
    >>> LOSSES.get("my_loss") is my_loss
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers a callable under ``name``; duplicates are an error."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: name must be a non-empty string, got {name!r}")

        def decorator(fn: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> T:
        """Return the callable registered as ``name``; unknown names raise :class:`UnknownNameError`."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            pass
        valid = self.names()
        raise UnknownNameError(f"Unknown {self.kind} {name!r}.{suggest(name, valid)} Valid names: {', '.join(valid)}.")

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
