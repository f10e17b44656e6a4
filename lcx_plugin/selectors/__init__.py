"""The selector registry: one file per method in this package, each registering its class.

    @register
    @dataclass(frozen=True)
    class Streaming(WindowedSelector):
        name: ClassVar[str] = "streaming"
        ...

Every module here is imported on first lookup, so a new method is one new file; a duplicate
name is an error.
"""
from __future__ import annotations

import importlib
import pkgutil

from lcx_plugin.errors import LcxConfigError

from .base import LayerInfo, SelectContext, Selector, TopKSelector, WindowedSelector, top_k

_REGISTRY: dict[str, type[Selector]] = {}
_loaded = False


def register(cls: type[Selector]) -> type[Selector]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    other = _REGISTRY.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise TypeError(f"selector name {cls.name!r} is taken by {other.__module__}.{other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for mod in pkgutil.iter_modules(__path__):
            if mod.name != "base":
                importlib.import_module(f"{__name__}.{mod.name}")
        _loaded = True


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type[Selector]:
    _load_all()
    if name not in _REGISTRY:
        raise LcxConfigError(f"lcx config: method={name!r} is not one of {names()}")
    return _REGISTRY[name]


__all__ = ["LayerInfo", "SelectContext", "Selector", "TopKSelector", "WindowedSelector", "get", "names", "register", "top_k"]
