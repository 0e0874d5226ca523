"""Issue 18 section 2's probe: the machine's own sequential direct-I/O rate, to judge the disk tier by.

Writes, then reads back, --gib GiB (default 8) of one unnamed file in --dir, the way the disk tier does
(Note [Disk tier], csrc/disk_tier.h): O_TMPFILE, space reserved with fallocate first, O_DIRECT, 16 MiB
chunks from page-aligned host buffers (pinned with cudaHostRegister where CUDA is there), --threads
threads (default 4, the tier's default) each taking the next chunk, two buffers per thread. No device
copies: this is the disk alone. Where the filesystem refuses O_DIRECT, buffered I/O (said in the output:
then the read rate is the page cache's, not the disk's). Prints a table and a DISK summary line; JSON to
--out DIR (probe_disk.json), which bench_disk_tier.py reads or calls `measure()` directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import mmap
import os
import sys
import threading
import time
from typing import Optional

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 16 * MiB


@dataclasses.dataclass(frozen=True)
class DiskRates:
    dir: str
    bytes: int
    threads: int
    direct: bool
    write_gbps: float
    read_gbps: float


def open_unnamed(directory: str) -> tuple[int, bool]:
    """An unnamed file in `directory` (O_TMPFILE, 0600), direct I/O where the filesystem allows it."""
    flags = os.O_RDWR | getattr(os, "O_TMPFILE", 0)
    for direct in (True, False):
        try:
            return os.open(directory, flags | (os.O_DIRECT if direct else 0), 0o600), direct
        except OSError as e:
            if not direct or e.errno != 22:  # EINVAL: O_DIRECT refused
                raise
    raise AssertionError("unreachable")


def _pin(buffer: mmap.mmap) -> Optional[int]:
    """cudaHostRegister of the buffer where torch has CUDA (as the tier's staging is pinned); its address."""
    try:
        import ctypes

        import torch

        if not torch.cuda.is_available():
            return None
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        err = torch.cuda.cudart().cudaHostRegister(address, len(buffer), 0)
        return address if int(err) == 0 else None
    except Exception:  # noqa: BLE001 - pinning is only faithfulness here, not needed for the I/O
        return None


def _unpin(address: Optional[int]) -> None:
    if address is not None:
        import torch

        torch.cuda.cudart().cudaHostUnregister(address)


def _run(fd: int, nbytes: int, threads: int, buffers: list[mmap.mmap], write: bool) -> float:
    """Seconds to write (or read) [0, nbytes) in CHUNK pieces on `threads` threads."""
    next_chunk = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        slots = (memoryview(buffers[2 * index]), memoryview(buffers[2 * index + 1]))
        turn = 0
        try:
            while True:
                with lock:
                    k = next_chunk[0]
                    next_chunk[0] += 1
                offset = k * CHUNK
                if offset >= nbytes:
                    return
                length = min(CHUNK, nbytes - offset)
                view = slots[turn][:length]
                turn ^= 1
                done = 0
                while done < length:
                    n = (os.pwrite(fd, view[done:], offset + done) if write
                         else os.preadv(fd, [view[done:]], offset + done))
                    if n <= 0:
                        raise OSError(f"{'write' if write else 'read'} returned {n} at {offset + done}")
                    done += n
        except BaseException as e:  # noqa: BLE001 - raised again on the main thread
            errors.append(e)

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


def measure(directory: str, nbytes: int, threads: int = 4) -> DiskRates:
    nbytes = (nbytes + 4095) // 4096 * 4096
    buffers = [mmap.mmap(-1, CHUNK) for _ in range(2 * threads)]
    for b in buffers:
        b.write(os.urandom(4096) * (CHUNK // 4096))  # real bytes, resident
    pinned = [_pin(b) for b in buffers]
    fd, direct = open_unnamed(directory)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        write_s = _run(fd, nbytes, threads, buffers, write=True)
        if not direct:
            os.fsync(fd)
        read_s = _run(fd, nbytes, threads, buffers, write=False)
    finally:
        os.close(fd)
        for address in pinned:
            _unpin(address)
        for b in buffers:
            b.close()
    return DiskRates(directory, nbytes, threads, direct, nbytes / write_s / 1e9, nbytes / read_s / 1e9)


def table(r: DiskRates) -> str:
    mode = "O_DIRECT" if r.direct else "buffered (O_DIRECT refused: read rate is the page cache's)"
    return "\n".join([
        f"disk probe: {r.dir}, {r.bytes / GiB:.2f} GiB, {r.threads} threads, 16 MiB chunks, {mode}",
        "| direction | GB/s |",
        "| --- | --- |",
        f"| write (sequential) | {r.write_gbps:.2f} |",
        f"| read (sequential) | {r.read_gbps:.2f} |",
    ])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=os.environ.get("VSE_DISK_DIR", "/tmp"))
    p.add_argument("--gib", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--out", default=None, help="directory for probe_disk.json")
    args = p.parse_args(argv)
    r = measure(args.dir, int(args.gib * GiB), args.threads)
    print(table(r))
    print(f"DISK write {r.write_gbps:.2f} GB/s read {r.read_gbps:.2f} GB/s direct={int(r.direct)}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "probe_disk.json"), "w") as f:
            json.dump(dataclasses.asdict(r), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
