#include "allocator.h"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <set>

#include "copy_pipeline.h"
#include "errors.h"

namespace vse {
namespace {

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

bool contains(const std::vector<std::string>& tags, const std::string& tag) {
  return std::find(tags.begin(), tags.end(), tag) != tags.end();
}

std::string hex(uintptr_t address) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%" PRIxPTR, address);
  return buf;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Runs `step` and adds its duration to `total` (an operation that throws reports no stats).
template <typename F>
void timed(double& total, F&& step) {
  const auto start = std::chrono::steady_clock::now();
  step();
  total += seconds_since(start);
}

std::set<int> devices_of(const std::vector<Allocation*>& rows) {
  std::set<int> devices;
  for (const Allocation* a : rows) devices.insert(a->device);
  return devices;
}

// What one driver call maps or releases: a row's own memory, or a slab with the rows of it at hand.
struct Unit {
  DeviceMemory* memory;
  std::vector<size_t> members;  // indices into the caller's list of rows
};

// Groups rows (in table order) by their backing memory, in the order each first appears.
template <typename RowOf>
std::vector<Unit> units_of(size_t count, RowOf row_of) {
  std::vector<Unit> units;
  std::map<const Slab*, size_t> slab_unit;
  for (size_t i = 0; i < count; ++i) {
    const Allocation& a = row_of(i);
    if (a.slab) {
      auto [it, fresh] = slab_unit.try_emplace(a.slab, units.size());
      if (fresh) units.push_back({&a.slab->memory, {}});
      units[it->second].members.push_back(i);
    } else {
      units.push_back({a.memory.get(), {i}});
    }
  }
  return units;
}

}  // namespace

const char* state_name(State state) {
  switch (state) {
    case State::Mapped: return "mapped";
    case State::BackedUp: return "backed_up";
    case State::Discarded: return "discarded";
    case State::Unused: return "unused";
  }
  return "?";
}

Slab::Slab(DeviceBackend& backend, int device, std::string tag, uint64_t bytes)
    : memory(backend, device, bytes), tag(std::move(tag)), free({0, bytes}) {}

std::optional<uint64_t> Slab::take(uint64_t bytes) {
  for (const ByteRange& r : free.ranges()) {
    if (r.size() < bytes) continue;
    const uint64_t offset = r.begin;
    free.subtract({offset, offset + bytes});
    return offset;
  }
  return std::nullopt;
}

void Slab::give_back(uint64_t offset, uint64_t bytes) { free.add({offset, offset + bytes}); }

Allocator::Allocator(std::unique_ptr<DeviceBackend> backend) : backend_(std::move(backend)), host_(*backend_) {}

// Each row's DeviceMemory gives its memory back (instances on the host backend come and go in tests).
// The process-wide CUDA instance is never destroyed: the driver may be gone by then. Background host
// work ends first (host_ goes first): its jobs hold arenas.
Allocator::~Allocator() = default;

std::optional<std::pair<Slab*, uint64_t>> Allocator::place_in_slab(uint64_t span, int device, const std::string& tag) {
  if (options_.slab_bytes == 0) return std::nullopt;
  const uint64_t slab_bytes = round_up(options_.slab_bytes, backend_->granularity(device));
  if (span > slab_bytes / 2) return std::nullopt;
  for (auto& [base, slab] : slabs_) {
    if (slab->memory.device() != device || slab->tag != tag || !slab->memory.mapped()) continue;
    if (auto offset = slab->take(span)) return std::make_pair(slab.get(), *offset);
  }
  auto slab = std::make_unique<Slab>(*backend_, device, tag, slab_bytes);
  try {
    slab->memory.map();
  } catch (const DeviceOutOfMemory&) {
    return std::nullopt;  // no room for a whole slab: the row gets just its own size
  }
  Slab* s = slab.get();
  slabs_.emplace(s->memory.address(), std::move(slab));
  return std::make_pair(s, *s->take(span));
}

uintptr_t Allocator::allocate(uint64_t size, int device, const std::string& tag) {
  if (size == 0) throw InvalidArgument("allocation size must be positive, got 0");
  if (tag.empty()) throw InvalidArgument("allocation tag must not be empty");
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t span = round_up(size, backend_->granularity(device));
  std::unique_ptr<DeviceMemory> memory;
  uintptr_t address = 0;
  auto place = place_in_slab(span, device, tag);
  if (place) {
    address = place->first->memory.address() + place->second;
    place->first->rows += 1;
  } else {
    memory = std::make_unique<DeviceMemory>(*backend_, device, span);
    try {
      memory->map();
    } catch (const DeviceOutOfMemory& e) {
      throw DeviceOutOfMemory("cannot allocate " + format_bytes(memory->size()) + " for tag '" + tag +
                              "' on device " + std::to_string(device) + ": " + e.what());
    }
    address = memory->address();
  }
  Allocation& a = table_[address];
  a.address = address;
  a.size = size;
  a.span = span;
  a.device = device;
  a.tag = tag;
  a.state = State::Mapped;
  a.memory = std::move(memory);
  a.slab = place ? place->first : nullptr;
  return address;
}

// The row leaves Mapped only once the unmap succeeded; a failed release then leaves the handle with the
// row's DeviceMemory, which a later operation gives back (Note [Allocation states]).
void Allocator::unmap_and_release(Allocation& a, State asleep) {
  a.memory->unmap();
  a.state = asleep;
  a.memory->release();
}

bool Allocator::other_rows_mapped(const Slab& slab, const Allocation& except) const {
  const uintptr_t base = slab.memory.address();
  for (auto it = table_.lower_bound(base); it != table_.end() && it->first < base + slab.memory.size(); ++it)
    if (&it->second != &except && it->second.state == State::Mapped) return true;
  return false;
}

void Allocator::synchronize_devices(const std::vector<Allocation*>& rows) {
  for (int device : devices_of(rows)) backend_->synchronize(device);
}

void Allocator::free(uintptr_t address) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = table_.find(address);
  if (it == table_.end()) throw InvalidArgument("free of " + hex(address) + ", which this allocator did not allocate");
  Allocation& a = it->second;
  if (Slab* slab = a.slab) {
    // The slab's memory goes when its last Mapped row goes (and stays for the others).
    if (a.state == State::Mapped && !other_rows_mapped(*slab, a)) {
      backend_->synchronize(a.device);  // kernels still using the memory must finish before it is unmapped
      slab->memory.unmap();
      a.state = State::Discarded;
    }
    if (!slab->memory.mapped()) slab->memory.release();  // also a handle left by an earlier failed release
    slab->give_back(a.address - slab->memory.address(), a.span);
    slab->rows -= 1;
    table_.erase(it);
    if (slab->rows == 0) slabs_.erase(slab->memory.address());  // frees the slab's address range
  } else {
    if (a.state == State::Mapped) {
      backend_->synchronize(a.device);
      unmap_and_release(a, State::Discarded);
    }
    a.memory->release();  // a handle left by an earlier failed release
    table_.erase(it);     // frees the address range
  }
  host_.recycle(options_);
}

OpStats Allocator::sleep(const std::vector<std::string>& offload_tags, const std::vector<ByteRange>& preserve,
                         const std::vector<ByteRange>& exclude) {
  const auto start = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(mutex_);
  host_.settle();

  // Handles whose release failed before go back first (a second failure is raised here, unchanged).
  for (auto& [address, a] : table_)
    if (a.state != State::Mapped && a.memory) a.memory->release();
  for (auto& [base, slab] : slabs_)
    if (!slab->memory.mapped()) slab->memory.release();

  RangeSet kept_elsewhere;  // absolute: preserved bytes of allocations whose tag is not offloaded
  for (const ByteRange& r : preserve) kept_elsewhere.add(r);
  for (const ByteRange& r : exclude) kept_elsewhere.subtract(r);

  struct Step {
    Allocation* row;
    HostBackup backup;
  };
  std::vector<Step> steps;
  std::vector<Allocation*> rows;
  uint64_t backup_bytes = 0;
  for (auto& [address, a] : table_) {
    if (a.state != State::Mapped) continue;
    Step step{&a, {}};
    step.backup.whole = contains(offload_tags, a.tag);
    step.backup.ranges = step.backup.whole ? RangeSet({0, a.size})
                                           : kept_elsewhere.clipped_relative({a.address, a.address + a.size});
    step.backup.offset = backup_bytes;
    backup_bytes += step.backup.ranges.bytes();
    steps.push_back(std::move(step));
    rows.push_back(&a);
  }
  OpStats stats;
  stats.allocations = steps.size();
  if (steps.empty()) return stats;  // nothing mapped: last_sleep_ keeps the last real sleep

  // Everything that can fail comes before the first release: host memory, the wait for pending
  // work, the copies. A throw from here leaves every allocation mapped and untouched.
  std::shared_ptr<HostArena> arena = host_.acquire(backup_bytes, steps.front().row->device, options_);
  std::optional<CopyPipeline> copies;  // after `arena`: its destructor waits for copies into it
  try {
    timed(stats.sync_seconds, [&] { synchronize_devices(rows); });
    if (arena) {
      copies.emplace(*backend_, arena->data());
      for (Step& s : steps) {
        uint64_t host_offset = s.backup.offset;
        for (const ByteRange& r : s.backup.ranges.ranges()) {
          copies->add(s.row->device, s.row->address + r.begin, host_offset, r.size());
          host_offset += r.size();
        }
        s.backup.arena = arena;
      }
      stats.staging = arena->prepare(backup_bytes, options_.staging,
                                     [&](uint64_t begin, uint64_t end) { copies->feed(begin, end); });
    }
  } catch (...) {
    copies.reset();  // copies in flight must not land in an arena being freed
    for (Step& s : steps) s.backup.arena.reset();
    if (arena) host_.forget_failed(arena);  // may be half pinned
    throw;
  }

  // Release each allocation (a slab: once all of its rows) once the copies of its bytes are done,
  // while later copies still run; those with nothing to keep go first. A failure here (a copy the
  // device reports failed, a driver error) leaves those released so far asleep with complete backups
  // and the rest mapped: nothing is lost, and the same sleep can be retried.
  uint64_t released_bytes = 0;
  auto release = [&](const Unit& u) {
    timed(stats.unmap_seconds, [&] { u.memory->unmap(); });
    for (size_t i : u.members) {
      Step& s = steps[i];
      Allocation& a = *s.row;
      if (s.backup.ranges.empty()) {
        a.state = State::Discarded;
      } else {
        a.state = State::BackedUp;
        a.backup = std::move(s.backup);
      }
    }
    released_bytes += u.memory->size();
    stats.mappings += 1;
    timed(stats.release_seconds, [&] { u.memory->release(); });
  };
  const std::vector<Unit> units = units_of(steps.size(), [&](size_t i) -> const Allocation& { return *steps[i].row; });
  std::vector<uint64_t> host_end(units.size(), 0);  // past its last byte copied; 0: it keeps nothing
  for (size_t k = 0; k < units.size(); ++k)
    for (size_t i : units[k].members)
      if (!steps[i].backup.ranges.empty())
        host_end[k] = std::max(host_end[k], steps[i].backup.offset + steps[i].backup.ranges.bytes());
  for (size_t k = 0; k < units.size(); ++k)
    if (host_end[k] == 0) release(units[k]);
  for (size_t k = 0; k < units.size(); ++k) {
    if (host_end[k] == 0) continue;
    timed(stats.copy_wait_seconds, [&] { copies->wait_copied(units[k].memory->device(), host_end[k]); });
    release(units[k]);
  }
  copies.reset();
  stats.bytes_device = released_bytes;
  stats.bytes_copied = backup_bytes;
  stats.seconds = seconds_since(start);
  last_sleep_ = stats;
  return stats;
}

OpStats Allocator::wake(const std::optional<std::vector<std::string>>& tags) {
  const auto start = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(mutex_);

  std::vector<Allocation*> rows;
  for (auto& [address, a] : table_) {
    bool asleep = a.state == State::BackedUp || a.state == State::Discarded;
    if (!asleep || (tags && !contains(*tags, a.tag))) continue;
    rows.push_back(&a);
  }
  OpStats stats;
  stats.allocations = rows.size();
  if (rows.empty()) return stats;  // nothing asleep: last_wake_ keeps the last real wake

  // The rows of a slab are mapped with it, in one go (Note [Allocation states]).
  const std::vector<Unit> units = units_of(rows.size(), [&](size_t i) -> const Allocation& { return *rows[i]; });
  std::map<int, uint64_t> needed;  // device -> bytes
  std::map<int, std::set<std::string>> tags_on;
  for (const Unit& u : units) needed[u.memory->device()] += u.memory->size();
  for (const Allocation* a : rows) tags_on[a->device].insert(a->tag);

  auto no_room = [&](int device, const std::string& why) {
    std::string names;
    for (const std::string& t : tags_on[device]) names += (names.empty() ? "'" : ", '") + t + "'";
    MemoryInfo info = backend_->memory_info(device);
    return DeviceOutOfMemory("cannot wake tag " + names + " on device " + std::to_string(device) + ": needs " +
                             format_bytes(needed[device]) + ", " + format_bytes(info.free) +
                             " free. Nothing was changed: every backup and sleeping allocation is intact; "
                             "retry once memory is free" + (why.empty() ? "" : " (" + why + ")"));
  };
  for (const auto& [device, bytes] : needed)
    if (backend_->memory_info(device).free < bytes) throw no_room(device, "");

  // Map each allocation (or slab) and start its copies at once, so mapping the next overlaps them;
  // undo all of it if any step fails. (Driver calls on several threads were measured slower.)
  std::set<int> copying;
  auto undo = [&] {
    drain_copies(*backend_, copying);  // nothing may still write into memory that is unmapped here
    for (const Unit& u : units)
      warn_on_failure("undoing a failed wake", [&] { u.memory->release(); });
  };
  try {
    std::vector<CopySpan> spans;
    for (const Unit& u : units) {
      try {
        timed(stats.map_seconds, [&] { u.memory->map(); });
      } catch (const DeviceOutOfMemory& e) {
        throw no_room(u.memory->device(), e.what());
      }
      for (size_t i : u.members) {
        Allocation& a = *rows[i];
        if (options_.fill_unrestored) {
          RangeSet unrestored({0, a.span});
          if (a.backup) unrestored.subtract(a.backup->ranges);
          for (const ByteRange& r : unrestored.ranges())
            backend_->fill(a.device, a.address + r.begin, r.size(), 0xFF);
          copying.insert(a.device);
        }
        if (!a.backup) continue;
        spans.clear();
        uint8_t* host = a.backup->arena->data() + a.backup->offset;
        for (const ByteRange& r : a.backup->ranges.ranges()) {
          a.backup->arena->split_at_registrations({a.address + r.begin, host, r.size()}, spans);
          host += r.size();
          stats.bytes_copied += r.size();
        }
        copying.insert(a.device);
        backend_->enqueue_copies(a.device, CopyDirection::ToDevice, spans);
      }
    }
    timed(stats.copy_wait_seconds, [&] {
      for (int device : copying) backend_->wait_copies(device);
    });
  } catch (...) {
    undo();
    throw;
  }

  for (Allocation* a : rows) {
    a->state = State::Mapped;
    a->backup.reset();
  }
  for (const Unit& u : units) stats.bytes_device += u.memory->size();
  stats.mappings = units.size();
  host_.recycle(options_);
  stats.seconds = seconds_since(start);
  last_wake_ = stats;
  return stats;
}

void Allocator::discard(const std::vector<std::string>& tags) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<Allocation*> mapped;
  for (auto& [address, a] : table_)
    if (a.state == State::Mapped && contains(tags, a.tag)) mapped.push_back(&a);
  synchronize_devices(mapped);
  // A slab's Mapped rows all have its tag, so they go together, with its memory.
  for (const Unit& u : units_of(mapped.size(), [&](size_t i) -> const Allocation& { return *mapped[i]; })) {
    u.memory->unmap();
    for (size_t i : u.members) mapped[i]->state = State::Discarded;
    u.memory->release();
  }
  for (auto& [address, a] : table_) {
    if (a.state == State::BackedUp && contains(tags, a.tag)) {
      a.backup.reset();
      a.state = State::Discarded;
    }
  }
  host_.recycle(options_);
}

void Allocator::trim(uintptr_t address) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = table_.find(address);
  if (it == table_.end()) throw InvalidArgument("trim of " + hex(address) + ", which this allocator did not allocate");
  Allocation& a = it->second;
  if (Slab* slab = a.slab) {
    // The row keeps its range (its address stays its own until freed); the slab's memory goes when
    // its last Mapped row goes.
    if (a.state == State::Mapped && !other_rows_mapped(*slab, a)) {
      backend_->synchronize(a.device);
      slab->memory.unmap();
      a.state = State::Unused;
    }
    if (!slab->memory.mapped()) slab->memory.release();  // also a handle left by an earlier failed release
  } else {
    if (a.state == State::Mapped) {
      backend_->synchronize(a.device);
      unmap_and_release(a, State::Unused);
    }
    a.memory->release();  // a handle left by an earlier failed release
  }
  a.backup.reset();
  a.state = State::Unused;
  host_.recycle(options_);
}

uint64_t Allocator::host_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return host_.held_bytes();
}

uint64_t Allocator::host_pinned_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return host_.pinned_bytes();
}

void Allocator::release_host_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  host_.release_idle();
}

void Allocator::prepare_host(uint64_t bytes, int device, bool wait) {
  std::unique_lock<std::mutex> lock(mutex_);
  host_.prepare(bytes, device, wait, options_, lock);
}

void Allocator::wait_host() { host_.wait(); }

std::string Allocator::host_error() { return host_.take_error(); }

void Allocator::simulate_host_reclaim() {
  std::lock_guard<std::mutex> lock(mutex_);
  host_.simulate_reclaim();
}

std::vector<AllocationInfo> Allocator::allocations() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<AllocationInfo> out;
  out.reserve(table_.size());
  for (const auto& [address, a] : table_) {
    uint64_t backup = a.backup ? a.backup->ranges.bytes() : 0;
    out.push_back({a.address, a.size, a.device, a.tag, a.state, backup, a.backup && !a.backup->whole ? backup : 0});
  }
  return out;
}

std::map<std::string, TagStats> Allocator::tag_stats() const {
  std::map<std::string, TagStats> out;
  for (const AllocationInfo& a : allocations()) {
    if (a.state == State::Unused) continue;
    TagStats& s = out[a.tag];
    s.allocations += 1;
    (a.state == State::Mapped ? s.mapped_bytes : s.asleep_bytes) += a.size;
    s.backed_up_bytes += a.backup_bytes;
    s.preserved_bytes += a.preserved_bytes;
  }
  return out;
}

std::optional<OpStats> Allocator::last_sleep() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return last_sleep_;
}

std::optional<OpStats> Allocator::last_wake() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return last_wake_;
}

AllocatorOptions Allocator::options() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return options_;
}

void Allocator::set_options(const AllocatorOptions& options) {
  std::lock_guard<std::mutex> lock(mutex_);
  set_options_locked(options);
}

void Allocator::set_options_locked(const AllocatorOptions& options) {
  if (options.slab_bytes > kMaxSlabBytes)
    throw InvalidArgument("slab bytes must be at most " + format_bytes(kMaxSlabBytes) + ", got " +
                          std::to_string(options.slab_bytes));
  if (options.staging.threads == 0) throw InvalidArgument("staging threads must be at least 1");
  if (!(options.reclaimable_pinned_share >= 0 && options.reclaimable_pinned_share <= 1))
    throw InvalidArgument("reclaimable pinned share must be between 0 and 1, got " +
                          std::to_string(options.reclaimable_pinned_share));
  if (options.staging.piece_bytes < kMinStagingPieceBytes || options.staging.piece_bytes > kMaxStagingPieceBytes)
    throw InvalidArgument("staging_piece_bytes must be between " + format_bytes(kMinStagingPieceBytes) + " and " +
                          format_bytes(kMaxStagingPieceBytes) + " (it is rounded up to whole 2 MiB pages), got " +
                          std::to_string(options.staging.piece_bytes));
  options_ = options;
  host_.recycle(options_);
}

}  // namespace vse
