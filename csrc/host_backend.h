// Linux host backend: the CUDA VMM semantics on plain host memory.
//   reserve  -> mmap(PROT_NONE)            create  -> memfd of that size
//   map      -> mmap(MAP_FIXED, the memfd) unmap   -> mmap(MAP_FIXED, PROT_NONE) over it (address kept)
//   release  -> close(memfd): contents gone
// `capacity` simulates a card of that many bytes; 0 means only the host's memory limits it.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "backend.h"
#include "host_codec_stream.h"

namespace vse {

// The device memory of a simulated card. Host backends of one card share its capacity, as processes
// share a GPU: two allocators on one card stand for two processes (a wake waiting for memory that
// another process's sleep frees).
struct HostCard {
  explicit HostCard(uint64_t capacity) : capacity(capacity) {}
  const uint64_t capacity;  // 0: only the host's memory limits it
  std::atomic<uint64_t> used{0};

  // The card of that name while any backend uses it, else a new one of `capacity` (which must be
  // positive, and the same as the existing card's).
  static std::shared_ptr<HostCard> named(const std::string& name, uint64_t capacity);
};

class HostBackend final : public DeviceBackend {
 public:
  explicit HostBackend(uint64_t capacity = 0) : card_(std::make_shared<HostCard>(capacity)) {}
  explicit HostBackend(std::shared_ptr<HostCard> card) : card_(std::move(card)) {}

  const char* name() const override { return "host"; }
  int device_count() override { return 1; }
  uint64_t granularity(int device) override;

  uintptr_t reserve(int device, uint64_t size) override;
  void unreserve(int device, uintptr_t address, uint64_t size) override;
  PhysicalHandle create(int device, uint64_t size) override;
  void release(int device, PhysicalHandle handle) override;
  void map(int device, uintptr_t address, uint64_t size, PhysicalHandle handle) override;
  void unmap(int device, uintptr_t address, uint64_t size) override;

  MemoryInfo memory_info(int device) override;
  void synchronize(int) override {}

  void pin(int, void*, uint64_t) override {}
  void unpin(int, void*) override {}
  void enqueue_copies(int device, CopyDirection direction, const std::vector<CopySpan>& spans) override;
  void wait_copies(int) override {}
  void fill(int device, uintptr_t address, uint64_t bytes, uint8_t value) override;
  uint64_t record_mark(int) override { return 0; }  // copies are synchronous here
  void wait_mark(int, uint64_t) override {}
  void release_mark(int, uint64_t) noexcept override {}
  CodecStream* codec_stream(int device) override;

 private:
  void check_device(int device) const;

  HostCodecStream codec_stream_{*this, 0};

  const std::shared_ptr<HostCard> card_;
  std::mutex mutex_;
  std::unordered_map<int, uint64_t> sizes_;  // memfd -> bytes, to give capacity back on release
};

}  // namespace vse
