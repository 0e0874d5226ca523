// The sleep allocator: one table of allocations with explicit states, driven over any DeviceBackend.
//
// Note [Allocation states]
// Every piece of memory the pools hand out is one row of Allocator::table_, keyed by its address, in
// one of three states:
//   Mapped    - physical memory is mapped at the address; kernels see plain device memory.
//   BackedUp  - asleep: the physical memory was released and some bytes wait in a host backup: the
//               whole allocation when its tag was offloaded, else only its preserved ranges.
//   Discarded - asleep: the physical memory was released and nothing was kept.
// sleep() moves Mapped rows to BackedUp or Discarded; discard() moves Mapped and BackedUp rows to
// Discarded; wake() moves BackedUp and Discarded rows to Mapped; free() removes a row in any state.
// Rows move only under mutex_. The address range stays reserved in every state, so tensor pointers
// and captured CUDA graphs stay valid across a sleep.
//
// Device memory has one owner: a Segment (segment.h), as PyTorch's ExpandableSegment. A segment is
// one reserved range of one (device, tag) and the physical handles mapped in it, as runs; rows are
// ranges of it and never own memory. An allocation with its own memory is a segment of one row; small
// ones share slabs (below). A row holds its segment and offset, so free, sleep, wake and discard each
// take one path over segments. Only Segment calls reserve/create/map/unmap/release, and it changes
// what it holds only after the driver call succeeded: a row leaves Mapped only once the unmap of its
// run succeeded, and is Mapped only once its map succeeded; a release that fails after that leaves the
// handle with the segment, unmapped, which the next settle() gives back. So a half-done driver call can
// make an operation fail, never make a row lie about its memory or lose a handle.
//
// Wait before reuse: memory that was mapped may be handed out again, or unmapped, only after the work
// that could touch it is done. PyTorch calls free from empty_cache() without synchronizing (its own
// path relies on cudaFree doing it), possibly while another thread captures a CUDA graph, where a
// synchronize or an unmap would break the capture. So free() of a Mapped row makes no driver call: its
// range goes into its segment's quarantine (still taken, never handed out; quarantined_bytes() counts
// it, physical memory still held) and the row leaves the table. A free of a sleeping row needs no wait:
// its range is free at once. settle() synchronizes the devices that have quarantined ranges, makes
// those ranges free, and releases every run no row lies in any more (unreserving a segment left with
// nothing). It runs at the start of sleep, wake and discard, from the Python layer after its
// empty_cache() when the stream is not capturing, and from allocate() when it would fail for lack of
// device memory and its caller says synchronizing is safe (the pluggable malloc: its stream is not
// capturing, and no other work may run while a global capture does; asked only then, so a malloc that
// fits makes no driver call for it). The price: what PyTorch frees
// between those points stays held until the next one; in particular PyTorch's own out-of-memory retry
// for an allocation outside our pools frees our cached segments into the quarantine without settling.
//
// Copy ordering (copy_pipeline.h): a sleep releases an allocation only after the fence that follows
// the last copy of its bytes, not merely some earlier fence. The host backend copies synchronously
// and would hide a wrong fence; the async host backend (async_host_backend.h) copies on a thread
// with random delays and counts every unmap or release that comes while a copy from that memory is
// still pending, which is how the tests check this order.
//
// Nothing is ever lost, and no error outlives the call that raised it. Each operation first does
// everything that can fail (host memory, physical memory, copies), then takes the irreversible steps
// (releasing physical memory, dropping backups), and undoes its own work when a step before those
// fails: a failed wake, or a sleep that fails before releasing, leaves the table as it was. Sleep
// (plan, copy, release) releases each segment as soon as the copies of all of its rows are done, so a
// failure found only then (a copy the device reports failed, a driver error) leaves the segments
// released so far asleep with complete backups and the rest mapped. Either way the same call can be
// retried.
//
// Slabs (option slab_bytes; 0 = off). For small allocations the driver's cost is per physical handle
// mapped (for large ones it is per byte: cuMemRelease takes ~0.7 ms per GiB), so rows of at most
// slab_bytes/2 (PyTorch's 2 MiB and 20 MiB segments at 64 MiB) share slabs: segments of slab_bytes for
// one (device, tag), mapped by ONE handle over the whole range when made. A row takes a
// granularity-aligned free range that lies in a mapped run (first fit). All rows of a segment share a
// tag, so sleep, discard and wake move them together: sleep releases every run of a segment after the
// copies of all its rows are done (a failing sleep leaves each segment wholly asleep or wholly mapped,
// except that a driver call failing between two runs of a sparsely woken segment leaves the rows of
// the runs released so far asleep, each row still true to its memory); wake maps, per segment, only the runs its rows cover (adjacent rows are one run, so a dense
// slab is still one handle, and a lone row left in a slab costs its own size, not the slab's) before
// their backups are copied back (segments with backups first, so the copies start at once and the
// memory with nothing to restore is mapped while they run), and a failed wake releases them again. New rows go only into mapped
// runs, so after a sparse wake they go to another awake segment or a new one; when a new slab cannot
// be had (device full), the row gets its own memory, as rows over the threshold do. The price, while
// awake: the free part of the mapped runs is physical memory too (one partly filled slab per (device,
// tag) as rows come, plus the holes freed rows leave until their run empties).
//
// A wake that waits for memory (wake's wait_seconds > 0; 0, the default, fails at once when the device
// has less free than the wake needs). Two processes on one GPU can swap models faster than one after
// the other: A's sleep (device to host) releases its KV cache at once and each backed-up segment as
// soon as its copies are done, so B's wake (host to device) can map, and start copying into, what
// fits as the memory comes free. Such a wake maps run after run in the usual order (backups first),
// starting each one's copies at once; when the next run does not fit (the backend's free memory is
// smaller, or create() reports the device full) it sleeps 1 ms and tries again, until the deadline.
// Then it undoes what it mapped, as any failed wake does, and raises DeviceOutOfMemory saying how
// long it waited: nothing lost, retryable. It holds mutex_ all the while, so only memory that another
// process frees can end the wait: a free, allocate or settle of this allocator on another thread
// waits for the wake to end (no deadlock: the wake ends by the deadline at the latest), and memory
// this process's PyTorch caches outside our pools is not given back by it. vLLM calls sleep and wake
// from one thread, and what it waits for is the other engine's sleep.
//
// Discarded bytes are never trusted: released physical memory often comes back holding its old
// contents, which hides a lost buffer until someone else uses the card. A woken allocation holds only
// what its backup put back; the rest is undefined. (The tests overwrite freed memory for that reason;
// the option fill_unrestored makes wake set the rest to 0xFF, NaN in every float type, to make a lost
// buffer loud.)
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "backend.h"
#include "disk_tier.h"
#include "compress_pipeline.h"
#include "create_primer.h"
#include "host_arena.h"
#include "host_cache.h"
#include "range_set.h"
#include "segment.h"

namespace vse {

class CopyPipeline;

enum class State { Mapped, BackedUp, Discarded };
const char* state_name(State state);

// Bytes of one allocation kept while it sleeps, laid out in range order, in two parts: the first in a
// host arena from `offset`, the last `disk_bytes` in a file from `file_offset` (Note [Disk tier]).
struct HostBackup {
  std::shared_ptr<HostArena> arena;  // null when the whole backup is on disk
  uint64_t offset = 0;
  RangeSet ranges;     // allocation-relative
  bool whole = false;  // the tag was offloaded (else: preserved ranges only)
  uint64_t disk_bytes = 0;  // of ranges.bytes(): the last this many lie in `file`
  std::shared_ptr<DiskFile> file;
  uint64_t file_offset = 0;
  // A compressed backup (Note [Compressed backups], compress_pipeline.h): where each piece of `ranges`
  // lies in the arena and how it is stored; `offset` is then unused. Empty: plain, at `offset`.
  std::vector<PackedPiece> pieces;
  uint64_t stored_bytes() const;  // host bytes it takes
};

struct Allocation {
  uintptr_t address = 0;
  uint64_t size = 0;  // as asked by the caller
  uint64_t span = 0;  // size rounded up to the granularity: the address range the row owns
  Segment* segment = nullptr;  // owned by Allocator::segments_; the row is [offset, offset + span) of it
  uint64_t offset = 0;
  State state = State::Mapped;
  std::optional<HostBackup> backup;

  int device() const { return segment->device(); }
  const std::string& tag() const { return segment->tag(); }
};

struct AllocationInfo {
  uintptr_t address;
  uint64_t size;
  int device;
  std::string tag;
  State state;
  uint64_t backup_bytes;
  uint64_t preserved_bytes;
  uint64_t disk_bytes;  // of backup_bytes, on disk
  uint64_t stored_bytes;  // host bytes of the backup (less than backup_bytes when compressed)
};

struct TagStats {
  uint64_t allocations = 0;
  uint64_t mapped_bytes = 0;
  uint64_t asleep_bytes = 0;
  uint64_t backed_up_bytes = 0;  // host bytes held for this tag (whole and preserved)
  uint64_t preserved_bytes = 0;  // of which preserved ranges of non-offloaded allocations
  uint64_t disk_bytes = 0;       // of backed_up_bytes, in files of the disk tier
  uint64_t stored_bytes = 0;     // host bytes the backups take (compressed: less than backed_up_bytes)
};

struct OpStats {
  double seconds = 0;
  uint64_t bytes_copied = 0;
  uint64_t bytes_device = 0;  // released by a sleep, mapped by a wake
  uint64_t allocations = 0;
  uint64_t mappings = 0;      // physical handles released by a sleep, mapped by a wake
  StagingTimes staging;       // sleep: making new host memory resident and pinned (0 when reused)
  // Where the time went, for the log and the benchmarks (each summed over the operation).
  double sync_seconds = 0;     // sleep: waiting for the device's pending work
  double copy_wait_seconds = 0;  // waiting for copies (sleep: before each release; wake: at the end)
  double unmap_seconds = 0;    // sleep: cuMemUnmap
  double release_seconds = 0;  // sleep: cuMemRelease
  double map_seconds = 0;      // wake: cuMemCreate + cuMemMap + cuMemSetAccess
  double wait_seconds = 0;     // wake: waiting for device memory that another process frees
  DiskTimes disk;              // of bytes_copied, what went to (sleep) or came from (wake) disk, and how long
  CompressTotals compress;     // compressed backups: bytes through the codec's pipeline, stored, staging
};

struct AllocatorOptions {
  bool keep_host_backups = true;   // false: HostPolicy::Release whatever host_policy says (the old switch)
  HostPolicy host_policy = HostPolicy::Pinned;
  // prepare_host() in the background: bytes per second at most (0: as fast as it goes), in pieces of
  // staging.piece_bytes on one thread, so that serving does not notice (vLLM decode throughput, 8B on
  // an H100: 0.92x at 2 GB/s, 0.97x at 1 GB/s, 1.00x at 0.5 GB/s; benchmarks/RESULTS.md). A change
  // takes effect in the preparation under way (Note [Prepare rate], host_cache.h).
  uint64_t host_prepare_rate = 500000000ull;
  double reclaimable_pinned_share = 0;  // HostPolicy::Reclaimable: share of an idle arena kept pinned
  uint64_t host_memory_limit = 0;  // 0: no limit beyond what the host has
  StagingOptions staging;
  bool fill_unrestored = false;  // wake sets bytes no backup restored to 0xFF (NaN in fp16/bf16/fp32)
  bool prime_after_release = true;  // Note [Priming the next create]; off for measuring what it saves
  uint64_t slab_bytes = 0;        // rows of at most half this share slabs of this size (0: off)
  DiskOptions disk;               // backups past host_memory_limit go to disk there (Note [Disk tier])
  CompressOptions compress;       // level-1 backups compressed on the device (compress_pipeline.h)

  HostPolicy effective_host_policy() const { return keep_host_backups ? host_policy : HostPolicy::Release; }
};

constexpr uint64_t kMaxSlabBytes = 4ull << 30;
constexpr double kMaxWakeWaitSeconds = 3600;  // an hour: past that, a wait is a hang

class Allocator {
 public:
  explicit Allocator(std::unique_ptr<DeviceBackend> backend);
  ~Allocator();
  Allocator(const Allocator&) = delete;
  Allocator& operator=(const Allocator&) = delete;

  const char* backend_name() const { return backend_->name(); }

  // `may_synchronize` says whether the caller is at a point where waiting for the device is safe (no
  // CUDA graph capture can be running), so that a quarantine may be settled to make room. It is asked
  // only then, when the device is full and something is quarantined: the answer may cost driver calls.
  uintptr_t allocate(uint64_t size, int device, const std::string& tag,
                     const std::function<bool()>& may_synchronize = [] { return true; });
  // Never synchronizes, unmaps or releases (Note [Allocation states], "Wait before reuse").
  void free(uintptr_t address);
  // Waits for the devices with quarantined ranges, makes those ranges free and releases the physical
  // memory no row uses any more. Call it only where no CUDA graph capture can be running.
  void settle();
  uint64_t quarantined_bytes() const;  // freed while mapped, not settled yet: physical memory still held
  MemoryInfo device_memory(int device);  // as the backend reports it (tests compare it with a model)

  // Mapped allocations whose tag is in `offload_tags` are backed up whole; of the others, the bytes in
  // `preserve` minus `exclude` (absolute ranges) are backed up; all are then released.
  OpStats sleep(const std::vector<std::string>& offload_tags, const std::vector<ByteRange>& preserve,
                const std::vector<ByteRange>& exclude);
  // Maps sleeping allocations of `tags` (all when empty optional) again and restores their backups.
  // With `wait_seconds` > 0, waits up to that long for device memory to come free instead of failing
  // at once (Note [Allocation states], "A wake that waits for memory").
  OpStats wake(const std::optional<std::vector<std::string>>& tags, double wait_seconds = 0);
  void discard(const std::vector<std::string>& tags);

  std::vector<AllocationInfo> allocations() const;
  std::map<std::string, TagStats> tag_stats() const;
  std::optional<OpStats> last_sleep() const;
  std::optional<OpStats> last_wake() const;
  // What the background primes after releases did (Note [Priming the next create]).
  PrimeStats prime_stats() const { return primer_.stats(); }

  uint64_t host_bytes() const;  // host memory held for backups, cached arenas included
  void release_host_cache();
  uint64_t host_pinned_bytes() const;  // of host_bytes(), what is pinned now
  // Makes a cached arena for a backup of about `bytes` resident and pinned, so the next sleep of that
  // size copies at once; an arena that holds `hold_bytes` (0: bytes), of which `bytes` are made ready,
  // for a compressed sleep, which takes an arena of its plain bytes and stores about `bytes`. In the
  // background (throttled by host_prepare_rate) unless `wait`; never throws for the work itself: a
  // failure is kept for host_error() and the sleep does it the usual way.
  void prepare_host(uint64_t bytes, int device, bool wait, uint64_t hold_bytes = 0);
  void wait_host();         // until background host work is done
  std::string host_error();  // what background host work last failed with ("" none), cleared by reading
  void simulate_host_reclaim();  // test hook: the kernel takes every reclaimable arena's pages
  DiskTier& disk_tier() { return disk_; }  // its test hooks
  // Why option compress cannot work on this backend ("" when it can: the codec loads).
  std::string compress_unavailable();
  AllocatorOptions options() const;
  void set_options(const AllocatorOptions& options);  // throws InvalidArgument for a bad value
  // Changes some options in one step under the lock, so concurrent updates of different options
  // are never lost (a get-then-set pair could lose one).
  template <typename F>
  void update_options(F&& change) {
    std::lock_guard<std::mutex> lock(mutex_);
    AllocatorOptions o = options_;
    change(o);
    set_options_locked(o);
  }

 private:
  void set_options_locked(const AllocatorOptions& options);
  struct SleepPlan;
  struct SegmentRows;  // the rows of one segment that an operation moves
  template <typename RowOf>
  static std::vector<SegmentRows> by_segment(size_t count, RowOf row_of);
  void synchronize_devices(const std::vector<SegmentRows>& segments);
  void settle_locked();
  std::pair<Segment*, uint64_t> place(uint64_t span, int device, const std::string& tag);
  Segment& new_segment(int device, const std::string& tag, uint64_t size, bool shared);
  SleepPlan plan_sleep(const std::vector<std::string>& offload_tags, const std::vector<ByteRange>& preserve,
                       const std::vector<ByteRange>& exclude);
  std::unique_ptr<BackupCopies> copy_backups(SleepPlan& plan, std::shared_ptr<HostArena>& arena, OpStats& stats);
  // The compressed sleep of a plan on one device (Note [Compressed backups]), or nullptr when it goes plain.
  std::unique_ptr<BackupCopies> compress_backups(SleepPlan& plan, HostArena& arena, OpStats& stats);
  void release_slept(SleepPlan& plan, BackupCopies* copies, OpStats& stats);
  // Unmaps each mapped run of a segment, calls `asleep(member)` for its rows in it, then releases it.
  void release_runs(const SegmentRows& rows, OpStats& stats, const std::function<void(size_t)>& asleep);
  // After `released` went back to the driver: the primer's rounds on their devices (Note [Priming the next create]).
  void prime_after(const std::vector<SegmentRows>& released);
  uint64_t quarantined_bytes_locked() const;

  std::unique_ptr<DeviceBackend> backend_;
  mutable std::mutex mutex_;
  std::map<uintptr_t, std::unique_ptr<Segment>> segments_;  // by base address; outlives the rows in table_
  std::map<uintptr_t, Allocation> table_;
  AllocatorOptions options_;
  std::optional<OpStats> last_sleep_;
  std::optional<OpStats> last_wake_;
  DiskTier disk_;
  CodecCache codecs_;  // the backend's codec, loaded at the first compressed sleep or wake
  // Primes the driver's next create after a sleep or discard releases memory (Note [Priming the next
  // create]); after backend_ and mutex_, which its thread uses, so it ends before they go.
  CreatePrimer primer_;
  // Host memory for backups. Called only under mutex_ (its thread-safety contract, host_cache.h);
  // last, so its background work (which holds arenas) ends before the rest goes.
  HostCache host_;
};

}  // namespace vse
