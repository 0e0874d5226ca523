#include "device_memory.h"

#include "errors.h"

namespace vse {

DeviceMemory::DeviceMemory(DeviceBackend& backend, int device, uint64_t size)
    : backend_(backend), device_(device), size_(size) {
  address_ = backend_.reserve(device_, size_);
}

DeviceMemory::~DeviceMemory() {
  warn_on_failure("giving back device memory", [&] { release(); });
  warn_on_failure("freeing a reserved address range", [&] { backend_.unreserve(device_, address_, size_); });
}

void DeviceMemory::map() {
  if (mapped_) return;
  const bool fresh = !handle_;
  if (fresh) handle_ = backend_.create(device_, size_);
  try {
    backend_.map(device_, address_, size_, *handle_);
  } catch (...) {
    // A handle made here goes back at once; if even that fails it stays held for a later release.
    if (fresh)
      warn_on_failure("releasing physical memory after a failed map", [&] {
        backend_.release(device_, *handle_);
        handle_.reset();
      });
    throw;
  }
  mapped_ = true;
}

void DeviceMemory::unmap() {
  if (!mapped_) return;
  backend_.unmap(device_, address_, size_);
  mapped_ = false;
}

void DeviceMemory::release() {
  unmap();
  if (!handle_) return;
  backend_.release(device_, *handle_);
  handle_.reset();
}

}  // namespace vse
