// The device-memory backend interface: what the allocator needs from "a GPU", and nothing more.
// Two implementations: CudaBackend (CUDA VMM through the driver API) and HostBackend (Linux
// mmap/memfd with the same semantics, so the whole state machine runs and is tested without a GPU).
#pragma once

#include <cstdint>
#include <vector>

namespace vse {

class CodecStream;  // codec.h

// Opaque physical-memory handle: a CUmemGenericAllocationHandle, or a memfd.
using PhysicalHandle = uint64_t;

struct MemoryInfo {
  uint64_t free = 0;
  uint64_t total = 0;
};

// One contiguous copy between device and host memory.
struct CopySpan {
  uintptr_t device = 0;
  void* host = nullptr;
  uint64_t bytes = 0;
};

enum class CopyDirection { ToHost, ToDevice };

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;

  virtual const char* name() const = 0;
  virtual int device_count() = 0;
  // Sizes and addresses of physical memory are multiples of this.
  virtual uint64_t granularity(int device) = 0;

  // Virtual address range: survives sleep, so tensor pointers and captured graphs stay valid.
  virtual uintptr_t reserve(int device, uint64_t size) = 0;
  virtual void unreserve(int device, uintptr_t address, uint64_t size) = 0;

  // Physical memory: contents are lost on release. create() throws DeviceOutOfMemory when full.
  virtual PhysicalHandle create(int device, uint64_t size) = 0;
  virtual void release(int device, PhysicalHandle handle) = 0;
  virtual void map(int device, uintptr_t address, uint64_t size, PhysicalHandle handle) = 0;
  virtual void unmap(int device, uintptr_t address, uint64_t size) = 0;

  virtual MemoryInfo memory_info(int device) = 0;
  // Finish all pending work of this process on the device, so memory can be copied or unmapped.
  virtual void synchronize(int device) = 0;

  // Host memory that backups are copied into. pin() may run on several threads at once.
  virtual void pin(int device, void* host, uint64_t bytes) = 0;
  virtual void unpin(int device, void* host) = 0;
  // Copies may complete asynchronously; wait_copies() returns when all enqueued ones are done.
  virtual void enqueue_copies(int device, CopyDirection direction, const std::vector<CopySpan>& spans) = 0;
  virtual void wait_copies(int device) = 0;
  // Sets `bytes` of device memory to `value`, ordered with the copies (before those enqueued after it).
  virtual void fill(int device, uintptr_t address, uint64_t bytes, uint8_t value) = 0;
  // A mark after the copies enqueued so far, so a caller can wait for a prefix of them and release
  // memory while later copies still run. Every mark is released once, waited for or not.
  virtual uint64_t record_mark(int device) = 0;
  virtual void wait_mark(int device, uint64_t mark) = 0;
  virtual void release_mark(int device, uint64_t mark) noexcept = 0;

  // After a release: seconds at which to prime(device), creating and releasing one granule so that
  // work the driver left for the next create is not done on a wake's path (Note [Priming the next
  // create], create_primer.h). Empty (the default): nothing to prime.
  virtual std::vector<double> prime_delays() const { return {}; }
  virtual void prime(int /*device*/) {}

  // The device's queue for codec work (compressed backups, compress_pipeline.h), owned by the backend;
  // nullptr where the backend has none.
  virtual CodecStream* codec_stream(int /*device*/) { return nullptr; }
};

}  // namespace vse
