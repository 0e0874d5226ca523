#include "allocator.h"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <set>

#include "errors.h"

namespace vse {
namespace {

constexpr size_t kMaxIdleArenas = 4;

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

// Enqueues the parts of `spans` (laid out back to back from host offset 0) that fall in [begin, end).
class SpanFeeder {
 public:
  SpanFeeder(const std::vector<std::pair<int, CopySpan>>& spans, uint8_t* host_base)
      : spans_(spans), host_base_(host_base) {}

  // Returns the devices that got copies.
  std::set<int> feed(DeviceBackend& backend, CopyDirection direction, uint64_t begin, uint64_t end) {
    std::map<int, std::vector<CopySpan>> by_device;
    while (next_ < spans_.size()) {
      const auto& [device, span] = spans_[next_];
      uint64_t span_begin = static_cast<uint64_t>(static_cast<uint8_t*>(span.host) - host_base_);
      uint64_t from = std::max(span_begin + done_, begin);
      uint64_t to = std::min(span_begin + span.bytes, end);
      if (from >= to) break;
      uint64_t skip = from - span_begin;
      by_device[device].push_back({span.device + skip, static_cast<uint8_t*>(span.host) + skip, to - from});
      done_ = to - span_begin;
      if (done_ < span.bytes) break;
      ++next_;
      done_ = 0;
    }
    std::set<int> devices;
    for (const auto& [device, parts] : by_device) {
      backend.enqueue_copies(device, direction, parts);
      devices.insert(device);
    }
    return devices;
  }

 private:
  const std::vector<std::pair<int, CopySpan>>& spans_;
  uint8_t* host_base_;
  size_t next_ = 0;
  uint64_t done_ = 0;  // bytes of spans_[next_] already enqueued
};

std::set<int> devices_of(const std::vector<Allocation*>& rows) {
  std::set<int> devices;
  for (const Allocation* a : rows) devices.insert(a->device);
  return devices;
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

Allocator::Allocator(std::unique_ptr<DeviceBackend> backend) : backend_(std::move(backend)) {}

Allocator::~Allocator() {
  host_worker_.cancel_and_wait();
  // Instances on the host backend come and go in tests; give their memory back. (The process-wide
  // CUDA instance is never destroyed: the driver may be gone by then.)
  for (auto& [address, a] : table_) {
    try {
      if (a.state == State::Mapped) release_physical(a);
      backend_->unreserve(a.device, a.address, a.mapped_size);
    } catch (...) {
    }
  }
}

uintptr_t Allocator::allocate(uint64_t size, int device, const std::string& tag) {
  if (size == 0) throw InvalidArgument("allocation size must be positive, got 0");
  if (tag.empty()) throw InvalidArgument("allocation tag must not be empty");
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t mapped_size = round_up(size, backend_->granularity(device));
  uintptr_t address = backend_->reserve(device, mapped_size);
  PhysicalHandle handle = 0;
  bool created = false;
  try {
    handle = backend_->create(device, mapped_size);
    created = true;
    backend_->map(device, address, mapped_size, handle);
  } catch (const DeviceOutOfMemory& e) {
    if (created) backend_->release(device, handle);
    backend_->unreserve(device, address, mapped_size);
    throw DeviceOutOfMemory("cannot allocate " + format_bytes(mapped_size) + " for tag '" + tag + "' on device " +
                            std::to_string(device) + ": " + e.what());
  } catch (...) {
    if (created) backend_->release(device, handle);
    backend_->unreserve(device, address, mapped_size);
    throw;
  }
  Allocation& a = table_[address];
  a.address = address;
  a.size = size;
  a.mapped_size = mapped_size;
  a.device = device;
  a.tag = tag;
  a.state = State::Mapped;
  a.handle = handle;
  return address;
}

void Allocator::release_physical(Allocation& a) {
  backend_->unmap(a.device, a.address, a.mapped_size);
  backend_->release(a.device, a.handle);
  a.handle = 0;
}

void Allocator::drain_copies(const std::set<int>& devices) noexcept {
  for (int device : devices) {
    try {
      backend_->wait_copies(device);
    } catch (...) {
      // The copy that failed is what is being reported; the stream is idle either way.
    }
  }
}

void Allocator::synchronize_devices(const std::vector<Allocation*>& rows) {
  for (int device : devices_of(rows)) backend_->synchronize(device);
}

void Allocator::free(uintptr_t address) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = table_.find(address);
  if (it == table_.end()) throw InvalidArgument("free of " + hex(address) + ", which this allocator did not allocate");
  Allocation& a = it->second;
  if (a.state == State::Mapped) {
    backend_->synchronize(a.device);  // kernels still using the memory must finish before it is unmapped
    release_physical(a);
  }
  backend_->unreserve(a.device, a.address, a.mapped_size);
  table_.erase(it);
  recycle_arenas();
}

OpStats Allocator::sleep(const std::vector<std::string>& offload_tags, const std::vector<ByteRange>& preserve,
                         const std::vector<ByteRange>& exclude) {
  const auto start = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(mutex_);
  settle_host_work();

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
  struct Mark {
    uint64_t host_end;  // the copies of host bytes [0, host_end) precede the mark
    uint64_t handle;
  };
  std::map<int, std::vector<Mark>> marks;
  std::map<int, size_t> marks_waited;
  auto release_marks = [&] {
    for (auto& [device, list] : marks)
      for (const Mark& m : list) backend_->release_mark(device, m.handle);
  };
  std::shared_ptr<HostArena> arena;
  if (backup_bytes > 0) arena = acquire_arena(backup_bytes, steps.front().row->device);
  drop_prepared_unless(arena.get());
  try {
    synchronize_devices(rows);
    if (arena) {
      std::vector<std::pair<int, CopySpan>> spans;
      for (Step& s : steps) {
        uint64_t host_offset = s.backup.offset;
        for (const ByteRange& r : s.backup.ranges.ranges()) {
          spans.push_back({s.row->device, {s.row->address + r.begin, arena->data() + host_offset, r.size()}});
          host_offset += r.size();
        }
        s.backup.arena = arena;
      }
      SpanFeeder feeder(spans, arena->data());
      stats.staging = arena->prepare(backup_bytes, options_.staging, [&](uint64_t begin, uint64_t end) {
        for (int device : feeder.feed(*backend_, CopyDirection::ToHost, begin, end))
          marks[device].push_back({end, backend_->record_mark(device)});
      });
    }
  } catch (...) {
    drain_copies(devices_of(rows));  // copies in flight must not land in an arena being freed
    release_marks();
    for (Step& s : steps) s.backup.arena.reset();
    if (arena) arenas_.erase(std::find(arenas_.begin(), arenas_.end(), arena));  // may be half pinned
    throw;
  }

  // Release each allocation once the copies of its bytes are done, while later copies still run;
  // allocations with nothing to keep go first. A failure here (a copy the device reports failed, a
  // driver error) leaves the allocations released so far asleep with complete backups and the rest
  // mapped: nothing is lost, and the same sleep can be retried.
  auto copied = [&](const Step& s) {
    const uint64_t host_end = s.backup.offset + s.backup.ranges.bytes();
    std::vector<Mark>& list = marks[s.row->device];
    size_t& waited = marks_waited[s.row->device];
    if (waited > 0 && list[waited - 1].host_end >= host_end) return;  // done with an earlier wait
    size_t k = waited;
    while (k < list.size() && list[k].host_end < host_end) ++k;
    if (k < list.size()) {
      backend_->wait_mark(s.row->device, list[k].handle);
      waited = k + 1;
    }
  };
  uint64_t released_bytes = 0;
  auto release = [&](Step& s) {
    Allocation& a = *s.row;
    backend_->unmap(a.device, a.address, a.mapped_size);
    PhysicalHandle handle = a.handle;
    a.handle = 0;
    if (s.backup.ranges.empty()) {
      a.state = State::Discarded;
    } else {
      a.state = State::BackedUp;
      a.backup = std::move(s.backup);
    }
    released_bytes += a.mapped_size;
    backend_->release(a.device, handle);
  };
  try {
    for (Step& s : steps)
      if (s.backup.ranges.empty()) release(s);
    for (Step& s : steps) {
      if (s.backup.ranges.empty()) continue;
      copied(s);
      release(s);
    }
  } catch (...) {
    drain_copies(devices_of(rows));
    release_marks();
    throw;
  }
  release_marks();
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
  std::map<int, uint64_t> needed;  // device -> bytes
  std::map<int, std::set<std::string>> tags_on;
  for (auto& [address, a] : table_) {
    bool asleep = a.state == State::BackedUp || a.state == State::Discarded;
    if (!asleep || (tags && !contains(*tags, a.tag))) continue;
    rows.push_back(&a);
    needed[a.device] += a.mapped_size;
    tags_on[a.device].insert(a.tag);
  }
  OpStats stats;
  stats.allocations = rows.size();
  if (rows.empty()) return stats;  // nothing asleep: last_wake_ keeps the last real wake

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

  // Map each allocation and start its copies at once, so mapping the next overlaps them; undo all
  // of it if any step fails. (Driver calls on several threads were measured slower, not faster.)
  std::vector<PhysicalHandle> handles(rows.size());
  std::vector<char> is_mapped(rows.size(), 0);
  std::set<int> copying;
  auto undo = [&] {
    drain_copies(copying);  // nothing may still write into memory that is unmapped here
    for (size_t i = 0; i < rows.size(); ++i) {
      if (!is_mapped[i]) continue;
      try {
        backend_->unmap(rows[i]->device, rows[i]->address, rows[i]->mapped_size);
        backend_->release(rows[i]->device, handles[i]);
      } catch (...) {
      }
    }
  };
  try {
    std::vector<CopySpan> spans;
    for (size_t i = 0; i < rows.size(); ++i) {
      Allocation& a = *rows[i];
      try {
        handles[i] = backend_->create(a.device, a.mapped_size);
      } catch (const DeviceOutOfMemory& e) {
        throw no_room(a.device, e.what());
      }
      try {
        backend_->map(a.device, a.address, a.mapped_size, handles[i]);
      } catch (...) {
        backend_->release(a.device, handles[i]);
        throw;
      }
      is_mapped[i] = 1;
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
    for (int device : copying) backend_->wait_copies(device);
  } catch (...) {
    undo();
    throw;
  }

  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i]->state = State::Mapped;
    rows[i]->handle = handles[i];
    rows[i]->backup.reset();
    stats.bytes_device += rows[i]->mapped_size;
  }
  recycle_arenas();
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
  for (Allocation* a : mapped) {
    release_physical(*a);
    a->state = State::Discarded;
  }
  for (auto& [address, a] : table_) {
    if (a.state == State::BackedUp && contains(tags, a.tag)) {
      a.backup.reset();
      a.state = State::Discarded;
    }
  }
  recycle_arenas();
}

void Allocator::trim(uintptr_t address) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = table_.find(address);
  if (it == table_.end()) throw InvalidArgument("trim of " + hex(address) + ", which this allocator did not allocate");
  Allocation& a = it->second;
  if (a.state == State::Mapped) {
    backend_->synchronize(a.device);
    release_physical(a);
  }
  a.backup.reset();
  a.state = State::Unused;
  recycle_arenas();
}

std::shared_ptr<HostArena> Allocator::acquire_arena(uint64_t bytes, int device) {
  auto idle = [](const std::shared_ptr<HostArena>& a) { return a.use_count() == 1; };
  const uint64_t limit = options_.host_memory_limit;
  bytes = round_up(bytes, 4096);  // what the arena will hold
  if (limit != 0) {
    uint64_t in_use = 0;  // idle arenas are only a cache and can be dropped
    for (const auto& arena : arenas_)
      if (!idle(arena)) in_use += arena->capacity();
    if (in_use + bytes > limit)
      throw HostOutOfMemory("sleep needs " + format_bytes(bytes) + " of host memory for backups, but the host " +
                            "memory limit is " + format_bytes(limit) + " with " + format_bytes(in_use) +
                            " in use. Nothing was released");
  }
  // Reuse an idle arena only if it keeps host memory within 1% of the backup.
  std::shared_ptr<HostArena> best;
  for (const auto& arena : arenas_) {
    bool fits = arena->capacity() >= bytes && arena->capacity() <= bytes + bytes / 100 + 4096;
    if (idle(arena) && fits && (!best || arena->capacity() < best->capacity())) best = arena;
  }
  if (best) return best;
  if (limit != 0 && host_bytes_locked() + bytes > limit)
    arenas_.erase(std::remove_if(arenas_.begin(), arenas_.end(), idle), arenas_.end());
  auto arena = std::make_shared<HostArena>(*backend_, device, bytes);
  arenas_.push_back(arena);
  return arena;
}

void Allocator::recycle_arenas() {
  const HostPolicy policy = options_.effective_host_policy();
  auto is_idle = [&](const std::shared_ptr<HostArena>& a) { return a.use_count() == 1 && a.get() != prepared_; };
  size_t idle = 0;
  for (auto it = arenas_.rbegin(); it != arenas_.rend(); ++it)
    if (is_idle(*it)) ++idle;
  const size_t keep = policy == HostPolicy::Release ? 0 : kMaxIdleArenas;
  // Drop the oldest idle arenas beyond what is kept.
  for (auto it = arenas_.begin(); it != arenas_.end() && idle > keep;) {
    if (is_idle(*it)) {
      it = arenas_.erase(it);
      --idle;
    } else {
      ++it;
    }
  }
  if (policy == HostPolicy::Reclaimable)
    for (const auto& arena : arenas_)
      if (is_idle(arena) && arena->pinned_bytes() > 0) post_reclaim(arena);
}

uint64_t Allocator::host_bytes_locked() const {
  uint64_t total = 0;
  for (const auto& arena : arenas_) total += arena->capacity();
  return total;
}

uint64_t Allocator::host_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return host_bytes_locked();
}

void Allocator::release_host_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  settle_host_work();
  prepared_ = nullptr;
  arenas_.erase(std::remove_if(arenas_.begin(), arenas_.end(), [](const auto& a) { return a.use_count() == 1; }),
                arenas_.end());
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
  if (options.staging.threads == 0) throw InvalidArgument("staging threads must be at least 1");
  std::lock_guard<std::mutex> lock(mutex_);
  options_ = options;
  recycle_arenas();
}

}  // namespace vse
