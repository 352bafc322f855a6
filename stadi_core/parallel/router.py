"""One model, several band layouts: the context its patch-parallel layers see is switchable.

A rank of a branch arrangement may compute a band of the uncond branch (exchanging with that
branch's group) and then the whole cond branch (exchanging with nobody) in one step. Its
layers were wrapped once, around one context object; this router is that object and
forwards every read, call and write to the active group's ``BandContext``. Each group keeps
its own buffers, process group and in-flight exchanges, so the units never mix context.
"""

from __future__ import annotations

from typing import Callable

from .context import BandContext


class ContextRouter:
    """Forwards to the active ``BandContext``; the default one is the world's band layout."""

    def __init__(self, default: BandContext):
        object.__setattr__(self, "_default", default)
        object.__setattr__(self, "_active", default)
        object.__setattr__(self, "_groups", {})

    def __getattr__(self, name):  # only called for names the router itself lacks
        return getattr(self._active, name)

    def __setattr__(self, name, value) -> None:
        setattr(self._active, name, value)

    @property
    def active(self) -> BandContext:
        return self._active

    def activate(self, key, make: Callable[[], BandContext]) -> BandContext:
        """Make the group ``key``'s context the active one (created by ``make`` the first time)."""
        ctx = self._groups.get(key)
        if ctx is None:
            ctx = self._groups[key] = make()
        object.__setattr__(self, "_active", ctx)
        return ctx

    def deactivate(self) -> None:
        object.__setattr__(self, "_active", self._default)

    def drop_groups(self) -> None:
        """Forget every group's context (a new plan): their exchanges must not be pending."""
        for ctx in self._groups.values():
            ctx.complete_inflight(store=False)
        self._groups.clear()
        object.__setattr__(self, "_active", self._default)
