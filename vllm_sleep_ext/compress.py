"""Option ``compress`` of level-1 backups: where its codec comes from, and what the allocator says of it.

The core compresses (``csrc/compress_pipeline.h``, Note [Compressed backups]); on CUDA its codec is
nvCOMP's ANS in ``libnvcomp.so.6``, which the core opens by that name. The library ships in the wheel
``nvidia-libnvcomp-cu13``, whose directory is not on the loader's path, so it is loaded here first
(RTLD_GLOBAL) when that package is importable: the core's dlopen then finds it by its soname.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Optional

logger = logging.getLogger(__name__)

MODES = ("off", "auto", "on")
# Host bytes a compressed backup of bf16 weights takes per byte (nvCOMP ANS measured 0.685 on an H200,
# benchmarks/RESULTS.md section 10), with a margin: how much host memory is made ready ahead of a sleep.
EXPECTED_RATIO = 0.72
NVCOMP_SONAME = "libnvcomp.so.6"


class CompressUnavailableError(ValueError):
    """``compress='on'`` where the codec cannot be had (the message says why)."""


def preload_nvcomp() -> Optional[str]:
    """Loads libnvcomp.so.6 from the nvidia-libnvcomp-cu13 package if it is installed; returns its path."""
    try:
        import nvidia.libnvcomp as package  # type: ignore[import-not-found]

        roots = list(getattr(package, "__path__", []))
    except ImportError:
        roots = []
    # Installed with --target beside another `nvidia` package that is not a namespace package, the
    # import fails though the files are there: look on sys.path too.
    roots += [os.path.join(p, "nvidia", "libnvcomp") for p in sys.path if p]
    for root in roots:
        for sub in ("lib64", "lib"):
            path = os.path.join(root, sub, NVCOMP_SONAME)
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError as e:
                    logger.warning("vllm_sleep_ext: %s found but not loadable: %s", path, e)
                    return None
                return path
    return None


def apply(core: object, mode: str, backend: str) -> None:
    """Sets ``core.compress`` to ``mode``: ``on`` raises CompressUnavailableError where the codec cannot be
    had, ``auto`` says so once in the log and the backups are copied plain."""
    if mode not in MODES:
        raise ValueError(f"compress must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "off":
        if backend == "cuda":
            preload_nvcomp()
        why = core.compress_unavailable()
        if why:
            if mode == "on":
                raise CompressUnavailableError(f"compress='on' cannot work on the {backend} backend: {why}")
            logger.warning("vllm_sleep_ext: compress='auto' is off here, backups are copied plain: %s", why)
    core.compress = mode
