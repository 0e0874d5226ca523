// The one owner of an allocation's device memory: its reserved address range and its physical handle.
// See Note [Allocation states] in allocator.h for why every site goes through it.
#pragma once

#include <cstdint>
#include <optional>

#include "backend.h"

namespace vse {

// Each method changes what this object holds only after the driver call succeeded, so a failed call
// (cuMemUnmap, cuMemRelease, ...) leaves it describing exactly what the driver holds, and a later call
// finishes the job: a handle whose release failed is kept and released (or mapped again) later, never
// lost. The destructor gives back whatever is still held, best effort, with a warning for each failure.
class DeviceMemory {
 public:
  // Reserves the address range; nothing is mapped yet. `size` is a multiple of the granularity.
  DeviceMemory(DeviceBackend& backend, int device, uint64_t size);
  ~DeviceMemory();
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  uintptr_t address() const { return address_; }
  uint64_t size() const { return size_; }
  int device() const { return device_; }
  bool mapped() const { return mapped_; }
  bool holds_physical() const { return handle_.has_value(); }

  // Maps physical memory at the address: a handle still held (its release failed before) or a new one.
  // Contents are undefined. A no-op when mapped.
  void map();
  // Unmaps; the physical memory stays held until release(). A no-op when not mapped.
  void unmap();
  // Unmaps when mapped, then releases the physical memory. A no-op when none is held.
  void release();

 private:
  DeviceBackend& backend_;
  const int device_;
  const uint64_t size_;
  uintptr_t address_ = 0;
  std::optional<PhysicalHandle> handle_;
  bool mapped_ = false;
};

}  // namespace vse
