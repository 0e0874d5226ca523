"""Run inside an environment with vLLM and vllm_sleep_ext installed: does vLLM pick us up by itself?"""

import ctypes
import importlib.metadata
import sys


def libcuda_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def main() -> int:
    if not libcuda_loads():
        # vLLM's own allocator extension links libcuda, so without a driver its cumem module fails to
        # import. Tell vLLM what a platform without that extension says (ModuleNotFoundError, which
        # its cumem.py handles) so the module imports and the swap can be checked here too.
        sys.modules["vllm.cumem_allocator"] = None
        print("no CUDA driver here: vllm.cumem_allocator marked absent, as on a platform without it")
    import vllm
    from vllm.plugins import load_general_plugins

    names = [ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins")]
    print(f"vLLM {vllm.__version__}; general plugins installed: {names}")
    load_general_plugins()

    import vllm.device_allocator.cumem as cumem

    import vllm_sleep_ext

    swapped = cumem.CuMemAllocator is vllm_sleep_ext.CuMemAllocator
    print(f"vllm.device_allocator.cumem.CuMemAllocator is {cumem.CuMemAllocator.__module__}."
          f"{cumem.CuMemAllocator.__qualname__}; cumem_available={cumem.cumem_available}")
    print("PASS: vLLM's plugin loader installed vllm_sleep_ext's allocator" if swapped else
          "FAIL: vLLM still uses its own allocator")
    return 0 if swapped else 1


if __name__ == "__main__":
    sys.exit(main())
