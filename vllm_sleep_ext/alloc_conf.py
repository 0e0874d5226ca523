"""PyTorch's caching-allocator settings while one of our pools is in use: expandable segments off,
every other option kept."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch

# Expandable segments do not work with pluggable-allocator pools (pytorch#147851), so they are off while
# any of our pools is in use. PyTorch parses a settings string as a whole and resets every option it
# does not name (vLLM 0.33's alloc_conf.py documents the same), so the whole current string is written
# back with only the expandable_segments value changed, and the original string afterwards.
_ALLOC_CONF_ENVS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
_EXPANDABLE = re.compile(r"(expandable_segments\s*:\s*)(\w+)")
_settings_lock = threading.Lock()
_settings_users = 0
_settings_saved: Optional[str] = None


def current_allocator_settings() -> str:
    """PyTorch's allocator settings in effect (torch >= 2.9), else the environment's."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if callable(get):
        try:
            return get()
        except Exception:  # noqa: BLE001 - an older or odd build: the environment is the next best
            pass
    return next((os.environ[name] for name in _ALLOC_CONF_ENVS if os.environ.get(name)), "")


def _set_allocator_settings(settings: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if not callable(setter):
        setter = torch.cuda.memory._set_allocator_settings  # torch before 2.9
    setter(settings)


def expandable_segments_enabled(settings: str) -> bool:
    values = [m.group(2) for m in _EXPANDABLE.finditer(settings)]
    return bool(values) and values[-1] == "True"  # PyTorch applies the last occurrence


def with_expandable_segments(settings: str, enabled: bool) -> str:
    """`settings` with every expandable_segments value set, all other options verbatim."""
    return _EXPANDABLE.sub(lambda m: f"{m.group(1)}{enabled}", settings)


@contextmanager
def expandable_segments_off() -> Iterator[None]:
    """Expandable segments off while any thread is inside; the first in turns them off, the last out
    writes back the settings as they were."""
    global _settings_users, _settings_saved
    with _settings_lock:
        if _settings_users == 0:
            settings = current_allocator_settings()
            if expandable_segments_enabled(settings):
                _set_allocator_settings(with_expandable_segments(settings, False))
                _settings_saved = settings
        _settings_users += 1
    try:
        yield
    finally:
        with _settings_lock:
            _settings_users -= 1
            if _settings_users == 0 and _settings_saved is not None:
                saved, _settings_saved = _settings_saved, None
                _set_allocator_settings(saved)
