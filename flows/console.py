"""Keep Prefect's console output from burying the tool's own error messages.

When a task raises one of our errors, Prefect logs it at ERROR with the full traceback, then
again as the flow's final state. The CLI prints that error once, clearly; a traceback for a
user's mistake is noise. These records are dropped from the console handlers only: they still
reach the Prefect server's logs. Unexpected exceptions (bugs) keep their tracebacks.
"""

from __future__ import annotations

import logging

from edgedeploy.errors import EdgeDeployError


def _error_names() -> tuple[str, ...]:
    names, todo = [], [EdgeDeployError]
    while todo:
        cls = todo.pop()
        names.append(cls.__name__)
        todo.extend(cls.__subclasses__())
    return tuple(names)


class DropOurErrors(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.markers = tuple(f"{n}{c}" for n in _error_names() for c in ("(", ":"))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EdgeDeployError):
            return False
        if record.levelno >= logging.ERROR:
            message = record.getMessage()
            return not any(marker in message for marker in self.markers)
        return True


def hide_our_error_tracebacks() -> None:
    """Install the filter on the console handlers of Prefect's loggers."""
    drop = DropOurErrors()
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            already = any(isinstance(f, DropOurErrors) for f in handler.filters)
            if isinstance(handler, logging.StreamHandler) and not already:
                handler.addFilter(drop)
