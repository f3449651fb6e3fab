"""Giving one object a few methods of its own, without changing its class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def use_overrides(
    obj: object, overrides: Mapping[str, Any], cache: dict[type, type]
) -> None:
    """Moves `obj` to a subclass of its class that has `overrides`.

    The subclass keeps the class's name, module and qualified name, so reprs,
    error messages and saved configs still name the original class; it is
    made once per class and kept in `cache` (one cache per set of
    overrides). An object already moved is left as it is.

    Args:
        obj: The object (a Keras variable, layer, or a strategy's extended).
        overrides: Attributes of the subclass, by name.
        cache: Subclasses made with these `overrides`, by original class.
    """
    cls = type(obj)
    if cls in cache.values():
        return
    subclass = cache.get(cls)
    if subclass is None:
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            **overrides,
        }
        subclass = type(cls.__name__, (cls,), namespace)
        cache[cls] = subclass
    obj.__class__ = subclass
