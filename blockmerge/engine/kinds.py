"""The kinds of statistic a merge may read: the shape each has for a parameter, and how a block reads it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class StatisticKind:
    """One kind of statistic: `shape` maps a parameter's shape to the statistic's (None: the kind does not apply
    to such a parameter). An elementwise statistic has its parameter's shape and is cut to a block's rows;
    any other (a Gram matrix, a blockwise Fisher) is read whole."""

    name: str
    shape: Callable[[Shape], Shape | None]
    elementwise: bool


def _own_shape(shape: Shape) -> Shape:
    return shape


STATISTICS = {kind.name: kind for kind in (
    StatisticKind("fisher", _own_shape, elementwise=True),
    StatisticKind("gram_in", lambda s: (s[1], s[1]) if len(s) == 2 else None, elementwise=False),
    StatisticKind("gram_out", lambda s: (s[0], s[0]) if len(s) == 2 else None, elementwise=False),
    StatisticKind("blockwise_fisher", lambda s: (s[0], s[0]) if len(s) == 1 else None, elementwise=False),
    StatisticKind("trimmed", _own_shape, elementwise=True),
)}
STATISTIC_KINDS = tuple(STATISTICS)


def statistic_shape(kind: str, shape: Shape) -> Shape | None:
    """The shape of a `kind` statistic of a parameter of shape `shape`; None where the kind does not apply."""
    return STATISTICS[kind].shape(shape)


def is_elementwise(kind: str) -> bool:
    """Whether a `kind` statistic has its parameter's shape (cut to a block's rows) rather than being read whole."""
    return STATISTICS[kind].elementwise
