// Process-wide state behind the pluggable-allocator entry points, which get no context argument:
// the one CUDA allocator of the process, and the pool tag each thread is allocating for.
#pragma once

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

}  // namespace vse

namespace vse {
// A new allocator over the named backend ("host" or "cuda"); `capacity` applies to "host" only.
std::unique_ptr<Allocator> make_allocator(const std::string& backend, uint64_t capacity);
}  // namespace vse
