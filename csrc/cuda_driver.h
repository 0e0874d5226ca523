// The CUDA driver API, reached through dlopen("libcuda.so.1") + cuGetProcAddress, so the module
// imports on machines without a GPU or driver and only fails, clearly, when a GPU is asked for.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <string>

namespace vse {

struct CudaDriver {
// Each entry point with the ABI version we ask cuGetProcAddress for, typed by cudaTypedefs.h's PFN for
// that version. (Asking for "the header's version" is wrong: under CUDA 13, cuCtxSynchronize resolves
// to a variant that takes a context argument while cuda.h still declares the old one.)
#define VSE_DRIVER_FUNCTIONS(X)                                                                          \
  X(cuInit, 2000) X(cuDriverGetVersion, 2020) X(cuDeviceGetCount, 2000) X(cuDeviceGet, 2000)             \
  X(cuDevicePrimaryCtxRetain, 7000) X(cuCtxPushCurrent, 4000) X(cuCtxPopCurrent, 4000)                   \
  X(cuCtxSynchronize, 2000) X(cuMemGetInfo, 3020) X(cuMemGetAllocationGranularity, 10020)                \
  X(cuMemAddressReserve, 10020) X(cuMemAddressFree, 10020) X(cuMemCreate, 10020) X(cuMemRelease, 10020)  \
  X(cuMemMap, 10020) X(cuMemUnmap, 10020) X(cuMemSetAccess, 10020) X(cuMemHostRegister, 6050)            \
  X(cuMemHostUnregister, 4000) X(cuMemcpyDtoHAsync, 3020) X(cuMemcpyHtoDAsync, 3020)                     \
  X(cuStreamCreate, 2000) X(cuStreamSynchronize, 2000) X(cuEventCreate, 2000) X(cuEventRecord, 2000)       \
  X(cuEventSynchronize, 2000) X(cuGetErrorName, 6000) X(cuGetErrorString, 6000)                         \
  X(cuDeviceGetAttribute, 2000) X(cuDeviceCanAccessPeer, 4000) X(cuMemsetD8Async, 3020)                 \
  X(cuThreadExchangeStreamCaptureMode, 10010) X(cuStreamIsCapturing, 10000)                            \
  X(cuStreamWaitEvent, 3020) X(cuEventDestroy, 4000)
#define VSE_DECLARE(name, version) PFN_##name##_v##version name = nullptr;
  VSE_DRIVER_FUNCTIONS(VSE_DECLARE)
#undef VSE_DECLARE

  int version = 0;
};

// Loads libcuda and calls cuInit once per process; throws DriverUnavailable saying why it can't.
const CudaDriver& cuda_driver();

// Which memory a call's CUDA_ERROR_OUT_OF_MEMORY is about: device memory (cuMemCreate) or host memory
// (cuMemHostRegister pins host pages; the README promises HostOutOfMemoryError for that).
enum class OutOfMemory { Device, Host };

// Throws Error naming the call, the code and its name (looked up in `driver`); CUDA_ERROR_OUT_OF_MEMORY
// throws DeviceOutOfMemory or HostOutOfMemory as `oom` says.
void check_cuda(const CudaDriver& driver, CUresult result, const char* call, OutOfMemory oom = OutOfMemory::Device);
inline void check_cuda(CUresult result, const char* call) {
  if (result != CUDA_SUCCESS) check_cuda(cuda_driver(), result, call);
}

}  // namespace vse

#define VSE_CUDA_CHECK(call) ::vse::check_cuda((call), #call)
