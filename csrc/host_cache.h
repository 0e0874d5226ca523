// The host memory that backups are copied into, kept between sleeps: the arenas, the one prepare_host()
// makes ready ahead of the first sleep, the background thread that prepares and unpins them, and the
// policy that says what is kept (Note [Host policies]). The Allocator holds one and asks it for an
// arena at each sleep; everything here is about arenas, nothing about device memory.
//
// Note [Host policies]
// What happens to host backup memory once a wake has copied it back:
//   Pinned      - kept resident and pinned (up to a few arenas): the next sleep copies at once.
//   Reclaimable - kept, but unpinned on the host thread and marked MADV_FREE: the kernel may take
//                 the pages back under memory pressure. The next sleep pins again; pages the kernel
//                 took are faulted in anew (as zeros), the others are still resident. Nothing in a
//                 reclaimable arena is ever read before a backup has overwritten it.
//   Release     - given back to the system; the next sleep finds new memory.
// Pinning runs at about half the copy rate (24-30 GB/s against 55 on an H100 host, whatever the number
// of threads), so a sleep that pins all of its backup first copies at about half speed. Option
// reclaimable_pinned_share keeps that share of each reclaimable arena (its start) pinned: the sleep
// copies into it while it pins the rest.
// A backup, and a preparation, take the smallest idle arena that holds their bytes, and make ready
// what of it is not: a level-2 sleep's small backup goes into the arena a level-1 sleep left, and a
// second prepare_host() finishes the idle arena instead of pinning a second one beside it. When none
// holds them, an idle arena that can grow in place (the prepared one first, else the largest) grows,
// keeping what of it is ready: vLLM 0.33's level 1 backs up the runtime and CUDA-graph pools beside
// the weights, allocated after the preparation for the weights began, and the preparation restarted
// for all of them goes on where it was instead of pinning everything again in a second arena.
// An arena made ready by prepare_host() is exempt from the policy until a sleep takes it: it exists to
// be ready. A sleep that takes another arena drops it (it would only hold host memory twice over).
//
// Note [Prepare rate]
// The background preparation exists so that the first sleep copies at the speed of a warm one; it is
// throttled only so that serving does not notice it. Nothing is served before vLLM's first request, so
// the plugin (vllm_sleep_ext/serving.py) sets the rate to 0 (full speed) while the engine is idle and to
// host_prepare_rate while requests run. The job reads the rate before each piece, so a change takes
// effect within one step (throttled: one piece on one thread, ~0.13 s at 0.5 GB/s; at full speed a piece
// per staging thread, faulted in side by side), and a change to 0 also cuts short the wait after the
// piece that is done. The pace is kept per piece (no credit for time
// spent at another rate), so a switch never brings a burst.
//
// After a fork() the child has neither the parent's arenas (MADV_DONTFORK) nor its host thread: its
// cache starts empty, and the parent's arenas are forgotten, never unpinned or unmapped from there.
//
// Thread safety: HostCache has no lock of its own. Every call but wait() and take_error() is made
// under the owner's lock (Allocator::mutex_), which guards arenas_ and prepared_; prepare() is handed
// that lock and lets it go only while it waits for its background work.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"
#include "fork_guard.h"
#include "host_arena.h"
#include "host_worker.h"

namespace vse {

enum class HostPolicy { Pinned, Reclaimable, Release };
const char* host_policy_name(HostPolicy policy);
HostPolicy parse_host_policy(const std::string& name);  // throws InvalidArgument

struct AllocatorOptions;  // allocator.h: the host policy, its share, the limit, staging, prepare rate

class HostCache {
 public:
  explicit HostCache(DeviceBackend& backend);
  HostCache(const HostCache&) = delete;
  HostCache& operator=(const HostCache&) = delete;

  // Before a sleep: no background job runs after this, and arenas a failed job left are gone.
  void settle();
  // The arena a sleep backs up `bytes` into (none for 0 bytes): the smallest idle one that holds them,
  // else an idle one grown to them, else a new one. Throws HostOutOfMemory past
  // options.host_memory_limit, changing nothing. A prepared arena it does not hand out goes.
  std::shared_ptr<HostArena> acquire(uint64_t bytes, int device, const AllocatorOptions& options);
  // A sleep failed before releasing anything, with `arena` perhaps half prepared: it goes.
  void forget_failed(const std::shared_ptr<HostArena>& arena);
  // After a wake, free, discard or a change of options: idle arenas beyond what the policy keeps
  // go, and under "reclaimable" the rest are unpinned in the background.
  void recycle(const AllocatorOptions& options);

  // Bytes of backups that may still go to host memory: with a disk tier, the room under
  // options.host_memory_limit in whole disk blocks (idle arenas count as free: they are only a cache;
  // the rest goes to disk, Note [Disk tier]); the most a uint64_t holds without a disk tier or a limit.
  uint64_t room(const AllocatorOptions& options) const;
  uint64_t held_bytes() const;    // host memory held, cached arenas included
  uint64_t pinned_bytes() const;  // of held_bytes(), what is pinned now
  void release_idle();            // every arena no backup uses goes, the prepared one too
  // Makes the smallest idle arena that holds `hold` bytes (else one grown to them, else a new one)
  // resident and pinned up to `bytes` (hold >= bytes; 0: bytes), so the next sleep that backs up `hold`
  // bytes takes it and copies at once: a compressed sleep asks for an arena of its plain bytes and
  // stores fewer (Note [Compressed backups]). In the background (throttled by options.host_prepare_rate)
  // unless `wait`, when it unlocks `lock` (the owner's) while it waits and throws if the memory could not
  // be made ready; a background failure is kept for take_error(). Reads `options` only before it first unlocks.
  void prepare(uint64_t bytes, uint64_t hold, int device, bool wait, const AllocatorOptions& options,
               std::unique_lock<std::mutex>& lock);
  void wait();               // until background work is done; without the owner's lock
  std::string take_error();  // what background work last failed with ("" none); without the owner's lock
  // The background preparation's rate, bytes per second (0: as fast as it goes). It takes effect in the
  // preparation under way at its next piece (Note [Prepare rate]); safe from any thread.
  void set_prepare_rate(uint64_t rate) { prepare_rate_.store(rate, std::memory_order_relaxed); }
  void simulate_reclaim();   // test hook: the kernel takes every reclaimable arena's pages

  // The background preparation of `arena` up to `bytes`, in pieces of the staging options, at most
  // `*rate` bytes per second as it reads before each piece, on one thread; at rate 0 a piece per staging
  // thread at a time, with no wait; all at once when `rate` is null.
  // Returns when done or `cancelled`. Each piece makes progress or it throws, so it never spins.
  static void prepare_in_pieces(HostArena& arena, uint64_t bytes, const StagingOptions& staging,
                                const std::atomic<uint64_t>* rate, const std::atomic<bool>& cancelled);

 private:
  std::shared_ptr<HostArena> smallest_idle(uint64_t bytes) const;
  // An idle arena that can grow to hold `bytes` (HostArena::extend): the prepared one, else the largest.
  std::shared_ptr<HostArena> extendable_idle(uint64_t bytes) const;
  static void extend_to(HostArena& arena, uint64_t bytes);
  void drop_prepared_unless(const HostArena* taken);
  void post_reclaim(const std::shared_ptr<HostArena>& arena, uint64_t keep_pinned);
  void forget_after_fork();

  DeviceBackend& backend_;
  std::vector<std::shared_ptr<HostArena>> arenas_;  // in use by backups, or idle (held only here)
  const HostArena* prepared_ = nullptr;             // made ready by prepare(), not yet taken by a sleep
  uint64_t prepared_target_ = 0;  // what of prepared_ its preparation makes ready (0: none is under way or done)
  std::atomic<uint64_t> prepare_rate_{0};  // read by the background job; before worker_, which ends first
  HostWorker worker_;  // after arenas_, so its jobs (which hold arenas) end before arenas_ goes
  ForkChildHook fork_hook_;
};

}  // namespace vse
