"""The method registry: the one place where attention methods are named."""

from typing import Dict, Type

from ..plan import PlanError
from .base import SparseMethod
from .block_topk import BlockTopK
from .dense import Dense
from .flexprefill import FlexPrefill
from .streaming import Streaming
from .vertical_slash import VerticalSlash
from .xattention import XAttention

METHODS: Dict[str, Type[SparseMethod]] = {}


def register_method(cls: Type[SparseMethod]) -> Type[SparseMethod]:
    """Add a method class to the registry (usable as a decorator by extensions)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Type[SparseMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise PlanError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


for _cls in (Dense, Streaming, VerticalSlash, BlockTopK, FlexPrefill, XAttention):
    register_method(_cls)

__all__ = ["METHODS", "SparseMethod", "get_method", "register_method"]
