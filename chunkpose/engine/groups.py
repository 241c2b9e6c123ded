"""Several groups of items run as one stage (Engine.map_groups).

The hypotheses of several objects in one frame are work of one kind, but each object's
items need that object's own arguments (its frame, renderer, thresholds). One plan over all
items fills every chunk up to the budget whatever group its items come from; within a
chunk, each group's slice is one call of the op with its own arguments, and the chunk's
output is their concatenation. Separate from executor.py because it is bookkeeping of
item ranges, not of memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree


@dataclass
class MapGroup:
    """One group of an Engine.map_groups call.

    Attributes:
        mapped: the group's positional tensors, sliced along axis 0 (same leading length).
        kwargs: the group's own keyword arguments of the op, passed whole.
    """

    mapped: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def items(self) -> int:
        return int(self.mapped[0].shape[0])


@dataclass
class GroupPlan:
    """What a map call is planned as: the op, tensors and kwargs its cost model is keyed on,
    estimated and probed with (a plain map: the call itself; map_groups: its first group),
    and every input that counts against the budget while it runs."""

    op: object
    mapped: tuple
    kwargs: dict
    tracked: tuple = ()


def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    spec = pytree.tree_structure(parts[0])
    columns = zip(*(pytree.tree_leaves(p) for p in parts))
    return pytree.tree_unflatten([torch.cat(column) for column in columns], spec)


class GroupedOp:
    """The op of a map_groups call as the engine's chunk loop runs it: called on a slice of the
    item places ``index`` (a contiguous range of all groups' items laid end to end), it calls
    the group op on each group's part of that range and concatenates the outputs."""

    def __init__(self, op, groups):
        self.op, self.groups = op, list(groups)
        self.starts = []
        start = 0
        for group in self.groups:
            self.starts.append(start)
            start += group.items
        self.items = start

    def __call__(self, index: torch.Tensor):
        first, stop = int(index[0]), int(index[-1]) + 1
        parts = []
        for start, group in zip(self.starts, self.groups):
            lo, hi = max(first, start), min(stop, start + group.items)
            if lo < hi:
                parts.append(self.op(*(t[lo - start: hi - start] for t in group.mapped), **group.kwargs))
        return _concat(parts)

    def split(self, out) -> list:
        """The whole call's output (all items in place order) cut into each group's output."""
        leaves, spec = pytree.tree_flatten(out)
        return [pytree.tree_unflatten([leaf[start: start + group.items] for leaf in leaves], spec)
                for start, group in zip(self.starts, self.groups)]
