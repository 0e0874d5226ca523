"""Where this package's log lines go: plain ``logging`` on its own, vLLM's log under vLLM.

vLLM configures handlers (format, level, stream) for the ``vllm`` logger and its children only, so a
record of ``vllm_sleep_ext.*`` never shows in a vLLM log. Under the plugin, ``route_to_vllm()`` hands
every record of this package to ``vllm.vllm_sleep_ext``, a child of vLLM's logger: it is then printed,
filtered and formatted exactly like vLLM's own lines, whatever vLLM's logging configuration is.
"""

from __future__ import annotations

import logging

PACKAGE_LOGGER = "vllm_sleep_ext"
VLLM_CHILD_LOGGER = "vllm.vllm_sleep_ext"


class _ToLogger(logging.Handler):
    """Passes records on to another logger, which applies its own level and handlers."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if self.target.isEnabledFor(record.levelno):
            self.target.handle(record)


def route_to_vllm() -> logging.Logger:
    """Sends this package's records to vLLM's log from now on (idempotent); returns vLLM's child logger."""
    target = logging.getLogger(VLLM_CHILD_LOGGER)
    package = logging.getLogger(PACKAGE_LOGGER)
    if not any(isinstance(h, _ToLogger) for h in package.handlers):
        package.addHandler(_ToLogger(target))
        # vLLM may configure its logging after plugins load (0.33 does, per process), so the level is
        # vLLM's at the time of each record: ours makes every record and the handler asks vLLM's logger.
        # vLLM's handlers alone print it, not the root logger's as well.
        package.setLevel(logging.DEBUG)
        package.propagate = False
    return target


def routed_to_vllm() -> bool:
    return any(isinstance(h, _ToLogger) for h in logging.getLogger(PACKAGE_LOGGER).handlers)
