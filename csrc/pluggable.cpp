// The ABI of torch.cuda.memory.CUDAPluggableAllocator: C entry points, found by name in this module's
// shared object. Exceptions must not cross this boundary; process.cpp does the work and says what failed.
#include <cuda.h>
#include <sys/types.h>

#include "cuda_backend.h"
#include "process.h"

#define VSE_EXPORT extern "C" __attribute__((visibility("default")))

// Allocations of the pools of CuMemAllocator: tagged with the pool tag of the calling thread. A malloc
// whose stream is not capturing is a point where synchronizing is safe: PyTorch allows no other work
// in the process while a global capture runs (Note [Allocation states], "Wait before reuse").
VSE_EXPORT void* my_malloc(ssize_t size, int device, CUstream stream) {
  return reinterpret_cast<void*>(vse::process_allocate_or_null(size, device, vse::thread_tag().value_or("default"),
                                                               [stream] { return !vse::stream_is_capturing(stream); }));
}
VSE_EXPORT void my_free(void* ptr, ssize_t, int, CUstream) {
  vse::process_free_or_warn(reinterpret_cast<uintptr_t>(ptr));
}
