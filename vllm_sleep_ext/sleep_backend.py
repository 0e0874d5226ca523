"""This allocator as a named entry of vLLM's sleep-mode backend registry (``SleepModeBackendFactory``).

vLLM 0.26 and 0.33 pick the mechanism that frees and restores GPU memory by name
(``model_config.sleep_mode_backend``, ``--sleep-mode-backend`` in 0.33). Installing this package needs no
flag: the plugin puts our class behind vLLM's default ``"cumem"`` backend. ``register()`` adds the name
``"vllm_sleep_ext"`` as well, so that selecting it says plainly that this allocator is wanted: where it
cannot serve (turned off, no CUDA, core not loaded), ``is_supported()`` is false and vLLM refuses to
start with "not supported on this platform" instead of sleeping through its own allocator.

The backend is vLLM's ``CuMemBackend`` (the offload tags of each level follow the vLLM in use), asked
for our allocator. Its capability flags, for this allocator:
- ``preserves_communicators``: True. NCCL buffers are allocated outside the sleep-mode pools and are
  never touched (as with ``cumem``).
- ``preserves_compiled_artifacts``: True. The process lives on; compiled kernels are code objects and
  loaded modules, never memory of a sleep-mode pool.
- ``preserves_graphs_with_communicators``: True. Communicators are kept, and graph memory comes back at
  the same addresses (tensor-parallel CUDA graphs ran after sleep and wake on vLLM 0.26:
  benchmarks/RESULTS.md).
- ``supports_durable_storage``: False. Backups live in this process's host memory.

One difference from ``"cumem"`` that is vLLM's, not ours: vLLM 0.33 puts CUDA graphs into the sleep pool
(``--sleep-mode-offload-cudagraph``) only when the backend is named ``"cumem"``; under this name the
graphs stay mapped through sleep. The default name is served by this allocator too.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BACKEND_NAME = "vllm_sleep_ext"


def register() -> bool:
    """Adds ``BACKEND_NAME`` to vLLM's registry, where this vLLM has one; True when it is registered
    (now or before). Never raises: the plugin calls it in every vLLM process."""
    try:
        from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory
    except ImportError:
        return False  # a vLLM without the registry: the default name is all there is
    try:
        SleepModeBackendFactory.register_backend(BACKEND_NAME, __name__, "VllmSleepExtBackend")
    except ValueError:
        pass  # registered already (register() runs once per plugin load; a second load finds it)
    except Exception as e:  # noqa: BLE001 - a registry of another shape: vLLM keeps starting
        logger.warning("vllm_sleep_ext: could not register sleep-mode backend %r (%s: %s)", BACKEND_NAME,
                       type(e).__name__, e)
        return False
    return True


def serving_reason() -> str | None:
    """Why this process's vLLM does not sleep through our allocator (None: it does)."""
    try:
        import vllm.device_allocator.cumem as cumem
    except Exception as e:  # noqa: BLE001 - vLLM's module fails to import on this platform
        return f"vllm.device_allocator.cumem does not import ({type(e).__name__}: {e})"
    if not getattr(cumem.CuMemAllocator, "__module__", "").startswith("vllm_sleep_ext"):
        return ("vLLM's sleep-mode allocator is its own here (the vllm_sleep_ext plugin did not install "
                "its class: see the plugin's line earlier in this log)")
    return None


def __getattr__(name: str):
    # The class derives from vLLM's CuMemBackend, so it is built when vLLM's loader asks for it, never
    # on import of this module (which must import without vLLM).
    if name == "VllmSleepExtBackend":
        cls = _backend_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _backend_class() -> type:
    from vllm.device_allocator.sleep_mode_backend import CuMemBackend

    class VllmSleepExtBackend(CuMemBackend):
        """vLLM's CuMemBackend on vllm_sleep_ext's allocator (module note: the flags)."""

        @classmethod
        def is_supported(cls) -> bool:
            reason = serving_reason()
            if reason is not None:
                logger.warning("vllm_sleep_ext: sleep-mode backend %r cannot serve: %s", BACKEND_NAME, reason)
            return reason is None

        @classmethod
        def preserves_communicators(cls) -> bool:
            return True

        @classmethod
        def preserves_compiled_artifacts(cls) -> bool:
            return True

        @classmethod
        def preserves_graphs_with_communicators(cls) -> bool:
            return True

        @classmethod
        def supports_durable_storage(cls) -> bool:
            return False

    VllmSleepExtBackend.__module__ = __name__
    VllmSleepExtBackend.__qualname__ = "VllmSleepExtBackend"
    return VllmSleepExtBackend
