#include "cuda_driver.h"

#include <dlfcn.h>

#include <mutex>

#include "errors.h"

namespace vse {
namespace {

using GetProcAddressV2 = CUresult (*)(const char*, void**, int, cuuint64_t, CUdriverProcAddressQueryResult*);
using GetProcAddressV1 = CUresult (*)(const char*, void**, int, cuuint64_t);

CudaDriver load_driver() {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* why = dlerror();
    throw DriverUnavailable(std::string("no CUDA driver found: dlopen(\"libcuda.so.1\") failed: ") +
                            (why ? why : "unknown reason"));
  }
  auto v2 = reinterpret_cast<GetProcAddressV2>(dlsym(lib, "cuGetProcAddress_v2"));
  auto v1 = reinterpret_cast<GetProcAddressV1>(dlsym(lib, "cuGetProcAddress"));
  if (!v2 && !v1) throw DriverUnavailable("no CUDA driver found: libcuda.so.1 has no cuGetProcAddress (driver too old)");

  auto lookup = [&](const char* name, int version, void** fn) {
    CUresult r = v2 ? v2(name, fn, version, CU_GET_PROC_ADDRESS_DEFAULT, nullptr)
                    : v1(name, fn, version, CU_GET_PROC_ADDRESS_DEFAULT);
    if (r != CUDA_SUCCESS || *fn == nullptr)
      throw DriverUnavailable(std::string("CUDA driver lacks ") + name + " (error " + std::to_string(r) + ")");
  };
  CudaDriver d;
#define VSE_LOOKUP(name, version) lookup(#name, version, reinterpret_cast<void**>(&d.name));
  VSE_DRIVER_FUNCTIONS(VSE_LOOKUP)
#undef VSE_LOOKUP

  CUresult r = d.cuInit(0);
  if (r != CUDA_SUCCESS) {
    const char* name = nullptr;
    d.cuGetErrorName(r, &name);
    throw DriverUnavailable(std::string("CUDA driver found but cuInit(0) failed: ") + (name ? name : "?") + " (" +
                            std::to_string(r) + ")");
  }
  d.cuDriverGetVersion(&d.version);
  return d;
}

}  // namespace

const CudaDriver& cuda_driver() {
  // A failed load is not cached: the error is thrown again (and may differ) on the next call.
  static std::mutex mutex;
  static CudaDriver* loaded = nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  if (!loaded) loaded = new CudaDriver(load_driver());  // never freed: the driver outlives static destructors
  return *loaded;
}

void check_cuda(const CudaDriver& d, CUresult result, const char* call, OutOfMemory oom) {
  if (result == CUDA_SUCCESS) return;
  const char* name = nullptr;
  const char* text = nullptr;
  if (d.cuGetErrorName) d.cuGetErrorName(result, &name);
  if (d.cuGetErrorString) d.cuGetErrorString(result, &text);
  std::string message = std::string(call) + " failed: " + (name ? name : "CUDA_ERROR_?") + " (" +
                        std::to_string(static_cast<int>(result)) + "): " + (text ? text : "no description");
  if (result == CUDA_ERROR_OUT_OF_MEMORY) {
    if (oom == OutOfMemory::Host) throw HostOutOfMemory(message);
    throw DeviceOutOfMemory(message);
  }
  throw Error(message);
}

}  // namespace vse
