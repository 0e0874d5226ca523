// Tests of slabs (Note [Allocation states], "Slabs"): small rows of one (device, tag) share one
// physical handle. Over the host backend ("host", synchronous copies) and the async one ("host-async",
// copies that finish later on another thread, which shows a slab released before its copies were done).
// Built as target `slab_tests` with -DVSE_BUILD_TESTS=ON; tests/cpp/run_sanitizers.sh runs it under
// ASan, UBSan and TSan. The last line of output is "N passed, M failed".
//
// Usage: slab_tests [substring]   -- runs only the tests whose name contains the substring.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "allocator.h"
#include "async_host_backend.h"
#include "errors.h"
#include "host_backend.h"
#include "test_harness.h"

namespace {

constexpr uint64_t MiB = 1ull << 20;
constexpr uint64_t kSlab = 64 * MiB;

using vse::Allocator;
using vse::ByteRange;
using vse::State;

// Word patterns, never zero, different per seed (fast under TSan); `bytes` need not be a multiple of 8.
uint64_t word(uint64_t seed, uint64_t i) { return (((seed + 1) << 40) ^ ((i + 1) * 0x9E3779B97F4A7C15ull)) | 1; }

void fill(uintptr_t address, uint64_t bytes, uint64_t seed) {
  for (uint64_t i = 0; i < bytes / 8; ++i) reinterpret_cast<uint64_t*>(address)[i] = word(seed, i);
  for (uint64_t i = bytes / 8 * 8; i < bytes; ++i)
    reinterpret_cast<uint8_t*>(address)[i] = static_cast<uint8_t>(seed | 1);
}

bool matches(uintptr_t address, uint64_t bytes, uint64_t seed) {
  for (uint64_t i = 0; i < bytes / 8; ++i)
    if (reinterpret_cast<const uint64_t*>(address)[i] != word(seed, i)) return false;
  for (uint64_t i = bytes / 8 * 8; i < bytes; ++i)
    if (reinterpret_cast<const uint8_t*>(address)[i] != static_cast<uint8_t>(seed | 1)) return false;
  return true;
}

using vse_test::Fault;

// Counts the driver-level calls over a host backend ("host" or "host-async"), remembers the reserved
// ranges (to tell which slab a row is in), and fails chosen calls.
class CountingBackend final : public vse::DeviceBackend {
 public:
  // On `card`, which other backends may share, as processes share a GPU.
  CountingBackend(bool async, std::shared_ptr<vse::HostCard> card) {
    if (async) {
      auto inner = std::make_unique<vse::AsyncHostBackend>(std::move(card), 100, 7);
      async_ = inner.get();
      inner_ = std::move(inner);
    } else {
      inner_ = std::make_unique<vse::HostBackend>(std::move(card));
    }
  }

  Fault create_fault, map_fault, release_fault, wait_mark_fault;
  std::atomic<long> creates{0}, maps{0}, unmaps{0}, releases{0}, syncs{0};

  const char* name() const override { return inner_->name(); }
  int device_count() override { return inner_->device_count(); }
  uint64_t granularity(int device) override { return inner_->granularity(device); }
  uintptr_t reserve(int device, uint64_t size) override {
    uintptr_t address = inner_->reserve(device, size);
    std::lock_guard<std::mutex> lock(mutex_);
    reserved_[address] = size;
    return address;
  }
  void unreserve(int device, uintptr_t address, uint64_t size) override {
    inner_->unreserve(device, address, size);
    std::lock_guard<std::mutex> lock(mutex_);
    reserved_.erase(address);
  }
  vse::PhysicalHandle create(int device, uint64_t size) override {
    if (create_fault.fire()) throw vse::DeviceOutOfMemory("injected: create");
    ++creates;
    return inner_->create(device, size);
  }
  void release(int device, vse::PhysicalHandle handle) override {
    if (release_fault.fire()) throw vse::Error("injected: release");
    ++releases;
    inner_->release(device, handle);
  }
  void map(int device, uintptr_t address, uint64_t size, vse::PhysicalHandle handle) override {
    if (map_fault.fire()) throw vse::Error("injected: map");
    ++maps;
    inner_->map(device, address, size, handle);
    log_event('m', address);
  }
  void unmap(int device, uintptr_t address, uint64_t size) override {
    ++unmaps;
    inner_->unmap(device, address, size);
  }
  vse::MemoryInfo memory_info(int device) override { return inner_->memory_info(device); }
  void synchronize(int device) override {
    ++syncs;
    inner_->synchronize(device);
  }
  void pin(int device, void* host, uint64_t bytes) override { inner_->pin(device, host, bytes); }
  void unpin(int device, void* host) override { inner_->unpin(device, host); }
  void enqueue_copies(int device, vse::CopyDirection direction, const std::vector<vse::CopySpan>& spans) override {
    inner_->enqueue_copies(device, direction, spans);
    if (!spans.empty()) log_event('c', spans.front().device);
  }
  void wait_copies(int device) override { inner_->wait_copies(device); }
  void fill(int device, uintptr_t address, uint64_t bytes, uint8_t value) override {
    inner_->fill(device, address, bytes, value);
  }
  uint64_t record_mark(int device) override { return inner_->record_mark(device); }
  void wait_mark(int device, uint64_t mark) override {
    if (wait_mark_fault.fire()) throw vse::Error("injected: wait_mark");
    inner_->wait_mark(device, mark);
  }
  void release_mark(int device, uint64_t mark) noexcept override { inner_->release_mark(device, mark); }

  uint64_t free_bytes() { return inner_->memory_info(0).free; }
  uint64_t early_releases() const { return async_ ? async_->early_releases() : 0; }
  size_t reservations() {
    std::lock_guard<std::mutex> lock(mutex_);
    return reserved_.size();
  }
  // The base of the reserved range holding `address` (0 when none).
  uintptr_t reservation_of(uintptr_t address) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = reserved_.upper_bound(address);
    if (it == reserved_.begin()) return 0;
    --it;
    return address < it->first + it->second ? it->first : 0;
  }
  // The size of the reserved range starting at `base` (0 when none starts there).
  uint64_t reserved_size(uintptr_t base) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = reserved_.find(base);
    return it == reserved_.end() ? 0 : it->second;
  }
  void reset_counts() {
    creates = maps = unmaps = releases = syncs = 0;
    std::lock_guard<std::mutex> lock(mutex_);
    events_.clear();
  }
  // Maps ('m') and copy enqueues ('c', at the device address of the first span) in call order.
  std::vector<std::pair<char, uintptr_t>> events() {
    std::lock_guard<std::mutex> lock(mutex_);
    return events_;
  }
  vse::DeviceBackend& inner() { return *inner_; }

 private:
  std::unique_ptr<vse::DeviceBackend> inner_;
  vse::AsyncHostBackend* async_ = nullptr;
  std::mutex mutex_;
  std::map<uintptr_t, uint64_t> reserved_;
  std::vector<std::pair<char, uintptr_t>> events_;

  void log_event(char kind, uintptr_t address) {
    std::lock_guard<std::mutex> lock(mutex_);
    events_.emplace_back(kind, address);
  }
};

struct Fixture {
  CountingBackend* backend = nullptr;
  std::unique_ptr<Allocator> allocator;
};

Fixture make_on(bool async, uint64_t slab_bytes, std::shared_ptr<vse::HostCard> card) {
  auto b = std::make_unique<CountingBackend>(async, std::move(card));
  Fixture f;
  f.backend = b.get();
  f.allocator = std::make_unique<Allocator>(std::move(b));
  vse::AllocatorOptions o;
  o.staging.threads = 2;
  o.staging.piece_bytes = 2 * MiB;  // many pieces, many fences: copies of one slab span several
  o.slab_bytes = slab_bytes;
  f.allocator->set_options(o);
  return f;
}

Fixture make(bool async, uint64_t slab_bytes, uint64_t capacity = 1024 * MiB) {
  return make_on(async, slab_bytes, std::make_shared<vse::HostCard>(capacity));
}

State state_of(const Allocator& a, uintptr_t address) {
  for (const auto& i : a.allocations())
    if (i.address == address) return i.state;
  return static_cast<State>(-1);
}

std::string snapshot(const Allocator& a) {
  std::string s;
  char buf[256];
  for (const auto& i : a.allocations()) {
    std::snprintf(buf, sizeof buf, "%" PRIxPTR " %" PRIu64 " %s %s %" PRIu64 " %" PRIu64 "\n", i.address, i.size,
                  i.tag.c_str(), vse::state_name(i.state), i.backup_bytes, i.preserved_bytes);
    s += buf;
  }
  return s;
}

struct Row {
  uintptr_t p;
  uint64_t n;
  std::string tag;
  uint64_t seed;
};

// PyTorch-like segments: 2 MiB small-pool ones, 20 MiB ones, odd sizes, and big ones with their own memory.
std::vector<Row> allocate_mix(Allocator& a, const std::string& tag, uint64_t seed0, int small = 12) {
  std::vector<Row> rows;
  std::vector<uint64_t> sizes;
  for (int i = 0; i < small; ++i) sizes.push_back(2 * MiB);
  sizes.insert(sizes.end(), {20 * MiB, 5 * MiB + 11, 20 * MiB, 32 * MiB, 20 * MiB, 34 * MiB, 2 * MiB - 8});
  uint64_t seed = seed0;
  for (uint64_t n : sizes) {
    Row r{a.allocate(n, 0, tag), n, tag, seed++};
    fill(r.p, r.n, r.seed);
    rows.push_back(r);
  }
  return rows;
}

std::set<uintptr_t> slabs_of(CountingBackend& b, const std::vector<Row>& rows) {
  std::set<uintptr_t> out;
  for (const Row& r : rows) out.insert(b.reservation_of(r.p));
  return out;
}

// ---------------------------------------------------------------------------------------------

void test_small_allocations_of_one_tag_land_in_few_slabs() {
  auto f = make(false, kSlab);
  std::vector<Row> rows;
  for (int i = 0; i < 40; ++i) rows.push_back({f.allocator->allocate(2 * MiB, 0, "weights"), 2 * MiB, "weights", 0});
  CHECK(f.backend->creates == 2);  // 32 rows of 2 MiB to a 64 MiB slab
  CHECK(slabs_of(*f.backend, rows).size() == 2);
  const uintptr_t big = f.allocator->allocate(33 * MiB, 0, "weights");  // over half a slab: its own memory
  CHECK(f.backend->creates == 3);
  CHECK(f.backend->reserved_size(big) == 34 * MiB);
  const uintptr_t half = f.allocator->allocate(32 * MiB, 0, "weights");  // exactly half: in a slab,
  CHECK(f.backend->reserved_size(f.backend->reservation_of(half)) == kSlab);
  CHECK(f.backend->creates == 3);  // the second one, which had 48 MiB left
  // Each row is aligned to the granularity and owns its span.
  std::set<uintptr_t> seen;
  for (const Row& r : rows) {
    CHECK(r.p % (2 * MiB) == 0);
    CHECK(seen.insert(r.p).second);
  }
}

void test_slab_off_is_one_handle_per_allocation() {
  auto f = make(false, 0);
  std::vector<Row> rows = allocate_mix(*f.allocator, "weights", 1);
  CHECK(f.backend->creates == static_cast<long>(rows.size()));
  for (const Row& r : rows) CHECK(f.backend->reserved_size(r.p) == (r.n + 2 * MiB - 1) / (2 * MiB) * (2 * MiB));
  f.backend->reset_counts();
  auto slept = f.allocator->sleep({"weights"}, {}, {});
  CHECK(slept.mappings == rows.size());
  CHECK(f.backend->releases == static_cast<long>(rows.size()));
  auto woke = f.allocator->wake(std::nullopt);
  CHECK(woke.mappings == rows.size());
  CHECK(f.backend->creates == static_cast<long>(rows.size()));
  for (const Row& r : rows) CHECK(matches(r.p, r.n, r.seed));
}

void test_mixed_tags_never_share_a_slab() {
  auto f = make(false, kSlab);
  std::vector<Row> rows;
  const char* tags[] = {"weights", "kv_cache", "runtime"};
  for (int i = 0; i < 30; ++i) {
    const char* tag = tags[i % 3];
    rows.push_back({f.allocator->allocate(2 * MiB + (i % 2 ? 0 : 100), 0, tag), 2 * MiB, tag, 0});
  }
  std::map<uintptr_t, std::set<std::string>> tags_in;
  for (const Row& r : rows) tags_in[f.backend->reservation_of(r.p)].insert(r.tag);
  CHECK(tags_in.size() == 3);
  for (const auto& [slab, in] : tags_in) CHECK(in.size() == 1);
}

// Sleep (offloaded, preserved, discarded), wake, discard, free and settle, with data checked each time.
void round_trips_keep_data(bool async) {
  auto f = make(async, kSlab);
  Allocator& a = *f.allocator;
  std::vector<Row> weights = allocate_mix(a, "weights", 100);
  std::vector<Row> kv = allocate_mix(a, "kv_cache", 200, 5);
  std::vector<Row> runtime = allocate_mix(a, "runtime", 300, 3);
  const long handles_awake = f.backend->creates;
  CHECK(handles_awake < static_cast<long>(weights.size() + kv.size() + runtime.size()));

  // Level 2 shape: runtime offloaded, weights discarded except preserved ranges (one inside a small
  // row, one across two rows of the same slab), kv discarded.
  const Row& w0 = weights[0];
  const Row& w1 = weights[1];
  const Row& w2 = weights[2];
  CHECK(w1.p == w0.p + 2 * MiB && w2.p == w1.p + 2 * MiB);  // back to back in one slab
  const std::vector<ByteRange> keep = {{w0.p + 4096, w0.p + 8192}, {w1.p + MiB, w2.p + MiB}};
  f.backend->reset_counts();
  auto slept = a.sleep({"runtime"}, keep, {});
  CHECK(slept.mappings == static_cast<uint64_t>(f.backend->releases.load()));
  CHECK(slept.mappings == static_cast<uint64_t>(handles_awake));
  CHECK(slept.bytes_copied == 4096 + 2 * MiB + [&] {
    uint64_t n = 0;
    for (const Row& r : runtime) n += r.n;
    return n;
  }());
  for (const auto& i : a.allocations()) CHECK(i.state != State::Mapped);
  CHECK(state_of(a, w0.p) == State::BackedUp && state_of(a, w1.p) == State::BackedUp);
  CHECK(state_of(a, weights[5].p) == State::Discarded);
  CHECK(f.backend->free_bytes() == 1024 * MiB);
  CHECK(f.backend->early_releases() == 0);

  f.backend->reset_counts();
  auto woke = a.wake(std::nullopt);
  CHECK(woke.mappings == static_cast<uint64_t>(handles_awake));
  CHECK(f.backend->creates == handles_awake && f.backend->maps == handles_awake);
  for (const Row& r : runtime) CHECK(matches(r.p, r.n, r.seed));
  // Preserved bytes came back: compare against the pattern at their offsets.
  auto matches_at = [](const Row& r, uint64_t from, uint64_t to) {
    for (uint64_t i = from / 8; i < to / 8; ++i)
      if (reinterpret_cast<const uint64_t*>(r.p)[i] != word(r.seed, i)) return false;
    return true;
  };
  CHECK(matches_at(w0, 4096, 8192));
  CHECK(matches_at(w1, MiB, 2 * MiB) && matches_at(w2, 0, MiB));
  CHECK(f.backend->early_releases() == 0);

  // Level 1 shape: weights offloaded whole, kv discarded; then kv discarded while asleep and woken apart.
  for (const Row& r : weights) fill(r.p, r.n, r.seed);
  for (const Row& r : kv) fill(r.p, r.n, r.seed);
  a.sleep({"weights", "runtime"}, {}, {});
  a.discard({"kv_cache"});
  a.wake(std::vector<std::string>{"weights"});
  for (const Row& r : weights) CHECK(matches(r.p, r.n, r.seed));
  for (const Row& r : kv) CHECK(state_of(a, r.p) == State::Discarded);
  a.wake(std::nullopt);
  for (const Row& r : runtime) CHECK(matches(r.p, r.n, r.seed));
  CHECK(f.backend->early_releases() == 0);

  // Discard of an awake tag, then wake: the slab goes and comes back as one handle.
  f.backend->reset_counts();
  a.discard({"kv_cache"});
  CHECK(f.backend->releases == static_cast<long>(slabs_of(*f.backend, kv).size()));
  a.wake(std::nullopt);
  for (const Row& r : kv) fill(r.p, r.n, r.seed);

  // Frees inside awake slabs: the others keep their data through a cycle; a freed range is taken
  // again only after a settle.
  a.free(weights[3].p);
  a.free(weights[4].p);
  CHECK(a.quarantined_bytes() == 4 * MiB);
  const uintptr_t again = a.allocate(2 * MiB, 0, "weights");  // never at a quarantined address
  CHECK(again != weights[3].p && again != weights[4].p);
  fill(again, 2 * MiB, 999);
  a.sleep({"weights", "kv_cache"}, {}, {});
  CHECK(a.quarantined_bytes() == 0);
  a.wake(std::nullopt);
  CHECK(matches(again, 2 * MiB, 999));
  for (size_t i = 0; i < weights.size(); ++i)
    if (i != 3 && i != 4) CHECK(matches(weights[i].p, weights[i].n, weights[i].seed));
  for (const Row& r : kv) CHECK(matches(r.p, r.n, r.seed));
  CHECK(f.backend->early_releases() == 0);

  // Free of every row, in every state, gives every slab and every byte back.
  a.sleep({"weights"}, {}, {});
  for (size_t i = 0; i < weights.size(); ++i)
    if (i != 3 && i != 4) a.free(weights[i].p);
  a.free(again);
  for (const Row& r : kv) a.free(r.p);
  for (const Row& r : runtime) a.free(r.p);
  a.settle();
  CHECK(a.allocations().empty());
  CHECK(f.backend->reservations() == 0);
  CHECK(f.backend->free_bytes() == 1024 * MiB);
}

void test_round_trips_keep_data_on_host() { round_trips_keep_data(false); }
void test_round_trips_keep_data_on_host_async() { round_trips_keep_data(true); }

// Many offloaded rows per slab with copies that finish late: no slab goes before its copies.
void test_slab_is_released_only_after_copies_of_all_its_rows() {
  auto f = make(true, kSlab);
  Allocator& a = *f.allocator;
  std::vector<Row> rows;
  for (int i = 0; i < 64; ++i) {
    Row r{a.allocate(MiB + 8 * i, 0, "weights"), MiB + 8 * static_cast<uint64_t>(i), "weights", 10u + i};
    fill(r.p, r.n, r.seed);
    rows.push_back(r);
  }
  for (int cycle = 0; cycle < 3; ++cycle) {
    auto slept = a.sleep({"weights"}, {}, {});
    CHECK(slept.mappings == 2);
    CHECK(f.backend->early_releases() == 0);
    a.wake(std::nullopt);
    for (const Row& r : rows) CHECK(matches(r.p, r.n, r.seed));
  }
}

void test_new_allocations_never_go_into_a_sleeping_slab() {
  auto f = make(false, kSlab);
  Allocator& a = *f.allocator;
  std::vector<Row> rows = allocate_mix(a, "weights", 1, 4);
  const auto asleep_slabs = slabs_of(*f.backend, rows);
  a.sleep({"weights"}, {}, {});
  const uintptr_t late = a.allocate(2 * MiB, 0, "weights");
  CHECK(asleep_slabs.count(f.backend->reservation_of(late)) == 0);
  CHECK(state_of(a, late) == State::Mapped);
  fill(late, 2 * MiB, 77);
  a.wake(std::nullopt);
  for (const Row& r : rows) CHECK(matches(r.p, r.n, r.seed));
  CHECK(matches(late, 2 * MiB, 77));
}

// A wake whose create or map fails part way leaves everything asleep and intact; the retry works.
void failed_wake_leaves_everything_asleep(bool async) {
  auto f = make(async, kSlab);
  Allocator& a = *f.allocator;
  std::vector<Row> rows = allocate_mix(a, "weights", 1);
  std::vector<Row> kv = allocate_mix(a, "kv_cache", 50, 3);
  const uint64_t free_awake = f.backend->free_bytes();
  const std::vector<ByteRange> keep = {{kv[0].p, kv[0].p + 4096}};
  a.sleep({"weights"}, keep, {});
  const std::string asleep = snapshot(a);
  const uint64_t free_asleep = f.backend->free_bytes();
  int fired = 0;
  for (Fault* fault : {&f.backend->create_fault, &f.backend->map_fault}) {
    for (int after : {0, 1, 3}) {
      fault->arm(after);
      bool threw = false;
      try {
        a.wake(std::nullopt);
      } catch (const vse::Error&) {
        threw = true;
      }
      fault->disarm();
      fired += threw;
      CHECK(threw);
      CHECK(snapshot(a) == asleep);
      CHECK(f.backend->free_bytes() == free_asleep);
    }
  }
  CHECK(fired == 6);
  a.wake(std::nullopt);
  CHECK(f.backend->free_bytes() >= free_awake);  // only what the rows cover: not the slabs' free tails
  for (const Row& r : rows) CHECK(matches(r.p, r.n, r.seed));
  CHECK(matches(kv[0].p, 4096, kv[0].seed));
  CHECK(f.backend->early_releases() == 0);
}

void test_failed_wake_leaves_everything_asleep_on_host() { failed_wake_leaves_everything_asleep(false); }
void test_failed_wake_leaves_everything_asleep_on_host_async() { failed_wake_leaves_everything_asleep(true); }

// A sleep that fails while releasing leaves each slab either released with complete backups of all
// its rows, or mapped with all of them: never a slab half asleep. The retry finishes the job.
void test_sleep_failing_while_releasing_moves_whole_slabs() {
  int failed = 0;
  for (int after = 0; after < 4; ++after) {
    auto f = make(false, kSlab);
    Allocator& a = *f.allocator;
    std::vector<Row> rows = allocate_mix(a, "weights", 1, 40);
    f.backend->wait_mark_fault.arm(after);
    bool threw = false;
    try {
      a.sleep({"weights"}, {}, {});
    } catch (const vse::Error&) {
      threw = true;
    }
    f.backend->wait_mark_fault.disarm();
    if (!threw) {
      a.wake(std::nullopt);
      continue;
    }
    ++failed;
    std::map<uintptr_t, std::set<State>> states;
    for (const Row& r : rows) states[f.backend->reservation_of(r.p)].insert(state_of(a, r.p));
    bool whole = true;
    for (const auto& [slab, in] : states) whole = whole && in.size() == 1;
    CHECK(whole);
    for (const auto& i : a.allocations())
      if (i.state == State::BackedUp) CHECK(i.backup_bytes == i.size);
    for (const Row& r : rows)
      if (state_of(a, r.p) == State::Mapped) CHECK(matches(r.p, r.n, r.seed));
    a.sleep({"weights"}, {}, {});
    a.wake(std::nullopt);
    for (const Row& r : rows) CHECK(matches(r.p, r.n, r.seed));
  }
  std::printf("  (%d of 4 sleeps failed part way)\n", failed);
  CHECK(failed >= 1);
}

void test_freed_rows_of_a_slab_are_quarantined_until_settle() {
  auto f = make(false, kSlab, 256 * MiB);
  Allocator& a = *f.allocator;
  std::vector<uintptr_t> rows;
  for (int i = 0; i < 4; ++i) rows.push_back(a.allocate(2 * MiB, 0, "weights"));
  CHECK(f.backend->free_bytes() == 256 * MiB - kSlab);
  for (uintptr_t p : rows) a.free(p);
  CHECK(a.allocations().empty());
  CHECK(a.quarantined_bytes() == 8 * MiB);
  CHECK(f.backend->free_bytes() == 256 * MiB - kSlab);  // still held: the device may still use it
  const uintptr_t next = a.allocate(2 * MiB, 0, "weights");
  for (uintptr_t p : rows) CHECK(next != p);
  a.settle();
  CHECK(a.quarantined_bytes() == 0);
  CHECK(f.backend->free_bytes() == 256 * MiB - kSlab);  // `next` keeps the slab's run
  const uintptr_t reused = a.allocate(2 * MiB, 0, "weights");
  CHECK(reused == rows[0]);  // settled: first fit again
  a.free(next);
  a.free(reused);
  a.settle();
  CHECK(f.backend->reservations() == 0);
  CHECK(f.backend->free_bytes() == 256 * MiB);
}

void test_no_room_for_a_slab_falls_back_to_own_memory() {
  auto f = make(false, kSlab, 16 * MiB);
  Allocator& a = *f.allocator;
  const uintptr_t p = a.allocate(2 * MiB, 0, "weights");
  CHECK(f.backend->reserved_size(p) == 2 * MiB);
  CHECK(f.backend->free_bytes() == 14 * MiB);
  fill(p, 2 * MiB, 5);
  a.sleep({"weights"}, {}, {});
  a.wake(std::nullopt);
  CHECK(matches(p, 2 * MiB, 5));
  a.free(p);
  a.settle();
  CHECK(f.backend->reservations() == 0);
}

void test_slab_bytes_option_is_checked_and_changes_only_new_rows() {
  auto f = make(false, kSlab);
  Allocator& a = *f.allocator;
  bool threw = false;
  try {
    a.update_options([](vse::AllocatorOptions& o) { o.slab_bytes = vse::kMaxSlabBytes + 1; });
  } catch (const vse::InvalidArgument&) {
    threw = true;
  }
  CHECK(threw);
  CHECK(a.options().slab_bytes == kSlab);
  const uintptr_t in_slab = a.allocate(2 * MiB, 0, "weights");
  a.update_options([](vse::AllocatorOptions& o) { o.slab_bytes = 0; });
  const uintptr_t own = a.allocate(2 * MiB, 0, "weights");
  CHECK(f.backend->reserved_size(f.backend->reservation_of(own)) == 2 * MiB);
  CHECK(f.backend->reserved_size(f.backend->reservation_of(in_slab)) == kSlab);
  a.update_options([](vse::AllocatorOptions& o) { o.slab_bytes = 5 * MiB; });  // rounded up to 6 MiB
  const uintptr_t small = a.allocate(MiB, 0, "kv_cache");
  const uintptr_t second = a.allocate(MiB, 0, "kv_cache");
  CHECK(f.backend->reservation_of(small) == f.backend->reservation_of(second));
  CHECK(f.backend->reserved_size(f.backend->reservation_of(small)) == 6 * MiB);
  a.free(in_slab);
  a.free(own);
  a.free(small);
  a.free(second);
  a.settle();
  CHECK(f.backend->reservations() == 0);
}

// Threads allocate, fill, check and free small rows of one tag (so they share slabs) while another
// thread puts the tag to sleep and wakes it; every row a thread sees awake holds its own data.
void test_concurrent_small_allocations_during_sleep_wake() {
  auto f = make(true, 16 * MiB);
  Allocator& a = *f.allocator;
  std::atomic<bool> stop{false};
  std::atomic<long> bad{0}, done{0};
  std::mutex sleeping;  // held across a sleep..wake, so the workers touch memory only while it is mapped
  auto worker = [&](uint64_t id) {
    for (int i = 0; i < 60; ++i) {
      std::lock_guard<std::mutex> awake(sleeping);
      const uint64_t n = (1 + (i + id) % 3) * MiB;
      const uintptr_t p = a.allocate(n, 0, "weights");
      fill(p, n, id * 1000 + i);
      if (!matches(p, n, id * 1000 + i)) ++bad;
      a.free(p);
      if (i % 4 == 0) a.settle();
      ++done;
    }
  };
  std::vector<Row> kept;
  for (uint64_t i = 0; i < 4; ++i) {
    kept.push_back({a.allocate(2 * MiB - 8 * i, 0, "weights"), 2 * MiB - 8 * i, "weights", 500 + i});
    fill(kept.back().p, kept.back().n, kept.back().seed);
  }
  std::thread sleeper([&] {
    while (!stop) {
      {
        std::lock_guard<std::mutex> asleep(sleeping);
        a.sleep({"weights"}, {}, {});
        a.wake(std::nullopt);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  std::vector<std::thread> workers;
  for (uint64_t id = 1; id <= 3; ++id) workers.emplace_back(worker, id);
  for (auto& t : workers) t.join();
  stop = true;
  sleeper.join();
  CHECK(bad == 0);
  CHECK(done == 180);
  for (const Row& r : kept) CHECK(matches(r.p, r.n, r.seed));
  CHECK(f.backend->early_releases() == 0);
  for (const Row& r : kept) a.free(r.p);
  a.settle();
  CHECK(f.backend->reservations() == 0);
}

// A slab whose release fails keeps its handle: its rows are asleep with complete backups, and the next
// settle (first thing in a wake, or on its own) gives it back.
void test_failed_slab_release_keeps_the_handle_and_the_rows_honest() {
  auto f = make(false, kSlab, 256 * MiB);
  Allocator& a = *f.allocator;
  std::vector<Row> rows;
  for (uint64_t i = 0; i < 4; ++i) {
    rows.push_back({a.allocate(2 * MiB, 0, "weights"), 2 * MiB, "weights", 40 + i});
    fill(rows.back().p, rows.back().n, rows.back().seed);
  }
  f.backend->release_fault.arm(0);
  bool threw = false;
  try {
    a.sleep({"weights"}, {}, {});
  } catch (const vse::Error&) {
    threw = true;
  }
  CHECK(threw);
  for (const auto& i : a.allocations()) CHECK(i.state == State::BackedUp && i.backup_bytes == i.size);
  CHECK(f.backend->free_bytes() == 256 * MiB - kSlab);  // the handle is still held
  f.backend->reset_counts();
  a.wake(std::nullopt);  // gives the held handle back, then maps the one run the rows cover
  CHECK(f.backend->releases == 1 && f.backend->creates == 1 && f.backend->maps == 1);
  for (const Row& r : rows) CHECK(matches(r.p, r.n, r.seed));

  // The same in the settle after the last free of the slab; the retried settle gives everything back.
  for (const Row& r : rows) a.free(r.p);
  f.backend->release_fault.arm(0);
  threw = false;
  try {
    a.settle();
  } catch (const vse::Error&) {
    threw = true;
  }
  CHECK(threw);
  CHECK(f.backend->free_bytes() == 256 * MiB - 8 * MiB);  // the run the four rows covered, still held
  a.settle();
  CHECK(a.allocations().empty());
  CHECK(f.backend->reservations() == 0);
  CHECK(f.backend->free_bytes() == 256 * MiB);
}

void test_fill_unrestored_covers_rows_in_a_slab() {
  auto f = make(false, kSlab);
  Allocator& a = *f.allocator;
  a.update_options([](vse::AllocatorOptions& o) { o.fill_unrestored = true; });
  const uintptr_t p = a.allocate(MiB, 0, "weights");
  const uintptr_t q = a.allocate(MiB, 0, "weights");
  fill(p, MiB, 1);
  fill(q, MiB, 2);
  a.sleep({}, {{q, q + 4096}}, {});
  a.wake(std::nullopt);
  CHECK(matches(q, 4096, 2));
  bool loud = true;
  for (uint64_t i = 0; i < 2 * MiB; ++i) loud = loud && reinterpret_cast<const uint8_t*>(p)[i] == 0xFF;
  for (uint64_t i = 4096; i < 2 * MiB; ++i) loud = loud && reinterpret_cast<const uint8_t*>(q)[i] == 0xFF;
  CHECK(loud);
}

// The benchmark's hot path: a full slab sleeps with one unmap and one release and wakes with one
// create and one map, and a sleep synchronizes once; a freed-and-settled row costs nothing more.
void test_dense_slab_sleeps_and_wakes_with_one_handle() {
  auto f = make(false, kSlab);
  Allocator& a = *f.allocator;
  std::vector<Row> rows;
  for (uint64_t i = 0; i < 32; ++i) {
    rows.push_back({a.allocate(2 * MiB, 0, "weights"), 2 * MiB, "weights", 60 + i});
    fill(rows.back().p, rows.back().n, rows.back().seed);
  }
  for (int cycle = 0; cycle < 2; ++cycle) {
    f.backend->reset_counts();
    const vse::OpStats slept = a.sleep({"weights"}, {}, {});
    CHECK(slept.mappings == 1 && slept.bytes_device == kSlab);
    CHECK(f.backend->syncs == 1 && f.backend->unmaps == 1 && f.backend->releases == 1);
    CHECK(f.backend->creates == 0 && f.backend->maps == 0);
    f.backend->reset_counts();
    const vse::OpStats woke = a.wake(std::nullopt);
    CHECK(woke.mappings == 1 && woke.bytes_device == kSlab);
    CHECK(f.backend->creates == 1 && f.backend->maps == 1);
    CHECK(f.backend->syncs == 0 && f.backend->unmaps == 0 && f.backend->releases == 0);
    for (const Row& r : rows) CHECK(matches(r.p, r.n, r.seed));
  }
}

// Issue 17, item 1. A wake's copies are what the user waits for: each segment's copies start as soon as it
// is mapped, backed-up memory first, so every copy is enqueued before memory with nothing to copy back
// (the KV cache) is mapped, whatever the order of their addresses; the same with and without a wait for
// memory (mapping everything first was measured slower, benchmarks/RESULTS.md section 16).
void test_wake_copies_each_segment_once_mapped_and_maps_the_kv_cache_last() {
  for (double wait : {0.0, 5.0}) {
    auto f = make(true, kSlab);
    Allocator& a = *f.allocator;
    std::vector<Row> weights;
    std::set<uintptr_t> kv;
    for (uint64_t i = 0; i < 4; ++i) {
      kv.insert(a.allocate(48 * MiB, 0, "kv_cache"));  // own memory, between the weights
      weights.push_back({a.allocate(40 * MiB, 0, "weights"), 40 * MiB, "weights", 90 + i});
      fill(weights.back().p, weights.back().n, weights.back().seed);
      weights.push_back({a.allocate(2 * MiB, 0, "weights"), 2 * MiB, "weights", 95 + i});  // slab rows
      fill(weights.back().p, weights.back().n, weights.back().seed);
    }
    a.sleep({"weights"}, {}, {});
    f.backend->reset_counts();
    a.wake(std::nullopt, wait);
    const auto events = f.backend->events();
    size_t first_copy = events.size(), last_copy = 0, last_map = 0, first_kv_map = events.size(), copies = 0;
    for (size_t i = 0; i < events.size(); ++i) {
      if (events[i].first == 'c') last_copy = i, first_copy = std::min(first_copy, i), ++copies;
      if (events[i].first == 'm') last_map = i;
      if (events[i].first == 'm' && kv.count(events[i].second) && first_kv_map == events.size()) first_kv_map = i;
    }
    CHECK(copies >= 5);  // four 40 MiB allocations and the slab
    CHECK(first_kv_map < events.size());
    CHECK(last_copy < first_kv_map);
    CHECK(first_copy < last_map);
    for (const Row& r : weights) CHECK(matches(r.p, r.n, r.seed));
  }
}

// Issue 16, item 1. PyTorch frees from empty_cache() without synchronizing; work still queued on the
// device may read a freed row. The next allocation must not get that range before the device is done
// with it: here a pending copy reads the row while a new allocation writes at once.
void test_freed_row_is_not_handed_out_while_queued_work_reads_it() {
  auto f = make(true, kSlab);
  Allocator& a = *f.allocator;
  const uintptr_t neighbour = a.allocate(2 * MiB, 0, "weights");
  const uintptr_t p = a.allocate(2 * MiB, 0, "weights");
  fill(p, 2 * MiB, 1);
  std::vector<uint64_t> host(2 * MiB / 8);
  std::vector<vse::CopySpan> spans;  // many small copies, so that most are still queued below
  for (uint64_t at = 0; at < 2 * MiB; at += 4096)
    spans.push_back({p + at, reinterpret_cast<uint8_t*>(host.data()) + at, 4096});
  f.backend->enqueue_copies(0, vse::CopyDirection::ToHost, spans);
  a.free(p);
  const uintptr_t q = a.allocate(2 * MiB, 0, "weights");
  CHECK(q != p);
  fill(q, 2 * MiB, 2);  // the new owner writes at once
  f.backend->wait_copies(0);
  CHECK(matches(reinterpret_cast<uintptr_t>(host.data()), 2 * MiB, 1));
  a.settle();  // the device is done with it now
  CHECK(a.allocate(2 * MiB, 0, "weights") == p);
  (void)neighbour;
}

// Issue 16, item 1: a free of a Mapped row makes no driver call (PyTorch may call it while another
// thread captures a CUDA graph); settle() waits for the device and gives the memory back.
void test_free_of_a_mapped_row_makes_no_driver_call_and_settle_does() {
  auto f = make(false, kSlab, 256 * MiB);
  Allocator& a = *f.allocator;
  const uintptr_t small = a.allocate(2 * MiB, 0, "weights");  // in a slab
  const uintptr_t big = a.allocate(40 * MiB, 0, "weights");   // its own memory
  f.backend->reset_counts();
  a.free(small);
  a.free(big);
  CHECK(f.backend->syncs == 0 && f.backend->unmaps == 0 && f.backend->releases == 0);
  CHECK(f.backend->free_bytes() == 256 * MiB - kSlab - 40 * MiB);
  CHECK(a.quarantined_bytes() == 42 * MiB);
  a.settle();
  CHECK(f.backend->syncs == 1 && f.backend->unmaps == 2 && f.backend->releases == 2);
  CHECK(a.quarantined_bytes() == 0);
  CHECK(f.backend->free_bytes() == 256 * MiB);
  CHECK(f.backend->reservations() == 0);
}

// Issue 16, item 7: a slab whose rows were all freed but one wakes with that row's memory only, where
// the whole slab would not fit; new rows then go elsewhere, not into the slab's unmapped part.
void test_sparse_slab_wakes_with_only_its_rows_memory() {
  for (bool freed_asleep : {true, false}) {
    auto f = make(false, kSlab, 80 * MiB);
    Allocator& a = *f.allocator;
    std::vector<uintptr_t> rows;
    for (int i = 0; i < 4; ++i) rows.push_back(a.allocate(2 * MiB, 0, "weights"));
    fill(rows[2], 2 * MiB, 3);
    if (!freed_asleep) {
      a.free(rows[0]);
      a.free(rows[1]);
      a.free(rows[3]);
    }
    a.sleep({"weights"}, {}, {});
    if (freed_asleep) {
      a.free(rows[0]);
      a.free(rows[1]);
      a.free(rows[3]);
    }
    const uintptr_t hog = a.allocate(72 * MiB, 0, "kv_cache");  // leaves 8 MiB: not a slab, but the row
    f.backend->reset_counts();
    const vse::OpStats woke = a.wake(std::vector<std::string>{"weights"});
    CHECK(woke.bytes_device == 2 * MiB && woke.mappings == 1);
    CHECK(f.backend->creates == 1);
    CHECK(matches(rows[2], 2 * MiB, 3));
    CHECK(f.backend->free_bytes() == 6 * MiB);
    const uintptr_t late = a.allocate(2 * MiB, 0, "weights");
    CHECK(f.backend->reservation_of(late) != f.backend->reservation_of(rows[2]));
    fill(late, 2 * MiB, 4);
    CHECK(matches(rows[2], 2 * MiB, 3) && matches(late, 2 * MiB, 4));
    a.free(hog);
  }
}

// Issue 16, item 8: a caller that cannot synchronize (its stream captures a CUDA graph) never makes
// allocate synchronize, even when settling the quarantine would make room; one that can does.
void test_allocate_that_may_not_synchronize_never_does() {
  for (uint64_t slab : {uint64_t{0}, 8 * MiB}) {
    auto f = make(false, slab, 8 * MiB);
    Allocator& a = *f.allocator;
    std::vector<uintptr_t> rows;
    for (int i = 0; i < 4; ++i) rows.push_back(a.allocate(2 * MiB, 0, "weights"));
    for (uintptr_t p : rows) a.free(p);
    CHECK(a.quarantined_bytes() == 8 * MiB);
    f.backend->reset_counts();
    int asked = 0;
    CHECK_THROWS(a.allocate(4 * MiB, 0, "kv_cache", [&] { return ++asked, false; }), vse::DeviceOutOfMemory);
    CHECK(asked == 1);
    CHECK(f.backend->syncs == 0 && a.quarantined_bytes() == 8 * MiB);
    const uintptr_t p = a.allocate(4 * MiB, 0, "kv_cache", [&] { return ++asked, true; });
    CHECK(asked == 2);
    a.allocate(2 * MiB, 0, "kv_cache", [&] { return ++asked, false; });  // room: not asked
    CHECK(asked == 2);
    CHECK(f.backend->syncs == 1 && a.quarantined_bytes() == 0);
    fill(p, 4 * MiB, 9);
    CHECK(matches(p, 4 * MiB, 9));
  }
}

// Issue 18, a wake that waits for memory. Two allocators on one card stand for two processes on one
// GPU: B sleeps with its weights backed up, A is awake and holds most of the card, so that only B's
// first run fits.
struct Swap {
  std::shared_ptr<vse::HostCard> card = std::make_shared<vse::HostCard>(256 * MiB);
  Fixture a, b;
  std::vector<Row> a_weights, b_weights;

  explicit Swap(bool async) : a(make_on(async, kSlab, card)), b(make_on(async, kSlab, card)) {
    for (uint64_t i = 0; i < 4; ++i) {  // 40 MiB: each its own memory, one run
      b_weights.push_back({b.allocator->allocate(40 * MiB, 0, "weights"), 40 * MiB, "weights", 300 + i});
      fill(b_weights.back().p, b_weights.back().n, b_weights.back().seed);
    }
    b.allocator->sleep({"weights"}, {}, {});
    for (uint64_t i = 0; i < 2; ++i) {
      a_weights.push_back({a.allocator->allocate(40 * MiB, 0, "weights"), 40 * MiB, "weights", 400 + i});
      fill(a_weights.back().p, a_weights.back().n, a_weights.back().seed);
    }
    for (int i = 0; i < 3; ++i) a.allocator->allocate(40 * MiB, 0, "kv_cache");  // 200 MiB held: 56 MiB free
    b.backend->reset_counts();
  }
  size_t b_copies() {  // enqueued by B since it went to sleep
    size_t n = 0;
    for (const auto& e : b.backend->events()) n += e.first == 'c';
    return n;
  }
};

// Today's behaviour stays the default: no wait, no driver call, the same message, nothing changed.
void test_wake_without_room_fails_at_once_by_default() {
  Swap swap(false);
  Allocator& b = *swap.b.allocator;
  const std::string asleep = snapshot(b);
  const uint64_t free_before = swap.b.backend->free_bytes();
  std::string message;
  const auto start = std::chrono::steady_clock::now();
  try {
    b.wake(std::nullopt);
  } catch (const vse::DeviceOutOfMemory& e) {
    message = e.what();
  }
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(1));
  CHECK(message.find("cannot wake tag 'weights' on device 0: needs 160.00 MiB (167772160 bytes), 56.00 MiB "
                     "(58720256 bytes) free. Nothing was changed") == 0);
  CHECK(message.find("waited") == std::string::npos);
  CHECK(swap.b.backend->creates == 0 && swap.b.backend->maps == 0);
  CHECK(snapshot(b) == asleep && swap.b.backend->free_bytes() == free_before);
  CHECK(!b.last_wake());
}

// A's sleep in "another process" frees the memory while B's wake waits: B maps its first run and
// starts its copies before the wait, then the rest as A releases; every byte comes back.
void wake_waits_for_memory_another_process_frees(bool async) {
  Swap swap(async);
  std::atomic<bool> woke{false};
  std::atomic<size_t> copies_before_room{0};
  std::thread other_process([&] {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (swap.b_copies() == 0 && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    std::this_thread::sleep_for(std::chrono::milliseconds(30));  // B waits meanwhile
    copies_before_room = woke ? 0 : swap.b_copies();
    swap.a.allocator->sleep({"weights"}, {}, {});  // releases the KV cache, then each weight once copied
  });
  vse::OpStats stats;
  try {
    stats = swap.b.allocator->wake(std::nullopt, 30);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "wake failed: %s\n", e.what());
  }
  woke = true;
  other_process.join();
  CHECK(copies_before_room >= 1);               // the first run's copies overlapped the wait
  CHECK(copies_before_room < swap.b_copies());  // and the rest came after it
  CHECK(stats.wait_seconds >= 0.02);
  CHECK(stats.bytes_device == 160 * MiB && stats.bytes_copied == 160 * MiB);
  for (const Row& r : swap.b_weights) CHECK(state_of(*swap.b.allocator, r.p) == State::Mapped);
  for (const Row& r : swap.b_weights) CHECK(matches(r.p, r.n, r.seed));
  swap.b.allocator->sleep({"weights"}, {}, {});  // and back: A's weights came through its sleep whole
  swap.a.allocator->wake(std::nullopt);
  for (const Row& r : swap.a_weights) CHECK(matches(r.p, r.n, r.seed));
  CHECK(swap.a.backend->early_releases() == 0 && swap.b.backend->early_releases() == 0);
}

void test_wake_waits_for_memory_another_process_frees_on_host() { wake_waits_for_memory_another_process_frees(false); }
void test_wake_waits_for_memory_another_process_frees_on_host_async() {
  wake_waits_for_memory_another_process_frees(true);
}

// Nobody frees anything: at the deadline the wake undoes what it mapped (its copies drained first) and
// raises, saying it waited; everything is asleep with its backup, and the wake works once there is room.
void wake_past_its_deadline_changes_nothing(bool async) {
  Swap swap(async);
  Allocator& b = *swap.b.allocator;
  const std::string asleep = snapshot(b);
  const uint64_t free_before = swap.b.backend->free_bytes();
  std::string message;
  try {
    b.wake(std::nullopt, 0.05);
  } catch (const vse::DeviceOutOfMemory& e) {
    message = e.what();
  }
  CHECK(message.find("cannot wake tag 'weights'") == 0 && message.find("Nothing was changed") != std::string::npos);
  CHECK(message.find("waited 0.0") != std::string::npos);
  CHECK(swap.b.backend->creates == 1 && swap.b.backend->releases == 1);  // the first run, mapped and given back
  CHECK(swap.b_copies() >= 1);
  CHECK(snapshot(b) == asleep && swap.b.backend->free_bytes() == free_before);
  CHECK(!b.last_wake());
  CHECK(swap.b.backend->early_releases() == 0);
  swap.a.allocator->sleep({"weights"}, {}, {});
  const vse::OpStats stats = b.wake(std::nullopt);
  CHECK(stats.wait_seconds == 0);
  for (const Row& r : swap.b_weights) CHECK(matches(r.p, r.n, r.seed));
}

void test_wake_past_its_deadline_changes_nothing_on_host() { wake_past_its_deadline_changes_nothing(false); }
void test_wake_past_its_deadline_changes_nothing_on_host_async() { wake_past_its_deadline_changes_nothing(true); }

void test_wake_wait_must_be_a_sane_number_of_seconds() {
  Swap swap(false);
  Allocator& b = *swap.b.allocator;
  const std::string asleep = snapshot(b);
  for (double bad : {-1.0, std::nan(""), 1e9}) CHECK_THROWS(b.wake(std::nullopt, bad), vse::InvalidArgument);
  CHECK(snapshot(b) == asleep);
}

using vse_test::Test;

const Test kTests[] = {
    {"small_allocations_of_one_tag_land_in_few_slabs", test_small_allocations_of_one_tag_land_in_few_slabs},
    {"slab_off_is_one_handle_per_allocation", test_slab_off_is_one_handle_per_allocation},
    {"mixed_tags_never_share_a_slab", test_mixed_tags_never_share_a_slab},
    {"round_trips_keep_data_on_host", test_round_trips_keep_data_on_host},
    {"round_trips_keep_data_on_host_async", test_round_trips_keep_data_on_host_async},
    {"slab_is_released_only_after_copies_of_all_its_rows", test_slab_is_released_only_after_copies_of_all_its_rows},
    {"new_allocations_never_go_into_a_sleeping_slab", test_new_allocations_never_go_into_a_sleeping_slab},
    {"failed_wake_leaves_everything_asleep_on_host", test_failed_wake_leaves_everything_asleep_on_host},
    {"failed_wake_leaves_everything_asleep_on_host_async", test_failed_wake_leaves_everything_asleep_on_host_async},
    {"sleep_failing_while_releasing_moves_whole_slabs", test_sleep_failing_while_releasing_moves_whole_slabs},
    {"freed_rows_of_a_slab_are_quarantined_until_settle", test_freed_rows_of_a_slab_are_quarantined_until_settle},
    {"no_room_for_a_slab_falls_back_to_own_memory", test_no_room_for_a_slab_falls_back_to_own_memory},
    {"slab_bytes_option_is_checked_and_changes_only_new_rows",
     test_slab_bytes_option_is_checked_and_changes_only_new_rows},
    {"concurrent_small_allocations_during_sleep_wake", test_concurrent_small_allocations_during_sleep_wake},
    {"failed_slab_release_keeps_the_handle_and_the_rows_honest",
     test_failed_slab_release_keeps_the_handle_and_the_rows_honest},
    {"fill_unrestored_covers_rows_in_a_slab", test_fill_unrestored_covers_rows_in_a_slab},
    {"dense_slab_sleeps_and_wakes_with_one_handle", test_dense_slab_sleeps_and_wakes_with_one_handle},
    {"freed_row_is_not_handed_out_while_queued_work_reads_it",
     test_freed_row_is_not_handed_out_while_queued_work_reads_it},
    {"free_of_a_mapped_row_makes_no_driver_call_and_settle_does",
     test_free_of_a_mapped_row_makes_no_driver_call_and_settle_does},
    {"sparse_slab_wakes_with_only_its_rows_memory", test_sparse_slab_wakes_with_only_its_rows_memory},
    {"allocate_that_may_not_synchronize_never_does", test_allocate_that_may_not_synchronize_never_does},
    {"wake_copies_each_segment_once_mapped_and_maps_the_kv_cache_last",
     test_wake_copies_each_segment_once_mapped_and_maps_the_kv_cache_last},
    {"wake_without_room_fails_at_once_by_default", test_wake_without_room_fails_at_once_by_default},
    {"wake_waits_for_memory_another_process_frees_on_host", test_wake_waits_for_memory_another_process_frees_on_host},
    {"wake_waits_for_memory_another_process_frees_on_host_async",
     test_wake_waits_for_memory_another_process_frees_on_host_async},
    {"wake_past_its_deadline_changes_nothing_on_host", test_wake_past_its_deadline_changes_nothing_on_host},
    {"wake_past_its_deadline_changes_nothing_on_host_async", test_wake_past_its_deadline_changes_nothing_on_host_async},
    {"wake_wait_must_be_a_sane_number_of_seconds", test_wake_wait_must_be_a_sane_number_of_seconds},
};

}  // namespace

int main(int argc, char** argv) { return vse_test::run_tests(kTests, argc, argv); }
