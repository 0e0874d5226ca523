// Self-contained tests of the C++ core over the Linux host backend (no GPU, no framework).
// Built as target `core_tests` with -DVSE_BUILD_TESTS=ON; tests/cpp/run_sanitizers.sh runs it under
// ASan, UBSan and TSan. Exit status is non-zero when any check fails; the last line of output is
// "N passed, M failed".
//
// Usage: core_tests [substring]   -- runs only the tests whose name contains the substring.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#include "allocator.h"
#include "async_host_backend.h"
#include "copy_pipeline.h"
#include "cuda_backend.h"
#include "segment.h"
#include "errors.h"
#include "host_arena.h"
#include "host_backend.h"
#include "process.h"
#include "range_set.h"
#include "test_harness.h"

namespace {

// Returns the message of the `Type` that `expr` throws ("" when it does not throw one).
template <typename Type, typename F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const Type& e) {
    return e.what();
  } catch (...) {
  }
  return "";
}

constexpr uint64_t KiB = 1ull << 10;
constexpr uint64_t MiB = 1ull << 20;
constexpr uint64_t kGranularity = 2 * MiB;

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

using vse::Allocator;
using vse::ByteRange;
using vse::RangeSet;
using vse::State;
using Tags = std::optional<std::vector<std::string>>;

// ---------------------------------------------------------------------------------------------
// Byte patterns: never zero, so a region that was discarded (and reads zero on this backend) never
// matches by luck; different seeds give different bytes.

uint8_t pattern_byte(uint64_t seed, uint64_t i) {
  uint64_t x = (seed + 1) * 0x9E3779B97F4A7C15ull ^ (i / 8 + 1) * 0xBF58476D1CE4E5B9ull;
  x ^= x >> 31;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 29;
  return static_cast<uint8_t>(((x >> ((i % 8) * 8)) & 0xFF) % 255 + 1);
}

void fill(uintptr_t address, uint64_t bytes, uint64_t seed, uint64_t from = 0) {
  auto* p = reinterpret_cast<uint8_t*>(address);
  for (uint64_t i = from; i < from + bytes; ++i) p[i - from] = pattern_byte(seed, i);
}

// True when [address, address+bytes) holds the pattern `seed` at pattern offsets [from, from+bytes).
bool matches(uintptr_t address, uint64_t bytes, uint64_t seed, uint64_t from = 0) {
  const auto* p = reinterpret_cast<const uint8_t*>(address);
  for (uint64_t i = from; i < from + bytes; ++i)
    if (p[i - from] != pattern_byte(seed, i)) return false;
  return true;
}

// True when no byte of the range equals the pattern at its offset (what a discarded range must show:
// on the host backend it reads zero, and the pattern is never zero).
bool differs_everywhere(uintptr_t address, uint64_t bytes, uint64_t seed, uint64_t from = 0) {
  const auto* p = reinterpret_cast<const uint8_t*>(address);
  for (uint64_t i = from; i < from + bytes; ++i)
    if (p[i - from] == pattern_byte(seed, i)) return false;
  return true;
}

// Word-wise pattern for the concurrency test (fast under TSan).
void fill_words(uintptr_t address, uint64_t bytes, uint64_t seed) {
  auto* p = reinterpret_cast<uint64_t*>(address);
  for (uint64_t i = 0; i < bytes / 8; ++i) p[i] = (seed << 32) ^ (i * 0x9E3779B97F4A7C15ull) ^ 0x5555;
}

bool words_match(uintptr_t address, uint64_t bytes, uint64_t seed) {
  const auto* p = reinterpret_cast<const uint64_t*>(address);
  for (uint64_t i = 0; i < bytes / 8; ++i)
    if (p[i] != ((seed << 32) ^ (i * 0x9E3779B97F4A7C15ull) ^ 0x5555)) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// A backend over HostBackend that fails chosen calls, to test that every failed operation undoes
// its own work (each fault a vse_test::Fault).

using vse_test::Fault;

class FaultyBackend final : public vse::DeviceBackend {
 public:
  explicit FaultyBackend(uint64_t capacity) : inner_(capacity) {}

  Fault create_fault, map_fault, unmap_fault, release_fault, pin_fault, synchronize_fault, to_host_fault,
      to_device_fault, wait_fault, wait_mark_fault;
  bool lie_about_free_memory = false;  // report lots of free memory, so only create() can say "full"
  std::vector<double> prime_at;        // prime_delays(): none by default, as the host backend
  Fault prime_fault;

  const char* name() const override { return "faulty-host"; }
  int device_count() override { return inner_.device_count(); }
  uint64_t granularity(int device) override { return inner_.granularity(device); }
  uintptr_t reserve(int device, uint64_t size) override { return inner_.reserve(device, size); }
  void unreserve(int device, uintptr_t address, uint64_t size) override { inner_.unreserve(device, address, size); }
  vse::PhysicalHandle create(int device, uint64_t size) override {
    if (create_fault.fire()) throw vse::DeviceOutOfMemory("injected: create");
    return inner_.create(device, size);
  }
  void release(int device, vse::PhysicalHandle handle) override {
    if (release_fault.fire()) throw vse::Error("injected: release");
    inner_.release(device, handle);
  }
  void map(int device, uintptr_t address, uint64_t size, vse::PhysicalHandle handle) override {
    if (map_fault.fire()) throw vse::Error("injected: map");
    inner_.map(device, address, size, handle);
  }
  void unmap(int device, uintptr_t address, uint64_t size) override {
    if (unmap_fault.fire()) throw vse::Error("injected: unmap");
    inner_.unmap(device, address, size);
  }
  vse::MemoryInfo memory_info(int device) override {
    vse::MemoryInfo info = inner_.memory_info(device);
    if (lie_about_free_memory) info.free = info.total;
    return info;
  }
  // The real free memory, whatever memory_info() says.
  uint64_t real_free() { return inner_.memory_info(0).free; }
  void synchronize(int device) override {
    if (synchronize_fault.fire()) throw vse::Error("injected: synchronize");
    inner_.synchronize(device);
  }
  void pin(int device, void* host, uint64_t bytes) override {
    if (pin_fault.fire()) throw vse::HostOutOfMemory("injected: pin");
    pinned_ += 1;
    inner_.pin(device, host, bytes);
  }
  void unpin(int device, void* host) override {
    pinned_ -= 1;
    inner_.unpin(device, host);
  }
  void enqueue_copies(int device, vse::CopyDirection direction, const std::vector<vse::CopySpan>& spans) override {
    Fault& f = direction == vse::CopyDirection::ToHost ? to_host_fault : to_device_fault;
    if (f.fire()) throw vse::Error("injected: copy");
    inner_.enqueue_copies(device, direction, spans);
  }
  void wait_copies(int device) override {
    if (wait_fault.fire()) throw vse::Error("injected: wait_copies");
    inner_.wait_copies(device);
  }
  void fill(int device, uintptr_t address, uint64_t bytes, uint8_t value) override {
    inner_.fill(device, address, bytes, value);
  }
  uint64_t record_mark(int device) override {
    ++marks_recorded_;
    return inner_.record_mark(device);
  }
  void wait_mark(int device, uint64_t mark) override {
    if (wait_mark_fault.fire()) throw vse::Error("injected: wait_mark");
    inner_.wait_mark(device, mark);
  }
  void release_mark(int device, uint64_t mark) noexcept override {
    ++marks_released_;
    inner_.release_mark(device, mark);
  }

  std::vector<double> prime_delays() const override { return prime_at; }
  void prime(int device) override {
    if (prime_fault.fire()) throw vse::DeviceOutOfMemory("injected: prime");
    inner_.release(device, inner_.create(device, inner_.granularity(device)));
    ++primes_;
  }

  long pinned() const { return pinned_.load(); }
  long primes() const { return primes_.load(); }
  // Every mark must be released once, waited for or not.
  bool marks_balanced() const { return marks_recorded_.load() == marks_released_.load(); }

 private:
  vse::HostBackend inner_;
  std::atomic<long> pinned_{0};
  std::atomic<long> primes_{0};
  std::atomic<long> marks_recorded_{0}, marks_released_{0};
};

vse::AllocatorOptions small_pieces(unsigned threads = 2) {
  vse::AllocatorOptions o;
  o.staging.threads = threads;
  o.staging.piece_bytes = 2 * MiB;  // the smallest piece: big backups are staged in many pieces
  return o;
}

std::unique_ptr<Allocator> host_allocator(uint64_t capacity, vse::AllocatorOptions options = small_pieces()) {
  auto a = std::make_unique<Allocator>(std::make_unique<vse::HostBackend>(capacity));
  a->set_options(options);
  return a;
}

std::unique_ptr<Allocator> faulty_allocator(uint64_t capacity, FaultyBackend** backend,
                                            vse::AllocatorOptions options = small_pieces()) {
  auto b = std::make_unique<FaultyBackend>(capacity);
  *backend = b.get();
  auto a = std::make_unique<Allocator>(std::move(b));
  a->set_options(options);
  return a;
}

const vse::AllocationInfo* find(const std::vector<vse::AllocationInfo>& infos, uintptr_t address) {
  for (const auto& i : infos)
    if (i.address == address) return &i;
  return nullptr;
}

State state_of(const Allocator& a, uintptr_t address) {
  auto infos = a.allocations();
  const vse::AllocationInfo* i = find(infos, address);
  return i ? i->state : static_cast<State>(-1);
}

// Everything observable about the table, to check that a failed call changed nothing.
std::string snapshot(const Allocator& a) {
  std::string s;
  char buf[256];
  for (const auto& i : a.allocations()) {
    std::snprintf(buf, sizeof buf, "%" PRIxPTR " %" PRIu64 " %d %s %s %" PRIu64 " %" PRIu64 "\n", i.address, i.size,
                  i.device, i.tag.c_str(), vse::state_name(i.state), i.backup_bytes, i.preserved_bytes);
    s += buf;
  }
  return s;
}

std::string ranges_text(const RangeSet& s) {
  std::string out;
  for (const ByteRange& r : s.ranges()) out += "[" + std::to_string(r.begin) + "," + std::to_string(r.end) + ")";
  return out;
}

// ---------------------------------------------------------------------------------------------
// RangeSet

void test_range_set_add() {
  RangeSet s;
  CHECK(s.empty());
  CHECK(s.bytes() == 0);
  s.add({5, 5});  // empty range: nothing
  s.add({9, 3});  // inverted range: nothing
  CHECK(s.empty());

  s.add({20, 30});
  s.add({0, 10});  // before, disjoint: sorted
  CHECK(ranges_text(s) == "[0,10)[20,30)");
  s.add({10, 12});  // touches the end of [0,10): merged
  CHECK(ranges_text(s) == "[0,12)[20,30)");
  s.add({18, 20});  // touches the start of [20,30): merged
  CHECK(ranges_text(s) == "[0,12)[18,30)");
  s.add({12, 18});  // fills the gap exactly: one range
  CHECK(ranges_text(s) == "[0,30)");
  CHECK(s.bytes() == 30);
  s.add({3, 7});  // inside: nothing changes
  CHECK(ranges_text(s) == "[0,30)");

  RangeSet t;
  t.add({10, 20});
  t.add({30, 40});
  t.add({50, 60});
  t.add({15, 55});  // overlaps three: one range
  CHECK(ranges_text(t) == "[10,60)");
  t.add({0, 100});  // covers all
  CHECK(ranges_text(t) == "[0,100)");

  RangeSet u;
  u.add({100, 110});
  u.add({50, 60});
  u.add({70, 80});
  u.add({0, 1});
  u.add({61, 69});  // between, touching neither
  CHECK(ranges_text(u) == "[0,1)[50,60)[61,69)[70,80)[100,110)");
  CHECK(u.bytes() == 1 + 10 + 8 + 10 + 10);
  u.add({60, 61});
  CHECK(ranges_text(u) == "[0,1)[50,69)[70,80)[100,110)");

  RangeSet big(ByteRange{UINT64_MAX - 10, UINT64_MAX});
  CHECK(big.bytes() == 10);
  RangeSet none(ByteRange{7, 7});
  CHECK(none.empty());
}

void test_range_set_subtract() {
  RangeSet s(ByteRange{0, 100});
  s.subtract({40, 60});  // middle: split in two
  CHECK(ranges_text(s) == "[0,40)[60,100)");
  s.subtract({0, 10});  // the start
  CHECK(ranges_text(s) == "[10,40)[60,100)");
  s.subtract({90, 200});  // the end and beyond
  CHECK(ranges_text(s) == "[10,40)[60,90)");
  s.subtract({40, 60});  // exactly the gap: nothing
  CHECK(ranges_text(s) == "[10,40)[60,90)");
  s.subtract({50, 50});  // empty: nothing
  CHECK(ranges_text(s) == "[10,40)[60,90)");
  s.subtract({39, 61});  // one byte of each
  CHECK(ranges_text(s) == "[10,39)[61,90)");
  s.subtract({0, 1000});  // all
  CHECK(s.empty());

  RangeSet t;
  t.add({0, 10});
  t.add({20, 30});
  t.add({40, 50});
  RangeSet holes;
  holes.add({5, 25});
  holes.add({45, 46});
  t.subtract(holes);
  CHECK(ranges_text(t) == "[0,5)[25,30)[40,45)[46,50)");
  CHECK(t.bytes() == 5 + 5 + 5 + 4);

  RangeSet empty;
  empty.subtract({0, 10});
  CHECK(empty.empty());
}

void test_range_set_clip() {
  RangeSet s;
  s.add({100, 200});
  s.add({300, 400});
  CHECK(ranges_text(s.clipped_relative({0, 1000})) == "[100,200)[300,400)");
  CHECK(ranges_text(s.clipped_relative({150, 350})) == "[0,50)[150,200)");
  CHECK(ranges_text(s.clipped_relative({120, 130})) == "[0,10)");  // inside one range
  CHECK(s.clipped_relative({200, 300}).empty());                   // exactly the gap
  CHECK(s.clipped_relative({0, 100}).empty());                     // ends where the first begins
  CHECK(s.clipped_relative({400, 500}).empty());                   // begins where the last ends
  CHECK(s.clipped_relative({150, 150}).empty());                   // empty window
  CHECK(ranges_text(s.clipped_relative({199, 301})) == "[0,1)[101,102)");
  CHECK(ranges_text(s.clipped_relative({100, 400})) == "[0,100)[200,300)");
  CHECK(RangeSet().clipped_relative({0, 10}).empty());
}

// RangeSet against a bitmap over a small universe, random operations.
void test_range_set_random_against_bitmap() {
  constexpr int kUniverse = 96;
  std::mt19937 rng(12345);
  for (int round = 0; round < 300; ++round) {
    RangeSet s;
    std::vector<bool> bits(kUniverse, false);
    for (int op = 0; op < 12; ++op) {
      uint64_t a = rng() % kUniverse, b = rng() % (kUniverse + 1);
      bool add = rng() % 3 != 0;
      if (add) {
        s.add({a, b});
        for (uint64_t i = a; i < b; ++i) bits[i] = true;
      } else {
        s.subtract({a, b});
        for (uint64_t i = a; i < b; ++i) bits[i] = false;
      }
    }
    // Same bytes, and kept as sorted, disjoint, non-touching ranges.
    std::vector<bool> from_set(kUniverse, false);
    bool canonical = true;
    uint64_t prev_end = 0;
    bool first = true;
    for (const ByteRange& r : s.ranges()) {
      if (r.empty() || (!first && r.begin <= prev_end)) canonical = false;
      for (uint64_t i = r.begin; i < r.end && i < kUniverse; ++i) from_set[i] = true;
      prev_end = r.end;
      first = false;
    }
    CHECK(canonical);
    CHECK(from_set == bits);
    uint64_t count = 0;
    for (bool bit : bits) count += bit;
    CHECK(s.bytes() == count);

    uint64_t w0 = rng() % kUniverse, w1 = w0 + rng() % (kUniverse - w0 + 1);
    RangeSet c = s.clipped_relative({w0, w1});
    std::vector<bool> clipped(kUniverse, false);
    for (const ByteRange& r : c.ranges())
      for (uint64_t i = r.begin; i < r.end; ++i) clipped[i] = true;
    bool same = true;
    for (uint64_t i = 0; i < kUniverse; ++i) {
      bool want = i < w1 - w0 && bits[w0 + i];
      if (clipped[i] != want) same = false;
    }
    CHECK(same);
  }
}

// ---------------------------------------------------------------------------------------------
// Allocator over the host backend

void test_allocate_and_free() {
  auto a = host_allocator(64 * MiB);
  uintptr_t p = a->allocate(100, 0, "weights");
  CHECK(p != 0);
  fill(p, 100, 1);
  CHECK(matches(p, 100, 1));
  auto infos = a->allocations();
  CHECK(infos.size() == 1);
  CHECK(infos[0].address == p && infos[0].size == 100 && infos[0].tag == "weights");
  CHECK(infos[0].state == State::Mapped && infos[0].backup_bytes == 0 && infos[0].preserved_bytes == 0);
  a->free(p);
  CHECK(a->allocations().empty());
  CHECK_THROWS(a->free(p), vse::InvalidArgument);
  CHECK_THROWS(a->free(0), vse::InvalidArgument);
  CHECK_THROWS(a->allocate(0, 0, "weights"), vse::InvalidArgument);
  CHECK_THROWS(a->allocate(10, 0, ""), vse::InvalidArgument);
  CHECK_THROWS(a->allocate(10, 1, "weights"), vse::InvalidArgument);  // the host backend has device 0 only
  CHECK(a->allocations().empty());
}

void test_offloaded_tag_survives_every_byte() {
  // Sizes off and on the granularity, and backups spanning many 2 MiB staging pieces.
  for (unsigned threads : {1u, 3u}) {
    auto a = host_allocator(256 * MiB, small_pieces(threads));
    const std::vector<uint64_t> sizes = {1, 4095, kGranularity, kGranularity + 1, 5 * MiB + 3, 9 * MiB};
    std::vector<uintptr_t> ptrs;
    for (size_t i = 0; i < sizes.size(); ++i) {
      ptrs.push_back(a->allocate(sizes[i], 0, "weights"));
      fill(ptrs[i], sizes[i], 100 + i);
    }
    for (int cycle = 0; cycle < 3; ++cycle) {
      vse::OpStats s = a->sleep({"weights"}, {}, {});
      CHECK(s.allocations == sizes.size());
      for (uintptr_t p : ptrs) CHECK(state_of(*a, p) == State::BackedUp);
      vse::OpStats w = a->wake(std::nullopt);
      CHECK(w.allocations == sizes.size());
      for (size_t i = 0; i < sizes.size(); ++i) {
        CHECK(state_of(*a, ptrs[i]) == State::Mapped);
        CHECK(matches(ptrs[i], sizes[i], 100 + i));
      }
    }
    for (uintptr_t p : ptrs) a->free(p);
  }
}

void test_other_tags_are_discarded() {
  auto a = host_allocator(64 * MiB);
  uintptr_t w = a->allocate(3 * MiB, 0, "weights");
  uintptr_t kv = a->allocate(1 * MiB, 0, "kv_cache");
  fill(w, 3 * MiB, 1);
  fill(kv, 1 * MiB, 2);
  a->sleep({"weights"}, {}, {});
  CHECK(state_of(*a, w) == State::BackedUp);
  CHECK(state_of(*a, kv) == State::Discarded);
  a->wake(std::nullopt);
  CHECK(matches(w, 3 * MiB, 1));
  CHECK(differs_everywhere(kv, 1 * MiB, 2));
  // A woken discarded allocation is ordinary memory again.
  fill(kv, 1 * MiB, 3);
  CHECK(matches(kv, 1 * MiB, 3));
}

void test_preserved_ranges() {
  auto a = host_allocator(64 * MiB);
  const uint64_t n = 1 * MiB;
  // Three allocations in address order: one range spans the first two (and the gap between them,
  // which belongs to no allocation's bytes); the third gets ranges of its own.
  std::vector<uintptr_t> addr = {a->allocate(n, 0, "weights"), a->allocate(n, 0, "weights"),
                                 a->allocate(n, 0, "weights")};
  std::sort(addr.begin(), addr.end());
  const uintptr_t lo = addr[0], hi = addr[1], z = addr[2], x = lo;
  const uint64_t lo_seed = 1, hi_seed = 2;
  fill(lo, n, lo_seed);
  fill(hi, n, hi_seed);
  fill(z, n, 3);
  std::vector<ByteRange> preserve = {
      {lo + n - 100, hi + 200},           // the last 100 bytes of one and the first 200 of the other
      {z + 1000, z + 2000},               // z: [1000, 2000) ...
      {z + 1500, z + 3000},               // ... overlapping: [1000, 3000)
      {z + 3000, z + 4000},               // ... adjacent: [1000, 4000)
      {z + 10000, z + 20000},             // z: [10000, 20000) minus [12000, 13000) below
  };
  std::vector<ByteRange> exclude = {{z + 12000, z + 13000}, {z + 3500, z + 5000}};  // -> [1000, 3500)
  vse::OpStats s = a->sleep({}, preserve, exclude);
  CHECK(s.allocations == 3);
  CHECK(s.bytes_copied == 100 + 200 + 2500 + 9000);
  auto infos = a->allocations();
  CHECK(find(infos, lo)->preserved_bytes == 100);
  CHECK(find(infos, hi)->preserved_bytes == 200);
  CHECK(find(infos, z)->preserved_bytes == 2500 + 9000);
  CHECK(find(infos, z)->state == State::BackedUp);
  auto stats = a->tag_stats();
  CHECK(stats["weights"].preserved_bytes == 100 + 200 + 11500);
  CHECK(stats["weights"].backed_up_bytes == 100 + 200 + 11500);
  a->wake(std::nullopt);
  CHECK(matches(lo + n - 100, 100, lo_seed, n - 100));
  CHECK(differs_everywhere(lo, n - 100, lo_seed));
  CHECK(matches(hi, 200, hi_seed));
  CHECK(differs_everywhere(hi + 200, n - 200, hi_seed, 200));
  CHECK(differs_everywhere(z, 1000, 3));
  CHECK(matches(z + 1000, 2500, 3, 1000));
  CHECK(differs_everywhere(z + 3500, 10000 - 3500, 3, 3500));
  CHECK(matches(z + 10000, 2000, 3, 10000));
  CHECK(differs_everywhere(z + 12000, 1000, 3, 12000));
  CHECK(matches(z + 13000, 7000, 3, 13000));
  CHECK(differs_everywhere(z + 20000, n - 20000, 3, 20000));

  // A range preserved in an offloaded allocation changes nothing: the whole of it is kept.
  fill(x, n, 4);
  a->sleep({"weights"}, {{x + 10, x + 20}}, {{x, x + n}});
  infos = a->allocations();
  CHECK(find(infos, x)->backup_bytes == n);
  CHECK(find(infos, x)->preserved_bytes == 0);
  a->wake(std::nullopt);
  CHECK(matches(x, n, 4));

  // Ranges outside every allocation, and all-excluded ranges, keep nothing.
  a->sleep({}, {{0, 4096}, {x + 5, x + 50}}, {{x, x + 100}});
  CHECK(state_of(*a, x) == State::Discarded);
  a->wake(std::nullopt);
}

void test_selective_wake_and_noops() {
  auto a = host_allocator(64 * MiB);
  uintptr_t p = a->allocate(MiB, 0, "a");
  uintptr_t q = a->allocate(MiB, 0, "b");
  fill(p, MiB, 1);
  fill(q, MiB, 2);
  a->sleep({"a", "b"}, {}, {});
  std::string asleep = snapshot(*a);
  uint64_t host = a->host_bytes();

  // Sleep when everything sleeps: nothing changes.
  vse::OpStats again = a->sleep({}, {}, {});
  CHECK(again.allocations == 0 && again.bytes_copied == 0 && again.bytes_device == 0);
  CHECK(snapshot(*a) == asleep);
  CHECK(a->host_bytes() == host);

  // Wake of an unknown tag, and of no tag: nothing.
  CHECK(a->wake(std::vector<std::string>{"nope"}).allocations == 0);
  CHECK(a->wake(std::vector<std::string>{}).allocations == 0);
  CHECK(snapshot(*a) == asleep);

  vse::OpStats w = a->wake(std::vector<std::string>{"a"});
  CHECK(w.allocations == 1 && w.bytes_copied == MiB && w.bytes_device == kGranularity);
  CHECK(state_of(*a, p) == State::Mapped);
  CHECK(state_of(*a, q) == State::BackedUp);
  CHECK(matches(p, MiB, 1));

  // Wake of an awake tag: nothing, and its bytes stay as they are.
  fill(p, MiB, 3);
  CHECK(a->wake(std::vector<std::string>{"a"}).allocations == 0);
  CHECK(matches(p, MiB, 3));

  a->wake(std::vector<std::string>{"b"});
  CHECK(matches(q, MiB, 2));
  CHECK(a->wake(std::nullopt).allocations == 0);

  // An allocation made while others sleep is mapped, and usable at once.
  a->sleep({"a"}, {}, {});
  uintptr_t r = a->allocate(1000, 0, "b");
  CHECK(state_of(*a, r) == State::Mapped);
  fill(r, 1000, 9);
  CHECK(matches(r, 1000, 9));
  a->free(r);
  a->wake(std::nullopt);
  CHECK(matches(p, MiB, 3));
}

void test_discard() {
  auto a = host_allocator(64 * MiB);
  uintptr_t p = a->allocate(MiB, 0, "a");
  uintptr_t q = a->allocate(MiB, 0, "b");
  uintptr_t r = a->allocate(MiB, 0, "c");
  fill(p, MiB, 1);
  fill(q, MiB, 2);
  fill(r, MiB, 3);
  a->sleep({"a"}, {{q, q + 100}}, {});
  CHECK(state_of(*a, p) == State::BackedUp);
  CHECK(state_of(*a, q) == State::BackedUp);  // preserved range only
  a->discard({"a", "b", "nope"});             // drops backups, whole and preserved
  CHECK(state_of(*a, p) == State::Discarded);
  CHECK(state_of(*a, q) == State::Discarded);
  CHECK(state_of(*a, r) == State::Discarded);
  auto stats = a->tag_stats();
  CHECK(stats["a"].backed_up_bytes == 0 && stats["b"].backed_up_bytes == 0 && stats["b"].preserved_bytes == 0);
  a->wake(std::nullopt);
  CHECK(differs_everywhere(p, MiB, 1));
  CHECK(differs_everywhere(q, MiB, 2));

  // Discard of mapped allocations releases their memory; other tags stay mapped.
  fill(p, MiB, 4);
  fill(r, MiB, 5);
  a->discard({"a"});
  CHECK(state_of(*a, p) == State::Discarded);
  CHECK(state_of(*a, r) == State::Mapped);
  CHECK(matches(r, MiB, 5));
  a->discard({"a"});  // again: nothing
  a->wake(std::vector<std::string>{"a"});
  CHECK(state_of(*a, p) == State::Mapped);
  CHECK(differs_everywhere(p, MiB, 4));
}

void test_free_returns_capacity_in_every_state() {
  const uint64_t cap = 8 * MiB;
  auto a = host_allocator(cap);
  uintptr_t p = a->allocate(2 * MiB, 0, "a");      // will be backed up
  uintptr_t q = a->allocate(2 * MiB, 0, "b");      // will be discarded
  uintptr_t r = a->allocate(2 * MiB, 0, "c");      // will keep a preserved range
  uintptr_t s = a->allocate(2 * MiB - 1, 0, "d");  // will be discarded
  CHECK_THROWS(a->allocate(1, 0, "e"), vse::DeviceOutOfMemory);
  a->sleep({"a"}, {{r, r + 10}}, {});
  uintptr_t t = a->allocate(2 * MiB, 0, "d");  // while asleep: mapped (into memory the sleep gave back)
  fill(t, 2 * MiB, 7);
  CHECK(state_of(*a, p) == State::BackedUp);
  CHECK(state_of(*a, q) == State::Discarded);
  CHECK(state_of(*a, r) == State::BackedUp);
  a->free(p);
  a->free(q);
  a->free(r);
  a->free(s);
  a->free(t);
  CHECK(a->allocations().empty());
  CHECK(a->tag_stats().empty());
  uintptr_t all = a->allocate(cap, 0, "x");  // the whole capacity is free again
  fill(all, cap, 8);
  CHECK(matches(all, cap, 8));
  a->free(all);
}

void test_stats_exact() {
  auto a = host_allocator(64 * MiB);
  CHECK(!a->last_sleep() && !a->last_wake());
  uintptr_t w1 = a->allocate(MiB + 5, 0, "weights");       // mapped 2 MiB
  uintptr_t w2 = a->allocate(3 * MiB, 0, "weights");       // mapped 4 MiB
  uintptr_t kv = a->allocate(2 * MiB, 0, "kv_cache");      // mapped 2 MiB
  uintptr_t other = a->allocate(7, 0, "other");            // mapped 2 MiB
  (void)w1;
  (void)w2;
  (void)other;
  auto s0 = a->tag_stats();
  CHECK(s0.size() == 3);
  CHECK(s0["weights"].allocations == 2 && s0["weights"].mapped_bytes == 4 * MiB + 5);
  CHECK(s0["weights"].asleep_bytes == 0 && s0["weights"].backed_up_bytes == 0);

  vse::OpStats s = a->sleep({"weights"}, {{kv + 100, kv + 400}}, {});
  CHECK(s.allocations == 4);
  CHECK(s.bytes_copied == 4 * MiB + 5 + 300);
  CHECK(s.bytes_device == 10 * MiB);
  CHECK(s.seconds >= 0);
  CHECK(a->last_sleep() && a->last_sleep()->bytes_copied == s.bytes_copied);
  auto st = a->tag_stats();
  CHECK(st["weights"].allocations == 2 && st["weights"].mapped_bytes == 0);
  CHECK(st["weights"].asleep_bytes == 4 * MiB + 5);
  CHECK(st["weights"].backed_up_bytes == 4 * MiB + 5 && st["weights"].preserved_bytes == 0);
  CHECK(st["kv_cache"].asleep_bytes == 2 * MiB && st["kv_cache"].backed_up_bytes == 300);
  CHECK(st["kv_cache"].preserved_bytes == 300);
  CHECK(st["other"].asleep_bytes == 7 && st["other"].backed_up_bytes == 0);
  CHECK(a->host_bytes() >= 4 * MiB + 305);

  vse::OpStats w = a->wake(std::vector<std::string>{"weights"});
  CHECK(w.allocations == 2 && w.bytes_copied == 4 * MiB + 5 && w.bytes_device == 6 * MiB);
  w = a->wake(std::nullopt);
  CHECK(w.allocations == 2 && w.bytes_copied == 300 && w.bytes_device == 4 * MiB);
  CHECK(a->last_wake()->allocations == 2);
  auto st2 = a->tag_stats();
  CHECK(st2["kv_cache"].mapped_bytes == 2 * MiB && st2["kv_cache"].backed_up_bytes == 0);
}

void test_host_cache() {
  auto a = host_allocator(64 * MiB);
  uintptr_t p = a->allocate(3 * MiB, 0, "w");
  fill(p, 3 * MiB, 1);
  a->sleep({"w"}, {}, {});
  const uint64_t held = a->host_bytes();
  CHECK(held >= 3 * MiB && held <= 3 * MiB + 3 * MiB / 100);  // within 1% of the bytes backed up
  a->wake(std::nullopt);
  CHECK(a->host_bytes() == held);  // kept for the next sleep
  for (int i = 0; i < 5; ++i) {
    fill(p, 3 * MiB, 10 + i);
    a->sleep({"w"}, {}, {});
    CHECK(a->host_bytes() == held);  // reused, not grown
    a->wake(std::nullopt);
    CHECK(matches(p, 3 * MiB, 10 + i));
  }
  a->release_host_cache();
  CHECK(a->host_bytes() == 0);

  // release_host_cache() leaves backups in use alone.
  a->sleep({"w"}, {}, {});
  a->release_host_cache();
  CHECK(a->host_bytes() == held);
  a->wake(std::nullopt);
  CHECK(matches(p, 3 * MiB, 14));

  vse::AllocatorOptions o = a->options();
  o.keep_host_backups = false;
  a->set_options(o);  // drops the idle cache at once
  CHECK(a->host_bytes() == 0);
  a->sleep({"w"}, {}, {});
  CHECK(a->host_bytes() == held);
  a->wake(std::nullopt);
  CHECK(a->host_bytes() == 0);
  CHECK(matches(p, 3 * MiB, 14));
}

void test_wake_out_of_memory_then_retry() {
  const uint64_t cap = 8 * MiB;
  auto a = host_allocator(cap);
  uintptr_t w = a->allocate(4 * MiB, 0, "weights");
  uintptr_t kv = a->allocate(2 * MiB, 0, "kv_cache");
  fill(w, 4 * MiB, 1);
  fill(kv, 2 * MiB, 2);
  a->sleep({"weights"}, {{kv, kv + 1000}}, {});
  uintptr_t hog = a->allocate(6 * MiB, 0, "trainer");  // made while asleep: leaves 2 MiB free
  const std::string before = snapshot(*a);
  const uint64_t host = a->host_bytes();
  std::string msg = message_of<vse::DeviceOutOfMemory>([&] { a->wake(std::nullopt); });
  CHECK(!msg.empty());
  CHECK(msg.find("'weights'") != std::string::npos);
  CHECK(msg.find("'kv_cache'") != std::string::npos);
  CHECK(msg.find("6291456 bytes") != std::string::npos);  // needed
  CHECK(msg.find("2097152 bytes") != std::string::npos);  // free
  CHECK(snapshot(*a) == before);
  CHECK(a->host_bytes() == host);
  CHECK_THROWS(a->wake(std::vector<std::string>{"weights"}), vse::DeviceOutOfMemory);
  CHECK(snapshot(*a) == before);
  // Part of it fits: kv_cache needs 2 MiB.
  a->wake(std::vector<std::string>{"kv_cache"});
  CHECK(matches(kv, 1000, 2));
  CHECK_THROWS(a->wake(std::nullopt), vse::DeviceOutOfMemory);
  a->free(hog);
  a->wake(std::nullopt);
  CHECK(matches(w, 4 * MiB, 1));
  CHECK(matches(kv, 1000, 2));
}

void test_host_memory_limit_then_retry() {
  auto a = host_allocator(64 * MiB);
  uintptr_t w = a->allocate(3 * MiB, 0, "weights");
  uintptr_t kv = a->allocate(MiB, 0, "kv_cache");
  fill(w, 3 * MiB, 1);
  fill(kv, MiB, 2);
  vse::AllocatorOptions o = a->options();
  o.host_memory_limit = 2 * MiB;
  a->set_options(o);
  const std::string before = snapshot(*a);
  std::string msg = message_of<vse::HostOutOfMemory>([&] { a->sleep({"weights"}, {}, {}); });
  CHECK(!msg.empty());
  CHECK(msg.find("Nothing was released") != std::string::npos);
  CHECK(snapshot(*a) == before);  // all mapped
  CHECK(a->host_bytes() == 0);
  CHECK(!a->last_sleep());
  CHECK(matches(w, 3 * MiB, 1) && matches(kv, MiB, 2));
  fill(w, 3 * MiB, 3);  // still ordinary memory
  o.host_memory_limit = 4 * MiB;
  a->set_options(o);
  a->sleep({"weights"}, {}, {});
  CHECK(state_of(*a, w) == State::BackedUp);
  a->wake(std::nullopt);
  CHECK(matches(w, 3 * MiB, 3));
  // The cached arena is reused under the same limit.
  a->sleep({"weights"}, {}, {});
  a->wake(std::nullopt);
  CHECK(matches(w, 3 * MiB, 3));
  // A backup held by sleeping allocations counts against the limit.
  a->sleep({"weights"}, {}, {});
  a->wake(std::vector<std::string>{"kv_cache"});
  uintptr_t extra = a->allocate(3 * MiB, 0, "more");
  CHECK_THROWS(a->sleep({"more"}, {}, {}), vse::HostOutOfMemory);
  CHECK(state_of(*a, extra) == State::Mapped && state_of(*a, kv) == State::Mapped);
  a->free(extra);
  a->wake(std::nullopt);
  CHECK(matches(w, 3 * MiB, 3));
}

// Every failure injected into sleep and wake leaves the table as it was; the retry succeeds.
void test_injected_faults_roll_back() {
  FaultyBackend* b = nullptr;
  auto a = faulty_allocator(64 * MiB, &b, small_pieces(3));
  const uint64_t n1 = 5 * MiB + 11, n2 = 3 * MiB, n3 = MiB;
  uintptr_t p1 = a->allocate(n1, 0, "weights");
  uintptr_t p2 = a->allocate(n2, 0, "weights");
  uintptr_t p3 = a->allocate(n3, 0, "kv_cache");
  auto refill = [&](uint64_t seed) {
    fill(p1, n1, seed);
    fill(p2, n2, seed + 1);
    fill(p3, n3, seed + 2);
  };
  auto intact = [&](uint64_t seed) {
    return matches(p1, n1, seed) && matches(p2, n2, seed + 1) && matches(p3 + 64, 4096, seed + 2, 64);
  };
  const std::vector<ByteRange> keep = {{p3 + 64, p3 + 64 + 4096}};
  uint64_t seed = 10;
  refill(seed);
  const std::string awake = snapshot(*a);
  const uint64_t free_awake = b->real_free();

  // Sleep: failures before anything is released.
  struct SleepFault {
    const char* name;
    Fault* fault;
    int after;
  };
  std::vector<SleepFault> sleep_faults = {
      {"pin, first piece", &b->pin_fault, 0},     {"pin, a later piece", &b->pin_fault, 2},
      {"synchronize", &b->synchronize_fault, 0},  {"copy to host, first", &b->to_host_fault, 0},
      {"copy to host, later", &b->to_host_fault, 3},
  };
  for (const SleepFault& f : sleep_faults) {
    a->release_host_cache();
    f.fault->arm(f.after);
    bool threw = false;
    try {
      a->sleep({"weights"}, keep, {});
    } catch (const vse::Error&) {
      threw = true;
    }
    f.fault->disarm();
    if (!threw) std::fprintf(stderr, "  injected fault did not fire: %s\n", f.name);
    CHECK(threw);
    CHECK(snapshot(*a) == awake);
    CHECK(b->real_free() == free_awake);
    CHECK(a->host_bytes() == 0);
    CHECK(b->pinned() == 0);
    CHECK(b->marks_balanced());
    CHECK(intact(seed));
    refill(++seed);  // still plain memory
  }

  // Wake: failures after some memory was created, mapped or copied.
  a->sleep({"weights"}, keep, {});
  const std::string asleep = snapshot(*a);
  const uint64_t free_asleep = b->real_free();
  CHECK(free_asleep == 64 * MiB);
  b->lie_about_free_memory = true;  // so that the failure comes from create(), past the free-memory check
  struct WakeFault {
    const char* name;
    Fault* fault;
    int after;
    bool device_oom;
  };
  std::vector<WakeFault> wake_faults = {
      {"create, first", &b->create_fault, 0, true},  {"create, last", &b->create_fault, 2, true},
      {"map, first", &b->map_fault, 0, false},       {"map, last", &b->map_fault, 2, false},
      {"copy to device", &b->to_device_fault, 0, false}, {"wait for copies", &b->wait_fault, 0, false},
  };
  for (const WakeFault& f : wake_faults) {
    f.fault->arm(f.after);
    std::string kind;
    try {
      a->wake(std::nullopt);
      kind = "none";
    } catch (const vse::DeviceOutOfMemory& e) {
      kind = "oom";
      CHECK(std::string(e.what()).find("'weights'") != std::string::npos);
    } catch (const vse::Error&) {
      kind = "error";
    }
    f.fault->disarm();
    if (kind == "none") std::fprintf(stderr, "  injected fault did not fire: %s\n", f.name);
    CHECK(kind == (f.device_oom ? "oom" : "error"));
    CHECK(snapshot(*a) == asleep);
    CHECK(b->real_free() == free_asleep);
  }
  b->lie_about_free_memory = false;
  a->wake(std::nullopt);
  CHECK(intact(seed));
  CHECK(b->real_free() == free_awake);
  CHECK(b->marks_balanced());
}

// Sleep releases each allocation as soon as the copies of its bytes are done. When waiting for a copy
// fails there, the allocations released so far are asleep with complete backups, the rest are still
// mapped, nothing is lost, and the same sleep, retried, puts the rest to sleep.
void test_sleep_failing_while_releasing_loses_nothing() {
  int failed_sleeps = 0;
  for (int after = 0; after < 4; ++after) {
    FaultyBackend* b = nullptr;
    const uint64_t cap = 64 * MiB;
    auto a = faulty_allocator(cap, &b, small_pieces(2));
    struct Row {
      uintptr_t p;
      uint64_t n;
      const char* tag;
      uint64_t seed;
    };
    std::vector<Row> rows = {{0, 5 * MiB + 11, "weights", 1}, {0, 3 * MiB, "weights", 2},
                             {0, MiB, "kv_cache", 3},         {0, 2 * MiB + 5, "weights", 4},
                             {0, MiB, "scratch", 5}};
    for (Row& r : rows) {
      r.p = a->allocate(r.n, 0, r.tag);
      fill(r.p, r.n, r.seed);
    }
    const uintptr_t kv = rows[2].p, scratch = rows[4].p;
    const std::vector<ByteRange> keep = {{kv + 64, kv + 64 + 4096}};
    b->wait_mark_fault.arm(after);
    bool threw = false;
    try {
      a->sleep({"weights"}, keep, {});
    } catch (const vse::Error&) {
      threw = true;
    }
    b->wait_mark_fault.disarm();
    if (!threw) {
      // Fewer waits than `after`+1 (one wait can cover several allocations): nothing to check.
      a->wake(std::nullopt);
      continue;
    }
    ++failed_sleeps;
    CHECK(b->marks_balanced());
    uint64_t mapped = 0;
    bool consistent = true;
    for (const auto& i : a->allocations()) {
      const bool weights = i.tag == "weights";
      if (i.state == State::Mapped) {
        mapped += round_up(i.size, kGranularity);
      } else if (i.state == State::BackedUp) {
        if (i.backup_bytes != (weights ? i.size : 4096)) consistent = false;  // complete backups only
      } else if (i.address != scratch) {
        consistent = false;  // only the allocation with nothing to keep may be discarded
      }
    }
    CHECK(consistent);
    CHECK(state_of(*a, scratch) == State::Discarded);  // nothing to keep: released before any wait
    CHECK(b->real_free() == cap - mapped);
    for (const Row& r : rows)  // what is still mapped is still intact
      if (state_of(*a, r.p) == State::Mapped && r.p != kv) CHECK(matches(r.p, r.n, r.seed));
    a->sleep({"weights"}, keep, {});  // the retry puts the rest to sleep
    for (const Row& r : rows) CHECK(state_of(*a, r.p) != State::Mapped);
    a->wake(std::nullopt);
    for (const Row& r : rows)
      if (std::string(r.tag) == "weights") CHECK(matches(r.p, r.n, r.seed));
    CHECK(matches(kv + 64, 4096, 3, 64));
    CHECK(b->marks_balanced());
    CHECK(b->real_free() == cap - 6 * MiB - 4 * MiB - 2 * MiB - 4 * MiB - 2 * MiB);
  }
  std::printf("  (%d of 4 sleeps failed part way)\n", failed_sleeps);
  CHECK(failed_sleeps >= 2);
}

void test_destructor_releases_everything() {
  // Under ASan/LSan this checks that an allocator dropped in any state leaks nothing.
  for (int mode = 0; mode < 3; ++mode) {
    auto a = host_allocator(16 * MiB);
    uintptr_t p = a->allocate(MiB, 0, "w");
    uintptr_t q = a->allocate(MiB, 0, "k");
    fill(p, MiB, 1);
    fill(q, MiB, 2);
    if (mode >= 1) a->sleep({"w"}, {{q, q + 10}}, {});
    if (mode == 2) a->wake(std::vector<std::string>{"w"});
  }
  CHECK(true);
}

// Worker threads allocate, write, check and free memory of tag "w" while a sleeper thread puts
// everything to sleep (offloading "w", keeping a preserved range of its own tag "s") and wakes it.
// Allocation and free run unsynchronized against sleep/wake, so they also free sleeping allocations
// and allocate while others sleep. Touching memory while a sleep may unmap it is a caller error, as
// with kernels on a GPU: an access gate (shared for workers, exclusive around the sleeper's cycle)
// keeps memory accesses out of the sleep-wake window, but not the allocator calls.
void test_concurrent_alloc_free_during_sleep_wake() {
  auto a = host_allocator(512 * MiB, small_pieces(2));
  std::shared_mutex gate;
  std::atomic<bool> done{false};
  std::atomic<long> bad_data{0}, errors{0}, cycles{0}, worker_iterations{0};
  constexpr int kWorkers = 4;
  constexpr int kIterations = 150;

  auto worker = [&](int id) {
    std::mt19937_64 rng(1000 + id);
    struct Live {
      uintptr_t p;
      uint64_t n;
      uint64_t seed;
    };
    std::vector<Live> live;
    try {
      for (int it = 0; it < kIterations; ++it) {
        uint64_t n = 8 * (1 + rng() % (96 * KiB / 8));
        uint64_t seed = (static_cast<uint64_t>(id) << 20) + it;
        uintptr_t p = a->allocate(n, 0, "w");
        {
          std::shared_lock<std::shared_mutex> access(gate);
          fill_words(p, n, seed);
        }
        live.push_back({p, n, seed});
        std::this_thread::yield();
        if (live.size() > 3 || rng() % 2 == 0) {
          size_t k = rng() % live.size();
          {
            std::shared_lock<std::shared_mutex> access(gate);
            if (!words_match(live[k].p, live[k].n, live[k].seed)) ++bad_data;
          }
          a->free(live[k].p);
          if (rng() % 4 == 0) a->settle();  // what the frees quarantined goes, while others use theirs
          live.erase(live.begin() + static_cast<long>(k));
        }
        ++worker_iterations;
      }
      std::shared_lock<std::shared_mutex> access(gate);
      for (const Live& l : live) {
        if (!words_match(l.p, l.n, l.seed)) ++bad_data;
        a->free(l.p);
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  worker %d: %s\n", id, e.what());
      ++errors;
    }
  };

  auto sleeper = [&] {
    try {
      const uint64_t n = 64 * KiB;
      uintptr_t s = a->allocate(n, 0, "s");
      uint64_t seed = 1;
      while (!done) {
        std::unique_lock<std::shared_mutex> exclusive(gate);
        fill(s, n, seed);
        a->sleep({"w"}, {{s + 1000, s + 9000}}, {});
        if (state_of(*a, s) != State::BackedUp) ++bad_data;
        a->wake(std::vector<std::string>{"s"});  // "w" sleeps on while workers allocate and free
        if (!matches(s + 1000, 8000, seed, 1000)) ++bad_data;
        a->wake(std::nullopt);
        ++seed;
        ++cycles;
        exclusive.unlock();
        std::this_thread::yield();
      }
      a->free(s);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  sleeper: %s\n", e.what());
      ++errors;
    }
  };

  auto reader = [&] {
    try {
      while (!done) {
        // Each call takes its own snapshot; what is checked is that they are safe at any moment.
        auto stats = a->tag_stats();
        auto infos = a->allocations();
        for (const auto& i : infos)
          if (i.state == State::BackedUp && i.backup_bytes == 0) ++bad_data;  // a row caught half-moved
        (void)stats;
        (void)a->host_bytes();
        (void)a->last_sleep();
        std::this_thread::yield();
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  reader: %s\n", e.what());
      ++errors;
    }
  };

  std::thread sleep_thread(sleeper);
  std::thread read_thread(reader);
  std::vector<std::thread> workers;
  for (int i = 0; i < kWorkers; ++i) workers.emplace_back(worker, i);
  for (auto& t : workers) t.join();
  done = true;
  sleep_thread.join();
  read_thread.join();
  CHECK(errors == 0);
  CHECK(bad_data == 0);
  CHECK(worker_iterations == kWorkers * kIterations);
  CHECK(cycles > 0);
  CHECK(a->allocations().empty());
  std::printf("  (%ld sleep/wake cycles during %ld worker iterations)\n", cycles.load(), worker_iterations.load());
}

// ---------------------------------------------------------------------------------------------
// Device memory has one owner: a failed driver call never makes a row lie or loses a handle.

// Warnings said during a test (the sink is process-wide; tests that read it run on one thread).
std::mutex g_warnings_mutex;
std::vector<std::string> g_warnings;
void capture_warning(const std::string& message) {
  std::lock_guard<std::mutex> lock(g_warnings_mutex);
  g_warnings.push_back(message);
}
struct CapturedWarnings {
  CapturedWarnings() {
    g_warnings.clear();
    previous = vse::set_warning_sink(capture_warning);
  }
  ~CapturedWarnings() { vse::set_warning_sink(previous); }
  size_t count() {
    std::lock_guard<std::mutex> lock(g_warnings_mutex);
    return g_warnings.size();
  }
  vse::WarningSink previous;
};

// A cuMemRelease that fails once: in sleep, discard and settle. The row is asleep (it was unmapped),
// the handle is kept, and the next settle (on its own, or first in sleep, wake and discard) gives it
// back; no capacity leaks, no later call fails.
void test_failed_release_keeps_the_handle_and_the_row_honest() {
  const uint64_t cap = 64 * MiB;
  FaultyBackend* b = nullptr;
  auto a = faulty_allocator(cap, &b);
  uintptr_t w = a->allocate(3 * MiB, 0, "weights");
  uintptr_t k = a->allocate(MiB, 0, "kv_cache");
  fill(w, 3 * MiB, 1);

  // Sleep: the first release is kv_cache's (nothing to keep, released first).
  b->release_fault.arm(0);
  CHECK_THROWS(a->sleep({"weights"}, {}, {}), vse::Error);
  CHECK(state_of(*a, k) == State::Discarded);  // unmapped: not Mapped, whatever the release did
  CHECK(state_of(*a, w) == State::Mapped);
  CHECK(b->real_free() == cap - 4 * MiB - 2 * MiB);  // kv_cache's handle is still held, not lost
  a->sleep({"weights"}, {}, {});  // gives kv_cache's handle back, then sleeps the rest
  CHECK(b->real_free() == cap);
  a->wake(std::nullopt);
  CHECK(matches(w, 3 * MiB, 1));

  // A release failing for an offloaded allocation: asleep with its whole backup, handle kept; the wake
  // gives that handle back first, then maps what the row needs.
  b->release_fault.arm(1);
  CHECK_THROWS(a->sleep({"weights"}, {}, {}), vse::Error);
  CHECK(state_of(*a, w) == State::BackedUp);
  CHECK(b->real_free() == cap - 4 * MiB);
  a->wake(std::nullopt);
  CHECK(matches(w, 3 * MiB, 1));
  CHECK(b->real_free() == cap - 6 * MiB);

  // discard, then settle.
  b->release_fault.arm(0);
  CHECK_THROWS(a->discard({"kv_cache"}), vse::Error);
  CHECK(state_of(*a, k) == State::Discarded);
  CHECK(b->real_free() == cap - 6 * MiB);
  b->release_fault.arm(0);
  CHECK_THROWS(a->settle(), vse::Error);  // the handle left by discard fails to go back again
  CHECK(state_of(*a, k) == State::Discarded);
  a->settle();
  CHECK(b->real_free() == cap - 4 * MiB);
  a->free(w);  // quarantined: nothing goes back before the settle
  CHECK(a->quarantined_bytes() == 4 * MiB && b->real_free() == cap - 4 * MiB);
  b->release_fault.arm(0);
  CHECK_THROWS(a->settle(), vse::Error);
  CHECK(a->quarantined_bytes() == 0 && b->real_free() == cap - 4 * MiB);  // the handle is still held
  a->settle();
  a->free(k);
  CHECK(a->allocations().empty());
  CHECK(b->real_free() == cap);

  // An unmap that fails leaves the row Mapped and its memory intact.
  uintptr_t x = a->allocate(MiB, 0, "weights");
  fill(x, MiB, 7);
  b->unmap_fault.arm(0);
  CHECK_THROWS(a->sleep({"weights"}, {}, {}), vse::Error);
  CHECK(state_of(*a, x) == State::Mapped);
  CHECK(matches(x, MiB, 7));
  a->sleep({"weights"}, {}, {});
  a->wake(std::nullopt);
  CHECK(matches(x, MiB, 7));
  a->free(x);
  a->settle();
  CHECK(b->real_free() == cap);
}

// A map failing after create: the new handle goes back at once; if even that release fails, the
// warning says so and the handle stays with its segment until release_unused() gives it back.
void test_segment_map_failure_gives_the_new_handle_back() {
  const uint64_t cap = 16 * MiB;
  FaultyBackend b(cap);
  CapturedWarnings warnings;
  {
    vse::Segment m(b, 0, "weights", 2 * MiB, false);
    b.map_fault.arm(0);
    CHECK_THROWS(m.map({0, 2 * MiB}), vse::Error);
    CHECK(m.mapped_runs().empty() && m.idle() && b.real_free() == cap);
    b.map_fault.arm(0);
    b.release_fault.arm(0);
    CHECK_THROWS(m.map({0, 2 * MiB}), vse::Error);
    CHECK(m.mapped_runs().empty() && !m.idle() && b.real_free() == cap - 2 * MiB);
    CHECK(warnings.count() == 1);
    CHECK_THROWS(m.map({0, 2 * MiB}), vse::Error);  // the held handle is in the way: never lost
    m.release_unused();
    CHECK(m.idle() && b.real_free() == cap);
    m.map({0, 2 * MiB});
    CHECK(m.mapped_runs().size() == 1 && b.real_free() == cap - 2 * MiB);
  }
  CHECK(b.real_free() == cap);  // the destructor gave it back
}

// ---------------------------------------------------------------------------------------------
// Copy ordering, on a backend whose copies complete later, on a thread, at random.

// Sleep releases an allocation only after the fence that follows its own last copy. On the async
// backend a release before that shows as an early release (a release while a copy from the memory
// is pending). Waiting for an earlier fence (the one before the right one) fails here.
void test_sleep_releases_each_allocation_only_after_its_own_copies() {
  auto backend = std::make_unique<vse::AsyncHostBackend>(256 * MiB, 300, 7);
  vse::AsyncHostBackend* b = backend.get();
  auto a = std::make_unique<Allocator>(std::move(backend));
  a->set_options(small_pieces(2));
  // Sizes that put allocation ends in the middle of 2 MiB staging pieces and on their edges.
  const std::vector<uint64_t> sizes = {MiB + 7, 3 * MiB, 512 * KiB, 5 * MiB + 3, 2 * MiB, 700 * KiB, 4 * MiB - 1};
  std::vector<uintptr_t> ptrs;
  for (size_t i = 0; i < sizes.size(); ++i) ptrs.push_back(a->allocate(sizes[i], 0, i % 3 == 2 ? "kv" : "weights"));
  const uintptr_t kv = ptrs[2];
  for (int cycle = 0; cycle < 4; ++cycle) {
    for (size_t i = 0; i < sizes.size(); ++i) fill_words(ptrs[i], sizes[i] & ~uint64_t(7), 10 * cycle + i);
    a->sleep({"weights"}, {{kv + 4096, kv + 12288}}, {});
    CHECK(b->early_releases() == 0);
    CHECK(b->open_marks() == 0);
    a->wake(std::nullopt);
    for (size_t i = 0; i < sizes.size(); ++i)
      if (i % 3 != 2) CHECK(words_match(ptrs[i], sizes[i] & ~uint64_t(7), 10 * cycle + i));
  }
  for (uintptr_t p : ptrs) a->free(p);
  CHECK(b->early_releases() == 0);
}

// A fence is released once whether it was waited for or not, and waits only for what preceded it.
void test_fences_release_themselves_and_wait_for_their_prefix() {
  vse::AsyncHostBackend b(0, 500, 3);
  std::vector<uint8_t> src(64 * KiB, 0x5A), dst(64 * KiB, 0);
  {
    vse::Fence empty(b, 0);
    empty.wait();
    b.enqueue_copies(0, vse::CopyDirection::ToHost,
                     {{reinterpret_cast<uintptr_t>(src.data()), dst.data(), src.size()}});
    vse::Fence after(b, 0);
    vse::Fence moved(std::move(after));
    CHECK(b.open_marks() == 2);
    moved.wait();
    CHECK(dst == src);
  }
  CHECK(b.open_marks() == 0);
}

// ---------------------------------------------------------------------------------------------
// fill_unrestored: bytes a wake does not restore are 0xFF (NaN in fp16/bf16/fp32), restored ones intact.

bool all_bytes(uintptr_t address, uint64_t bytes, uint8_t value) {
  const auto* p = reinterpret_cast<const uint8_t*>(address);
  for (uint64_t i = 0; i < bytes; ++i)
    if (p[i] != value) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Priming the driver's next create after a release (Note [Priming the next create])

// The backend's delays are read when the allocator is made.
std::unique_ptr<Allocator> priming_allocator(std::vector<double> delays, FaultyBackend** backend) {
  auto b = std::make_unique<FaultyBackend>(64 * MiB);
  b->prime_at = std::move(delays);
  *backend = b.get();
  auto a = std::make_unique<Allocator>(std::move(b));
  a->set_options(small_pieces());
  return a;
}

bool eventually(const std::function<bool()>& done, double seconds = 5) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

// A sleep primes each device it released memory on at every delay, a discard too; the granule goes
// back each time, and nothing is primed where nothing was released.
void test_sleep_and_discard_prime_the_next_create() {
  FaultyBackend* b = nullptr;
  auto a = priming_allocator({0.01, 0.03}, &b);
  uintptr_t w = a->allocate(4 * MiB, 0, "weights");
  a->allocate(8 * MiB, 0, "kv");
  fill(w, 4 * MiB, 7);
  const uint64_t free_awake = b->real_free();
  a->sleep({"weights"}, {}, {});
  CHECK(eventually([&] { return a->prime_stats().rounds == 2; }));
  CHECK(b->primes() == 2 && a->prime_stats().failures == 0 && a->prime_stats().skipped == 0);
  CHECK(b->real_free() == free_awake + 12 * MiB);  // every granule primed went back
  a->wake(std::nullopt);
  CHECK(matches(w, 4 * MiB, 7));
  a->discard({"kv"});
  CHECK(eventually([&] { return a->prime_stats().rounds == 4; }));
  a->discard({"kv"});  // nothing mapped with that tag: nothing released, nothing primed
  std::this_thread::sleep_for(std::chrono::milliseconds(60));
  CHECK(a->prime_stats().rounds == 4 && b->primes() == 4);
}

// A wake drops the primes still to come: its own creates take the driver's work.
void test_wake_cancels_the_primes_to_come() {
  FaultyBackend* b = nullptr;
  auto a = priming_allocator({0.15}, &b);
  uintptr_t w = a->allocate(4 * MiB, 0, "weights");
  fill(w, 4 * MiB, 3);
  a->sleep({"weights"}, {}, {});
  a->wake(std::nullopt);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(b->primes() == 0 && a->prime_stats().rounds == 0);
  CHECK(matches(w, 4 * MiB, 3));
  // Option prime_after_release off: a sleep schedules nothing.
  a->update_options([](vse::AllocatorOptions& o) { o.prime_after_release = false; });
  a->sleep({"weights"}, {}, {});
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(b->primes() == 0 && a->prime_stats().rounds == 0);
  a->wake(std::nullopt);
  CHECK(matches(w, 4 * MiB, 3));
}

// A prime that fails (a device a trainer has filled) is counted with its error and harms nothing:
// the next wake works, and a later sleep primes again.
void test_a_failed_prime_is_counted_not_raised() {
  FaultyBackend* b = nullptr;
  auto a = priming_allocator({0.01}, &b);
  b->prime_fault.arm(0);
  uintptr_t w = a->allocate(4 * MiB, 0, "weights");
  fill(w, 4 * MiB, 5);
  a->sleep({"weights"}, {}, {});
  CHECK(eventually([&] { return a->prime_stats().rounds == 1; }));
  vse::PrimeStats s = a->prime_stats();
  CHECK(s.failures == 1 && s.last_error.find("injected: prime") != std::string::npos);
  a->wake(std::nullopt);
  CHECK(matches(w, 4 * MiB, 5));
  a->sleep({"weights"}, {}, {});
  CHECK(eventually([&] { return a->prime_stats().rounds == 2; }));
  CHECK(a->prime_stats().failures == 1 && b->primes() == 1);
  a->wake(std::nullopt);
}

// The primer on its own: a round is skipped while an operation runs; a destructor with rounds far
// off returns at once; without delays no thread is started and nothing happens.
void test_primer_skips_busy_rounds_and_stops_at_once() {
  std::atomic<int> primed{0};
  std::atomic<bool> busy{true};
  {
    vse::CreatePrimer p({0.01, 0.02}, [&](int) { ++primed; }, [&] { return !busy.load(); });
    p.released({0, 1});
    CHECK(eventually([&] { return p.stats().skipped == 2; }));
    CHECK(primed == 0 && p.stats().rounds == 0);
    busy = false;
    p.released({1});  // devices gathered since the last round ran: 0 and 1 again, then 1
    CHECK(eventually([&] { return p.stats().rounds == 2; }));
    CHECK(primed == 2);
  }
  const auto start = std::chrono::steady_clock::now();
  {
    vse::CreatePrimer p({30.0}, [&](int) { ++primed; }, [] { return true; });
    p.released({0});
  }
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(2));
  vse::CreatePrimer none({}, [&](int) { ++primed; }, [] { return true; });
  none.released({0});
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(primed == 2 && none.stats().rounds == 0 && none.stats().skipped == 0);
}

void test_fill_unrestored_makes_discarded_bytes_loud() {
  for (bool async : {false, true}) {
    std::unique_ptr<vse::DeviceBackend> backend;
    if (async)
      backend = std::make_unique<vse::AsyncHostBackend>(64 * MiB, 100, 5);
    else
      backend = std::make_unique<vse::HostBackend>(64 * MiB);
    Allocator a(std::move(backend));
    vse::AllocatorOptions o = small_pieces();
    o.fill_unrestored = true;
    a.set_options(o);
    const uint64_t n = MiB + 100;
    uintptr_t w = a.allocate(n, 0, "weights");  // offloaded: all restored
    uintptr_t b = a.allocate(n, 0, "buffers");  // preserved ranges only
    uintptr_t d = a.allocate(n, 0, "kv");       // discarded
    fill(w, n, 1);
    fill(b, n, 2);
    fill(d, n, 3);
    a.sleep({"weights"}, {{b + 10, b + 5000}, {b + n - 20, b + n}}, {});
    a.wake(std::nullopt);
    CHECK(matches(w, n, 1));
    CHECK(all_bytes(b, 10, 0xFF));
    CHECK(matches(b + 10, 4990, 2, 10));
    CHECK(all_bytes(b + 5000, n - 20 - 5000, 0xFF));
    CHECK(matches(b + n - 20, 20, 2, n - 20));
    CHECK(all_bytes(b + n, round_up(n, kGranularity) - n, 0xFF));  // the rounding tail too
    CHECK(all_bytes(d, round_up(n, kGranularity), 0xFF));
    // Off (the default): nothing is filled (the host backend's fresh memory reads zero).
    o.fill_unrestored = false;
    a.set_options(o);
    a.sleep({"weights"}, {}, {});
    a.wake(std::nullopt);
    CHECK(all_bytes(d, n, 0));
    CHECK(matches(w, n, 1));
  }
}

// ---------------------------------------------------------------------------------------------
// Host arena: not inherited by fork(), no overflow of piece sizes, no terminate when threads can't start.

void test_host_arena_is_not_inherited_by_fork() {
  vse::HostBackend backend;
  vse::HostArena arena(backend, 0, 4 * MiB);
  arena.prepare(4 * MiB, small_pieces().staging, [](uint64_t, uint64_t) {});
  std::memset(arena.data(), 1, 4 * MiB);
  pid_t child = fork();
  if (child == 0) {
    // Not mapped in the child at all: msync of an unmapped range fails with ENOMEM.
    bool absent = msync(arena.data(), 4096, MS_ASYNC) != 0 && errno == ENOMEM;
    _exit(absent ? 0 : 1);
  }
  int status = -1;
  CHECK(child > 0 && waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

void test_staging_piece_bytes_at_the_limits() {
  auto a = host_allocator(64 * MiB);
  vse::AllocatorOptions o = a->options();
  o.staging.piece_bytes = ~uint64_t(0);  // 2**64-1 once wrapped to 0 and divided by it
  CHECK_THROWS(a->set_options(o), vse::InvalidArgument);
  o.staging.piece_bytes = vse::kMaxStagingPieceBytes;
  a->set_options(o);
  uintptr_t p = a->allocate(5 * MiB, 0, "w");
  fill(p, 5 * MiB, 1);
  a->sleep({"w"}, {}, {});
  a->wake(std::nullopt);
  CHECK(matches(p, 5 * MiB, 1));
  // The arena clamps what it is given directly, too.
  vse::HostBackend backend;
  vse::HostArena arena(backend, 0, 3 * MiB);
  vse::StagingOptions huge{2, ~uint64_t(0)};
  uint64_t ready = 0;
  arena.prepare(3 * MiB, huge, [&](uint64_t, uint64_t end) { ready = end; });
  CHECK(ready == 3 * MiB);
}

std::atomic<int> g_spawns_left{0};
std::thread spawn_until_bad_alloc(const std::function<void()>& work) {
  if (g_spawns_left-- <= 0) throw std::bad_alloc();
  return std::thread(work);
}

void test_staging_threads_that_cannot_start_are_no_failure() {
  vse::HostBackend backend;
  for (int started : {0, 1}) {
    g_spawns_left = started;
    vse::HostArena arena(backend, 0, 16 * MiB);
    uint64_t ready = 0;
    arena.prepare(16 * MiB, vse::StagingOptions{4, 2 * MiB}, [&](uint64_t, uint64_t end) { ready = end; },
                  spawn_until_bad_alloc);
    CHECK(ready == 16 * MiB);
  }
}

// ---------------------------------------------------------------------------------------------
// Options, and what my_malloc says.

// Two threads changing different options at once: neither change is lost.
void test_concurrent_option_updates_are_not_lost() {
  auto a = host_allocator(16 * MiB);
  constexpr uint64_t kRounds = 2000;
  std::thread limits([&] {
    for (uint64_t i = 1; i <= kRounds; ++i) a->update_options([&](vse::AllocatorOptions& o) { o.host_memory_limit = i; });
  });
  std::thread threads([&] {
    for (uint64_t i = 1; i <= kRounds; ++i)
      a->update_options([&](vse::AllocatorOptions& o) { o.staging.threads = 1 + static_cast<unsigned>(i % 5); });
  });
  limits.join();
  threads.join();
  CHECK(a->options().host_memory_limit == kRounds);
  CHECK(a->options().staging.threads == 1 + kRounds % 5);
  CHECK_THROWS(a->update_options([](vse::AllocatorOptions& o) { o.staging.threads = 0; }), vse::InvalidArgument);
  CHECK(a->options().staging.threads == 1 + kRounds % 5);  // a rejected update changes nothing
}

// Out of device memory is PyTorch's to report (it retries after freeing its cache); other failures
// are said once.
void test_allocate_or_null_is_silent_only_about_device_memory() {
  auto a = host_allocator(4 * MiB);
  CapturedWarnings warnings;
  CHECK(vse::allocate_or_null(*a, 8 * MiB, 0, "w") == 0);
  CHECK(vse::allocate_or_null(*a, 8 * MiB, 0, "w") == 0);
  CHECK(warnings.count() == 0);
  CHECK(vse::allocate_or_null(*a, 0, 0, "w") == 0);
  CHECK(vse::allocate_or_null(*a, MiB, 3, "w") == 0);
  CHECK(warnings.count() == 2);
  uintptr_t p = vse::allocate_or_null(*a, MiB, 0, "w");
  CHECK(p != 0);
  a->free(p);
}

// A failure met while undoing a failed wake is said, not swallowed; the wake's own error is raised.
void test_failure_while_undoing_a_wake_is_warned() {
  FaultyBackend* b = nullptr;
  auto a = faulty_allocator(64 * MiB, &b);
  uintptr_t p = a->allocate(MiB, 0, "w");
  uintptr_t q = a->allocate(MiB, 0, "w");
  fill(p, MiB, 1);
  fill(q, MiB, 2);
  a->sleep({"w"}, {}, {});
  CapturedWarnings warnings;
  b->map_fault.arm(1);      // the second map fails ...
  b->release_fault.arm(1);  // ... and giving back the first one's memory in the undo fails too
  CHECK_THROWS(a->wake(std::nullopt), vse::Error);
  CHECK(warnings.count() >= 1);
  CHECK(state_of(*a, p) == State::BackedUp && state_of(*a, q) == State::BackedUp);
  a->wake(std::nullopt);  // gives the handle left behind back first
  CHECK(matches(p, MiB, 1) && matches(q, MiB, 2));
  a->free(p);
  a->free(q);
  a->settle();
  CHECK(b->real_free() == 64 * MiB);
}

// ---------------------------------------------------------------------------------------------
// The CUDA backend over a fake driver table: the flags and descriptors it hands the driver. (Only the
// plumbing: whether RDMA and peer access work is for the GPU suite.)

namespace fake_cuda {
constexpr int kDevices = 3;
CUmemAllocationProp last_prop{};
std::vector<CUmemAccessDesc> last_access;
CUresult host_register_result = CUDA_SUCCESS;
CUstream last_memset_stream = nullptr;
CUstreamCaptureMode capture_mode = CU_STREAM_CAPTURE_MODE_GLOBAL;  // this (fake) thread's mode
std::vector<CUstreamCaptureMode> pinned_in_mode;                     // mode at each pin and unpin
std::vector<CUstreamCaptureMode> queried_in_mode;                    // mode at each cuStreamIsCapturing
const CUstream capturing_stream = reinterpret_cast<CUstream>(uintptr_t(0x51));
const CUstream broken_stream = reinterpret_cast<CUstream>(uintptr_t(0x52));  // the query fails
unsigned char last_memset_value = 0;
std::vector<size_t> created;                       // size of each cuMemCreate
std::vector<CUmemGenericAllocationHandle> released;  // each cuMemRelease

vse::CudaDriver table() {
  vse::CudaDriver d;
  d.cuDeviceGetCount = [](int* n) { *n = kDevices; return CUDA_SUCCESS; };
  d.cuDeviceGet = [](CUdevice* dev, int i) { *dev = i; return CUDA_SUCCESS; };
  d.cuDevicePrimaryCtxRetain = [](CUcontext* c, CUdevice dev) {
    *c = reinterpret_cast<CUcontext>(uintptr_t(0x1000 + dev));
    return CUDA_SUCCESS;
  };
  d.cuCtxPushCurrent = [](CUcontext) { return CUDA_SUCCESS; };
  d.cuCtxPopCurrent = [](CUcontext* c) { *c = nullptr; return CUDA_SUCCESS; };
  d.cuStreamCreate = [](CUstream* s, unsigned) { *s = reinterpret_cast<CUstream>(uintptr_t(0x2000)); return CUDA_SUCCESS; };
  // Device 0 supports GPUDirect RDMA with VMM; devices 1 and 2 do not.
  d.cuDeviceGetAttribute = [](int* v, CUdevice_attribute attr, CUdevice dev) {
    *v = attr == CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED && dev == 0;
    return CUDA_SUCCESS;
  };
  // Devices 0 and 1 are peers of each other; device 2 is nobody's peer.
  d.cuDeviceCanAccessPeer = [](int* can, CUdevice from, CUdevice to) {
    *can = from != to && from < 2 && to < 2;
    return CUDA_SUCCESS;
  };
  d.cuMemGetAllocationGranularity = [](size_t* g, const CUmemAllocationProp*, CUmemAllocationGranularity_flags) {
    *g = 2 << 20;
    return CUDA_SUCCESS;
  };
  d.cuMemCreate = [](CUmemGenericAllocationHandle* h, size_t size, const CUmemAllocationProp* p, unsigned long long) {
    last_prop = *p;
    created.push_back(size);
    *h = 42;
    return CUDA_SUCCESS;
  };
  d.cuMemRelease = [](CUmemGenericAllocationHandle h) {
    released.push_back(h);
    return CUDA_SUCCESS;
  };
  d.cuMemMap = [](CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long) { return CUDA_SUCCESS; };
  d.cuMemSetAccess = [](CUdeviceptr, size_t, const CUmemAccessDesc* desc, size_t count) {
    last_access.assign(desc, desc + count);
    return CUDA_SUCCESS;
  };
  d.cuMemHostRegister = [](void*, size_t, unsigned) {
    pinned_in_mode.push_back(capture_mode);
    return host_register_result;
  };
  d.cuMemHostUnregister = [](void*) {
    pinned_in_mode.push_back(capture_mode);
    return CUDA_SUCCESS;
  };
  d.cuThreadExchangeStreamCaptureMode = [](CUstreamCaptureMode* mode) {
    std::swap(*mode, capture_mode);
    return CUDA_SUCCESS;
  };
  d.cuStreamIsCapturing = [](CUstream stream, CUstreamCaptureStatus* status) {
    queried_in_mode.push_back(capture_mode);
    if (stream == broken_stream) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    *status = stream == capturing_stream ? CU_STREAM_CAPTURE_STATUS_ACTIVE : CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
  };
  d.cuMemsetD8Async = [](CUdeviceptr, unsigned char value, size_t, CUstream stream) {
    last_memset_value = value;
    last_memset_stream = stream;
    return CUDA_SUCCESS;
  };
  d.cuGetErrorName = [](CUresult r, const char** name) {
    *name = r == CUDA_ERROR_OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY" : "CUDA_ERROR_OTHER";
    return CUDA_SUCCESS;
  };
  d.cuGetErrorString = [](CUresult, const char** text) { *text = "fake"; return CUDA_SUCCESS; };
  return d;
}

bool accessible_to(const std::vector<CUmemAccessDesc>& access, std::vector<int> devices) {
  std::vector<int> got;
  for (const CUmemAccessDesc& a : access) {
    if (a.location.type != CU_MEM_LOCATION_TYPE_DEVICE || a.flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE) return false;
    got.push_back(a.location.id);
  }
  std::sort(got.begin(), got.end());
  std::sort(devices.begin(), devices.end());
  return got == devices;
}
}  // namespace fake_cuda

void test_cuda_backend_asks_for_rdma_and_peer_access() {
  const vse::CudaDriver driver = fake_cuda::table();
  vse::CudaBackend b(driver);
  b.create(0, 2 * MiB);
  CHECK(fake_cuda::last_prop.allocFlags.gpuDirectRDMACapable == 1);
  CHECK(fake_cuda::last_prop.location.id == 0);
  b.create(1, 2 * MiB);
  CHECK(fake_cuda::last_prop.allocFlags.gpuDirectRDMACapable == 0);
  b.map(0, 0x10000000, 2 * MiB, 42);
  CHECK(fake_cuda::accessible_to(fake_cuda::last_access, {0, 1}));
  b.map(2, 0x10000000, 2 * MiB, 42);
  CHECK(fake_cuda::accessible_to(fake_cuda::last_access, {2}));
  b.fill(1, 0x10000000, 100, 0xFF);
  CHECK(fake_cuda::last_memset_value == 0xFF);
  CHECK(fake_cuda::last_memset_stream == reinterpret_cast<CUstream>(uintptr_t(0x2000)));  // the copy stream
}

// The CUDA backend primes the driver with one granule, created and released, at delays that start
// within the 0.3 s the H200 needed to leave its work (Note [Priming the next create]).
void test_cuda_prime_creates_and_releases_one_granule() {
  const vse::CudaDriver driver = fake_cuda::table();
  vse::CudaBackend b(driver);
  fake_cuda::created.clear();
  fake_cuda::released.clear();
  b.prime(1);
  CHECK(fake_cuda::created == std::vector<size_t>{2 << 20});
  CHECK(fake_cuda::released == std::vector<CUmemGenericAllocationHandle>{42});
  CHECK(fake_cuda::last_prop.location.id == 1);
  const std::vector<double> delays = b.prime_delays();
  CHECK(!delays.empty() && delays.front() <= 0.3 && std::is_sorted(delays.begin(), delays.end()));
}

// cuMemHostRegister out of memory is about host memory: HostOutOfMemory, naming the call and the code.
void test_cuda_pin_out_of_memory_is_host_out_of_memory() {
  const vse::CudaDriver driver = fake_cuda::table();
  vse::CudaBackend b(driver);
  char page[4096];
  fake_cuda::host_register_result = CUDA_ERROR_OUT_OF_MEMORY;
  const std::string message = message_of<vse::HostOutOfMemory>([&] { b.pin(0, page, sizeof page); });
  fake_cuda::host_register_result = CUDA_SUCCESS;
  CHECK(message.find("cuMemHostRegister") != std::string::npos);
  CHECK(message.find("CUDA_ERROR_OUT_OF_MEMORY (2)") != std::string::npos);
  CHECK_THROWS(vse::check_cuda(driver, CUDA_ERROR_OUT_OF_MEMORY, "cuMemCreate"), vse::DeviceOutOfMemory);
}

// my_malloc asks whether its stream captures before it lets the allocator synchronize: in relaxed
// mode (asking must not break another thread's capture), and a failed query reads as capturing.
void test_cuda_stream_capture_query_is_relaxed_and_fails_safe() {
  const vse::CudaDriver driver = fake_cuda::table();
  fake_cuda::queried_in_mode.clear();
  CHECK(vse::CudaBackend::stream_is_capturing(driver, fake_cuda::capturing_stream));
  CHECK(!vse::CudaBackend::stream_is_capturing(driver, nullptr));
  CHECK(vse::CudaBackend::stream_is_capturing(driver, fake_cuda::broken_stream));
  CHECK(fake_cuda::queried_in_mode.size() == 3);
  for (CUstreamCaptureMode mode : fake_cuda::queried_in_mode) CHECK(mode == CU_STREAM_CAPTURE_MODE_RELAXED);
  CHECK(fake_cuda::capture_mode == CU_STREAM_CAPTURE_MODE_GLOBAL);
}

// A pin or unpin must not invalidate another thread's CUDA graph capture: each is made in relaxed
// capture mode, and the thread's own mode is given back afterwards, also when the call fails.
void test_cuda_pin_and_unpin_run_in_relaxed_capture_mode() {
  const vse::CudaDriver driver = fake_cuda::table();
  vse::CudaBackend b(driver);
  char page[4096];
  fake_cuda::pinned_in_mode.clear();
  b.pin(0, page, sizeof page);
  b.unpin(0, page);
  fake_cuda::host_register_result = CUDA_ERROR_OUT_OF_MEMORY;
  CHECK_THROWS(b.pin(0, page, sizeof page), vse::HostOutOfMemory);
  fake_cuda::host_register_result = CUDA_SUCCESS;
  CHECK(fake_cuda::pinned_in_mode.size() == 3);
  for (CUstreamCaptureMode mode : fake_cuda::pinned_in_mode) CHECK(mode == CU_STREAM_CAPTURE_MODE_RELAXED);
  CHECK(fake_cuda::capture_mode == CU_STREAM_CAPTURE_MODE_GLOBAL);
}

using vse_test::Test;

const Test kTests[] = {
    {"range_set_add", test_range_set_add},
    {"range_set_subtract", test_range_set_subtract},
    {"cuda_pin_and_unpin_run_in_relaxed_capture_mode", test_cuda_pin_and_unpin_run_in_relaxed_capture_mode},
    {"cuda_stream_capture_query_is_relaxed_and_fails_safe", test_cuda_stream_capture_query_is_relaxed_and_fails_safe},
    {"range_set_clip", test_range_set_clip},
    {"range_set_random_against_bitmap", test_range_set_random_against_bitmap},
    {"allocate_and_free", test_allocate_and_free},
    {"offloaded_tag_survives_every_byte", test_offloaded_tag_survives_every_byte},
    {"other_tags_are_discarded", test_other_tags_are_discarded},
    {"preserved_ranges", test_preserved_ranges},
    {"selective_wake_and_noops", test_selective_wake_and_noops},
    {"discard", test_discard},
    {"free_returns_capacity_in_every_state", test_free_returns_capacity_in_every_state},
    {"stats_exact", test_stats_exact},
    {"host_cache", test_host_cache},
    {"wake_out_of_memory_then_retry", test_wake_out_of_memory_then_retry},
    {"host_memory_limit_then_retry", test_host_memory_limit_then_retry},
    {"injected_faults_roll_back", test_injected_faults_roll_back},
    {"sleep_failing_while_releasing_loses_nothing", test_sleep_failing_while_releasing_loses_nothing},
    {"destructor_releases_everything", test_destructor_releases_everything},
    {"concurrent_alloc_free_during_sleep_wake", test_concurrent_alloc_free_during_sleep_wake},
    {"failed_release_keeps_the_handle_and_the_row_honest", test_failed_release_keeps_the_handle_and_the_row_honest},
    {"segment_map_failure_gives_the_new_handle_back", test_segment_map_failure_gives_the_new_handle_back},
    {"sleep_releases_each_allocation_only_after_its_own_copies",
     test_sleep_releases_each_allocation_only_after_its_own_copies},
    {"fences_release_themselves_and_wait_for_their_prefix", test_fences_release_themselves_and_wait_for_their_prefix},
    {"fill_unrestored_makes_discarded_bytes_loud", test_fill_unrestored_makes_discarded_bytes_loud},
    {"sleep_and_discard_prime_the_next_create", test_sleep_and_discard_prime_the_next_create},
    {"wake_cancels_the_primes_to_come", test_wake_cancels_the_primes_to_come},
    {"a_failed_prime_is_counted_not_raised", test_a_failed_prime_is_counted_not_raised},
    {"primer_skips_busy_rounds_and_stops_at_once", test_primer_skips_busy_rounds_and_stops_at_once},
    {"cuda_prime_creates_and_releases_one_granule", test_cuda_prime_creates_and_releases_one_granule},
    {"host_arena_is_not_inherited_by_fork", test_host_arena_is_not_inherited_by_fork},
    {"staging_piece_bytes_at_the_limits", test_staging_piece_bytes_at_the_limits},
    {"staging_threads_that_cannot_start_are_no_failure", test_staging_threads_that_cannot_start_are_no_failure},
    {"concurrent_option_updates_are_not_lost", test_concurrent_option_updates_are_not_lost},
    {"allocate_or_null_is_silent_only_about_device_memory", test_allocate_or_null_is_silent_only_about_device_memory},
    {"failure_while_undoing_a_wake_is_warned", test_failure_while_undoing_a_wake_is_warned},
    {"cuda_backend_asks_for_rdma_and_peer_access", test_cuda_backend_asks_for_rdma_and_peer_access},
    {"cuda_pin_out_of_memory_is_host_out_of_memory", test_cuda_pin_out_of_memory_is_host_out_of_memory},
};

}  // namespace

int main(int argc, char** argv) { return vse_test::run_tests(kTests, argc, argv); }
