"""Rewards by name.

`@register_reward("name")` on a Reward subclass; `build_reward("name", **kwargs)` to construct one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from diffrl.core.registry import suggest

from .base import SAMPLE_KINDS, Reward

R = TypeVar("R", bound=type[Reward])

_REGISTRY: dict[str, type[Reward]] = {}


def register_reward(name: str) -> Callable[[R], R]:
    """Class decorator: register a Reward subclass under `name` and set its `name` attribute."""

    def decorator(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise TypeError(
                f"@register_reward({name!r}) must decorate a Reward subclass, got {cls!r}"
            )
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"reward name {name!r} is already registered to {_REGISTRY[name].__qualname__}"
            )
        unknown = [k for k in cls.accepts if k not in SAMPLE_KINDS]
        if unknown:
            raise ValueError(
                f"reward {name!r} declares unknown sample kinds {unknown}; "
                f"valid kinds are {sorted(SAMPLE_KINDS)}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as `name` with constructor arguments `kwargs`."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        valid = list_rewards()
        raise ValueError(f"unknown reward {name!r}.{suggest(name, valid)} Valid rewards: {', '.join(valid)}") from None
    return cls(**kwargs)


def list_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def declares_differentiable(name: str, kwargs: dict[str, Any] | None = None) -> bool:
    """Whether `build_reward(name, **kwargs)` would let gradients reach the samples, read without building it
    (no weights load): the constructor's `differentiable` argument for rewards that take one (the CLIP
    family: tensor instead of PIL preprocessing), else the class's `differentiable` attribute."""
    cls = _REGISTRY[name]
    param = inspect.signature(cls.__init__).parameters.get("differentiable")
    if param is not None:
        return bool((kwargs or {}).get("differentiable", param.default))
    return bool(cls.differentiable)


def differentiable_rewards() -> list[str]:
    """Registered rewards that are, or can be made (`differentiable=True`), differentiable; sorted."""
    return [n for n in list_rewards() if declares_differentiable(n, {"differentiable": True})]
