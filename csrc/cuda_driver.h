// The CUDA driver API, reached through dlopen("libcuda.so.1") + cuGetProcAddress, so the module
// imports on machines without a GPU or driver and only fails, clearly, when a GPU is asked for.
#pragma once

#include <cuda.h>

#include <string>

namespace vse {

struct CudaDriver {
// Each entry point is typed from cuda.h's own prototype and looked up under its base name.
#define VSE_DRIVER_FUNCTIONS(X)                                                                  \
  X(cuInit) X(cuDriverGetVersion) X(cuDeviceGetCount) X(cuDeviceGet) X(cuDevicePrimaryCtxRetain) \
  X(cuCtxPushCurrent) X(cuCtxPopCurrent) X(cuCtxSynchronize) X(cuMemGetInfo)                     \
  X(cuMemGetAllocationGranularity) X(cuMemAddressReserve) X(cuMemAddressFree) X(cuMemCreate)     \
  X(cuMemRelease) X(cuMemMap) X(cuMemUnmap) X(cuMemSetAccess) X(cuMemHostRegister)               \
  X(cuMemHostUnregister) X(cuMemcpyDtoHAsync) X(cuMemcpyHtoDAsync) X(cuStreamCreate)             \
  X(cuStreamSynchronize) X(cuGetErrorName) X(cuGetErrorString)
#define VSE_DECLARE(name) decltype(&::name) name = nullptr;
  VSE_DRIVER_FUNCTIONS(VSE_DECLARE)
#undef VSE_DECLARE

  int version = 0;
};

// Loads libcuda and calls cuInit once per process; throws DriverUnavailable saying why it can't.
const CudaDriver& cuda_driver();

// Throws Error (DeviceOutOfMemory for CUDA_ERROR_OUT_OF_MEMORY) naming the call, the code and its name.
void check_cuda(CUresult result, const char* call);

}  // namespace vse

#define VSE_CUDA_CHECK(call) ::vse::check_cuda((call), #call)
