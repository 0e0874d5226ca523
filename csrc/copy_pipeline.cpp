#include "copy_pipeline.h"

#include <algorithm>
#include <string>

#include "errors.h"

namespace vse {

void drain_copies(DeviceBackend& backend, const std::set<int>& devices) noexcept {
  for (int device : devices)
    warn_on_failure(("waiting for copies on device " + std::to_string(device)).c_str(),
                    [&] { backend.wait_copies(device); });
}

CopyPipeline::~CopyPipeline() { drain_copies(backend_, devices_); }

void CopyPipeline::add(int device, uintptr_t device_address, uint64_t host_offset, uint64_t bytes) {
  spans_.push_back({device, {device_address, host_base_ + host_offset, bytes}});
}

void CopyPipeline::feed(uint64_t begin, uint64_t end) {
  std::map<int, std::vector<CopySpan>> by_device;
  while (next_ < spans_.size()) {
    const auto& [device, span] = spans_[next_];
    const uint64_t span_begin = static_cast<uint64_t>(static_cast<uint8_t*>(span.host) - host_base_);
    const uint64_t from = std::max(span_begin + done_, begin);
    const uint64_t to = std::min(span_begin + span.bytes, end);
    if (from >= to) break;
    const uint64_t skip = from - span_begin;
    by_device[device].push_back({span.device + skip, static_cast<uint8_t*>(span.host) + skip, to - from});
    done_ = to - span_begin;
    if (done_ < span.bytes) break;
    ++next_;
    done_ = 0;
  }
  for (const auto& [device, parts] : by_device) {
    devices_.insert(device);
    backend_.enqueue_copies(device, CopyDirection::ToHost, parts);
    queues_[device].stretches.push_back({end, Fence(backend_, device)});
  }
}

void CopyPipeline::wait_copied(int device, uint64_t host_end) {
  Queue& q = queues_[device];
  if (q.waited > 0 && q.stretches[q.waited - 1].host_end >= host_end) return;  // done with an earlier wait
  // The first fence at or past host_end: the fence before it may still have this allocation's last
  // copies ahead of it.
  size_t k = q.waited;
  while (k < q.stretches.size() && q.stretches[k].host_end < host_end) ++k;
  if (k == q.stretches.size()) return;  // nothing of it was copied on this device
  q.stretches[k].fence.wait();
  q.waited = k + 1;
}

}  // namespace vse
