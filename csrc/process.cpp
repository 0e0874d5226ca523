#include "process.h"

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <thread>

#include "async_host_backend.h"
#include "cuda_backend.h"
#include "errors.h"
#include "host_backend.h"

namespace vse {
namespace {
thread_local std::optional<std::string> current_tag;
}

AllocatorOptions default_options() {
  AllocatorOptions options;
  // Measured on a 16-core H200 host (benchmarks/probe_staging.py, RESULTS.md): page population
  // stops scaling past ~8 threads, and 32 MiB pieces start copies early without many small pins.
  options.staging.threads = std::clamp(std::thread::hardware_concurrency() / 2, 1u, 8u);
  options.staging.piece_bytes = 32ull << 20;
  // Level 2 costs per physical handle (benchmarks/RESULTS.md, VMM call costs): PyTorch's 2 and 20 MiB
  // segments share 64 MiB slabs, one handle each (Note [Allocation states] in allocator.h).
  options.slab_bytes = 64ull << 20;
  return options;
}

Allocator& process_cuda_allocator() {
  static std::mutex mutex;
  static Allocator* instance = nullptr;  // never destroyed: the driver may be gone at static destruction
  std::lock_guard<std::mutex> lock(mutex);
  if (!instance) {
    instance = new Allocator(std::make_unique<CudaBackend>());
    instance->set_options(default_options());
  }
  return *instance;
}

std::optional<std::string> set_thread_tag(std::optional<std::string> tag) {
  std::optional<std::string> previous = std::move(current_tag);
  current_tag = std::move(tag);
  return previous;
}

std::optional<std::string> thread_tag() { return current_tag; }

uintptr_t allocate_or_null(Allocator& allocator, int64_t size, int device, const std::string& tag,
                           const std::function<bool()>& may_synchronize) noexcept {
  try {
    if (size <= 0) throw InvalidArgument("allocation size must be positive, got " + std::to_string(size));
    return allocator.allocate(static_cast<uint64_t>(size), device, tag, may_synchronize);
  } catch (const DeviceOutOfMemory&) {
    return 0;
  } catch (const std::exception& e) {
    warn("allocating " + std::to_string(size) + " bytes on device " + std::to_string(device) + " for tag '" + tag +
         "' failed: " + e.what());
    return 0;
  }
}

uintptr_t process_allocate_or_null(int64_t size, int device, const std::string& tag,
                                   const std::function<bool()>& may_synchronize) noexcept {
  Allocator* allocator = nullptr;
  warn_on_failure("setting up the CUDA allocator", [&] { allocator = &process_cuda_allocator(); });
  return allocator ? allocate_or_null(*allocator, size, device, tag, may_synchronize) : 0;
}

void process_free_or_warn(uintptr_t address) noexcept {
  char what[64];
  std::snprintf(what, sizeof what, "freeing %#lx", static_cast<unsigned long>(address));
  warn_on_failure(what, [&] { process_cuda_allocator().free(address); });
}

}  // namespace vse

namespace vse {
std::unique_ptr<Allocator> make_allocator(const std::string& backend, uint64_t capacity, const std::string& card) {
  if (!card.empty() && backend == "cuda") throw InvalidArgument("a shared card is for the host backends only");
  auto host_card = [&] {
    return card.empty() ? std::make_shared<HostCard>(capacity) : HostCard::named(card, capacity);
  };
  std::unique_ptr<Allocator> allocator;
  if (backend == "host")
    allocator = std::make_unique<Allocator>(std::make_unique<HostBackend>(host_card()));
  else if (backend == "host-async")
    allocator = std::make_unique<Allocator>(std::make_unique<AsyncHostBackend>(host_card()));
  else if (backend == "cuda")
    allocator = std::make_unique<Allocator>(std::make_unique<CudaBackend>());
  else
    throw InvalidArgument("unknown backend '" + backend + "': expected 'host', 'host-async' or 'cuda'");
  allocator->set_options(default_options());
  return allocator;
}
}  // namespace vse
