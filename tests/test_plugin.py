"""The vLLM general plugin: found through its entry point, and it swaps the allocator class in."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest

from vllm_sleep_ext import CuMemAllocator, plugin


def test_entry_point_is_registered_in_vllms_plugin_group() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.value == "vllm_sleep_ext.plugin:register"]
    if not ours:
        pytest.skip("vllm_sleep_ext is not installed as a distribution here (in-place build)")
    assert ours[0].load() is plugin.register


def test_register_without_vllm_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import of vllm fails
    plugin.register()


def test_register_swaps_class_into_vllm_cumem(monkeypatch: pytest.MonkeyPatch) -> None:
    class VllmCuMemAllocator:  # stands in for vLLM's own class
        pass

    vllm = types.ModuleType("vllm")
    device_allocator = types.ModuleType("vllm.device_allocator")
    cumem = types.ModuleType("vllm.device_allocator.cumem")
    cumem.CuMemAllocator = VllmCuMemAllocator
    cumem.cumem_available = False
    worker = types.ModuleType("vllm.v1.worker.gpu_worker")
    worker.CuMemAllocator = VllmCuMemAllocator  # imported by name before plugins loaded
    vllm.device_allocator = device_allocator
    device_allocator.cumem = cumem
    for name, module in [
        ("vllm", vllm),
        ("vllm.device_allocator", device_allocator),
        ("vllm.device_allocator.cumem", cumem),
        ("vllm.v1.worker.gpu_worker", worker),
    ]:
        monkeypatch.setitem(sys.modules, name, module)

    plugin.register()
    assert cumem.CuMemAllocator is CuMemAllocator
    assert worker.CuMemAllocator is CuMemAllocator
    assert cumem.cumem_available is True
    plugin.register()  # idempotent
    assert cumem.CuMemAllocator is CuMemAllocator
