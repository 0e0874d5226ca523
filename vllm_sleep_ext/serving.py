"""Whether vLLM is serving, for the pace of the background host preparation (Note [Prepare rate] in
csrc/host_cache.h).

The preparation pins host memory for the first level-1 backup. It is throttled (``host_prepare_rate``,
0.5 GB/s) so that decoding does not notice it, but nothing is decoded before the first request: a 65 GB
model at 0.5 GB/s needs 130 s, and an RL trainer that puts the engine to sleep right after it starts
would find most of it unprepared. So the plugin wraps the worker's ``execute_model``; until a step
schedules tokens the preparation runs at full speed, while steps come it runs at the throttled rate, and
``IDLE_AFTER_S`` after the last one it is back at full speed.

Only in vLLM, and only where sleep mode creates the allocator: ``install()`` (from the plugin) asks for
it, ``attach()`` (from ``CuMemAllocator.get_instance()``) does it. Nothing here ever raises into vLLM.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import threading
import time
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

WORKER_MODULE = "vllm.v1.worker.gpu_worker"  # Worker.execute_model(scheduler_output, ...): 0.26 and 0.33
IDLE_AFTER_S = 2.0  # no step for this long: nothing is being served
_WRAPPED = "_vllm_sleep_ext_serving"  # set on the wrapper, so a second install finds it


class PrepareThrottle:
    """Full speed (rate 0) while idle, ``serving_rate`` while steps come; full speed again
    ``idle_after_s`` after the last step. ``set_rate`` is called on each change only, from the step's
    thread or from the throttle's own watcher thread."""

    def __init__(self, set_rate: Callable[[int], None], serving_rate: int, idle_after_s: float = IDLE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if serving_rate < 0:
            raise ValueError(f"serving_rate must be >= 0 bytes per second, got {serving_rate}")
        if not idle_after_s > 0:
            raise ValueError(f"idle_after_s must be > 0, got {idle_after_s}")
        self.serving_rate = int(serving_rate)
        self.idle_after_s = float(idle_after_s)
        self._set_rate = set_rate
        self._clock = clock
        self._changed = threading.Condition()
        self._serving = False
        self._last_step = 0.0
        self._watcher: Optional[threading.Thread] = None
        self._closed = False

    @property
    def serving(self) -> bool:
        return self._serving

    def start(self) -> None:
        """Idle from here: full speed."""
        with self._changed:
            self._serving = False
            self._set_rate(0)

    def step(self) -> None:
        """A step that serves requests ran (or is about to)."""
        self._last_step = self._clock()
        if self._serving:  # every decode step: no lock, one float store
            return
        with self._changed:
            if self._closed or self._serving:
                return
            self._serving = True
            self._set_rate(self.serving_rate)
            logger.debug("vllm_sleep_ext: serving: host preparation throttled to %.2f GB/s", self.serving_rate / 1e9)
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="vllm_sleep_ext-serving", daemon=True)
                self._watcher.start()
            self._changed.notify_all()

    def close(self) -> None:
        """Stops the watcher; the rate stays as it is."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()

    def _watch(self) -> None:
        with self._changed:
            while not self._closed:
                if not self._serving:
                    self._changed.wait()
                    continue
                remaining = self._last_step + self.idle_after_s - self._clock()
                if remaining > 0:
                    self._changed.wait(remaining)
                    continue
                self._serving = False
                try:
                    self._set_rate(0)
                except Exception as e:  # noqa: BLE001 - the watcher must outlive a failed call
                    logger.warning("vllm_sleep_ext: could not lift the host preparation's rate: %s", e)
                logger.debug("vllm_sleep_ext: idle for %.1f s: host preparation at full speed", self.idle_after_s)


def schedules_tokens(scheduler_output: Any) -> bool:
    """Whether a step serves requests: vLLM's SchedulerOutput with tokens scheduled. An output that does
    not say (another vLLM) counts as serving: throttling is the safe side."""
    if scheduler_output is None:
        return False
    count = getattr(scheduler_output, "total_num_scheduled_tokens", None)
    return True if count is None else count > 0


def wrap_execute_model(worker_cls: type, on_step: Callable[[Any], None]) -> bool:
    """Wraps ``worker_cls.execute_model`` so that ``on_step(scheduler_output)`` runs before each call;
    False when it is wrapped already (or there is none to wrap)."""
    original = getattr(worker_cls, "execute_model", None)
    if original is None or getattr(original, _WRAPPED, False):
        return False

    @functools.wraps(original)
    def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        scheduler_output = args[0] if args else kwargs.get("scheduler_output")
        try:
            on_step(scheduler_output)
        except Exception as e:  # noqa: BLE001 - never fail a step for the pace of the preparation
            logger.warning("vllm_sleep_ext: serving detection failed (%s: %s)", type(e).__name__, e)
        return original(self, *args, **kwargs)

    setattr(execute_model, _WRAPPED, True)
    worker_cls.execute_model = execute_model
    return True


# -- the process's throttle ----------------------------------------------------------------------

_lock = threading.Lock()
_requested = False
_throttle: Optional[PrepareThrottle] = None


def _on_step(scheduler_output: Any) -> None:
    throttle = _throttle
    if throttle is not None and schedules_tokens(scheduler_output):
        throttle.step()


def _wrap_worker(import_it: bool) -> bool:
    """Wraps vLLM's Worker.execute_model if its module is loaded (or, with ``import_it``, importable)."""
    module = sys.modules.get(WORKER_MODULE)
    if module is None and import_it:
        try:
            module = importlib.import_module(WORKER_MODULE)
        except Exception as e:  # noqa: BLE001 - another vLLM: no serving detection, the rate stays throttled
            logger.info("vllm_sleep_ext: %s does not import (%s); host preparation stays throttled", WORKER_MODULE, e)
            return False
    worker_cls = getattr(module, "Worker", None) if module is not None else None
    if worker_cls is None:
        return False
    if wrap_execute_model(worker_cls, _on_step):
        logger.debug("vllm_sleep_ext: %s.Worker.execute_model wrapped for serving detection", WORKER_MODULE)
    return True


def install() -> None:
    """From the plugin: serving detection is wanted in this process (done now if vLLM's worker module
    is loaded, else by ``attach()``, where sleep mode starts)."""
    global _requested
    with _lock:
        _requested = True
        _wrap_worker(import_it=False)


def installed() -> bool:
    return _requested


def attach(allocator: Any) -> Optional[PrepareThrottle]:
    """From ``CuMemAllocator.get_instance()``: when the plugin asked for serving detection, the
    allocator's background preparation runs at full speed until vLLM serves, at its
    ``host_prepare_rate`` while it does. Returns the throttle (None: not in vLLM, or it could not wrap)."""
    global _throttle
    with _lock:
        if not _requested or _throttle is not None:
            return _throttle
        if not _wrap_worker(import_it=True):
            return None
        core = allocator._core
        serving_rate = int(core.host_prepare_rate)

        def set_rate(rate: int) -> None:
            core.host_prepare_rate = rate

        throttle = PrepareThrottle(set_rate, serving_rate)
        throttle.start()
        _throttle = throttle
    logger.info("vllm_sleep_ext: host memory for the first sleep is prepared at full speed until vLLM serves, "
                "at %.2f GB/s while it does (back to full speed %.0f s after the last step)",
                serving_rate / 1e9, IDLE_AFTER_S)
    return throttle


def _reset_for_tests() -> None:
    global _requested, _throttle
    with _lock:
        if _throttle is not None:
            _throttle.close()
        _requested = False
        _throttle = None
