// Host memory that backups are copied into: one mmap'd range, made resident and pinned in pieces.
// It is MADV_DONTFORK: a fork() (DataLoader workers of a trainer in the same process) would otherwise
// copy the whole backup into the child, and pinned pages are not the child's to touch anyway. A child
// that destroys its copy of the object leaves the range alone (it is not mapped there, and the child
// may have mapped something else at that address since).
//
// Why not cudaHostAlloc: it zeroes and pins on one thread at ~2.5 GB/s, twenty times slower than the
// copy it serves, so a first sleep would run at a twentieth of the PCIe limit. Here worker threads
// fault pieces in (transparent huge pages, MADV_POPULATE_WRITE) and pin them (cuMemHostRegister), and
// the caller copies each piece as soon as it is ready, so the three stages overlap.
//
// The arena's logical capacity lies inside a larger reservation of address space, so that it can grow
// in place: the background preparation starts on the weights while vLLM has yet to allocate the other
// pools its level 1 backs up, and growing keeps what is already resident and pinned. Past the capacity
// the reservation is PROT_NONE, which costs neither memory nor commit charge until extend() opens it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <vector>

#include "backend.h"
#include "range_set.h"
#include "worker_threads.h"

namespace vse {

// Pieces are whole huge pages; larger ones gain nothing, and the limit keeps piece arithmetic far from
// overflow.
constexpr uint64_t kMinStagingPieceBytes = 2ull << 20;
constexpr uint64_t kMaxStagingPieceBytes = 1ull << 40;

struct StagingOptions {
  unsigned threads = 8;
  uint64_t piece_bytes = 64ull << 20;
};

// Where the time of making host memory ready went.
struct StagingTimes {
  double populate_seconds = 0;  // faulting pages in, summed over the staging threads
  double pin_seconds = 0;       // pinning them, on the calling thread
};

class HostArena {
 public:
  // Reserves address space for `capacity` bytes and room to grow (throws HostOutOfMemory); nothing is
  // resident or pinned yet.
  HostArena(DeviceBackend& backend, int device, uint64_t capacity);
  ~HostArena();
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  // Cuts `span` (its host side in this arena) where one pinned registration ends and the next begins:
  // the driver rejects an asynchronous copy whose host range crosses registrations.
  void split_at_registrations(const CopySpan& span, std::vector<CopySpan>& out) const;

  // The piece prepare() makes ready at a time for `options`: piece_bytes within the limits above,
  // rounded up to whole huge pages.
  static uint64_t piece_bytes(const StagingOptions& options);

  uint8_t* data() const { return base_; }
  uint64_t capacity() const { return capacity_; }          // logical: what is held and may be prepared
  uint64_t max_capacity() const { return max_capacity_; }  // what extend() can grow it to

  // Grows the capacity to `new_capacity` (rounded up to pages) within the reservation; the ready prefix
  // stays ready. False, changing nothing, when it does not fit; true when it holds that much already.
  // Throws HostOutOfMemory when the system refuses the memory. Not while prepare() runs.
  bool extend(uint64_t new_capacity);

  // Makes [0, bytes) resident and pinned. `on_ready(begin, end)` runs on the calling thread, in address
  // order, for each stretch as it becomes ready; a stretch never crosses two pinned registrations. Throws HostOutOfMemory or Error, after which the arena
  // is only fit to be destroyed (pieces past the failed one may be pinned already).
  StagingTimes prepare(uint64_t bytes, const StagingOptions& options,
                       const std::function<void(uint64_t, uint64_t)>& on_ready,
                       WorkerThreads::Spawn spawn = nullptr);

  // Host policy "reclaimable" (see Note [Host policies] in allocator.h), for an arena no backup uses:
  // unpins every registration past the first `keep_pinned` bytes and lets the kernel take those pages
  // back under pressure (MADV_FREE). The next prepare() faults them in and pins them again; pages the
  // kernel took come back as zeros, the others keep their bytes, and the next backup overwrites both.
  // On a throw the prefix still pinned stays ready.
  void make_reclaimable(uint64_t keep_pinned = 0);
  // Test hook: what memory pressure does to a reclaimable arena (MADV_PAGEOUT: the kernel reclaims
  // it now; MADV_FREE'd pages then read zero), past the prefix still pinned.
  void simulate_reclaim();
  uint64_t ready_bytes() const { return ready_bytes_; }                  // owner's thread only
  uint64_t pinned_bytes() const { return pinned_bytes_.load(); }         // any thread
  // A background prepare failed part way: the arena is only fit to be destroyed.
  void mark_unusable() { unusable_ = true; }
  bool unusable() const { return unusable_.load(); }

 private:
  static void populate(uint8_t* begin, uint64_t bytes);

  DeviceBackend& backend_;
  const int device_;
  const uint64_t fork_epoch_;  // of the process that made it: only that one gives it back
  void* mapping_ = nullptr;  // the whole reservation, alignment slack included
  uint64_t mapping_bytes_ = 0;
  uint8_t* base_ = nullptr;
  uint64_t capacity_ = 0;      // [base_, base_ + capacity_) is readable and writable
  uint64_t max_capacity_ = 0;  // [base_ + capacity_, base_ + max_capacity_) is reserved, PROT_NONE
  uint64_t ready_bytes_ = 0;  // this prefix is resident and pinned

  std::vector<ByteRange> pinned_;  // offsets of each registration, in address order
  std::atomic<uint64_t> pinned_bytes_{0};  // the sum of pinned_, readable from other threads
  std::atomic<bool> unusable_{false};
};

}  // namespace vse
