"""Stage progress as plain callbacks, so the flow can report and the CLI can display without
either importing the other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class StageListener(Protocol):
    def __call__(self, stage: str, event: str, detail: str) -> None: ...


_listeners: list[StageListener] = []


def subscribe(listener: StageListener) -> Callable[[], None]:
    """Add a listener; returns the function that removes it."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def emit(stage: str, event: str, detail: str = "") -> None:
    """event: 'start', 'done' or 'failed'."""
    for listener in list(_listeners):
        listener(stage, event, detail)
