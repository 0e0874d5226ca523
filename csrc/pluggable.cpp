// The ABI of torch.cuda.memory.CUDAPluggableAllocator: C entry points, found by name in this module's
// shared object. Exceptions must not cross this boundary: a failure returns nullptr (PyTorch then
// raises its out-of-memory error) and is reported on stderr.
#include <cuda.h>
#include <sys/types.h>

#include <cstdio>
#include <exception>

#include "errors.h"
#include "process.h"

#define VSE_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

void* allocate(ssize_t size, int device, const std::string& tag) {
  try {
    if (size <= 0) throw vse::InvalidArgument("allocation size must be positive, got " + std::to_string(size));
    return reinterpret_cast<void*>(vse::process_cuda_allocator().allocate(static_cast<uint64_t>(size), device, tag));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vllm_sleep_ext: allocating %zd bytes on device %d for tag '%s' failed: %s\n", size, device,
                 tag.c_str(), e.what());
    return nullptr;
  }
}

void release(void* ptr) {
  try {
    vse::process_cuda_allocator().free(reinterpret_cast<uintptr_t>(ptr));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vllm_sleep_ext: freeing %p failed: %s\n", ptr, e.what());
  }
}

}  // namespace

// Allocations of the pools of CuMemAllocator: tagged with the pool tag of the calling thread.
VSE_EXPORT void* my_malloc(ssize_t size, int device, CUstream) {
  return allocate(size, device, vse::thread_tag().value_or("default"));
}
VSE_EXPORT void my_free(void* ptr, ssize_t, int, CUstream) { release(ptr); }
