"""Every ``VLLM_SLEEP_EXT_*`` environment variable, and the one parser they are all read with.

Settings reach the processes vLLM starts only through the environment, so each variable is declared
once below (name, type, default, help) and read by one rule per type: the same words mean the same
thing in every variable, an unset or empty variable means its default, and a value that does not parse
raises ``EnvError`` (a ``ValueError``) naming the variable, the value and what is accepted. The
allocator reads them when it is created; the plugin reads ``VLLM_SLEEP_EXT_DISABLE`` and checks the
rest, to warn at start-up. README's settings table is ``markdown_table()`` (``python -m
vllm_sleep_ext.envs`` prints it; a test keeps the two equal).

No torch here: the plugin imports this in every vLLM process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Optional

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
_BYTE_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
_BYTES = re.compile(r"(\d+)\s*([a-z]*)")


class EnvError(ValueError):
    """A ``VLLM_SLEEP_EXT_*`` variable whose value is not accepted."""

    def __init__(self, name: str, value: str, accepted: str, reason: str = "") -> None:
        self.name, self.value, self.accepted = name, value, accepted
        why = f" ({reason})" if reason else ""
        super().__init__(f"{name}={value!r} is not valid{why}; accepted: {accepted}")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    type: str  # "bool", "bytes", "float", "choice", "tags" or "dir"
    default: Any  # what an unset or empty variable means; None: decided where it is used (default_text)
    help: str
    accepted: str
    parse: Callable[[str], Any] = dataclasses.field(repr=False, compare=False)
    default_text: str = ""

    def shown_default(self) -> str:
        if self.default_text:
            return self.default_text
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if isinstance(self.default, tuple):
            return ",".join(self.default)
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


# -- one parser per type (a ValueError says why; get() adds the variable, the value and what is accepted)

def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError("not a yes/no word")


def parse_bytes(text: str) -> int:
    match = _BYTES.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError("not a whole, non-negative number of bytes")
    number, unit = match.groups()
    if unit not in _BYTE_UNITS:
        raise ValueError(f"unknown unit {unit!r}")
    return int(number) * _BYTE_UNITS[unit]


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("not a number") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError("out of range")
        return value

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        word = text.strip().lower()
        if word not in choices:
            raise ValueError("not one of the choices")
        return word

    return parse


def parse_tags(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parse_dir(text: str) -> str:
    path = os.path.expanduser(text.strip())
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not an existing directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"directory {path!r} is not writable")
    return path


def _bool(name: str, default: Optional[bool], help: str, default_text: str = "") -> Setting:
    accepted = f"on: {', '.join(TRUE_WORDS)}; off: {', '.join(FALSE_WORDS)} (any case)"
    return Setting(name, "bool", default, help, accepted, parse_bool, default_text)


def _bytes(name: str, help: str, default_text: str) -> Setting:
    accepted = "a whole number of bytes >= 0, optionally with K, M, G (or KiB, MiB, GiB: powers of 1024)"
    return Setting(name, "bytes", None, help, accepted, parse_bytes, default_text)


def _float(name: str, default: float, low: float, high: float, help: str) -> Setting:
    return Setting(name, "float", default, help, f"a number from {low:g} to {high:g}", _float_in(low, high))


def _one_of(name: str, choices: tuple[str, ...], default: Optional[str], help: str, default_text: str = "") -> Setting:
    accepted = ", ".join(choices[:-1]) + f" or {choices[-1]}"
    return Setting(name, "choice", default, help, accepted, _choice(choices), default_text)


# -- the table -------------------------------------------------------------------------------------

DISABLE = _bool("VLLM_SLEEP_EXT_DISABLE", False,
                "turns the vLLM plugin off: vLLM keeps its own sleep-mode allocator")
PRESERVE = _one_of("VLLM_SLEEP_EXT_PRESERVE", ("live", "buffers", "off"), "live",
                   "what a level-2 sleep keeps of the pools it discards (`preserve_mode`)")
PRESERVE_TAGS = Setting(
    "VLLM_SLEEP_EXT_PRESERVE_TAGS", "tags", ("weights",),
    "pools whose live non-parameter bytes `live` keeps (`preserve_tags`)",
    "a comma list of pool tags, never kv_cache, runtime, cudagraph or workspace", parse_tags)
FILL_UNRESTORED = _bool("VLLM_SLEEP_EXT_FILL_UNRESTORED", False,
                        "on wake, fill bytes no backup restores with 0xFF (NaN), so lost state fails loudly")
KEEP_HOST = _bool("VLLM_SLEEP_EXT_KEEP_HOST", True,
                  "keep pinned host memory after a wake for the next sleep (`keep_host_backups`)")
HOST_POLICY = _one_of("VLLM_SLEEP_EXT_HOST_POLICY", ("pinned", "reclaimable", "release"), None,
                      "host backup memory between a wake and the next sleep (`host_policy`); wins over "
                      "VLLM_SLEEP_EXT_KEEP_HOST", "pinned (release if VLLM_SLEEP_EXT_KEEP_HOST is off)")
RECLAIMABLE_PINNED_SHARE = _float("VLLM_SLEEP_EXT_RECLAIMABLE_PINNED_SHARE", 0.0, 0.0, 1.0,
                                  "under `reclaimable`, the share of kept host memory that stays pinned")
PREPARE_HOST = _bool("VLLM_SLEEP_EXT_PREPARE_HOST", None,
                     "prepare host backup memory for level 1 (weights, runtime, CUDA graphs) in the background "
                     "as those pools are filled",
                     "on (CUDA), off (host backend)")
SLAB_BYTES = _bytes("VLLM_SLEEP_EXT_SLAB_BYTES",
                    "size of the slabs small allocations share (0: one physical handle per allocation)",
                    "64M")
WAKE_WAIT_MAX_S = 3600.0  # as the core's kMaxWakeWaitSeconds: past an hour, a wait is a hang
WAKE_WAIT_S = _float("VLLM_SLEEP_EXT_WAKE_WAIT_S", 0.0, 0.0, WAKE_WAIT_MAX_S,
                     "seconds a wake waits for device memory another process frees, mapping and copying what "
                     "fits meanwhile (0: fail at once; `wake_wait_seconds`)")

RECORD_ALLOCATIONS = _bool("VLLM_SLEEP_EXT_RECORD_ALLOCATIONS", False,
                           "record the Python stack of every CUDA allocation from the allocator's creation on, so "
                           "a report names who holds a kept range (`alloc_history`; costs a stack walk per "
                           "allocation)")

HOST_LIMIT = _bytes("VLLM_SLEEP_EXT_HOST_LIMIT",
                    "host memory backups may take (`host_memory_limit`); past it a sleep fails, or goes to "
                    "VLLM_SLEEP_EXT_DISK_DIR when that is set",
                    "0 (no limit)")
DISK_DIR = Setting(
    "VLLM_SLEEP_EXT_DISK_DIR", "dir", None,
    "directory for backups past VLLM_SLEEP_EXT_HOST_LIMIT (`disk_dir`): unnamed files, 0600, direct I/O",
    "an existing, writable directory", parse_dir, "none (no disk tier)")

COMPRESS = _one_of("VLLM_SLEEP_EXT_COMPRESS", ("off", "auto", "on"), "off",
                   "compress level-1 backups on the GPU (nvCOMP ANS; `compress`): auto keeps a piece compressed "
                   "only where it saves 5 %, on wherever it is smaller; both need libnvcomp.so.6 "
                   "(nvidia-libnvcomp-cu13), on fails without it, auto copies plain")

PRIME = _bool("VLLM_SLEEP_EXT_PRIME", True,
              "after a sleep releases memory, create and release one granule in the background at 0.3, 1 and 3 s, "
              "so the wake's first cuMemCreate finds none of the driver's deferred work (`prime_after_release`)")

SETTINGS = (DISABLE, PRESERVE, PRESERVE_TAGS, FILL_UNRESTORED, KEEP_HOST, HOST_POLICY, RECLAIMABLE_PINNED_SHARE,
            PREPARE_HOST, SLAB_BYTES, WAKE_WAIT_S, RECORD_ALLOCATIONS, HOST_LIMIT, DISK_DIR, COMPRESS, PRIME)


# -- reading ---------------------------------------------------------------------------------------

def raw(setting: Setting) -> str:
    """The variable as it is set ("" when it is not)."""
    return os.environ.get(setting.name, "")


def is_set(setting: Setting) -> bool:
    return bool(raw(setting).strip())


def get(setting: Setting) -> Any:
    """The variable's value, or its default when it is unset or empty; EnvError when it does not parse."""
    text = raw(setting)
    if not text.strip():
        return setting.default
    try:
        return setting.parse(text)
    except ValueError as e:
        raise EnvError(setting.name, text, setting.accepted, str(e)) from None


def set_from(setting: Setting, obj: object, attribute: str) -> None:
    """Sets ``obj.attribute`` to the variable's value, or to its default where it is unset; a default
    of None leaves ``obj``'s own.

    The owner of the option has the last word on what it accepts: a ValueError it raises for a value
    that was set names the variable too.
    """
    value = get(setting)
    if value is None:
        return
    try:
        setattr(obj, attribute, value)
    except ValueError as e:
        if not is_set(setting):
            raise
        raise EnvError(setting.name, raw(setting), setting.accepted, str(e)) from None


def invalid() -> list[EnvError]:
    """What is wrong with the variables as set: one EnvError per variable that does not parse."""
    errors = []
    for setting in SETTINGS:
        try:
            get(setting)
        except EnvError as e:
            errors.append(e)
    return errors


def markdown_table() -> str:
    rows = ["| variable | default | accepted | what |", "| --- | --- | --- | --- |"]
    rows += [f"| `{s.name}` | {s.shown_default()} | {s.accepted} | {s.help} |" for s in SETTINGS]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
