"""How fast can host memory that is already resident be pinned, and what does pinning cost a serving loop?

Two questions behind the "reclaimable" host policy and the background prepare:

1. Re-pinning. A reclaimable arena is unpinned while the engine serves and pinned again at the next
   sleep. How fast does cuMemHostRegister go on memory that is already resident (transparent huge
   pages), by number of pinning threads and piece size? The sleep copies at about 55 GB/s, so
   pinning must beat that to stay off the critical path.
2. Interference. While a background thread pins (or only faults pages in) at a given rate, how many
   steps per second does a launch-bound loop on the main thread keep (small kernels, one sync each)?
3. Bouncing instead of pinning. How fast do CPU threads copy between a pinned buffer and resident
   pageable memory? A backup kept in pageable memory could be reached through a small pinned ring at
   the PCIe rate only if this is well above it.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import sys
import threading
import time

MiB = 1 << 20
GiB = 1 << 30
CU_MEMHOSTREGISTER_PORTABLE = 1
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--piece-mib", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--rates-gbs", type=float, nargs="+", default=[0.5, 1, 2])
    parser.add_argument("--probe-s", type=float, default=3.0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["pin", "interference", "bounce"])
    args = parser.parse_args()

    import torch

    torch.zeros(1, device="cuda")
    cu = ctypes.CDLL("libcuda.so.1")
    context = ctypes.c_void_p()
    cu.cuCtxGetCurrent(ctypes.byref(context))  # torch's primary context; each thread makes it current

    def on_this_thread() -> None:
        cu.cuCtxSetCurrent(context)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    nbytes = int(args.gib * GiB)
    buf = mmap.mmap(-1, nbytes + 2 * MiB)
    raw = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    base = (raw + 2 * MiB - 1) // (2 * MiB) * (2 * MiB)
    libc.madvise(base, nbytes, MADV_HUGEPAGE)
    t0 = time.perf_counter()
    if libc.madvise(base, nbytes, MADV_POPULATE_WRITE) != 0:
        ctypes.memset(base, 0, nbytes)
    print(f"populated {nbytes / GiB:.1f} GiB in {time.perf_counter() - t0:.2f} s", flush=True)

    def register(ptr: int, size: int) -> None:
        r = cu.cuMemHostRegister_v2(ctypes.c_void_p(ptr), ctypes.c_size_t(size), ctypes.c_uint(CU_MEMHOSTREGISTER_PORTABLE))
        if r != 0:
            raise RuntimeError(f"cuMemHostRegister failed: {r}")

    def unregister(ptr: int) -> None:
        r = cu.cuMemHostUnregister(ctypes.c_void_p(ptr))
        if r != 0:
            raise RuntimeError(f"cuMemHostUnregister failed: {r}")

    print("-- 1. pinning resident memory (GB/s, wall clock; unpinning after each)")
    print(f"{'threads':>8} " + " ".join(f"{p:>6} MiB" for p in args.piece_mib) + "   unpin GB/s (1 thread)")
    for threads in () if "pin" in args.skip else args.threads:
        cells = []
        unpin_rate = 0.0
        for piece_mib in args.piece_mib:
            piece = piece_mib * MiB
            starts = list(range(0, nbytes - piece + 1, piece))
            nxt = iter(starts)
            lock = threading.Lock()

            def work() -> None:
                on_this_thread()
                while True:
                    with lock:
                        off = next(nxt, None)
                    if off is None:
                        return
                    register(base + off, piece)

            t0 = time.perf_counter()
            workers = [threading.Thread(target=work) for _ in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            dt = time.perf_counter() - t0
            cells.append(len(starts) * piece / dt / 1e9)
            t0 = time.perf_counter()
            for off in starts:
                unregister(base + off)
            unpin_rate = len(starts) * piece / (time.perf_counter() - t0) / 1e9
        print(f"{threads:8} " + " ".join(f"{c:10.1f}" for c in cells) + f"   {unpin_rate:.1f}", flush=True)

    # -- 2. interference with a launch-bound loop -------------------------------------------------
    x = torch.ones(1 << 16, device="cuda")

    def steps_per_s(seconds: float) -> float:
        n = 0
        torch.cuda.synchronize()
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            for _ in range(8):
                x.mul_(1.0)
            torch.cuda.synchronize()
            n += 1
        return n / seconds

    def background(kind: str, rate: float, piece: int, stop: threading.Event) -> None:
        on_this_thread()
        off = 0
        pinned = []
        t_start = time.perf_counter()
        done = 0
        while not stop.is_set() and off + piece <= nbytes:
            if kind == "pin":
                register(base + off, piece)
                pinned.append(base + off)
            else:  # fault in: drop the pages, then populate them again (what a fresh arena costs)
                libc.madvise(base + off, piece, 4)  # MADV_DONTNEED
                libc.madvise(base + off, piece, MADV_POPULATE_WRITE)
            off += piece
            done += piece
            ahead = done / rate - (time.perf_counter() - t_start)
            if ahead > 0:
                stop.wait(ahead)
        for p in pinned:
            unregister(p)

    if "bounce" not in args.skip:
        bounce(torch, base, nbytes, args.threads + [12])
    if "interference" in args.skip:
        return 0
    print("-- 2. launch-bound loop (8 small kernels + sync per step) with background host work")
    idle = steps_per_s(args.probe_s)
    print(f"{'background':>22} {'rate GB/s':>9} {'piece MiB':>9} {'steps/s':>9} {'x idle':>7}")
    print(f"{'none':>22} {'':>9} {'':>9} {idle:9.0f} {1.0:7.3f}", flush=True)
    for kind in ("pin", "populate"):
        for rate in args.rates_gbs:
            for piece_mib in (16, 64):
                stop = threading.Event()
                th = threading.Thread(target=background, args=(kind, rate * 1e9, piece_mib * MiB, stop))
                th.start()
                busy = steps_per_s(args.probe_s)
                stop.set()
                th.join()
                print(f"{kind:>22} {rate:9.1f} {piece_mib:9} {busy:9.0f} {busy / idle:7.3f}", flush=True)
    idle2 = steps_per_s(args.probe_s)
    print(f"{'none (again)':>22} {'':>9} {'':>9} {idle2:9.0f} {idle2 / idle:7.3f}")
    return 0


def bounce(torch, base: int, nbytes: int, threads_list: list[int]) -> None:
    """CPU copy bandwidth between a 1 GiB pinned buffer and resident pageable memory, by threads."""
    ring = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    ring.fill_(1)
    pageable = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(base), dtype=torch.uint8)
    print("-- 3. CPU copies, pinned 1 GiB <-> resident pageable (GB/s), torch.Tensor.copy_ on N threads")
    print(f"{'threads':>8} {'to pageable':>12} {'from pageable':>14}")
    saved = torch.get_num_threads()
    for threads in threads_list:
        torch.set_num_threads(threads)
        rates = []
        for direction in ("to", "from"):
            t0 = time.perf_counter()
            for off in range(0, nbytes - GiB + 1, GiB):
                if direction == "to":
                    pageable[off:off + GiB].copy_(ring)
                else:
                    ring.copy_(pageable[off:off + GiB])
            rates.append((nbytes // GiB) * GiB / (time.perf_counter() - t0) / 1e9)
        print(f"{threads:8} {rates[0]:12.1f} {rates[1]:14.1f}", flush=True)
    torch.set_num_threads(saved)


if __name__ == "__main__":
    sys.exit(main())
