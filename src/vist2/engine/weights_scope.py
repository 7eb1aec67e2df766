"""The weights a cache's entries belong to: the one check both caches across requests make.

An entry of the encoder cache (a chunk's visual tokens) is a function of the vision tower and
aligner weights; an entry of the prefix cache (a prompt start's K/V) of the whole model's. A cache's
*scope* is the identity of those weights, :func:`model_scope` (each parameter's storage and its
in-place version counter, so an optimizer step or ``load_state_dict`` on the same model object
changes it). Each cache holds a :class:`WeightsScope` and checks the current scope before every
use: when the weights changed, every entry is dropped at once (counted in ``invalidations``): an
entry of other weights could never be hit again, and keeping it would only hold memory.

    >>> import torch
    >>> entries, lin = [], torch.nn.Linear(2, 2)          # all a scope needs of its cache: len() and clear()
    >>> weights = WeightsScope(entries)
    >>> weights.check(model_scope([lin])); entries.append("an entry")
    >>> weights.check(model_scope([lin])); len(entries)    # the same weights: kept
    1
    >>> with torch.no_grad():
    ...     _ = lin.weight.add_(1.0)                        # an optimizer step, in place
    >>> weights.check(model_scope([lin])); len(entries), weights.invalidations
    (0, 1)
"""

from __future__ import annotations

from typing import Hashable, Protocol, Sequence

import torch


def model_scope(modules: Sequence[torch.nn.Module]) -> tuple:
    """What identifies the weights of ``modules`` now: every parameter's storage address, in-place
    version counter (bumped by optimizer steps, ``copy_``, ``load_state_dict``), dtype and device.
    Cheap (no tensor is read), so it is taken on every lookup."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for m in modules for p in m.parameters())


class _Entries(Protocol):
    def __len__(self) -> int: ...

    def clear(self) -> None: ...


class WeightsScope:
    """The scope a cache's entries were computed under (None before the first :meth:`check`)."""

    def __init__(self, cache: _Entries):
        self._cache = cache
        self.current: Hashable = None
        self.invalidations = 0  # times entries were dropped because the weights changed

    def check(self, scope: Hashable) -> None:
        """Call before every use of the cache with the current ``scope``: other weights than the entries'
        drop them all (nothing held can be hit again)."""
        if scope == self.current:
            return
        if len(self._cache):
            self.invalidations += 1
        self._cache.clear()
        self.current = scope
