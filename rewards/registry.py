"""Rewards by name.

`@register_reward("name")` on a Reward subclass; `build_reward("name", **kwargs)` to construct one. A reward
name is also any of:
    "package.module:Class"     a Reward subclass, imported (from the working directory too)
    "package.module:function"  a plain function (samples, prompts, metadata) -> one score per sample; set
                               `function.differentiable = True` when it is built from torch ops
    a plugin's name            a Reward subclass or function that an installed package declares under the
                               entry-point group "diffrl.rewards" (pyproject.toml:
                               [project.entry-points."diffrl.rewards"] myreward = "mypkg.rewards:MyReward")
and, from Python, any Reward instance or function given to `use_reward` (what `diffrl.train(reward=...)` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from diffrl.core.registry import suggest
from diffrl.runtime import entry_point_objects, import_object

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


ENTRY_POINT_GROUP = "diffrl.rewards"
"""Installed packages declare rewards under this entry-point group."""

_OBJECTS: dict[str, Any] = {}  # rewards given as Python objects (use_reward)


class FunctionReward(Reward):
    """A plain function `fn(samples, prompts, metadata) -> scores` as a Reward (any sample kind)."""

    accepts = tuple(SAMPLE_KINDS)

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.differentiable = bool(getattr(fn, "differentiable", False))

    def score(self, samples, prompts, metadata):
        return torch.as_tensor(self.fn(samples, prompts, metadata), device=samples.device)


def use_reward(obj: Any, name: str | None = None) -> str:
    """Make a Python reward usable by name in a run: a Reward instance, a Reward subclass, or a function
    (samples, prompts, metadata) -> scores. Returns the name (`name`, else "python:<qualified name>")."""
    is_class = isinstance(obj, type) and issubclass(obj, Reward)
    if not (is_class or isinstance(obj, Reward) or callable(obj)):
        raise TypeError(f"a reward must be a Reward, a Reward subclass or a function, got {type(obj).__name__}")
    target = obj if is_class or not isinstance(obj, Reward) else type(obj)
    name = name or f"python:{target.__module__}.{target.__qualname__}"
    if name in _REGISTRY or (name in _OBJECTS and _OBJECTS[name] is not obj):
        raise ValueError(f"reward name {name!r} is already taken; pass another name")
    _OBJECTS[name] = obj
    return name


def resolve_reward(name: str):
    """What `name` stands for (a Reward subclass, a Reward instance or a reward function), without building
    it (no weights load). ValueError for an unknown name (with the closest registered one) or a spec that does
    not import."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _OBJECTS:
        return _OBJECTS[name]
    if ":" in name and not name.startswith("python:"):
        obj = import_object(name, "reward")
    else:
        plugins = entry_point_objects(ENTRY_POINT_GROUP)
        if name not in plugins:
            valid = list_rewards()
            raise ValueError(f"unknown reward {name!r}.{suggest(name, valid)} Valid rewards: {', '.join(valid)}; "
                             "or 'package.module:Class' / 'package.module:function'")
        obj = plugins[name].load()
    if not ((isinstance(obj, type) and issubclass(obj, Reward)) or callable(obj)):
        raise ValueError(f"reward {name!r} is a {type(obj).__name__}: expected a Reward subclass or a function "
                         "(samples, prompts, metadata) -> scores")
    return obj


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward `name` (see the module docstring) with constructor arguments `kwargs`."""
    obj = resolve_reward(name)
    if isinstance(obj, type) and issubclass(obj, Reward):
        reward = obj(**kwargs)
        if getattr(reward, "name", None) is None:
            reward.name = name
        return reward
    if kwargs:
        raise ValueError(f"reward {name!r} is a {'Reward instance' if isinstance(obj, Reward) else 'function'}: "
                         f"it takes no constructor arguments, got {sorted(kwargs)}")
    return obj if isinstance(obj, Reward) else FunctionReward(obj, name)


class RewardArgumentError(ValueError):
    """Constructor arguments a reward would refuse; `argument` names the one at fault (None: the whole set)."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


def check_reward_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Whether `build_reward(name, **kwargs)` would take `kwargs`, read from the constructor's signature without
    building it (no weights load); a Reward subclass may add checks that need no weights as a classmethod
    `check_kwargs(kwargs)` (the remote reward asks its server whether it answers). Raises RewardArgumentError."""
    import inspect

    obj = resolve_reward(name)
    if not (isinstance(obj, type) and issubclass(obj, Reward)):
        if kwargs:
            raise RewardArgumentError(f"reward {name!r} is a {'Reward instance' if isinstance(obj, Reward) else 'function'}: "
                                      f"it takes no constructor arguments, got {sorted(kwargs)}", sorted(kwargs)[0])
        return
    params = list(inspect.signature(obj.__init__).parameters.values())[1:]  # after self
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        for key in kwargs:
            if key not in named:
                raise RewardArgumentError(f"reward {name!r} takes no argument {key!r}.{suggest(key, named)} It takes: "
                                          f"{', '.join(named) or 'none'}", key)
    missing = [p.name for p in params if p.default is p.empty and p.name in named and p.name not in kwargs]
    if missing:
        raise RewardArgumentError(f"reward {name!r} needs the argument(s) {', '.join(missing)}", missing[0])
    check = getattr(obj, "check_kwargs", None)
    if check is not None:
        check(kwargs)


def check_reward_service(name: str, kwargs: dict[str, Any]) -> None:
    """For a reward that reaches another process (a Reward subclass with a classmethod `check_service(kwargs)`,
    e.g. the remote reward's server), whether it answers; run before a run loads its model (diffrl.api), apart from
    check_reward_kwargs so that a recipe validates offline. Raises RewardArgumentError."""
    obj = resolve_reward(name)
    check = getattr(obj, "check_service", None) if isinstance(obj, type) and issubclass(obj, Reward) else None
    if check is not None:
        check(kwargs)


def list_rewards() -> list[str]:
    """Registered reward names and installed plugins' (entry-point group "diffrl.rewards"), sorted."""
    return sorted({*_REGISTRY, *_OBJECTS, *entry_point_objects(ENTRY_POINT_GROUP)})


def declares_differentiable(name: str, kwargs: dict[str, Any] | None = None) -> bool:
    """Whether `build_reward(name, **kwargs)` would let gradients reach the samples, read without building it
    (no weights load): the constructor's `differentiable` argument for rewards that take one (the CLIP
    family: tensor instead of PIL preprocessing), else the class's (or function's) `differentiable` attribute."""
    obj = resolve_reward(name)
    if isinstance(obj, type) and issubclass(obj, Reward):
        return obj.declares_differentiable(kwargs)
    return bool(getattr(obj, "differentiable", False))


def differentiable_rewards() -> list[str]:
    """Registered rewards that are, or can be made (`differentiable=True`), differentiable; sorted."""
    return [n for n in sorted(_REGISTRY) if declares_differentiable(n, {"differentiable": True})]


def reward_accepts(name: str) -> tuple[str, ...]:
    """The sample kinds reward `name` scores ("image", "video", "motion"), read without building it."""
    obj = resolve_reward(name)
    if isinstance(obj, type) and issubclass(obj, Reward):
        return tuple(obj.accepts)
    return tuple(obj.accepts) if isinstance(obj, Reward) else tuple(getattr(obj, "accepts", SAMPLE_KINDS))
