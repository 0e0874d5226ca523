"""The named sleep-mode backend ("vllm_sleep_ext" in vLLM's SleepModeBackendFactory), without vLLM: a
fake registry with vLLM 0.33's semantics stands in for it. Where vLLM is installed, the last test runs
against its real registry."""

from __future__ import annotations

import importlib
import logging
import sys
import types
from collections.abc import Iterator

import pytest

from vllm_sleep_ext import log, plugin, sleep_backend


class FakeFactory:
    """vLLM 0.33's SleepModeBackendFactory: lazy (module, class) registration, no re-registration."""

    _registry: dict = {}

    @classmethod
    def register_backend(cls, name: str, module_path: str, class_name: str) -> None:
        if name in cls._registry:
            raise ValueError(f"Sleep-mode backend '{name}' is already registered.")
        cls._registry[name] = lambda: getattr(importlib.import_module(module_path), class_name)

    @classmethod
    def get_backend_class(cls, name: str) -> type:
        return cls._registry[name]()

    @classmethod
    def create_backend(cls, name: str):
        backend_cls = cls.get_backend_class(name)
        if not backend_cls.is_supported():
            raise ValueError(f"Sleep-mode backend '{name}' is not supported on this platform.")
        return backend_cls()


class FakeCuMemBackend:
    calls: list = []

    def suspend(self, level: int = 1) -> None:
        self.calls.append(("suspend", level))

    @classmethod
    def is_supported(cls) -> bool:
        return True

    @classmethod
    def preserves_communicators(cls) -> bool:
        return True


class OursInstalled:  # what the plugin puts into vllm.device_allocator.cumem
    __module__ = "vllm_sleep_ext.allocator"


class VllmsOwn:
    __module__ = "vllm.device_allocator.cumem"


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    FakeFactory._registry = {"cumem": lambda: FakeCuMemBackend}
    vllm = types.ModuleType("vllm")
    device_allocator = types.ModuleType("vllm.device_allocator")
    device_allocator.__path__ = []
    registry = types.ModuleType("vllm.device_allocator.sleep_mode_backend")
    registry.SleepModeBackendFactory = FakeFactory
    registry.CuMemBackend = FakeCuMemBackend
    cumem = types.ModuleType("vllm.device_allocator.cumem")
    cumem.CuMemAllocator = VllmsOwn
    for name, module in [("vllm", vllm), ("vllm.device_allocator", device_allocator),
                         ("vllm.device_allocator.sleep_mode_backend", registry),
                         ("vllm.device_allocator.cumem", cumem)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delattr(sleep_backend, "VllmSleepExtBackend", raising=False)  # built per vLLM
    package = logging.getLogger(log.PACKAGE_LOGGER)  # plugin.register() routes it to vLLM's logger
    saved = (package.level, package.propagate, list(package.handlers))
    yield types.SimpleNamespace(cumem=cumem)
    sleep_backend.__dict__.pop("VllmSleepExtBackend", None)
    package.level, package.propagate = saved[:2]
    package.handlers[:] = saved[2]


def test_register_adds_the_name_vllms_factory_resolves_to_a_cumem_backend(fake_vllm) -> None:
    assert sleep_backend.register() is True
    cls = FakeFactory.get_backend_class(sleep_backend.BACKEND_NAME)
    assert issubclass(cls, FakeCuMemBackend)  # suspend/resume/discard and offload tags: the vLLM in use
    assert cls.__name__ == "VllmSleepExtBackend" and cls.__module__ == "vllm_sleep_ext.sleep_backend"
    assert sorted(FakeFactory._registry) == ["cumem", "vllm_sleep_ext"]  # the default name is untouched


def test_register_twice_keeps_one_entry_and_does_not_raise(fake_vllm) -> None:
    assert sleep_backend.register() and sleep_backend.register()
    assert list(FakeFactory._registry).count(sleep_backend.BACKEND_NAME) == 1


def test_register_without_the_registry_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.device_allocator", types.ModuleType("vllm.device_allocator"))
    monkeypatch.setitem(sys.modules, "vllm.device_allocator.sleep_mode_backend", None)
    assert sleep_backend.register() is False


def test_selecting_the_backend_where_vllms_allocator_serves_fails_and_says_why(
    fake_vllm, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(sleep_backend.logger, "warning", lambda msg, *a: warnings.append(msg % a))
    sleep_backend.register()
    with pytest.raises(ValueError, match="not supported on this platform"):
        FakeFactory.create_backend(sleep_backend.BACKEND_NAME)
    assert len(warnings) == 1 and "cannot serve" in warnings[0] and "did not install its class" in warnings[0]


def test_selecting_the_backend_where_our_allocator_serves_runs_vllms_suspend(fake_vllm) -> None:
    fake_vllm.cumem.CuMemAllocator = OursInstalled
    sleep_backend.register()
    backend = FakeFactory.create_backend(sleep_backend.BACKEND_NAME)
    FakeCuMemBackend.calls.clear()
    backend.suspend(level=2)
    assert FakeCuMemBackend.calls == [("suspend", 2)]


def test_capability_flags_say_what_this_allocator_keeps(fake_vllm) -> None:
    sleep_backend.register()
    cls = FakeFactory.get_backend_class(sleep_backend.BACKEND_NAME)
    assert cls.preserves_communicators() is True
    assert cls.preserves_compiled_artifacts() is True
    assert cls.preserves_graphs_with_communicators() is True
    assert cls.supports_durable_storage() is False


def test_plugin_registers_the_backend_even_when_turned_off(fake_vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    # Registered whatever the plugin decides, so that selecting the name fails with "not supported"
    # (and our reason in the log) rather than "unknown backend".
    monkeypatch.setenv(plugin.DISABLE_ENV, "1")
    plugin.register()
    assert sleep_backend.BACKEND_NAME in FakeFactory._registry
    assert fake_vllm.cumem.CuMemAllocator is VllmsOwn


def test_real_vllm_registry_resolves_the_name_to_its_cumem_backend() -> None:
    try:
        from vllm.device_allocator.sleep_mode_backend import CuMemBackend, SleepModeBackendFactory
    except Exception as e:  # noqa: BLE001 - no vLLM here, or one that does not import without a GPU
        pytest.skip(f"vLLM's sleep-mode backend registry does not import here ({type(e).__name__})")
    sleep_backend.__dict__.pop("VllmSleepExtBackend", None)
    assert sleep_backend.register() is True
    cls = SleepModeBackendFactory.get_backend_class(sleep_backend.BACKEND_NAME)
    assert issubclass(cls, CuMemBackend)
    assert cls.preserves_communicators() and not cls.supports_durable_storage()
