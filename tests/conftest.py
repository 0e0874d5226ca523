"""Shared test set-up: `cuda`-marked tests are skipped, with the reason, where no GPU can be used."""

from __future__ import annotations

import functools

import pytest
import torch


@functools.lru_cache(maxsize=None)
def cuda_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    try:
        from vllm_sleep_ext import _core

        _core.cuda_allocator()
    except Exception as e:  # noqa: BLE001 - any failure means the GPU suite cannot run here
        return f"CUDA driver not usable: {e}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
