// The codec queue of the host backends: codec work runs on the calling thread when enqueued, so it is
// done by the time the call returns; what it must come after (copies on the backend's queue, which the
// async host backend runs later on its own thread) is waited for first.
#pragma once

#include "backend.h"
#include "codec.h"

namespace vse {

class HostCodecStream final : public CodecStream {
 public:
  HostCodecStream(DeviceBackend& backend, int device) : backend_(backend), device_(device) {}
  void* handle() override { return nullptr; }
  void to_host(uintptr_t device, void* host, uint64_t bytes) override;
  void after_copies() override { backend_.wait_copies(device_); }
  uint64_t record() override { return ++marks_; }
  void wait(uint64_t) override {}
  void release(uint64_t) noexcept override {}
  void copies_after(uint64_t) override {}  // the work before any mark is done already
  void synchronize() override {}

 private:
  DeviceBackend& backend_;
  int device_;
  uint64_t marks_ = 0;
};

}  // namespace vse
