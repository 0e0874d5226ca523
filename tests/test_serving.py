"""Serving detection (vllm_sleep_ext/serving.py): the background host preparation runs at full speed
until vLLM serves, throttled while it does, at full speed again once it is idle; the worker's
execute_model is wrapped once, by the plugin's request, and a step never fails because of it."""

from __future__ import annotations

import sys
import threading
import time
import types
from collections.abc import Iterator

import pytest

from vllm_sleep_ext import CuMemAllocator, serving

MiB = 1 << 20


class Rates:
    """What set_rate was called with, in order."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, rate: int) -> None:
        with self.lock:
            self.calls.append(rate)

    def last(self) -> int:
        with self.lock:
            return self.calls[-1]


def wait_for(condition, timeout: float = 5.0) -> bool:
    due = time.monotonic() + timeout
    while time.monotonic() < due:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


@pytest.fixture(autouse=True)
def fresh_serving() -> Iterator[None]:
    serving._reset_for_tests()
    yield
    serving._reset_for_tests()


def output(tokens: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(total_num_scheduled_tokens=tokens)


# -- the throttle ----------------------------------------------------------------------------------

def test_full_speed_until_the_first_step_then_the_serving_rate() -> None:
    rates = Rates()
    throttle = serving.PrepareThrottle(rates, serving_rate=500_000_000, idle_after_s=30)
    throttle.start()
    assert rates.calls == [0] and not throttle.serving
    throttle.step()
    assert rates.calls == [0, 500_000_000] and throttle.serving
    for _ in range(100):  # every decode step: no further calls
        throttle.step()
    assert rates.calls == [0, 500_000_000]
    throttle.close()


def test_back_to_full_speed_after_the_idle_time_and_throttled_again_by_the_next_step() -> None:
    rates = Rates()
    throttle = serving.PrepareThrottle(rates, serving_rate=7, idle_after_s=0.1)
    throttle.start()
    throttle.step()
    assert rates.last() == 7
    assert wait_for(lambda: not throttle.serving)
    assert rates.calls == [0, 7, 0]
    throttle.step()
    assert rates.calls == [0, 7, 0, 7]
    throttle.close()


def test_steps_that_keep_coming_keep_it_throttled() -> None:
    rates = Rates()
    throttle = serving.PrepareThrottle(rates, serving_rate=7, idle_after_s=0.2)
    throttle.start()
    end = time.monotonic() + 0.6  # three idle times, a step every 20 ms
    while time.monotonic() < end:
        throttle.step()
        time.sleep(0.02)
    assert rates.calls == [0, 7]
    assert wait_for(lambda: rates.calls == [0, 7, 0])
    throttle.close()


def test_idle_timer_follows_the_clock_it_is_given() -> None:
    now = [100.0]
    rates = Rates()
    throttle = serving.PrepareThrottle(rates, serving_rate=7, idle_after_s=2.0, clock=lambda: now[0])
    throttle.start()
    throttle.step()
    time.sleep(0.1)
    assert throttle.serving  # the clock has not moved
    now[0] += 2.5
    with throttle._changed:
        throttle._changed.notify_all()
    assert wait_for(lambda: not throttle.serving)
    assert rates.calls == [0, 7, 0]
    throttle.close()


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="serving_rate"):
        serving.PrepareThrottle(Rates(), serving_rate=-1)
    with pytest.raises(ValueError, match="idle_after_s"):
        serving.PrepareThrottle(Rates(), serving_rate=1, idle_after_s=0)


@pytest.mark.parametrize("scheduled, serves", [(output(0), False), (output(17), True), (None, False),
                                              (object(), True)])
def test_a_step_serves_when_it_schedules_tokens(scheduled: object, serves: bool) -> None:
    assert serving.schedules_tokens(scheduled) is serves


# -- the wrapper -----------------------------------------------------------------------------------

class FakeWorker:
    """vLLM's Worker as far as the wrapper sees it: 0.26 passes the output by position, keywords work too."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def execute_model(self, scheduler_output: object, *rest: object, **kwargs: object) -> str:
        """vLLM's docstring."""
        self.calls.append(scheduler_output)
        return "model output"


def test_wrapper_sees_each_step_and_returns_what_execute_model_returns() -> None:
    cls = type("Worker", (FakeWorker,), {})
    seen: list[object] = []
    assert serving.wrap_execute_model(cls, seen.append)
    assert not serving.wrap_execute_model(cls, seen.append)  # once
    worker = cls()
    first, second = output(3), output(0)
    assert worker.execute_model(first) == "model output"
    assert worker.execute_model(scheduler_output=second) == "model output"
    assert seen == [first, second] and worker.calls == [first, second]
    assert cls.execute_model.__doc__ == "vLLM's docstring."


def test_a_failing_detection_never_fails_the_step(caplog: pytest.LogCaptureFixture) -> None:
    cls = type("Worker", (FakeWorker,), {})

    def broken(_: object) -> None:
        raise RuntimeError("boom")

    serving.wrap_execute_model(cls, broken)
    assert cls().execute_model(output(1)) == "model output"
    assert "serving detection failed (RuntimeError: boom)" in caplog.text


# -- in the process: plugin, then the allocator ----------------------------------------------------

class FakeCore:
    def __init__(self) -> None:
        self.host_prepare_rate = 500_000_000
        self.rates = Rates()

    def __setattr__(self, name: str, value: object) -> None:
        if name == "host_prepare_rate" and "rates" in self.__dict__:
            self.rates(value)
        object.__setattr__(self, name, value)


def fake_worker_module(monkeypatch: pytest.MonkeyPatch) -> type:
    module = types.ModuleType(serving.WORKER_MODULE)
    cls = type("Worker", (FakeWorker,), {})
    module.Worker = cls
    monkeypatch.setitem(sys.modules, serving.WORKER_MODULE, module)
    return cls


def test_attach_without_the_plugin_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = fake_worker_module(monkeypatch)
    core = FakeCore()
    assert serving.attach(types.SimpleNamespace(_core=core)) is None
    assert core.rates.calls == [] and not hasattr(cls.execute_model, serving._WRAPPED)


def test_attach_after_install_runs_full_speed_until_a_step_schedules_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = fake_worker_module(monkeypatch)
    serving.install()
    serving.install()
    core = FakeCore()
    throttle = serving.attach(types.SimpleNamespace(_core=core))
    assert throttle is not None and serving.attach(types.SimpleNamespace(_core=FakeCore())) is throttle
    assert core.rates.calls == [0]  # idle: full speed
    worker = cls()
    worker.execute_model(output(0))  # a step with nothing scheduled is not serving
    assert core.rates.calls == [0]
    worker.execute_model(output(5))
    assert core.rates.calls == [0, 500_000_000]


def test_host_backend_rate_changes_reach_the_core_mid_preparation() -> None:
    """The core's end of it: a preparation started at a crawl finishes once the throttle lifts the rate."""
    a = CuMemAllocator(backend="host", capacity_bytes=256 * MiB)
    a._core.host_prepare_rate = 1 * MiB  # 32 s for the weights below
    a._core.staging_piece_bytes = 2 * MiB
    with a.use_memory_pool("weights"):
        ptr = a._core.malloc(32 * MiB, 0, "weights")
    a._core.prepare_host(32 * MiB, 0, False)
    time.sleep(0.05)
    assert a._core.host_pinned_bytes() < 16 * MiB
    throttle = serving.PrepareThrottle(lambda rate: setattr(a._core, "host_prepare_rate", rate),
                                       serving_rate=1 * MiB)
    throttle.start()
    done = threading.Event()
    threading.Thread(target=lambda: (a._core.wait_host(), done.set()), daemon=True).start()
    assert done.wait(10), "the preparation did not speed up when the rate was lifted"
    assert a._core.host_pinned_bytes() >= 32 * MiB
    assert a._core.host_error() == ""
    a._core.free(ptr)
    throttle.close()
