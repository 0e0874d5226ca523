#include "async_host_backend.h"

#include <chrono>
#include <cstring>
#include <string>

#include "errors.h"

namespace vse {

AsyncHostBackend::AsyncHostBackend(uint64_t capacity, unsigned max_delay_us, uint64_t seed)
    : AsyncHostBackend(std::make_shared<HostCard>(capacity), max_delay_us, seed) {}

AsyncHostBackend::AsyncHostBackend(std::shared_ptr<HostCard> card, unsigned max_delay_us, uint64_t seed)
    : inner_(std::move(card)), max_delay_us_(max_delay_us), rng_(seed) {
  worker_ = std::thread([this] { run(); });
}

AsyncHostBackend::~AsyncHostBackend() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  changed_.notify_all();
  worker_.join();
}

void AsyncHostBackend::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and nothing left to do
    current_ = queue_.front();
    queue_.pop_front();
    running_job_ = true;
    const unsigned delay = max_delay_us_ ? static_cast<unsigned>(rng_() % (max_delay_us_ + 1)) : 0;
    lock.unlock();
    std::this_thread::sleep_for(std::chrono::microseconds(delay));
    const Job& j = current_;
    if (j.is_fill)
      std::memset(reinterpret_cast<void*>(j.span.device), j.value, j.span.bytes);
    else if (j.direction == CopyDirection::ToHost)
      std::memcpy(j.span.host, reinterpret_cast<const void*>(j.span.device), j.span.bytes);
    else
      std::memcpy(reinterpret_cast<void*>(j.span.device), j.span.host, j.span.bytes);
    lock.lock();
    running_job_ = false;
    ++done_;
    changed_.notify_all();
  }
}

void AsyncHostBackend::enqueue_copies(int device, CopyDirection direction, const std::vector<CopySpan>& spans) {
  if (device != 0) throw InvalidArgument("host backend has one device (0), not " + std::to_string(device));
  std::lock_guard<std::mutex> lock(mutex_);
  for (const CopySpan& s : spans) {
    queue_.push_back({direction, s, false, 0});
    ++enqueued_;
  }
  changed_.notify_all();
}

void AsyncHostBackend::fill(int, uintptr_t address, uint64_t bytes, uint8_t value) {
  std::lock_guard<std::mutex> lock(mutex_);
  queue_.push_back({CopyDirection::ToDevice, {address, nullptr, bytes}, true, value});
  ++enqueued_;
  changed_.notify_all();
}

void AsyncHostBackend::wait_done(uint64_t sequence) {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return done_ >= sequence; });
}

void AsyncHostBackend::wait_copies(int) {
  uint64_t sequence;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    sequence = enqueued_;
  }
  wait_done(sequence);
}

uint64_t AsyncHostBackend::record_mark(int) {
  std::lock_guard<std::mutex> lock(mutex_);
  // A mark is the sequence number it waits for, made unique with a counter in the high bits.
  const uint64_t mark = (++next_mark_ << 40) | enqueued_;
  marks_.insert(mark);
  return mark;
}

void AsyncHostBackend::wait_mark(int, uint64_t mark) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!marks_.count(mark)) throw InvalidArgument("host-async backend: wait for a mark not recorded or released");
  }
  wait_done(mark & ((1ull << 40) - 1));
}

void AsyncHostBackend::release_mark(int, uint64_t mark) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  marks_.erase(mark);
}

uint64_t AsyncHostBackend::open_marks() {
  std::lock_guard<std::mutex> lock(mutex_);
  return marks_.size();
}

void AsyncHostBackend::guard(uintptr_t address, uint64_t size) {
  auto touches = [&](const Job& j) { return j.span.device < address + size && address < j.span.device + j.span.bytes; };
  uint64_t sequence = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    bool early = running_job_ && touches(current_);
    for (const Job& j : queue_) early = early || touches(j);
    if (!early) return;
    sequence = enqueued_;
  }
  ++early_releases_;
  wait_done(sequence);  // so that the early release is counted, not a crash
}

void AsyncHostBackend::unreserve(int device, uintptr_t address, uint64_t size) {
  guard(address, size);
  inner_.unreserve(device, address, size);
}

void AsyncHostBackend::map(int device, uintptr_t address, uint64_t size, PhysicalHandle handle) {
  guard(address, size);
  inner_.map(device, address, size, handle);
}

void AsyncHostBackend::unmap(int device, uintptr_t address, uint64_t size) {
  guard(address, size);
  inner_.unmap(device, address, size);
}

}  // namespace vse
