// Process-wide state behind the pluggable-allocator entry points, which get no context argument:
// the one CUDA allocator of the process, and the pool tag each thread is allocating for.
#pragma once

#include <functional>
#include <optional>
#include <string>

#include "allocator.h"

namespace vse {

// Created on first use; throws DriverUnavailable (and tries again next call) when there is no driver.
Allocator& process_cuda_allocator();

// PyTorch routes a MemPool's allocations through the thread that entered it, so the tag is per thread.
std::optional<std::string> set_thread_tag(std::optional<std::string> tag);  // returns the previous one
std::optional<std::string> thread_tag();

AllocatorOptions default_options();

// The work of the pluggable allocator's my_malloc/my_free, which must not throw. A failed allocation
// returns 0 (PyTorch raises its own error then). Running out of device memory is said nowhere: PyTorch
// frees its cache and retries, and raises OutOfMemoryError if that fails too; any other failure goes to
// warn(), as does a failed free.
// `may_synchronize`: see Allocator::allocate.
uintptr_t allocate_or_null(Allocator& allocator, int64_t size, int device, const std::string& tag,
                           const std::function<bool()>& may_synchronize = [] { return true; }) noexcept;
uintptr_t process_allocate_or_null(int64_t size, int device, const std::string& tag,
                                   const std::function<bool()>& may_synchronize) noexcept;
void process_free_or_warn(uintptr_t address) noexcept;

}  // namespace vse

namespace vse {
// A new allocator over the named backend: "host", "host-async" (copies complete later, on a thread, as on
// a GPU) or "cuda"; `capacity` applies to the host ones only. Host backends given the same `card` name
// share one simulated card of `capacity`, as processes share a GPU ("": a card of their own).
std::unique_ptr<Allocator> make_allocator(const std::string& backend, uint64_t capacity, const std::string& card = "");
}  // namespace vse
