"""The one thing both sides of a proxied exchange know of each other: who to pause while a buffer is full."""

from __future__ import annotations

from typing import Protocol


class FlowPeer(Protocol):
    """A side whose reading is paused while the other side's write buffer is above its high-water mark."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Abortable(Protocol):
    """A side to cut at once when the other one is gone (the upstream connection of a client that left)."""

    def abort(self) -> None: ...
