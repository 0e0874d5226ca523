#include "host_arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <string>
#include <thread>

#include "errors.h"
#include "fork_guard.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace vse {
namespace {

constexpr uint64_t kHugePage = 2ull << 20;
constexpr uint64_t kPage = 4096;
// Room to grow beyond the capacity asked for: a quarter, at least 1 GiB (vLLM 0.33's level 1 backs up
// the runtime and CUDA-graph pools beside the weights; on a small model they can outweigh a quarter).
constexpr uint64_t kMinGrowthBytes = 1ull << 30;
constexpr uint64_t kMaxArenaBytes = 1ull << 56;  // far beyond any host; keeps the arithmetic from overflow

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

}  // namespace

HostArena::HostArena(DeviceBackend& backend, int device, uint64_t capacity)
    : backend_(backend), device_(device), fork_epoch_(fork_epoch()) {
  if (capacity > kMaxArenaBytes)
    throw HostOutOfMemory("cannot reserve " + format_bytes(capacity) + " of host memory for backups: more than " +
                          "the address space holds");
  // Capacity is rounded to pages only, so host memory stays within a page of the backup; the start is
  // huge-page aligned, so all but the tail can be backed by huge pages.
  capacity_ = round_up(std::max<uint64_t>(capacity, 1), kPage);
  max_capacity_ = round_up(capacity_ + std::max(capacity_ / 4, kMinGrowthBytes), kHugePage);
  // Over-reserve by one huge page so the arena starts on a huge-page boundary. PROT_NONE: address space
  // only, no commit charge; the capacity is opened below and by extend().
  mapping_bytes_ = max_capacity_ + kHugePage;
  mapping_ = mmap(nullptr, mapping_bytes_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping_ == MAP_FAILED) {
    mapping_ = nullptr;
    throw HostOutOfMemory("cannot reserve " + format_bytes(capacity_) + " of host memory for backups: mmap: " +
                          std::strerror(errno));
  }
  base_ = reinterpret_cast<uint8_t*>(round_up(reinterpret_cast<uintptr_t>(mapping_), kHugePage));
  auto fail = [&](const std::string& what) {
    const int error = errno;
    munmap(mapping_, mapping_bytes_);
    mapping_ = nullptr;
    throw HostOutOfMemory(what + std::strerror(error));
  };
  // The whole reservation, so that what extend() opens is kept from children and huge-page backed too.
  if (madvise(mapping_, mapping_bytes_, MADV_DONTFORK) != 0)
    fail("cannot keep " + format_bytes(capacity_) + " of host backup memory out of forked children: " +
         "madvise(MADV_DONTFORK): ");
  madvise(base_, max_capacity_, MADV_HUGEPAGE);  // a hint; without THP it is only slower
  if (mprotect(base_, capacity_, PROT_READ | PROT_WRITE) != 0)
    fail("cannot reserve " + format_bytes(capacity_) + " of host memory for backups: mprotect: ");
}

bool HostArena::extend(uint64_t new_capacity) {
  if (new_capacity > max_capacity_) return false;
  new_capacity = round_up(new_capacity, kPage);  // max_capacity_ is whole pages: still within it
  if (new_capacity <= capacity_) return true;
  if (mprotect(base_ + capacity_, new_capacity - capacity_, PROT_READ | PROT_WRITE) != 0)
    throw HostOutOfMemory("cannot grow host memory for backups from " + format_bytes(capacity_) + " to " +
                          format_bytes(new_capacity) + ": mprotect: " + std::strerror(errno));
  capacity_ = new_capacity;
  return true;
}

HostArena::~HostArena() {
  if (fork_epoch() != fork_epoch_) return;  // a forked child's copy: the memory is not ours (see the header)
  // The driver may already be shutting down at process exit; the memory goes with munmap anyway.
  for (const ByteRange& r : pinned_)
    warn_on_failure("unpinning host backup memory", [&] { backend_.unpin(device_, base_ + r.begin); });
  if (mapping_) munmap(mapping_, mapping_bytes_);
}

void HostArena::populate(uint8_t* begin, uint64_t bytes) {
  if (madvise(begin, bytes, MADV_POPULATE_WRITE) == 0) return;
  if (errno != EINVAL)  // EINVAL: kernel older than 5.14; touch the pages by hand
    throw HostOutOfMemory("cannot make " + format_bytes(bytes) + " of host backup memory resident: " +
                          std::strerror(errno));
  for (uint64_t off = 0; off < bytes; off += 4096) reinterpret_cast<volatile uint8_t*>(begin)[off] = 0;
}

uint64_t HostArena::piece_bytes(const StagingOptions& options) {
  return round_up(std::clamp(options.piece_bytes, kMinStagingPieceBytes, kMaxStagingPieceBytes), kHugePage);
}

void HostArena::split_at_registrations(const CopySpan& span, std::vector<CopySpan>& out) const {
  const uint64_t offset = static_cast<uint64_t>(static_cast<uint8_t*>(span.host) - base_);
  uint64_t done = 0;
  auto it = pinned_.begin();
  while (done < span.bytes) {
    const uint64_t pos = offset + done;
    while (it != pinned_.end() && it->end <= pos) ++it;
    uint64_t take = span.bytes - done;
    if (it != pinned_.end()) take = std::min(take, (it->begin > pos ? it->begin : it->end) - pos);
    out.push_back({span.device + done, static_cast<uint8_t*>(span.host) + done, take});
    done += take;
  }
}

StagingTimes HostArena::prepare(uint64_t bytes, const StagingOptions& options,
                                const std::function<void(uint64_t, uint64_t)>& on_ready,
                                WorkerThreads::Spawn spawn) {
  StagingTimes total;
  bytes = std::min(bytes, capacity_);
  for (const ByteRange& r : pinned_) {  // already prepared: one stretch per registration
    if (r.begin >= std::min(ready_bytes_, bytes)) break;
    on_ready(r.begin, std::min(r.end, bytes));
  }
  if (ready_bytes_ >= bytes) return total;

  const uint64_t piece = piece_bytes(options);
  const uint64_t start = ready_bytes_;
  const uint64_t end = std::min(capacity_, round_up(bytes, kHugePage));
  const size_t count = static_cast<size_t>((end - start + piece - 1) / piece);
  auto piece_begin = [&](size_t i) { return start + i * piece; };
  auto piece_end = [&](size_t i) { return std::min(end, start + (i + 1) * piece); };

  // Worker threads fault pieces in; this thread pins them in order and hands each to on_ready.
  // (Pinning from many threads at once contends in the driver and gets slower than one thread.)
  enum : int { kPending = 0, kResident = 1, kFailed = 2 };
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<int> state(count, kPending);
  std::vector<std::exception_ptr> errors(count);
  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  using clock = std::chrono::steady_clock;

  auto work = [&] {
    double seconds = 0;
    for (size_t i = next++; i < count && !stop; i = next++) {
      int outcome = kResident;
      const auto t0 = clock::now();
      try {
        populate(base_ + piece_begin(i), piece_end(i) - piece_begin(i));
      } catch (...) {
        errors[i] = std::current_exception();
        outcome = kFailed;
      }
      seconds += std::chrono::duration<double>(clock::now() - t0).count();
      std::lock_guard<std::mutex> lock(mutex);
      state[i] = outcome;
      changed.notify_all();
    }
    std::lock_guard<std::mutex> lock(mutex);
    total.populate_seconds += seconds;
  };
  const unsigned threads = std::max(1u, std::min<unsigned>(options.threads, static_cast<unsigned>(count)));
  WorkerThreads workers(spawn);
  // With no thread at all this thread faults every piece in itself: slower, never a failure.
  if (workers.start(threads, work) == 0) work();
  auto finish = [&] {
    stop = true;
    workers.join();
  };

  try {
    for (size_t i = 0; i < count; ++i) {
      int outcome;
      {
        std::unique_lock<std::mutex> lock(mutex);
        changed.wait(lock, [&] { return state[i] != kPending; });
        outcome = state[i];
      }
      if (outcome == kFailed) std::rethrow_exception(errors[i]);
      const auto t0 = clock::now();
      backend_.pin(device_, base_ + piece_begin(i), piece_end(i) - piece_begin(i));
      pinned_.push_back({piece_begin(i), piece_end(i)});
      pinned_bytes_ += piece_end(i) - piece_begin(i);
      total.pin_seconds += std::chrono::duration<double>(clock::now() - t0).count();
      ready_bytes_ = piece_end(i);
      on_ready(piece_begin(i), std::min(piece_end(i), bytes));
    }
  } catch (...) {
    finish();
    throw;
  }
  finish();
  return total;
}

void HostArena::make_reclaimable(uint64_t keep_pinned) {
  const uint64_t resident = ready_bytes_;
  // Last registration first, so that whatever a throw leaves pinned is still a ready prefix.
  while (!pinned_.empty() && pinned_.back().end > keep_pinned) {
    const ByteRange r = pinned_.back();
    backend_.unpin(device_, base_ + r.begin);
    pinned_.pop_back();
    pinned_bytes_ -= r.size();
    ready_bytes_ = r.begin;
  }
  ready_bytes_ = std::min(ready_bytes_, pinned_.empty() ? 0 : pinned_.back().end);
  // EINVAL: a kernel before 4.5 without MADV_FREE; the pages then simply stay resident.
  if (resident > ready_bytes_) madvise(base_ + ready_bytes_, resident - ready_bytes_, MADV_FREE);
}

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

void HostArena::simulate_reclaim() {
  // Only past the pinned prefix: pinned pages are not the kernel's to take.
  const uint64_t begin = pinned_.empty() ? 0 : pinned_.back().end;
  if (begin >= capacity_) return;
  // MADV_PAGEOUT (5.4+) reclaims the range through the kernel's own reclaim path: MADV_FREE'd pages
  // are dropped (they read zero afterwards), others are swapped or kept. Older kernels: drop them all.
  if (madvise(base_ + begin, capacity_ - begin, MADV_PAGEOUT) != 0) madvise(base_ + begin, capacity_ - begin, MADV_DONTNEED);
}

}  // namespace vse
