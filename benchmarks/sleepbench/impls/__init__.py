"""One adapter per implementation; ``make_impl`` picks one from a worker's parameters."""
from __future__ import annotations

from typing import Any


def make_impl(p: dict) -> Any:
    kind = p.get("impl", "ext")
    if kind == "ext":
        from .ext import ExtImpl  # noqa: PLC0415
        return ExtImpl()
    if kind == "vllm":
        from .vllm_cumem import VllmImpl  # noqa: PLC0415
        return VllmImpl()
    if kind == "tms":
        from .tms import TmsImpl  # noqa: PLC0415
        return TmsImpl(p.get("tms_hook", "preload"), bool(p.get("tms_retain")))
    raise ValueError(f"unknown impl {kind!r}")
