"""Adapter for torch_memory_saver (CPU backup; "retained" keeps the backup between cycles)."""
from __future__ import annotations

import os
from typing import ContextManager

from ..common import torch


class TmsImpl:
    """torch_memory_saver with enable_cpu_backup=True (hook mode chosen by the parent)."""
    has_stats = False

    def __init__(self, hook_mode: str, retain: bool) -> None:
        from torch_memory_saver import torch_memory_saver as tms  # noqa: PLC0415
        self.tms = tms
        self.name = f"torch_memory_saver{'-retained' if retain else ''}"
        if hook_mode == "torch":
            tms.hook_mode = "torch"
        self.retain_supported = isinstance(getattr(type(tms), "retain_cpu_backup", None), property)
        if retain and self.retain_supported:
            tms.retain_cpu_backup = True
        if getattr(tms, "enabled", True) is False:
            raise RuntimeError("torch_memory_saver reports enabled=False (LD_PRELOAD not applied?)")
        self._reserved_before = 0

    def region(self, tag: str) -> ContextManager:
        self._reserved_before = torch.cuda.memory_reserved()
        return self.tms.region(tag=tag, enable_cpu_backup=True)

    def sleep(self) -> None:
        self.tms.pause("weights")

    def wake(self) -> None:
        self.tms.resume("weights")

    def pool_bytes(self, fallback: int) -> int:
        delta = torch.cuda.memory_reserved() - self._reserved_before
        return int(delta) if delta >= fallback else fallback

    def stats(self) -> dict:
        return {}


def tms_preload_env() -> dict:
    """os.environ with LD_PRELOAD set the way torch_memory_saver's configure_subprocess() sets it
    (parent side: the worker process must start with the hook preloaded)."""
    import torch_memory_saver as m  # noqa: PLC0415
    cfg = getattr(m, "configure_subprocess", None)
    if cfg is None:
        from torch_memory_saver.hooks.mode_preload import configure_subprocess as cfg  # noqa
    with cfg():
        return dict(os.environ)
