// Sleep's copies to host: spans laid back to back in a host arena, enqueued stretch by stretch as the
// arena becomes ready, with a fence per device after each stretch, so an allocation can be released as
// soon as the copies of its own bytes are done while later copies still run.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <vector>

#include "backend.h"

namespace vse {

// A mark on a device's copy queue after the copies enqueued before it; released when destroyed,
// waited for or not.
class Fence {
 public:
  Fence(DeviceBackend& backend, int device) : backend_(&backend), device_(device), mark_(backend.record_mark(device)) {}
  Fence(Fence&& o) noexcept : backend_(o.backend_), device_(o.device_), mark_(o.mark_) { o.backend_ = nullptr; }
  Fence& operator=(Fence&&) = delete;
  Fence(const Fence&) = delete;
  Fence& operator=(const Fence&) = delete;
  ~Fence() {
    if (backend_) backend_->release_mark(device_, mark_);
  }
  void wait() const { backend_->wait_mark(device_, mark_); }

 private:
  DeviceBackend* backend_;
  int device_;
  uint64_t mark_;
};

// Waits for the copies in flight on each of `devices`, warning of a failure instead of throwing: used
// where another error is already on its way (the copy that failed is what gets reported) and the
// copies must only be done before their memory goes.
void drain_copies(DeviceBackend& backend, const std::set<int>& devices) noexcept;

// What a sleep waits on before it releases a segment: the copies of backup bytes [0, host_end) of the
// plan's layout are done. CopyPipeline copies that layout as it is; CompressedSleep (compress_pipeline.h)
// packs it.
class BackupCopies {
 public:
  virtual ~BackupCopies() = default;
  virtual void wait_copied(int device, uint64_t host_end) = 0;
};

class CopyPipeline final : public BackupCopies {
 public:
  CopyPipeline(DeviceBackend& backend, uint8_t* host_base) : backend_(backend), host_base_(host_base) {}
  // Waits for every copy still in flight (they must not land in memory freed after this), warning of
  // failures: on success every copy was waited for already, on failure another error is on its way.
  ~CopyPipeline() override;
  CopyPipeline(const CopyPipeline&) = delete;
  CopyPipeline& operator=(const CopyPipeline&) = delete;

  // Adds a copy of device memory into the arena; spans come in host order, back to back.
  void add(int device, uintptr_t device_address, uint64_t host_offset, uint64_t bytes);
  // Enqueues the copies of host bytes [begin, end) (the next stretch made ready), then a fence per device.
  void feed(uint64_t begin, uint64_t end);
  // Returns once every copy of host bytes [0, host_end) on `device` is done.
  void wait_copied(int device, uint64_t host_end) override;

 private:
  struct Span {
    int device;
    CopySpan span;
  };
  struct Stretch {
    uint64_t host_end;  // the copies of host bytes [0, host_end) precede the fence
    Fence fence;
  };
  struct Queue {
    std::vector<Stretch> stretches;
    size_t waited = 0;  // stretches[0, waited) are known done
  };

  DeviceBackend& backend_;
  uint8_t* host_base_;
  std::vector<Span> spans_;
  size_t next_ = 0;   // first span not wholly enqueued
  uint64_t done_ = 0; // bytes of spans_[next_] already enqueued
  std::map<int, Queue> queues_;
  std::set<int> devices_;  // that got copies
};

}  // namespace vse
