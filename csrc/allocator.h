// The sleep allocator: one table of allocations with explicit states, driven over any DeviceBackend.
//
// Note [Allocation states]
// Every piece of memory the pools hand out is one row of Allocator::table_, keyed by its address, in
// one of four states:
//   Mapped    - physical memory is mapped at the address; kernels see plain device memory.
//   BackedUp  - asleep: the physical memory was released and some bytes wait in a host backup: the
//               whole allocation when its tag was offloaded, else only its preserved ranges.
//   Discarded - asleep: the physical memory was released and nothing was kept.
//   Unused    - PyTorch keeps the segment cached in a pool that is never allocated from again, with
//               nothing in it: its physical memory is released for good and it is never woken.
// sleep() moves Mapped rows to BackedUp or Discarded; discard() moves Mapped and BackedUp rows to
// Discarded; wake() moves BackedUp and Discarded rows to Mapped; trim() moves any row to Unused;
// free() removes a row in any state. (Unused rows keep their address reserved until PyTorch frees
// them, so a late free can never hit a newer allocation at a reused address.)
// Rows move only under mutex_. The address range stays reserved in every state, so tensor pointers
// and captured CUDA graphs stay valid across a sleep.
//
// Device memory has one owner. Each row holds a DeviceMemory (device_memory.h; a row in a slab uses
// its slab's, see Slabs below): the reserved range
// and the physical handle, with map()/unmap()/release() that change what it holds only after the
// driver call succeeded. No other code calls reserve/create/map/unmap/release. A row leaves Mapped
// only once its unmap succeeded, and is Mapped only once its map succeeded; a release that fails
// after that leaves the handle with its DeviceMemory, which the next sleep, wake (it maps that handle
// again), trim or free gives back. So a half-done driver call can make an operation fail, never make
// a row lie about its memory or lose a handle.
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
// releases each allocation as soon as its copies are done, so a failure found only then (a copy the
// device reports failed, a driver error) leaves the allocations released so far asleep with complete
// backups and the rest mapped. Either way the same call can be retried.
//
// Slabs (option slab_bytes; 0 = off). For small allocations the driver's cost is per physical handle
// mapped (for large ones it is per byte: cuMemRelease takes ~0.7 ms per GiB), so rows of at most
// slab_bytes/2 (PyTorch's 2 MiB and 20 MiB segments at 64 MiB) share slabs: a reserved range of
// slab_bytes for one (device, tag), owned by a Slab in slabs_ through one DeviceMemory with ONE
// handle mapped over the whole range while the slab is awake. Such a row holds
// no DeviceMemory of its own; it points at its slab and takes a granularity-aligned range of it
// (first fit). Rows keep their own state; a slab is awake (mapped) exactly while one of its rows is
// Mapped. All rows of a slab share a tag, so sleep, discard and wake move them together, and the
// slab is the unit they unmap, release and map: sleep releases it only after the copies of every one
// of its rows are done (a failing sleep leaves each slab wholly asleep or wholly mapped), wake maps
// it before any of its rows' backups are copied back, and a failed wake releases it again. free()
// gives the row's range back; trim() keeps it taken (an Unused row keeps its address, as above).
// Both leave the physical memory to the slab, which releases it once no row is Mapped, and is
// unreserved once it has no rows. New rows go only into awake slabs; when a new slab cannot be had
// (device full), the row gets its own memory, as rows over the threshold do. The price, while awake:
// the free part of the slabs is physical memory too (one partly filled slab per (device, tag) as rows
// come, plus the holes freed rows leave).
//
// Discarded bytes are never trusted: released physical memory often comes back holding its old
// contents, which hides a lost buffer until someone else uses the card. A woken allocation holds only
// what its backup put back; the rest is undefined. (The tests overwrite freed memory for that reason;
// the option fill_unrestored makes wake set the rest to 0xFF, NaN in every float type, to make a lost
// buffer loud.)
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "backend.h"
#include "device_memory.h"
#include "host_arena.h"
#include "host_cache.h"
#include "range_set.h"

namespace vse {

enum class State { Mapped, BackedUp, Discarded, Unused };
const char* state_name(State state);

// Bytes of one allocation kept on the host while it sleeps, laid out in range order from `offset`.
struct HostBackup {
  std::shared_ptr<HostArena> arena;
  uint64_t offset = 0;
  RangeSet ranges;     // allocation-relative
  bool whole = false;  // the tag was offloaded (else: preserved ranges only)
};

// Physical memory shared by the small rows of one (device, tag): see "Slabs" in the note above.
struct Slab {
  Slab(DeviceBackend& backend, int device, std::string tag, uint64_t bytes);

  // A slab-relative range of `bytes` (a multiple of the granularity), first fit; none when full.
  std::optional<uint64_t> take(uint64_t bytes);
  void give_back(uint64_t offset, uint64_t bytes);

  DeviceMemory memory;  // the whole range, one handle; mapped while awake
  const std::string tag;
  RangeSet free;        // slab-relative
  uint64_t rows = 0;    // rows of the table in this slab, in any state
};

struct Allocation {
  uintptr_t address = 0;
  uint64_t size = 0;  // as asked by the caller
  uint64_t span = 0;  // size rounded up to the granularity: the address range the row owns
  int device = 0;
  std::string tag;
  State state = State::Mapped;
  std::unique_ptr<DeviceMemory> memory;  // its own memory, mapped while Mapped; null in a slab
  Slab* slab = nullptr;                  // owned by Allocator::slabs_, when the row lives in a slab
  std::optional<HostBackup> backup;
};

struct AllocationInfo {
  uintptr_t address;
  uint64_t size;
  int device;
  std::string tag;
  State state;
  uint64_t backup_bytes;
  uint64_t preserved_bytes;
};

struct TagStats {
  uint64_t allocations = 0;
  uint64_t mapped_bytes = 0;
  uint64_t asleep_bytes = 0;
  uint64_t backed_up_bytes = 0;  // host bytes held for this tag (whole and preserved)
  uint64_t preserved_bytes = 0;  // of which preserved ranges of non-offloaded allocations
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
};

struct AllocatorOptions {
  bool keep_host_backups = true;   // false: HostPolicy::Release whatever host_policy says (the old switch)
  HostPolicy host_policy = HostPolicy::Pinned;
  // prepare_host() in the background: bytes per second at most (0: as fast as it goes), in pieces of
  // staging.piece_bytes on one thread, so that serving does not notice (vLLM decode throughput, 8B on
  // an H100: 0.92x at 2 GB/s, 0.97x at 1 GB/s, 1.00x at 0.5 GB/s; benchmarks/RESULTS.md).
  uint64_t host_prepare_rate = 500000000ull;
  double reclaimable_pinned_share = 0;  // HostPolicy::Reclaimable: share of an idle arena kept pinned
  uint64_t host_memory_limit = 0;  // 0: no limit beyond what the host has
  StagingOptions staging;
  bool fill_unrestored = false;  // wake sets bytes no backup restored to 0xFF (NaN in fp16/bf16/fp32)
  uint64_t slab_bytes = 0;        // rows of at most half this share slabs of this size (0: off)

  HostPolicy effective_host_policy() const { return keep_host_backups ? host_policy : HostPolicy::Release; }
};

constexpr uint64_t kMaxSlabBytes = 4ull << 30;

class Allocator {
 public:
  explicit Allocator(std::unique_ptr<DeviceBackend> backend);
  ~Allocator();
  Allocator(const Allocator&) = delete;
  Allocator& operator=(const Allocator&) = delete;

  const char* backend_name() const { return backend_->name(); }

  uintptr_t allocate(uint64_t size, int device, const std::string& tag);
  void free(uintptr_t address);

  // Mapped allocations whose tag is in `offload_tags` are backed up whole; of the others, the bytes in
  // `preserve` minus `exclude` (absolute ranges) are backed up; all are then released.
  OpStats sleep(const std::vector<std::string>& offload_tags, const std::vector<ByteRange>& preserve,
                const std::vector<ByteRange>& exclude);
  // Maps sleeping allocations of `tags` (all when empty optional) again and restores their backups.
  OpStats wake(const std::optional<std::vector<std::string>>& tags);
  void discard(const std::vector<std::string>& tags);
  // The allocation at `address` holds nothing and never will again: release it for good.
  void trim(uintptr_t address);

  std::vector<AllocationInfo> allocations() const;
  std::map<std::string, TagStats> tag_stats() const;
  std::optional<OpStats> last_sleep() const;
  std::optional<OpStats> last_wake() const;

  uint64_t host_bytes() const;  // host memory held for backups, cached arenas included
  void release_host_cache();
  uint64_t host_pinned_bytes() const;  // of host_bytes(), what is pinned now
  // Makes a cached arena for a backup of about `bytes` resident and pinned, so the next sleep of that
  // size copies at once. In the background (throttled by host_prepare_rate) unless `wait`; never
  // throws for the work itself: a failure is kept for host_error() and the sleep does it the usual way.
  void prepare_host(uint64_t bytes, int device, bool wait);
  void wait_host();         // until background host work is done
  std::string host_error();  // what background host work last failed with ("" none), cleared by reading
  void simulate_host_reclaim();  // test hook: the kernel takes every reclaimable arena's pages
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
  void unmap_and_release(Allocation& a, State asleep);
  // An awake slab of (device, tag) with `span` bytes taken for a new row, or none when the row gets
  // its own memory (slabs off, row too big, device too full for a new slab).
  std::optional<std::pair<Slab*, uint64_t>> place_in_slab(uint64_t span, int device, const std::string& tag);
  bool other_rows_mapped(const Slab& slab, const Allocation& except) const;
  void synchronize_devices(const std::vector<Allocation*>& rows);

  std::unique_ptr<DeviceBackend> backend_;
  mutable std::mutex mutex_;
  std::map<uintptr_t, std::unique_ptr<Slab>> slabs_;  // by base address; outlives the rows in table_
  std::map<uintptr_t, Allocation> table_;
  AllocatorOptions options_;
  std::optional<OpStats> last_sleep_;
  std::optional<OpStats> last_wake_;
  // Host memory for backups. Called only under mutex_ (its thread-safety contract, host_cache.h);
  // last, so its background work (which holds arenas) ends before the rest goes.
  HostCache host_;
};

}  // namespace vse
