"""Units, progress lines, timing, and what the machine has (shared by every part of the benchmark)."""
from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import time
from typing import Any, Callable, Iterable, Optional

try:
    import torch
except Exception as _exc:  # noqa: BLE001 - any import failure means "no torch" here
    torch = None  # type: ignore[assignment]
    TORCH_IMPORT_ERROR: Optional[str] = f"{type(_exc).__name__}: {_exc}"
else:
    TORCH_IMPORT_ERROR = None

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

T0 = time.perf_counter()


def log(msg: str) -> None:
    """Parent-side progress line with the seconds since start."""
    say(f"[{time.perf_counter() - T0:6.1f}s] {msg}")


def say(msg: str) -> None:
    """Progress line, flushed at once (workers' lines are relayed by the parent)."""
    print(msg, flush=True)


def cuda_problem() -> Optional[str]:
    """Why this machine can't run a GPU benchmark, or None if it can."""
    if torch is None:
        return f"PyTorch is not importable ({TORCH_IMPORT_ERROR}); install torch with CUDA support."
    if not torch.cuda.is_available():
        return (f"no CUDA device available: torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
                "This benchmark needs an NVIDIA GPU and driver.")
    return None


def proc_kib_field(path: str, field: str) -> Optional[int]:
    """A "Field:   N kB" line of a /proc file, in bytes; None when the file or the field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return None


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (a large number if it can't be read)."""
    found = proc_kib_field("/proc/meminfo", "MemAvailable")
    return 1 << 50 if found is None else found


def lazyfree_bytes() -> Optional[int]:
    """Bytes of this process the kernel may take back at will (MADV_FREE'd, not yet reclaimed):
    LazyFree in /proc/self/smaps_rollup; None where the kernel does not say."""
    return proc_kib_field("/proc/self/smaps_rollup", "LazyFree")


def to_plain(obj: Any, depth: int = 0) -> Any:
    """Dataclass / namedtuple / pybind object -> JSON-able dicts and lists."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if depth > 6:
        return repr(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}
    if hasattr(obj, "_asdict"):
        return {k: to_plain(v, depth + 1) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {str(k): to_plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, depth + 1) for v in obj]
    out = {}
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            value = getattr(obj, name)
        except Exception:  # noqa: BLE001
            continue
        if not callable(value):
            out[name] = to_plain(value, depth + 1)
    return out or repr(obj)


def median(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def gbps(nbytes: Optional[int], seconds: Optional[float]) -> Optional[float]:
    if not nbytes or not seconds or seconds <= 0:
        return None
    return nbytes / seconds / 1e9


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of fn(), with the device idle before and after."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def mem_free() -> int:
    return int(torch.cuda.mem_get_info()[0])


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def clamp_bytes(requested: int, headroom: int, label: str, host_too: bool = False) -> int:
    """Requested bytes, limited to free device memory (and available host memory) minus headroom."""
    cap = mem_free() - headroom
    if host_too:
        cap = min(cap, host_available_bytes() - 8 * GiB)
    cap = max(cap, 64 * MiB)
    if requested > cap:
        say(f"  [clamp] {label}: {requested / GiB:.2f} GiB requested, "
            f"{cap / GiB:.2f} GiB fits with {headroom / GiB:g} GiB headroom -> using that")
        return cap
    return requested


def device_env() -> dict:
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    env = {"gpu": props.name, "total_gib": total / GiB, "free_gib_at_start": free / GiB,
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "host_mem_available_gib": host_available_bytes() / GiB, "cpus": os.cpu_count()}
    try:
        q = "driver_version,pcie.link.gen.current,pcie.link.width.current"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = out.stdout.strip()
    except Exception as exc:  # noqa: BLE001
        env["nvidia_smi"] = f"n/a ({type(exc).__name__})"
    return env
