"""Protocols by config name: each protocol file registers its class here.

The registry is the one place that maps a name to a protocol; nothing else outside
``splitfed.protocols`` names one. The shipped protocols register when the
``splitfed.protocols`` package is imported; ``protocol_class`` imports it on first use (by
module name, so that this module, imported by the config, stays below the protocols layer).
A protocol defined anywhere else (a test, a user's file) registers itself the same way.
"""

from __future__ import annotations

import importlib
from typing import Any

_PROTOCOLS: dict[str, Any] = {}
_DEFAULT: list[str] = []
BUILTIN_PACKAGE = "splitfed.protocols"


def register(cls: Any) -> Any:
    """Class decorator: make ``cls`` (a ``splitfed.protocols.base.Protocol``) available as ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__}: a protocol needs a non-empty string `name`")
    existing = _PROTOCOLS.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"protocol name {name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _PROTOCOLS[name] = cls
    return cls


def set_default(name: str) -> None:
    """The protocol a config gets when it names none (set by the shipped protocols package)."""
    _DEFAULT[:] = [name]


def default_protocol() -> str:
    _load_builtins()
    return _DEFAULT[0]


def _load_builtins() -> None:
    importlib.import_module(BUILTIN_PACKAGE)


def load_plugins(modules: list[str]) -> None:
    """Import modules that define and register protocols (``plugins`` in a config): every
    process of a run imports them before it looks its protocol up."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"plugins: cannot import {module!r}: {error}") from None


def protocol_names() -> list[str]:
    _load_builtins()
    return sorted(_PROTOCOLS)


def protocol_class(name: str) -> Any:
    """The registered class of protocol ``name``; ValueError listing the allowed names."""
    _load_builtins()
    if name not in _PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; allowed: {', '.join(sorted(_PROTOCOLS))}")
    return _PROTOCOLS[name]
