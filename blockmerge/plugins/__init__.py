"""Merge methods, found through the entry-point group `blockmerge.methods`.

A method is a `blockmerge.plugins.base.Method` object; a package adds one by declaring
`[options.entry_points] blockmerge.methods = name = package.module:METHOD`.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from ..errors import BlockmergeError
from .base import Block, Common, Method, Needs, Pass, describe, parse_hyperparameters, tensor_pass
from .hyperparameters import InputCheckpoint, PerModel, Scheduled

GROUP = "blockmerge.methods"

__all__ = ["Block", "Common", "InputCheckpoint", "Method", "Needs", "Pass", "PerModel", "Scheduled", "describe", "get",
           "parse_hyperparameters", "registry", "tensor_pass"]


@functools.cache
def registry() -> dict[str, Method]:
    """Every installed method by name."""
    methods: dict[str, Method] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            method = ep.load()
        except Exception as err:
            raise BlockmergeError(f"cannot load merge method entry point {ep.name} = {ep.value} ({err})") from None
        if not isinstance(method, Method) or method.name != ep.name:
            raise BlockmergeError(f"entry point {ep.name} = {ep.value} is not a Method named {ep.name!r}")
        methods[ep.name] = method
    return methods


def get(name: str) -> Method:
    """The method registered as `name`."""
    methods = registry()
    if name not in methods:
        raise BlockmergeError(f"unknown method {name!r} (available: {', '.join(sorted(methods))})")
    return methods[name]
