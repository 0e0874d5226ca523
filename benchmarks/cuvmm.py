"""The CUDA driver's VMM calls through ctypes, for the probes that time them one by one (probe_vmm_calls.py,
probe_wake_overlap.py): the structs the calls take and a small wrapper over libcuda.so.1 whose calls raise
with the call's name and CUresult instead of returning codes. No CUDA toolkit needed, only the driver."""

from __future__ import annotations

import ctypes
CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
CU_STREAM_NON_BLOCKING = 1  # as the core's copy stream (csrc/cuda_backend.cpp)


class Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class Prop(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", AllocFlags)]


class AccessDesc(ctypes.Structure):
    _fields_ = [("location", Location), ("flags", ctypes.c_int)]


def device_prop(device: int = 0) -> Prop:
    return Prop(CU_MEM_ALLOCATION_TYPE_PINNED, 0, Location(CU_MEM_LOCATION_TYPE_DEVICE, device))


def device_access(device: int = 0) -> AccessDesc:
    return AccessDesc(Location(CU_MEM_LOCATION_TYPE_DEVICE, device), CU_MEM_ACCESS_FLAGS_PROT_READWRITE)


class Driver:
    """libcuda's VMM, stream and event calls for one device; the caller makes a context current first
    (e.g. torch.zeros(1, device="cuda")) and on every thread it calls from (set_current)."""

    def __init__(self, device: int = 0, lib: str = "libcuda.so.1"):
        self.cu = ctypes.CDLL(lib)
        self.prop = device_prop(device)
        self.access = device_access(device)
        u64, size = ctypes.c_ulonglong, ctypes.c_size_t
        self.cu.cuMemcpyHtoDAsync_v2.argtypes = [u64, ctypes.c_void_p, size, ctypes.c_void_p]
        self.cu.cuMemsetD8Async.argtypes = [u64, ctypes.c_ubyte, size, ctypes.c_void_p]
        self.cu.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        # CUDA 12.8 added a _v2 (the same call for timing events); older drivers have only the first
        self._elapsed = getattr(self.cu, "cuEventElapsedTime_v2", None) or self.cu.cuEventElapsedTime
        self._elapsed.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
        self.cu.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
        self.cu.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]

    def check(self, result: int, what: str) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self.cu.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"{what} failed: CUresult {result} ({(name.value or b'?').decode()})")

    # -- context, memory info
    def current_context(self) -> ctypes.c_void_p:
        ctx = ctypes.c_void_p()
        self.check(self.cu.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            raise RuntimeError("no CUDA context is current on this thread (initialize the device first)")
        return ctx

    def set_current(self, ctx: ctypes.c_void_p) -> None:
        self.check(self.cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def mem_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.check(self.cu.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
        return free.value, total.value

    def granularity(self) -> int:
        g = ctypes.c_size_t()
        self.check(self.cu.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(self.prop),
                                                         CU_MEM_ALLOC_GRANULARITY_MINIMUM), "granularity")
        return g.value

    # -- VMM
    def reserve(self, size: int) -> int:
        base = ctypes.c_ulonglong()
        self.check(self.cu.cuMemAddressReserve(ctypes.byref(base), ctypes.c_size_t(size), ctypes.c_size_t(0),
                                               ctypes.c_ulonglong(0), ctypes.c_ulonglong(0)), "cuMemAddressReserve")
        return base.value

    def address_free(self, base: int, size: int) -> None:
        self.check(self.cu.cuMemAddressFree(ctypes.c_ulonglong(base), ctypes.c_size_t(size)), "cuMemAddressFree")

    def create(self, size: int) -> int:
        h = ctypes.c_ulonglong()
        self.check(self.cu.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(size), ctypes.byref(self.prop),
                                       ctypes.c_ulonglong(0)), f"cuMemCreate({size} bytes)")
        return h.value

    def map(self, ptr: int, size: int, handle: int) -> None:
        self.check(self.cu.cuMemMap(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0),
                                    ctypes.c_ulonglong(handle), ctypes.c_ulonglong(0)), "cuMemMap")

    def set_access(self, ptr: int, size: int) -> None:
        self.check(self.cu.cuMemSetAccess(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size), ctypes.byref(self.access),
                                          ctypes.c_size_t(1)), "cuMemSetAccess")

    def unmap(self, ptr: int, size: int) -> None:
        self.check(self.cu.cuMemUnmap(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size)), "cuMemUnmap")

    def release(self, handle: int) -> None:
        self.check(self.cu.cuMemRelease(ctypes.c_ulonglong(handle)), "cuMemRelease")

    # -- streams, events, copies
    def stream(self) -> ctypes.c_void_p:
        s = ctypes.c_void_p()
        self.check(self.cu.cuStreamCreate(ctypes.byref(s), ctypes.c_uint(CU_STREAM_NON_BLOCKING)), "cuStreamCreate")
        return s

    def sync(self, stream: ctypes.c_void_p) -> None:
        self.check(self.cu.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def event(self) -> ctypes.c_void_p:
        e = ctypes.c_void_p()
        self.check(self.cu.cuEventCreate(ctypes.byref(e), ctypes.c_uint(0)), "cuEventCreate")
        return e

    def record(self, event: ctypes.c_void_p, stream: ctypes.c_void_p) -> None:
        self.check(self.cu.cuEventRecord(event, stream), "cuEventRecord")

    def elapsed_s(self, start: ctypes.c_void_p, end: ctypes.c_void_p) -> float:
        ms = ctypes.c_float()
        self.check(self._elapsed(ctypes.byref(ms), start, end), "cuEventElapsedTime")
        return ms.value / 1e3

    def copy_h2d(self, dst: int, src: int, size: int, stream: ctypes.c_void_p) -> None:
        self.check(self.cu.cuMemcpyHtoDAsync_v2(dst, ctypes.c_void_p(src), size, stream), "cuMemcpyHtoDAsync")

    def memset_d8(self, dst: int, value: int, size: int, stream: ctypes.c_void_p) -> None:
        self.check(self.cu.cuMemsetD8Async(dst, value, size, stream), "cuMemsetD8Async")


def round_down(n: int, step: int) -> int:
    return n // step * step
