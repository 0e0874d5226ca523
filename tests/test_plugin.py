"""The vLLM general plugin, without vLLM installed: fake `vllm` modules stand in for it.

vLLM calls register() in every process with no try around it, and prints only what reaches its own
`vllm` logger. So: register() installs the class where it can serve, never raises, leaves vLLM's
allocator where it cannot (no CUDA platform, opted out, core not loadable) and says why in vLLM's log;
our sleep/wake lines show there too.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import types
from collections.abc import Iterator

import pytest
import torch

from vllm_sleep_ext import CuMemAllocator, log, plugin, serving

MiB = 1 << 20


class VllmCuMemAllocator:  # stands in for vLLM's own class
    pass


class FakePlatform:
    def __init__(self, cuda: bool, device_type: str) -> None:
        self._cuda = cuda
        self.device_type = device_type

    def is_cuda(self) -> bool:
        return self._cuda


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.messages)


@pytest.fixture
def vllm_log() -> Iterator[ListHandler]:
    """vLLM's logging as vllm/logger.py sets it up: a handler on `vllm`, INFO, no propagation."""
    vllm_logger = logging.getLogger("vllm")
    package = logging.getLogger(log.PACKAGE_LOGGER)
    saved = (vllm_logger.level, vllm_logger.propagate, package.level, package.propagate, list(package.handlers))
    handler = ListHandler()
    vllm_logger.addHandler(handler)
    vllm_logger.setLevel(logging.INFO)
    vllm_logger.propagate = False
    yield handler
    vllm_logger.removeHandler(handler)
    vllm_logger.level, vllm_logger.propagate, package.level, package.propagate = saved[:4]
    package.handlers[:] = saved[4]
    serving._reset_for_tests()  # register() asked for serving detection in this process


def install_fake_vllm(monkeypatch: pytest.MonkeyPatch, platform: FakePlatform) -> types.SimpleNamespace:
    vllm = types.ModuleType("vllm")
    vllm_envs = types.ModuleType("vllm.envs")
    vllm_envs.environment_variables = {"VLLM_LOGGING_LEVEL": lambda: "INFO"}
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = platform
    device_allocator = types.ModuleType("vllm.device_allocator")
    cumem = types.ModuleType("vllm.device_allocator.cumem")
    cumem.CuMemAllocator = VllmCuMemAllocator
    cumem.cumem_available = False
    worker = types.ModuleType("vllm.v1.worker.gpu_worker")
    worker.CuMemAllocator = VllmCuMemAllocator  # imported by name before plugins loaded
    vllm.platforms = platforms
    vllm.envs = vllm_envs
    vllm.device_allocator = device_allocator
    device_allocator.cumem = cumem
    for name, module in [
        ("vllm", vllm),
        ("vllm.platforms", platforms),
        ("vllm.envs", vllm_envs),
        ("vllm.device_allocator", device_allocator),
        ("vllm.device_allocator.cumem", cumem),
        ("vllm.v1.worker.gpu_worker", worker),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(cumem=cumem, worker=worker, envs=vllm_envs)


def assert_vllm_keeps_its_allocator(fake: types.SimpleNamespace) -> None:
    assert fake.cumem.CuMemAllocator is VllmCuMemAllocator
    assert fake.worker.CuMemAllocator is VllmCuMemAllocator
    assert fake.cumem.cumem_available is False


def test_entry_point_is_registered_in_vllms_plugin_group() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.value == "vllm_sleep_ext.plugin:register"]
    if not ours:
        pytest.skip("vllm_sleep_ext is not installed as a distribution here (in-place build)")
    assert ours[0].load() is plugin.register


def test_register_without_vllm_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import of vllm fails
    plugin.register()


def test_register_on_cuda_swaps_class_and_says_so_in_vllms_log(
    monkeypatch: pytest.MonkeyPatch, vllm_log: ListHandler
) -> None:
    monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    fake = install_fake_vllm(monkeypatch, FakePlatform(cuda=True, device_type="cuda"))
    plugin.register()
    assert fake.cumem.CuMemAllocator is CuMemAllocator
    assert fake.worker.CuMemAllocator is CuMemAllocator
    assert fake.cumem.cumem_available is True
    assert "vllm_sleep_ext.CuMemAllocator" in vllm_log.text()
    assert "preserve mode 'live'" in vllm_log.text() and "host memory" in vllm_log.text()
    plugin.register()  # idempotent
    assert fake.cumem.CuMemAllocator is CuMemAllocator


class FakeWorker:  # vLLM's Worker, as serving detection sees it
    def execute_model(self, scheduler_output: object) -> str:
        return "model output"


def test_register_wraps_the_workers_execute_model_once_for_serving_detection(
    monkeypatch: pytest.MonkeyPatch, vllm_log: ListHandler
) -> None:
    monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    serving._reset_for_tests()
    fake = install_fake_vllm(monkeypatch, FakePlatform(cuda=True, device_type="cuda"))
    fake.worker.Worker = type("Worker", (FakeWorker,), {})
    original = fake.worker.Worker.execute_model
    try:
        plugin.register()
        wrapped = fake.worker.Worker.execute_model
        assert serving.installed() and wrapped is not original and wrapped.__wrapped__ is original
        fake.cumem.CuMemAllocator = VllmCuMemAllocator  # as if vLLM put its class back: register swaps again
        plugin.register()
        assert fake.worker.Worker.execute_model is wrapped  # not wrapped twice
        assert fake.worker.Worker().execute_model(None) == "model output"
    finally:
        serving._reset_for_tests()


@pytest.mark.parametrize("platform", [FakePlatform(False, device) for device in ("rocm", "cpu", "xpu")])
def test_register_on_other_platforms_leaves_vllms_allocator_and_says_why(
    monkeypatch: pytest.MonkeyPatch, vllm_log: ListHandler, platform: FakePlatform
) -> None:
    monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    fake = install_fake_vllm(monkeypatch, platform)
    plugin.register()
    assert_vllm_keeps_its_allocator(fake)
    assert f"(device type {platform.device_type!r}), not CUDA" in vllm_log.text()
    assert "vLLM keeps its own sleep-mode allocator" in vllm_log.text()


@pytest.mark.parametrize("word, says", [
    *[(w, f"turned off by {plugin.DISABLE_ENV}={w}") for w in ("1", "true", "YES", "on")],
    # An opt-out it cannot read: today any word but the false ones disabled it without a word.
    *[(w, f"{plugin.DISABLE_ENV}={w!r} is not valid") for w in ("maybe", "2")],
])
def test_disable_env_leaves_vllms_allocator_and_says_why(
    monkeypatch: pytest.MonkeyPatch, vllm_log: ListHandler, word: str, says: str
) -> None:
    monkeypatch.setenv(plugin.DISABLE_ENV, word)
    fake = install_fake_vllm(monkeypatch, FakePlatform(cuda=True, device_type="cuda"))
    plugin.register()
    assert_vllm_keeps_its_allocator(fake)
    assert says in vllm_log.text()


@pytest.mark.parametrize("word", ["0", "false", "Off", "no", " "])
def test_disable_env_false_words_do_not_disable(monkeypatch: pytest.MonkeyPatch, vllm_log: ListHandler,
                                                word: str) -> None:
    monkeypatch.setenv(plugin.DISABLE_ENV, word)
    fake = install_fake_vllm(monkeypatch, FakePlatform(cuda=True, device_type="cuda"))
    plugin.register()
    assert fake.cumem.CuMemAllocator is CuMemAllocator


@pytest.mark.parametrize("name, value", [("VLLM_SLEEP_EXT_RECLAIMABLE_PINNED_SHARE", "half"),
                                         ("VLLM_SLEEP_EXT_SLAB_BYTES", "-1"),
                                         ("VLLM_SLEEP_EXT_KEEP_HOST", "maybe")])
def test_bad_setting_is_named_in_vllms_log_at_start_and_fails_the_allocator_not_vllm(
    monkeypatch: pytest.MonkeyPatch, vllm_log: ListHandler, name: str, value: str
) -> None:
    # Today such values failed later, in the worker, with errors that did not name the variable.
    monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    monkeypatch.setenv(name, value)
    fake = install_fake_vllm(monkeypatch, FakePlatform(cuda=True, device_type="cuda"))
    plugin.register()  # never raises: vLLM starts
    assert fake.cumem.CuMemAllocator is CuMemAllocator, "installed: sleep mode, where used, fails clearly"
    assert f"{name}={value!r} is not valid" in vllm_log.text() and "accepted:" in vllm_log.text()
    assert "not installed" not in vllm_log.text()
    with pytest.raises(ValueError, match=f"{name}={value!r} is not valid"):
        CuMemAllocator(backend="host", capacity_bytes=MiB)  # what the worker's get_instance() meets


@pytest.mark.parametrize("disabled", [False, True])
def test_our_variables_are_declared_to_vllm_so_it_neither_warns_nor_refuses(
    monkeypatch: pytest.MonkeyPatch, vllm_log: ListHandler, disabled: bool
) -> None:
    # vLLM (0.26, 0.33) warns about each VLLM_* variable missing from vllm.envs.environment_variables, and
    # raises with --fail-on-environ-validation: whoever set ours could not start vLLM that way.
    from vllm_sleep_ext import envs

    monkeypatch.setenv("VLLM_SLEEP_EXT_COMPRESS", "not a mode")  # a getter must not parse (nor raise)
    if disabled:
        monkeypatch.setenv(plugin.DISABLE_ENV, "1")
    else:
        monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    fake = install_fake_vllm(monkeypatch, FakePlatform(cuda=True, device_type="cuda"))
    plugin.register()
    registry = fake.envs.environment_variables
    assert {s.name for s in envs.SETTINGS} <= set(registry), "declared whether or not the plugin serves"
    assert registry["VLLM_SLEEP_EXT_COMPRESS"]() == "not a mode"
    assert registry[plugin.DISABLE_ENV]() == ("1" if disabled else "")
    assert registry["VLLM_LOGGING_LEVEL"]() == "INFO"  # vLLM's own left alone
    unknown = [name for name in envs.os.environ if name.startswith("VLLM_") and name not in registry]
    assert not [name for name in unknown if name.startswith("VLLM_SLEEP_EXT_")]


def test_core_that_fails_to_load_leaves_vllms_allocator_and_says_why(
    monkeypatch: pytest.MonkeyPatch, vllm_log: ListHandler
) -> None:
    monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    fake = install_fake_vllm(monkeypatch, FakePlatform(cuda=True, device_type="cuda"))
    monkeypatch.setitem(sys.modules, "vllm_sleep_ext.allocator", None)  # its import (and the core's) fails
    plugin.register()
    assert_vllm_keeps_its_allocator(fake)
    assert "its core failed to load" in vllm_log.text()


def test_register_never_raises(monkeypatch: pytest.MonkeyPatch, vllm_log: ListHandler) -> None:
    class BrokenPlatform(FakePlatform):
        def is_cuda(self) -> bool:
            raise RuntimeError("no platform detected")

    monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    fake = install_fake_vllm(monkeypatch, BrokenPlatform(cuda=True, device_type="?"))
    plugin.register()
    assert_vllm_keeps_its_allocator(fake)
    assert "platform could not be determined" in vllm_log.text()

    def explode() -> None:
        raise ValueError("anything at all")

    monkeypatch.setattr(plugin, "_install", explode)
    plugin.register()
    assert "not installed" in vllm_log.text() and "anything at all" in vllm_log.text()


def test_sleep_and_wake_lines_show_in_vllms_log(monkeypatch: pytest.MonkeyPatch, vllm_log: ListHandler) -> None:
    log.route_to_vllm()  # what register() does under vLLM
    alloc = CuMemAllocator(backend="host", capacity_bytes=64 * MiB)
    with alloc.use_memory_pool(tag="weights"):
        t = alloc.empty((4 * MiB,), dtype=torch.uint8)
    alloc.sleep(offload_tags=("weights",))
    alloc.wake_up()
    sleep_line = next(m for m in vllm_log.messages if m.startswith("sleep:"))
    wake_line = next(m for m in vllm_log.messages if m.startswith("wake_up:"))
    for line in (sleep_line, wake_line):
        assert "GiB" in line and " s (" in line and "GB/s" in line
    del t


def test_without_vllm_lines_go_to_plain_logging(caplog: pytest.LogCaptureFixture) -> None:
    assert not log.routed_to_vllm()
    alloc = CuMemAllocator(backend="host", capacity_bytes=64 * MiB)
    with alloc.use_memory_pool(tag="weights"):
        t = alloc.empty((MiB,))
    with caplog.at_level(logging.INFO, logger="vllm_sleep_ext"):
        alloc.sleep(offload_tags=("weights",))
    assert any(r.name == "vllm_sleep_ext.allocator" and r.getMessage().startswith("sleep:") for r in caplog.records)
    alloc.wake_up()
    del t
