"""Run inside an environment with vLLM and vllm_sleep_ext installed: does vLLM's own plugin loader pick
us up where we can serve, leave its allocator where we cannot, and show our lines in its log?

Each scenario runs in a fresh process (vLLM loads plugins once per process) with vLLM's logging as
vLLM configures it; the parent checks the class vLLM ends up with and what vLLM's log printed.
- cuda: a CUDA platform (faked here, no GPU needed): our class is installed, the "active" line is in
  vLLM's log, and a sleep/wake through vLLM 0.33's SleepModeBackendFactory ("cumem" backend) reaches
  our allocator (host backend standing in for the GPU) and logs its lines with GB/s in vLLM's log.
  Where vLLM has that registry, the name "vllm_sleep_ext" resolves to a CuMemBackend that is supported
  exactly where our class is installed (here and in no other scenario).
- platform: this machine's real platform (no GPU): vLLM keeps its allocator; the log says why.
- disabled: VLLM_SLEEP_EXT_DISABLE=1 on CUDA: vLLM keeps its allocator; the log says why.
- nocore: our compiled core fails to import: vLLM keeps its allocator, starts, and the log says why.
In every scenario a VLLM_SLEEP_EXT_* variable is set and vLLM's own start-up check of VLLM_* variables,
made strict (as --fail-on-environ-validation), must pass: the plugin declares our names to vLLM.
"""

import ctypes
import importlib.metadata
import json
import logging
import os
import subprocess
import sys

KEEPS = "vLLM keeps its own sleep-mode allocator"
SCENARIOS = {
    # name: (extra environment, our class installed?, text vLLM's log must show)
    "cuda": ({}, True, ["vLLM's sleep mode uses vllm_sleep_ext.CuMemAllocator", "preserve mode 'live'",
                        "sleep: released", "GB/s", "wake_up: mapped"]),
    "platform": ({}, False, [KEEPS]),
    "disabled": ({"VLLM_SLEEP_EXT_DISABLE": "1"}, False, ["turned off by VLLM_SLEEP_EXT_DISABLE=1", KEEPS]),
    "nocore": ({}, False, ["its core failed to load", KEEPS]),
}


def libcuda_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def configure_vllm_logging() -> None:
    """As each vLLM 0.33 process does before it loads plugins (0.26 did it on import of vllm.logger)."""
    import vllm.logger

    configure = getattr(vllm.logger, "_configure_vllm_root_logger", None)
    if configure is not None and not logging.getLogger("vllm").handlers:
        configure()


def fake_cuda_platform() -> None:
    """This machine's platform object, answering is_cuda() with True: all our plugin asks of it."""
    import vllm.platforms

    real = vllm.platforms.current_platform
    fake = type("FakeCudaPlatform", (type(real),), {"is_cuda": lambda self: True, "is_cuda_alike": lambda self: True})
    vllm.platforms.current_platform = fake()


def run_scenario(name: str) -> dict:
    if not libcuda_loads():
        # vLLM's own allocator extension links libcuda, so without a driver its cumem module fails to
        # import. Tell vLLM what a platform without that extension says (ModuleNotFoundError, which
        # its cumem.py handles) so the module imports and the swap can be checked here too.
        sys.modules["vllm.cumem_allocator"] = None
    if name == "nocore":
        sys.modules["vllm_sleep_ext._core"] = None  # as when the shared object does not load
    import vllm
    from vllm.plugins import load_general_plugins

    configure_vllm_logging()

    if name in ("cuda", "disabled", "nocore"):
        fake_cuda_platform()
    load_general_plugins()  # calls register() with no try, as in every vLLM process

    import vllm.device_allocator.cumem as cumem

    ours = cumem.CuMemAllocator.__module__.startswith("vllm_sleep_ext")
    facts = {"vllm": vllm.__version__, "installed": ours, "cumem_available": cumem.cumem_available,
             "named_backend": named_backend_facts()}
    facts["environ_validation"] = strict_environ_validation()
    if name == "cuda":
        facts["backend_path"] = sleep_and_wake_through_vllms_backend(cumem.CuMemAllocator)
    return facts


def strict_environ_validation() -> str:
    """vLLM's start-up check of VLLM_* variables with hard_fail (0.33: the platform's validate_environ,
    0.26: vllm.envs.validate_environ), over our variables only (whatever else this shell exports is not
    ours to judge): "passed", or why it refused."""
    import vllm.envs
    from vllm.platforms import current_platform

    check = getattr(current_platform, "validate_environ", None) or getattr(vllm.envs, "validate_environ", None)
    if check is None:
        return "no validate_environ in this vLLM"
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("VLLM_") and not k.startswith("VLLM_SLEEP_EXT_")]:
            del os.environ[key]
        check(True)
    except ValueError as e:
        return f"refused: {e}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return "passed"


def named_backend_facts() -> dict:
    """What vLLM's registry says of the name "vllm_sleep_ext" (--sleep-mode-backend): registered by our
    plugin, vLLM's CuMemBackend underneath, supported exactly where our class serves."""
    try:
        from vllm.device_allocator.sleep_mode_backend import CuMemBackend, SleepModeBackendFactory
    except ImportError:
        return {"registry": False}
    try:
        cls = SleepModeBackendFactory.get_backend_class("vllm_sleep_ext")
    except ValueError as e:
        return {"registry": True, "registered": False, "error": str(e)}
    return {"registry": True, "registered": True, "cumem_backend": issubclass(cls, CuMemBackend),
            "supported": cls.is_supported(), "preserves_communicators": cls.preserves_communicators(),
            "supports_durable_storage": cls.supports_durable_storage()}


def sleep_and_wake_through_vllms_backend(ours: type) -> str:
    """vLLM 0.33 sleeps through SleepModeBackendFactory's "cumem" backend, which asks
    get_mem_allocator_instance() -> cumem.CuMemAllocator.get_instance() at each call. With no GPU, our
    get_instance hands out an allocator on the host backend; everything above it is vLLM's code."""
    try:
        from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory
    except ImportError:
        return "no SleepModeBackendFactory in this vLLM"
    host = ours(backend="host", capacity_bytes=64 << 20)
    ours.get_instance = staticmethod(lambda: host)
    with host.use_memory_pool(tag="weights"):
        weights = host.empty((8 << 20,))
    backend = SleepModeBackendFactory.get_backend_class("cumem")()
    backend.suspend(level=1)
    assert host.stats().tags["weights"].backed_up_bytes >= weights.nbytes, "vLLM's backend did not reach us"
    backend.resume(None)
    return "SleepModeBackendFactory cumem backend -> vllm_sleep_ext allocator"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--scenario":
        print("FACTS " + json.dumps(run_scenario(sys.argv[2])), flush=True)
        return 0
    names = [ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins")]
    print(f"general plugins installed: {names}")
    failures = 0
    for name, (env, installed, lines) in SCENARIOS.items():
        environ = {k: v for k, v in os.environ.items() if k != "VLLM_SLEEP_EXT_DISABLE"}
        environ.update(env, VLLM_LOGGING_LEVEL="INFO", VLLM_CONFIGURE_LOGGING="1", VLLM_SLEEP_EXT_KEEP_HOST="1")
        run = subprocess.run([sys.executable, __file__, "--scenario", name], env=environ, capture_output=True,
                             text=True, timeout=600)
        log = run.stdout + run.stderr
        facts = next((json.loads(l[6:]) for l in run.stdout.splitlines() if l.startswith("FACTS ")), None)
        problems = []
        if run.returncode != 0 or facts is None:
            problems.append(f"the process failed (exit {run.returncode}): vLLM would not start")
        elif facts["installed"] != installed:
            problems.append(f"our class installed: {facts['installed']}, expected {installed}")
        problems += [f"vLLM's log lacks {line!r}" for line in lines if line not in log]
        if facts and facts.get("environ_validation") not in ("passed", "no validate_environ in this vLLM"):
            problems.append(f"vLLM's strict check of its variables: {facts.get('environ_validation')}")
        if "Unknown vLLM environment variable detected: VLLM_SLEEP_EXT_" in log:
            problems.append("vLLM's log warns of one of our variables as unknown")
        backend = (facts or {}).get("named_backend", {})
        if backend.get("registry") and not (
                backend.get("registered") and backend.get("cumem_backend") and backend.get("supported") == installed):
            problems.append(f"named backend 'vllm_sleep_ext': {backend} (supported should be {installed})")
        ours = [l for l in log.splitlines() if "vllm_sleep_ext" in l or "sleep: " in l or "wake_up: " in l]
        print(f"[{name}] {'PASS' if not problems else 'FAIL'} {facts}")
        for line in ours[:6]:
            print(f"    log| {line.strip()[:200]}")
        for p in problems:
            print(f"    {p}")
        if problems:
            print(log[-3000:])
        failures += bool(problems)
    print("PASS: vLLM's plugin loader installs vllm_sleep_ext where it can serve, leaves vLLM's allocator "
          "where it cannot, and vLLM's log says which" if not failures else f"FAIL: {failures} scenario(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
