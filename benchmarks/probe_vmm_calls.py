"""Cost of each CUDA VMM driver call: per call for many 2 MiB allocations (what level 2 is made of),
and per size for one allocation of 2 MiB to 8 GiB (does a call cost per mapping or per byte?).

Times cuMemCreate, cuMemMap, cuMemSetAccess, cuMemUnmap and cuMemRelease one allocation at a time,
then the same with the allocations laid out back to back in one address reservation, where
cuMemSetAccess and cuMemUnmap can each cover the whole range in one call. The size sweep writes
the memory before it is unmapped (as a KV cache is written), and creates it again right after the
release and once more after a pause: the driver prepares released memory before it hands it out.
"""

from __future__ import annotations

import ctypes
import sys
import time

from cuvmm import device_access, device_prop


def size_sweep(cu, prop, access, check, sizes_mib: list[int], repeats: int = 3) -> None:
    """One allocation of each size: every call's time, then re-creation right after release."""
    import torch

    print(f"-- one allocation per size, {repeats} rounds each (ms; the memory is written before the unmap)")
    print(f"{'size MiB':>9} {'create':>8} {'map':>8} {'access':>8} {'unmap':>8} {'release':>8} "
          f"{'create again':>12} {'after 1 s':>10}")
    for mib in sizes_mib:
        size = mib << 20
        base = ctypes.c_ulonglong()
        check(cu.cuMemAddressReserve(ctypes.byref(base), ctypes.c_size_t(size), ctypes.c_size_t(0),
                                     ctypes.c_ulonglong(0), ctypes.c_ulonglong(0)), "reserve")
        for _ in range(repeats):
            h = ctypes.c_ulonglong()
            t = []

            def step(fn) -> None:
                t0 = time.perf_counter()
                fn()
                t.append((time.perf_counter() - t0) * 1e3)

            step(lambda: check(cu.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(size), ctypes.byref(prop),
                                              ctypes.c_ulonglong(0)), "create"))
            step(lambda: check(cu.cuMemMap(base, ctypes.c_size_t(size), ctypes.c_size_t(0), h,
                                           ctypes.c_ulonglong(0)), "map"))
            step(lambda: check(cu.cuMemSetAccess(base, ctypes.c_size_t(size), ctypes.byref(access),
                                                 ctypes.c_size_t(1)), "access"))
            check(cu.cuMemsetD8_v2(base, ctypes.c_ubyte(7), ctypes.c_size_t(size)), "memset")
            torch.cuda.synchronize()
            step(lambda: check(cu.cuMemUnmap(base, ctypes.c_size_t(size)), "unmap"))
            step(lambda: check(cu.cuMemRelease(h), "release"))
            step(lambda: check(cu.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(size), ctypes.byref(prop),
                                              ctypes.c_ulonglong(0)), "create"))
            check(cu.cuMemRelease(h), "release")
            time.sleep(1.0)
            step(lambda: check(cu.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(size), ctypes.byref(prop),
                                              ctypes.c_ulonglong(0)), "create"))
            check(cu.cuMemRelease(h), "release")
            print(f"{mib:9} " + " ".join(f"{x:8.3f}" for x in t[:5]) + f" {t[5]:12.3f} {t[6]:10.3f}", flush=True)
        check(cu.cuMemAddressFree(base, ctypes.c_size_t(size)), "free")


def parallel_sweep(cu, prop, access, check, count: int, size_mib: int, threads_list: list[int]) -> None:
    """`count` allocations of `size_mib`: release, then create + map + access, on 1..N threads at once."""
    import threading

    import torch

    context = ctypes.c_void_p()
    cu.cuCtxGetCurrent(ctypes.byref(context))
    size = size_mib << 20
    base = ctypes.c_ulonglong()
    check(cu.cuMemAddressReserve(ctypes.byref(base), ctypes.c_size_t(size * count), ctypes.c_size_t(0),
                                 ctypes.c_ulonglong(0), ctypes.c_ulonglong(0)), "reserve")
    ptrs = [base.value + i * size for i in range(count)]
    handles = [ctypes.c_ulonglong() for _ in range(count)]

    def on_threads(threads: int, fn) -> float:
        chunks = [list(range(i, count, threads)) for i in range(threads)]

        def work(chunk: list[int]) -> None:
            cu.cuCtxSetCurrent(context)
            for i in chunk:
                fn(i)

        t0 = time.perf_counter()
        workers = [threading.Thread(target=work, args=(c,)) for c in chunks]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return (time.perf_counter() - t0) * 1e3

    def create_map(i: int) -> None:
        check(cu.cuMemCreate(ctypes.byref(handles[i]), ctypes.c_size_t(size), ctypes.byref(prop),
                             ctypes.c_ulonglong(0)), "create")
        check(cu.cuMemMap(ctypes.c_ulonglong(ptrs[i]), ctypes.c_size_t(size), ctypes.c_size_t(0), handles[i],
                          ctypes.c_ulonglong(0)), "map")
        check(cu.cuMemSetAccess(ctypes.c_ulonglong(ptrs[i]), ctypes.c_size_t(size), ctypes.byref(access),
                                ctypes.c_size_t(1)), "access")

    def unmap_release(i: int) -> None:
        check(cu.cuMemUnmap(ctypes.c_ulonglong(ptrs[i]), ctypes.c_size_t(size)), "unmap")
        check(cu.cuMemRelease(handles[i]), "release")

    print(f"-- {count} allocations of {size_mib} MiB ({count * size / (1 << 30):.0f} GiB), driver calls on "
          f"several threads at once (ms, wall clock)")
    print(f"{'threads':>8} {'unmap+release':>14} {'create+map+access':>18} {'after 1 s: release':>19} "
          f"{'create+map+access':>18}")
    on_threads(1, create_map)
    for threads in threads_list:
        check(cu.cuMemsetD8_v2(base, ctypes.c_ubyte(7), ctypes.c_size_t(size * count)), "memset")
        torch.cuda.synchronize()
        rel = on_threads(threads, unmap_release)
        cre = on_threads(threads, create_map)
        torch.cuda.synchronize()
        rel2 = on_threads(threads, unmap_release)
        time.sleep(1.0)
        cre2 = on_threads(threads, create_map)
        print(f"{threads:8} {rel:14.2f} {cre:18.2f} {rel2:19.2f} {cre2:18.2f}", flush=True)
    on_threads(1, unmap_release)
    check(cu.cuMemAddressFree(base, ctypes.c_size_t(size * count)), "free")


def main(n: int = 600, size: int = 2 << 20) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mib", type=int, nargs="*", default=[2, 64, 1024, 8192])
    parser.add_argument("--skip-small", action="store_true", help="skip the 600 x 2 MiB part")
    parser.add_argument("--parallel", type=str, nargs="*", default=["8x6144", "256x64"],
                        help="COUNTxMIB sets for the multi-thread part")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    import torch

    torch.cuda.init()
    torch.zeros(1, device="cuda")  # the primary context is current from here on
    cu = ctypes.CDLL("libcuda.so.1")
    prop, access = device_prop(0), device_access(0)

    def check(r: int, what: str) -> None:
        if r != 0:
            raise RuntimeError(f"{what} failed: {r}")

    def timed(label: str, fn, count: int) -> None:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        print(f"{label:48} {dt * 1e3:8.2f} ms  {dt / count * 1e6:7.1f} us/allocation", flush=True)

    for layout in () if args.skip_small else ("separate reservations", "one reservation, back to back"):
        print(f"-- {n} allocations of {size >> 20} MiB, {layout}")
        handles = [ctypes.c_ulonglong() for _ in range(n)]
        if layout.startswith("separate"):
            ptrs = []
            for _ in range(n):
                p = ctypes.c_ulonglong()
                check(cu.cuMemAddressReserve(ctypes.byref(p), ctypes.c_size_t(size), ctypes.c_size_t(size),
                                             ctypes.c_ulonglong(0), ctypes.c_ulonglong(0)), "reserve")
                ptrs.append(p.value)
        else:
            base = ctypes.c_ulonglong()
            check(cu.cuMemAddressReserve(ctypes.byref(base), ctypes.c_size_t(size * n), ctypes.c_size_t(size),
                                         ctypes.c_ulonglong(0), ctypes.c_ulonglong(0)), "reserve")
            ptrs = [base.value + i * size for i in range(n)]
        for cycle in range(2):
            timed("cuMemCreate", lambda: [check(cu.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(size),
                                                               ctypes.byref(prop), ctypes.c_ulonglong(0)), "create")
                                          for h in handles], n)
            timed("cuMemMap", lambda: [check(cu.cuMemMap(ctypes.c_ulonglong(p), ctypes.c_size_t(size),
                                                         ctypes.c_size_t(0), h, ctypes.c_ulonglong(0)), "map")
                                       for p, h in zip(ptrs, handles)], n)
            if layout.startswith("separate"):
                timed("cuMemSetAccess, one call each", lambda: [check(cu.cuMemSetAccess(
                    ctypes.c_ulonglong(p), ctypes.c_size_t(size), ctypes.byref(access), ctypes.c_size_t(1)), "access")
                    for p in ptrs], n)
                timed("cuMemUnmap, one call each", lambda: [check(cu.cuMemUnmap(
                    ctypes.c_ulonglong(p), ctypes.c_size_t(size)), "unmap") for p in ptrs], n)
            else:
                timed("cuMemSetAccess, one call for all", lambda: check(cu.cuMemSetAccess(
                    ctypes.c_ulonglong(ptrs[0]), ctypes.c_size_t(size * n), ctypes.byref(access),
                    ctypes.c_size_t(1)), "access"), n)
                torch.cuda.synchronize()
                timed("cuMemUnmap, one call for all", lambda: check(cu.cuMemUnmap(
                    ctypes.c_ulonglong(ptrs[0]), ctypes.c_size_t(size * n)), "unmap"), n)
            timed("cuMemRelease", lambda: [check(cu.cuMemRelease(h), "release") for h in handles], n)
    if args.sizes_mib:
        size_sweep(cu, prop, access, check, args.sizes_mib)
    for spec in args.parallel:
        count, mib = (int(x) for x in spec.split("x"))
        parallel_sweep(cu, prop, access, check, count, mib, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
