// The host backend with copies that complete later, on another thread, after random delays: what a
// GPU's copy stream does. HostBackend copies synchronously, so on it a release that comes before its
// copy finished can never show; here it does, and is counted (early_releases()) rather than left to
// crash: the release first waits for the pending copies, then goes ahead. Marks are real fences (a
// wait returns only once every copy enqueued before the mark is done). Used by the tests, under ASan
// and TSan, and by make_allocator("host-async").
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "host_backend.h"

namespace vse {

class AsyncHostBackend final : public DeviceBackend {
 public:
  // Each queued copy or fill waits a random 0..max_delay_us microseconds before it runs.
  explicit AsyncHostBackend(uint64_t capacity = 0, unsigned max_delay_us = 200, uint64_t seed = 1);
  // On a card shared with other host backends (host_backend.h).
  explicit AsyncHostBackend(std::shared_ptr<HostCard> card, unsigned max_delay_us = 200, uint64_t seed = 1);
  ~AsyncHostBackend() override;

  const char* name() const override { return "host-async"; }
  int device_count() override { return inner_.device_count(); }
  uint64_t granularity(int device) override { return inner_.granularity(device); }

  uintptr_t reserve(int device, uint64_t size) override { return inner_.reserve(device, size); }
  void unreserve(int device, uintptr_t address, uint64_t size) override;
  PhysicalHandle create(int device, uint64_t size) override { return inner_.create(device, size); }
  void release(int device, PhysicalHandle handle) override { inner_.release(device, handle); }
  void map(int device, uintptr_t address, uint64_t size, PhysicalHandle handle) override;
  void unmap(int device, uintptr_t address, uint64_t size) override;

  MemoryInfo memory_info(int device) override { return inner_.memory_info(device); }
  void synchronize(int device) override { wait_copies(device); }

  void pin(int device, void* host, uint64_t bytes) override { inner_.pin(device, host, bytes); }
  void unpin(int device, void* host) override { inner_.unpin(device, host); }
  void enqueue_copies(int device, CopyDirection direction, const std::vector<CopySpan>& spans) override;
  void wait_copies(int device) override;
  void fill(int device, uintptr_t address, uint64_t bytes, uint8_t value) override;
  uint64_t record_mark(int device) override;
  void wait_mark(int device, uint64_t mark) override;
  void release_mark(int device, uint64_t mark) noexcept override;
  CodecStream* codec_stream(int device) override { return inner_.codec_stream(device) ? &codec_stream_ : nullptr; }

  // Unmaps (or maps, or frees) of device memory that a pending copy still reads or writes.
  uint64_t early_releases() const { return early_releases_.load(); }
  // Marks recorded and not released yet.
  uint64_t open_marks();

 private:
  struct Job {
    CopyDirection direction = CopyDirection::ToHost;
    CopySpan span;
    bool is_fill = false;
    uint8_t value = 0;
  };
  void run();
  void wait_done(uint64_t sequence);
  // Counts an early release when a pending job touches [address, address+size), then waits them out.
  void guard(uintptr_t address, uint64_t size);

  HostBackend inner_;
  HostCodecStream codec_stream_{*this, 0};  // waits for this backend's copies, not inner_'s
  const unsigned max_delay_us_;
  std::mt19937_64 rng_;  // used by the worker only
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Job> queue_;
  bool running_job_ = false;
  Job current_;
  uint64_t enqueued_ = 0;  // sequence numbers: jobs [0, done_) are complete
  uint64_t done_ = 0;
  bool stop_ = false;
  std::set<uint64_t> marks_;
  uint64_t next_mark_ = 0;
  std::atomic<uint64_t> early_releases_{0};
  std::thread worker_;
};

}  // namespace vse
