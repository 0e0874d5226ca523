"""vLLM general plugin: makes vLLM's sleep mode use this allocator, with no change to user code.

vLLM calls every entry point of the group ``vllm.general_plugins`` in each process it starts (engine
core, workers, Ray actors), before the model is built. ``register`` swaps our class into
``vllm.device_allocator.cumem``, where vLLM's worker looks it up at sleep-mode time.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)


def register() -> None:
    try:
        import vllm.device_allocator.cumem as cumem
    except ImportError as e:  # vLLM absent, or built without its allocator: nothing to do
        logger.debug("vllm_sleep_ext plugin: vllm.device_allocator.cumem not importable (%s); not installed", e)
        return
    from vllm_sleep_ext.allocator import CuMemAllocator

    original = cumem.CuMemAllocator
    if original is CuMemAllocator:
        return
    # Also rebind the name in vLLM modules that imported it before plugins were loaded.
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm") and getattr(module, "CuMemAllocator", None) is original:
            module.CuMemAllocator = CuMemAllocator
    cumem.cumem_available = True
    logger.info("vllm_sleep_ext: vLLM sleep mode now uses vllm_sleep_ext.CuMemAllocator")
