"""vLLM general plugin: makes vLLM's sleep mode use this allocator, with no change to user code.

vLLM calls every entry point of the group ``vllm.general_plugins`` in each process it starts (front
end, engine core, workers, Ray actors), before the model is built, and calls it without a ``try``: an
exception here would stop every vLLM process from starting, sleep mode on or off. So ``register``
never raises. Where it cannot serve it leaves vLLM's allocator in place and says why in vLLM's log:
- ``VLLM_SLEEP_EXT_DISABLE=1`` (opt-out, e.g. to compare with vLLM's own allocator), or a value of it
  that is neither a yes nor a no word (an opt-out we cannot read; the warning names it);
- a platform other than CUDA (ROCm, XPU, CPU, TPU: the core drives the CUDA driver only);
- vLLM without ``vllm.device_allocator.cumem``, or our core failing to load.
Otherwise it swaps our class into ``vllm.device_allocator.cumem``, where vLLM looks the class up at
each use (``get_mem_allocator_instance()``, and the ``cumem`` backend of 0.33's
``SleepModeBackendFactory``, which goes through it), and into vLLM modules that imported the name
before plugins were loaded, and asks for serving detection (vllm_sleep_ext/serving.py: the background
host preparation runs at full speed until vLLM serves). Other settings (vllm_sleep_ext/envs.py) that are not valid are named in a
warning here and make the allocator's constructor raise in the worker, where sleep mode is used.
Whatever happens next, it first declares our ``VLLM_SLEEP_EXT_*`` names in vLLM's registry of its
variables, where vLLM has one: vLLM warns at start-up about every ``VLLM_*`` variable it does not know,
and with ``--fail-on-environ-validation`` refuses to start.
"""

from __future__ import annotations

import functools
import logging
import sys
from types import ModuleType
from typing import Optional

from vllm_sleep_ext import envs, log, serving, sleep_backend

logger = logging.getLogger(__name__)

DISABLE_ENV = envs.DISABLE.name
_KEPT = "vLLM keeps its own sleep-mode allocator"


def register() -> None:
    """Entry point of ``vllm.general_plugins``; never raises (see the module note)."""
    try:
        _install()
    except Exception as e:  # noqa: BLE001 - a plugin must not stop vLLM from starting
        logger.warning("vllm_sleep_ext: not installed, %s: %s: %s", _KEPT, type(e).__name__, e, exc_info=True)


def _install() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return  # registered by pip, run without vLLM: nothing to do and no vLLM log to write to
    log.route_to_vllm()
    _declare_settings()
    sleep_backend.register()  # "vllm_sleep_ext" for --sleep-mode-backend, where vLLM has the registry
    try:
        disabled = envs.get(envs.DISABLE)
    except envs.EnvError as e:  # an opt-out we cannot read: do not take vLLM's allocator over
        logger.warning("vllm_sleep_ext: not installed, %s: %s", _KEPT, e)
        return
    if disabled:
        logger.info("vllm_sleep_ext: turned off by %s=%s; %s", DISABLE_ENV, envs.raw(envs.DISABLE), _KEPT)
        return
    reason = _not_cuda_reason()
    if reason is not None:
        logger.info("vllm_sleep_ext: %s; %s", reason, _KEPT)
        return
    try:
        import vllm.device_allocator.cumem as cumem
    except Exception as e:  # noqa: BLE001 - vLLM's module may fail in ways of its own
        logger.warning("vllm_sleep_ext: vllm.device_allocator.cumem does not import (%s); not installed", e)
        return
    try:
        from vllm_sleep_ext.allocator import CuMemAllocator, describe
    except Exception as e:  # noqa: BLE001 - ImportError, or an OSError from the shared object
        logger.warning("vllm_sleep_ext: its core failed to load (%s: %s); %s", type(e).__name__, e, _KEPT)
        return
    if cumem.CuMemAllocator is not CuMemAllocator:
        _swap_class(cumem, CuMemAllocator)
        serving.install()  # the first sleep's host memory at full speed until vLLM serves
        errors = envs.invalid()
        if errors:  # the worker's allocator raises the same errors; said here too, once, at start-up
            logger.warning("vllm_sleep_ext: vLLM's sleep mode uses vllm_sleep_ext.CuMemAllocator, but its "
                           "settings are not valid, so creating it will fail: %s; %s=1 turns it off",
                           "; ".join(map(str, errors)), DISABLE_ENV)
            return
        logger.info("vllm_sleep_ext: vLLM's sleep mode uses vllm_sleep_ext.CuMemAllocator (%s; %s=1 turns "
                    "it off)", describe(), DISABLE_ENV)


def _declare_settings() -> None:
    """Our variables into ``vllm.envs.environment_variables`` (name -> getter), which vLLM checks every
    ``VLLM_*`` variable against at start-up (0.26, 0.33). A getter returns the text as set ("" unset) and never
    raises (vLLM calls them all when it caches its variables, and hashes them into its compile cache
    key); this package parses them itself. Names vLLM already has are left alone."""
    try:
        import vllm.envs as vllm_envs
    except Exception:  # noqa: BLE001 - an unknown vLLM: nothing to declare into
        return
    registry = getattr(vllm_envs, "environment_variables", None)
    if not isinstance(registry, dict):
        return
    for setting in envs.SETTINGS:
        registry.setdefault(setting.name, functools.partial(envs.raw, setting))


def _swap_class(cumem: ModuleType, ours: type) -> None:
    original = cumem.CuMemAllocator
    for name, module in list(sys.modules.items()):
        if (name == "vllm" or name.startswith("vllm.")) and getattr(module, "CuMemAllocator", None) is original:
            module.CuMemAllocator = ours
    # vLLM's flag says whether *its* extension loaded; on CUDA ours serves instead of it.
    cumem.cumem_available = True


def _not_cuda_reason() -> Optional[str]:
    """Why this process cannot use the allocator (None: it can)."""
    try:
        from vllm.platforms import current_platform

        is_cuda = current_platform.is_cuda()
    except Exception as e:  # noqa: BLE001 - an unknown vLLM or platform: do not guess
        return f"vLLM's platform could not be determined ({type(e).__name__}: {e})"
    if not is_cuda:
        device = getattr(current_platform, "device_type", "?")
        return f"vLLM runs on {type(current_platform).__name__} (device type {device!r}), not CUDA"
    return None
