#include "allocator.h"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <set>
#include <thread>

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

}  // namespace

const char* state_name(State state) {
  switch (state) {
    case State::Mapped: return "mapped";
    case State::BackedUp: return "backed_up";
    case State::Discarded: return "discarded";
  }
  return "?";
}

// The rows of one segment that an operation moves: indices into the operation's own list of rows.
struct Allocator::SegmentRows {
  Segment* segment;
  std::vector<size_t> members;
  std::vector<uint64_t> offsets;  // of each member in the segment
};

// Groups rows (in table order) by segment, in the order each segment first appears.
template <typename RowOf>
std::vector<Allocator::SegmentRows> Allocator::by_segment(size_t count, RowOf row_of) {
  std::vector<SegmentRows> groups;
  std::map<const Segment*, size_t> index;
  for (size_t i = 0; i < count; ++i) {
    Segment* s = row_of(i).segment;
    auto [it, fresh] = index.try_emplace(s, groups.size());
    if (fresh) groups.push_back({s, {}, {}});
    groups[it->second].members.push_back(i);
    groups[it->second].offsets.push_back(row_of(i).offset);
  }
  return groups;
}

void Allocator::synchronize_devices(const std::vector<SegmentRows>& segments) {
  std::set<int> devices;
  for (const SegmentRows& g : segments) devices.insert(g.segment->device());
  for (int device : devices) backend_->synchronize(device);
}

Allocator::Allocator(std::unique_ptr<DeviceBackend> backend)
    : backend_(std::move(backend)),
      disk_(*backend_),
      primer_(
          backend_->prime_delays(), [this](int device) { backend_->prime(device); },
          [this] { return std::unique_lock<std::mutex>(mutex_, std::try_to_lock).owns_lock(); }),
      host_(*backend_) {
  host_.set_prepare_rate(options_.host_prepare_rate);
}

// Each Segment gives its memory back (instances on the host backend come and go in tests). The
// process-wide CUDA instance is never destroyed: the driver may be gone by then. Background host work
// ends first (host_ goes first): its jobs hold arenas.
Allocator::~Allocator() = default;

Segment& Allocator::new_segment(int device, const std::string& tag, uint64_t size, bool shared) {
  auto segment = std::make_unique<Segment>(*backend_, device, tag, size, shared);
  segment->map({0, size});
  Segment& s = *segment;
  segments_.emplace(s.address(), std::move(segment));
  return s;
}

// A mapped free range of an awake slab of (device, tag), or a new slab, or (slabs off, row too big,
// device too full for a new slab) a segment of its own; throws DeviceOutOfMemory when none can be had.
std::pair<Segment*, uint64_t> Allocator::place(uint64_t span, int device, const std::string& tag) {
  const uint64_t slab_bytes = round_up(options_.slab_bytes, backend_->granularity(device));
  if (slab_bytes != 0 && span <= slab_bytes / 2) {
    for (auto& [base, s] : segments_) {
      if (!s->shared() || s->device() != device || s->tag() != tag) continue;
      if (auto offset = s->take(span)) return {s.get(), *offset};
    }
    try {
      Segment& s = new_segment(device, tag, slab_bytes, true);
      return {&s, *s.take(span)};
    } catch (const DeviceOutOfMemory&) {
      // no room for a whole slab: the row gets just its own size
    }
  }
  Segment& s = new_segment(device, tag, span, false);
  return {&s, *s.take(span)};
}

uintptr_t Allocator::allocate(uint64_t size, int device, const std::string& tag,
                             const std::function<bool()>& may_synchronize) {
  if (size == 0) throw InvalidArgument("allocation size must be positive, got 0");
  if (tag.empty()) throw InvalidArgument("allocation tag must not be empty");
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t span = round_up(size, backend_->granularity(device));
  std::pair<Segment*, uint64_t> at;
  try {
    try {
      at = place(span, device, tag);
    } catch (const DeviceOutOfMemory&) {
      if (quarantined_bytes_locked() == 0 || !may_synchronize()) throw;
      settle_locked();  // what was freed may be all the room there is
      at = place(span, device, tag);
    }
  } catch (const DeviceOutOfMemory& e) {
    throw DeviceOutOfMemory("cannot allocate " + format_bytes(span) + " for tag '" + tag + "' on device " +
                            std::to_string(device) + ": " + e.what());
  }
  const uintptr_t address = at.first->address() + at.second;
  Allocation& a = table_[address];
  a.address = address;
  a.size = size;
  a.span = span;
  a.segment = at.first;
  a.offset = at.second;
  a.state = State::Mapped;
  return address;
}

void Allocator::free(uintptr_t address) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = table_.find(address);
  if (it == table_.end()) throw InvalidArgument("free of " + hex(address) + ", which this allocator did not allocate");
  Segment& s = *it->second.segment;
  s.free_row(it->second.offset, it->second.state == State::Mapped);
  table_.erase(it);
  if (s.idle()) segments_.erase(s.address());  // nothing is mapped in it: only the address range goes
  host_.recycle(options_);  // host cache: a backup may have gone with the row
}

void Allocator::settle() {
  std::lock_guard<std::mutex> lock(mutex_);
  settle_locked();
}

void Allocator::settle_locked() {
  std::set<int> devices;
  for (const auto& [base, s] : segments_)
    if (s->quarantined_bytes() != 0) devices.insert(s->device());
  for (int device : devices) backend_->synchronize(device);
  for (auto it = segments_.begin(); it != segments_.end();) {
    Segment& s = *it->second;
    s.end_quarantine();
    s.release_unused();
    it = s.idle() ? segments_.erase(it) : std::next(it);
  }
}

uint64_t Allocator::quarantined_bytes_locked() const {
  uint64_t total = 0;
  for (const auto& [base, s] : segments_) total += s->quarantined_bytes();
  return total;
}

uint64_t Allocator::quarantined_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return quarantined_bytes_locked();
}

MemoryInfo Allocator::device_memory(int device) {
  std::lock_guard<std::mutex> lock(mutex_);
  return backend_->memory_info(device);
}

// Each run goes only once its unmap succeeded, and its rows are moved in between, so a failed release
// leaves them asleep and the handle with the segment (Note [Allocation states]).
void Allocator::release_runs(const SegmentRows& rows, OpStats& stats, const std::function<void(size_t)>& asleep) {
  Segment& segment = *rows.segment;
  for (const ByteRange& run : segment.mapped_runs()) {
    timed(stats.unmap_seconds, [&] { segment.unmap(run.begin); });
    for (size_t j = 0; j < rows.members.size(); ++j)
      if (rows.offsets[j] >= run.begin && rows.offsets[j] < run.end) asleep(rows.members[j]);
    stats.bytes_device += run.size();
    stats.mappings += 1;
    timed(stats.release_seconds, [&] { segment.release(run.begin); });
  }
}

void Allocator::prime_after(const std::vector<SegmentRows>& released) {
  if (!options_.prime_after_release) return;
  std::set<int> devices;
  for (const SegmentRows& g : released) devices.insert(g.segment->device());
  primer_.released(devices);
}

// What a sleep will do: the Mapped rows, the bytes of each that go to the host, by segment.
struct Allocator::SleepPlan {
  struct Step {
    Allocation* row;
    HostBackup backup;
  };
  std::vector<Step> steps;
  std::vector<SegmentRows> segments;
  std::vector<uint64_t> host_end;  // per segment: past its last byte copied to host; 0: none
  uint64_t backup_bytes = 0;
  uint64_t host_bytes = 0;  // the first this many of backup_bytes go to host memory, the rest to disk
};

Allocator::SleepPlan Allocator::plan_sleep(const std::vector<std::string>& offload_tags,
                                           const std::vector<ByteRange>& preserve,
                                           const std::vector<ByteRange>& exclude) {
  RangeSet kept_elsewhere;  // absolute: preserved bytes of allocations whose tag is not offloaded
  for (const ByteRange& r : preserve) kept_elsewhere.add(r);
  for (const ByteRange& r : exclude) kept_elsewhere.subtract(r);
  SleepPlan plan;
  for (auto& [address, a] : table_) {
    if (a.state != State::Mapped) continue;
    SleepPlan::Step step{&a, {}};
    step.backup.whole = contains(offload_tags, a.tag());
    step.backup.ranges = step.backup.whole ? RangeSet({0, a.size})
                                           : kept_elsewhere.clipped_relative({a.address, a.address + a.size});
    step.backup.offset = plan.backup_bytes;
    plan.backup_bytes += step.backup.ranges.bytes();
    plan.steps.push_back(std::move(step));
  }
  // Past the host memory limit, the rest goes to disk when a directory is set (Note [Disk tier]).
  plan.host_bytes = std::min(plan.backup_bytes, host_.room(options_));
  plan.segments = by_segment(plan.steps.size(), [&](size_t i) -> const Allocation& { return *plan.steps[i].row; });
  for (const SegmentRows& g : plan.segments) {
    uint64_t end = 0;
    for (size_t i : g.members) {
      const SleepPlan::Step& s = plan.steps[i];
      if (!s.backup.ranges.empty() && s.backup.offset < plan.host_bytes)
        end = std::max(end, std::min(plan.host_bytes, s.backup.offset + s.backup.ranges.bytes()));
    }
    plan.host_end.push_back(end);
  }
  return plan;
}

// Everything of a sleep that can fail comes before the first release: host memory, the wait for
// pending work, the disk part written whole, the copies. A throw from here leaves every allocation
// mapped and untouched. Compression and the disk tier are not combined yet: a sleep with a disk part
// is copied plain (the plan splits plain bytes between host and disk).
std::unique_ptr<BackupCopies> Allocator::copy_backups(SleepPlan& plan, std::shared_ptr<HostArena>& arena,
                                                      OpStats& stats) {
  arena = host_.acquire(plan.host_bytes, plan.steps.front().row->device(), options_);  // host cache
  std::unique_ptr<BackupCopies> copies;
  try {
    timed(stats.sync_seconds, [&] { synchronize_devices(plan.segments); });
    if (arena && plan.host_bytes == plan.backup_bytes) copies = compress_backups(plan, *arena, stats);
    if (copies) {
      for (SleepPlan::Step& s : plan.steps) s.backup.arena = arena;
    } else {
      std::unique_ptr<CopyPipeline> plain;
      if (arena) plain = std::make_unique<CopyPipeline>(*backend_, arena->data());
      // The backups back to back: [0, host_bytes) in the arena, the rest in the file from its offset 0.
      std::vector<DiskSpan> to_disk;
      for (SleepPlan::Step& s : plan.steps) {
        uint64_t at = s.backup.offset;
        for (const ByteRange& r : s.backup.ranges.ranges()) {
          const uint64_t host_part = at < plan.host_bytes ? std::min(r.size(), plan.host_bytes - at) : 0;
          if (host_part != 0) plain->add(s.row->device(), s.row->address + r.begin, at, host_part);
          if (host_part < r.size()) {
            if (s.backup.disk_bytes == 0) s.backup.file_offset = at + host_part - plan.host_bytes;
            s.backup.disk_bytes += r.size() - host_part;
            to_disk.push_back({s.row->device(), s.row->address + r.begin + host_part,
                               at + host_part - plan.host_bytes, r.size() - host_part});
          }
          at += r.size();
        }
        if (s.backup.disk_bytes < s.backup.ranges.bytes()) s.backup.arena = arena;
      }
      if (!to_disk.empty()) {
        std::shared_ptr<DiskFile> file =
            disk_.write(options_.disk, to_disk, plan.backup_bytes - plan.host_bytes, stats.disk);
        for (SleepPlan::Step& s : plan.steps)
          if (s.backup.disk_bytes != 0) s.backup.file = file;
      }
      if (arena) {
        CopyPipeline* copy = plain.get();
        stats.staging = arena->prepare(plan.host_bytes, options_.staging,
                                       [&](uint64_t begin, uint64_t end) { copy->feed(begin, end); });
      }
      copies = std::move(plain);
    }
  } catch (...) {
    copies.reset();  // copies in flight must not land in an arena being freed
    for (SleepPlan::Step& s : plan.steps) {
      s.backup.arena.reset();
      s.backup.file.reset();
      s.backup.disk_bytes = 0;
    }
    if (arena) host_.forget_failed(arena);  // host cache: may be half pinned
    throw;
  }
  return copies;
}

// Releases each segment once the copies of all of its rows are done, while later copies still run;
// those with nothing to keep go first. A failure here (a copy the device reports failed, a driver
// error) leaves those released so far asleep with complete backups and the rest mapped: nothing is
// lost, and the same sleep can be retried.
// Note [Compressed backups]: on one device, with a codec and staging memory; else plain (auto) or an
// error (on), before anything is released.
std::unique_ptr<BackupCopies> Allocator::compress_backups(SleepPlan& plan, HostArena& arena, OpStats& stats) {
  const CompressOptions& o = options_.compress;
  if (o.mode == CompressMode::Off) return nullptr;
  std::set<int> devices;
  for (const SleepPlan::Step& s : plan.steps)
    if (!s.backup.ranges.empty()) devices.insert(s.row->device());
  std::shared_ptr<Codec> codec = codecs_.get(*backend_);
  if (!codec) {
    if (o.mode == CompressMode::On) throw Error("compress is 'on' but cannot work here: " + codecs_.why());
    return nullptr;  // auto: the Python layer said why, once
  }
  if (devices.size() != 1) return nullptr;  // backups spread over devices go plain
  const int device = *devices.begin();
  std::unique_ptr<CompressedSleep> packed;
  try {
    packed = std::make_unique<CompressedSleep>(*backend_, *backend_->codec_stream(device), *codec, device, o, arena);
  } catch (const DeviceOutOfMemory& e) {
    const std::string why = "no device memory for compression staging (" + std::string(e.what()) + ")";
    if (o.mode == CompressMode::On) throw DeviceOutOfMemory("compress is 'on': " + why + "; nothing was changed");
    warn("compress 'auto': " + why + "; this sleep copies plain");
    return nullptr;
  }
  for (size_t i = 0; i < plan.steps.size(); ++i) {
    const SleepPlan::Step& s = plan.steps[i];
    uint64_t plain_offset = s.backup.offset;
    for (const ByteRange& r : s.backup.ranges.ranges()) {
      packed->add(i, s.row->address + r.begin, r.begin, plain_offset, r.size());
      plain_offset += r.size();
    }
  }
  stats.staging = packed->run(options_.staging);
  for (size_t i = 0; i < plan.steps.size(); ++i) plan.steps[i].backup.pieces = packed->pieces_of(i);
  stats.compress = packed->totals();
  return packed;
}

void Allocator::release_slept(SleepPlan& plan, BackupCopies* copies, OpStats& stats) {
  auto asleep = [&](size_t i) {
    SleepPlan::Step& s = plan.steps[i];
    if (s.backup.ranges.empty()) {
      s.row->state = State::Discarded;
    } else {
      s.row->state = State::BackedUp;
      s.row->backup = std::move(s.backup);
    }
  };
  for (size_t k = 0; k < plan.segments.size(); ++k)
    if (plan.host_end[k] == 0) release_runs(plan.segments[k], stats, asleep);
  for (size_t k = 0; k < plan.segments.size(); ++k) {
    if (plan.host_end[k] == 0) continue;
    timed(stats.copy_wait_seconds,
          [&] { copies->wait_copied(plan.segments[k].segment->device(), plan.host_end[k]); });
    release_runs(plan.segments[k], stats, asleep);
  }
}

OpStats Allocator::sleep(const std::vector<std::string>& offload_tags, const std::vector<ByteRange>& preserve,
                         const std::vector<ByteRange>& exclude) {
  const auto start = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(mutex_);
  host_.settle();  // host cache
  settle_locked();  // also gives back handles whose release failed before (a second failure is raised here)

  SleepPlan plan = plan_sleep(offload_tags, preserve, exclude);
  OpStats stats;
  stats.allocations = plan.steps.size();
  if (plan.steps.empty()) return stats;  // nothing mapped: last_sleep_ keeps the last real sleep

  std::shared_ptr<HostArena> arena;
  std::unique_ptr<BackupCopies> copies = copy_backups(plan, arena, stats);  // after `arena`: waits for copies into it
  release_slept(plan, copies.get(), stats);
  copies.reset();
  prime_after(plan.segments);
  stats.bytes_copied = plan.backup_bytes;
  stats.seconds = seconds_since(start);
  last_sleep_ = stats;
  return stats;
}

OpStats Allocator::wake(const std::optional<std::vector<std::string>>& tags, double wait_seconds) {
  if (!(wait_seconds >= 0 && wait_seconds <= kMaxWakeWaitSeconds))
    throw InvalidArgument("wake's wait for memory must be between 0 and " + std::to_string(kMaxWakeWaitSeconds) +
                          " seconds, got " + std::to_string(wait_seconds));
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                    std::chrono::duration<double>(wait_seconds));
  std::lock_guard<std::mutex> lock(mutex_);
  primer_.cancel();  // this wake's creates take what the driver left
  settle_locked();

  std::vector<Allocation*> rows;
  for (auto& [address, a] : table_) {
    bool asleep = a.state == State::BackedUp || a.state == State::Discarded;
    if (!asleep || (tags && !contains(*tags, a.tag()))) continue;
    rows.push_back(&a);
  }
  OpStats stats;
  stats.allocations = rows.size();
  if (rows.empty()) return stats;  // nothing asleep: last_wake_ keeps the last real wake

  // Per segment, only the runs its rows cover: adjacent rows are one run (Note [Allocation states]).
  const std::vector<SegmentRows> segments =
      by_segment(rows.size(), [&](size_t i) -> const Allocation& { return *rows[i]; });
  std::vector<RangeSet> cover(segments.size());
  std::map<int, uint64_t> needed;  // device -> bytes
  std::map<int, std::set<std::string>> tags_on;
  for (size_t k = 0; k < segments.size(); ++k) {
    const Segment& s = *segments[k].segment;
    for (size_t i : segments[k].members) cover[k].add({rows[i]->offset, rows[i]->offset + rows[i]->span});
    needed[s.device()] += cover[k].bytes();
    tags_on[s.device()].insert(s.tag());
  }

  auto no_room = [&](int device, const std::string& why) {
    std::string names;
    for (const std::string& t : tags_on[device]) names += (names.empty() ? "'" : ", '") + t + "'";
    MemoryInfo info = backend_->memory_info(device);
    return DeviceOutOfMemory("cannot wake tag " + names + " on device " + std::to_string(device) + ": needs " +
                             format_bytes(needed[device]) + ", " + format_bytes(info.free) +
                             " free. Nothing was changed: every backup and sleeping allocation is intact; "
                             "retry once memory is free" + (why.empty() ? "" : " (" + why + ")"));
  };
  // Compressed backups: packed pieces decode through staging on the device, sized to them and counted
  // in what the wake needs; a device whose pieces are all plain gets neither staging nor codec
  // (Note [Compressed backups]).
  std::map<int, PackedLoad> packed;  // device with compressed backups -> the packed pieces it decodes
  for (Allocation* a : rows)
    if (a->backup && !a->backup->pieces.empty()) packed[a->device()].add(a->backup->pieces);
  std::shared_ptr<Codec> codec;
  for (const auto& [device, load] : packed) {
    if (load.pieces == 0) continue;
    if (!codec && !(codec = codecs_.get(*backend_)))
      throw Error("a compressed backup cannot be restored: " + codecs_.why() + ". Nothing was changed");
    needed[device] += CompressedWake::staging_bytes(*backend_, *codec, device, options_.compress, load);
  }
  if (wait_seconds == 0)
    for (const auto& [device, bytes] : needed)
      if (backend_->memory_info(device).free < bytes) throw no_room(device, "");
  std::map<int, std::unique_ptr<CompressedWake>> unpack;  // device -> its compressed backups' restore
  for (const auto& [device, load] : packed) {
    try {
      unpack[device] = std::make_unique<CompressedWake>(*backend_, device, options_.compress, codec.get(), load);
    } catch (const DeviceOutOfMemory& e) {
      throw no_room(device, std::string("compression staging: ") + e.what());
    }
  }
  // A run is mapped once it fits; a wake that may wait tries again every millisecond until the
  // deadline (Note [Allocation states], "A wake that waits for memory"). The free memory last seen
  // is counted down, so the device is asked again only when a run seems not to fit.
  std::map<int, uint64_t> room;  // device -> bytes free when last asked, less what was mapped since
  auto fits = [&](int device, uint64_t bytes) {
    auto it = room.find(device);
    if (it == room.end() || it->second < bytes)
      it = room.insert_or_assign(device, backend_->memory_info(device).free).first;
    return it->second >= bytes;
  };
  auto map_run = [&](Segment& s, const ByteRange& run) {
    for (;;) {
      std::string why;
      if (wait_seconds == 0 || fits(s.device(), run.size())) {
        try {
          timed(stats.map_seconds, [&] { s.map(run); });
          if (wait_seconds != 0) room[s.device()] -= run.size();
          return;
        } catch (const DeviceOutOfMemory& e) {
          why = e.what();
          room.erase(s.device());  // the device had less than it said: ask again
        }
      }
      if (wait_seconds == 0) throw no_room(s.device(), why);
      if (std::chrono::steady_clock::now() >= deadline) {
        char waited[64];
        std::snprintf(waited, sizeof waited, "waited %.3f s for memory", stats.wait_seconds);
        throw no_room(s.device(), waited + (why.empty() ? "" : ": " + why));
      }
      timed(stats.wait_seconds, [] { std::this_thread::sleep_for(std::chrono::milliseconds(1)); });
    }
  };

  // Each segment's copies start as soon as it is mapped, segments with backups first, so every copy is
  // enqueued before memory with nothing to copy back (a KV cache) is mapped; undo all of it if any step
  // fails. A wake that waits for memory uses what another process frees as it comes. Mapping every run
  // before the first copy was tried and measured slower (benchmarks/RESULTS.md section 16: in vLLM 0.33
  // 0.456-0.472 s against 0.446-0.454 s; probe_wake_overlap.py, 118 segments: 0.355 s against 0.338 s).
  std::vector<size_t> order;
  for (int with_backup = 1; with_backup >= 0; --with_backup)
    for (size_t k = 0; k < segments.size(); ++k) {
      const auto& members = segments[k].members;
      const bool backed_up =
          std::any_of(members.begin(), members.end(), [&](size_t i) { return rows[i]->backup.has_value(); });
      if (backed_up == static_cast<bool>(with_backup)) order.push_back(k);
    }
  std::set<int> copying;
  std::map<const DiskFile*, std::vector<DiskSpan>> from_disk;
  std::vector<std::pair<Segment*, uint64_t>> mapped;  // runs mapped here
  auto undo = [&] {
    drain_copies(*backend_, copying);  // nothing may still write into memory that is unmapped here
    for (const auto& run : mapped)
      warn_on_failure("undoing a failed wake", [&] { run.first->release(run.second); });
  };
  try {
    std::vector<CopySpan> spans;
    for (size_t k : order) {
      Segment& s = *segments[k].segment;
      for (const ByteRange& run : cover[k].ranges()) {
        map_run(s, run);
        mapped.emplace_back(&s, run.begin);
        stats.bytes_device += run.size();
      }
      for (size_t i : segments[k].members) {
        Allocation& a = *rows[i];
        if (options_.fill_unrestored) {
          RangeSet unrestored({0, a.span});
          if (a.backup) unrestored.subtract(a.backup->ranges);
          for (const ByteRange& r : unrestored.ranges())
            backend_->fill(a.device(), a.address + r.begin, r.size(), 0xFF);
          copying.insert(a.device());
        }
        if (!a.backup) continue;
        if (!a.backup->pieces.empty()) {
          unpack.at(a.device())->add(a.address, a.backup->arena->data(), *a.backup->arena, a.backup->pieces);
          copying.insert(a.device());
          stats.bytes_copied += a.backup->ranges.bytes();
          continue;
        }
        spans.clear();
        const HostBackup& b = *a.backup;
        uint64_t host_left = b.ranges.bytes() - b.disk_bytes;  // the host part comes first
        uint8_t* host = b.arena ? b.arena->data() + b.offset : nullptr;
        uint64_t file_offset = b.file_offset;
        for (const ByteRange& r : b.ranges.ranges()) {
          const uint64_t host_part = std::min(r.size(), host_left);
          if (host_part != 0) b.arena->split_at_registrations({a.address + r.begin, host, host_part}, spans);
          if (host_part < r.size()) {
            from_disk[b.file.get()].push_back({a.device(), a.address + r.begin + host_part, file_offset,
                                               r.size() - host_part});
            file_offset += r.size() - host_part;
          }
          host += host_part;
          host_left -= host_part;
          stats.bytes_copied += r.size();
        }
        copying.insert(a.device());
        if (!spans.empty()) backend_->enqueue_copies(a.device(), CopyDirection::ToDevice, spans);
      }
    }
    timed(stats.copy_wait_seconds, [&] {
      for (auto& [device, u] : unpack) u->finish();
      for (int device : copying) backend_->wait_copies(device);
    });
    // Disk parts after the host parts' copies, which are ahead of them on the copy queue anyway.
    for (const auto& [file, parts] : from_disk) disk_.read(options_.disk, *file, parts, stats.disk);
  } catch (...) {
    unpack.clear();  // codec work done and staging given back before the memory it decodes into goes
    undo();
    throw;
  }
  for (const auto& [device, u] : unpack) stats.compress += u->totals();

  for (Allocation* a : rows) {
    a->state = State::Mapped;
    a->backup.reset();
  }
  stats.mappings = mapped.size();
  host_.recycle(options_);  // host cache
  stats.seconds = seconds_since(start);
  last_wake_ = stats;
  return stats;
}

void Allocator::discard(const std::vector<std::string>& tags) {
  std::lock_guard<std::mutex> lock(mutex_);
  settle_locked();
  std::vector<Allocation*> mapped;
  for (auto& [address, a] : table_)
    if (a.state == State::Mapped && contains(tags, a.tag())) mapped.push_back(&a);
  const std::vector<SegmentRows> segments =
      by_segment(mapped.size(), [&](size_t i) -> const Allocation& { return *mapped[i]; });
  synchronize_devices(segments);
  // A segment's rows all have its tag, so they go together, with its memory.
  OpStats ignored;
  for (const SegmentRows& g : segments)
    release_runs(g, ignored, [&](size_t i) { mapped[i]->state = State::Discarded; });
  prime_after(segments);
  for (auto& [address, a] : table_) {
    if (a.state == State::BackedUp && contains(tags, a.tag())) {
      a.backup.reset();
      a.state = State::Discarded;
    }
  }
  host_.recycle(options_);  // host cache
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

void Allocator::prepare_host(uint64_t bytes, int device, bool wait, uint64_t hold_bytes) {
  std::unique_lock<std::mutex> lock(mutex_);
  host_.prepare(bytes, hold_bytes, device, wait, options_, lock);
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
    out.push_back({a.address, a.size, a.device(), a.tag(), a.state, backup, a.backup && !a.backup->whole ? backup : 0,
                   a.backup ? a.backup->disk_bytes : 0, a.backup ? a.backup->stored_bytes() : 0});
  }
  return out;
}

std::map<std::string, TagStats> Allocator::tag_stats() const {
  std::map<std::string, TagStats> out;
  for (const AllocationInfo& a : allocations()) {
    TagStats& s = out[a.tag];
    s.allocations += 1;
    (a.state == State::Mapped ? s.mapped_bytes : s.asleep_bytes) += a.size;
    s.backed_up_bytes += a.backup_bytes;
    s.preserved_bytes += a.preserved_bytes;
    s.disk_bytes += a.disk_bytes;
    s.stored_bytes += a.stored_bytes;
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

std::string Allocator::compress_unavailable() {
  std::lock_guard<std::mutex> lock(mutex_);
  return codecs_.get(*backend_) ? "" : codecs_.why();
}

uint64_t HostBackup::stored_bytes() const {
  if (pieces.empty()) return ranges.bytes() - disk_bytes;  // plain: the host part
  uint64_t total = 0;
  for (const PackedPiece& p : pieces) total += p.stored_bytes;
  return total;
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
  check_compress_options(options.compress);
  if (!(options.reclaimable_pinned_share >= 0 && options.reclaimable_pinned_share <= 1))
    throw InvalidArgument("reclaimable pinned share must be between 0 and 1, got " +
                          std::to_string(options.reclaimable_pinned_share));
  if (options.staging.piece_bytes < kMinStagingPieceBytes || options.staging.piece_bytes > kMaxStagingPieceBytes)
    throw InvalidArgument("staging_piece_bytes must be between " + format_bytes(kMinStagingPieceBytes) + " and " +
                          format_bytes(kMaxStagingPieceBytes) + " (it is rounded up to whole 2 MiB pages), got " +
                          std::to_string(options.staging.piece_bytes));
  if (options.disk.dir != options_.disk.dir || options.disk.threads != options_.disk.threads)
    check_disk_options(options.disk);
  options_ = options;
  host_.set_prepare_rate(options_.host_prepare_rate);  // the preparation under way too (Note [Prepare rate])
  host_.recycle(options_);
}

}  // namespace vse
