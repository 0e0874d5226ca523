// Host policies and background host work (Allocator::prepare_host), over the host backend with pins
// counted. Built as target `host_policy_tests`; tests/cpp/run_sanitizers.sh runs it under ASan, UBSan
// and TSan after core_tests. Last line: "N passed, M failed".
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "allocator.h"
#include "errors.h"
#include "host_backend.h"
#include "host_cache.h"
#include "test_harness.h"

namespace {

constexpr uint64_t MiB = 1ull << 20;

// Pins as the CUDA backend sees them: every unpin must match a pin, and none may be left at the end.
struct PinLedger {
  std::mutex mutex;
  std::map<void*, uint64_t> pinned;
  long bad_unpins = 0;
  uint64_t pinned_ever = 0;  // bytes of every pin so far: what pinning again would show
  uint64_t bytes() {
    std::lock_guard<std::mutex> lock(mutex);
    uint64_t total = 0;
    for (const auto& [p, n] : pinned) total += n;
    return total;
  }
};

class CountingBackend final : public vse::DeviceBackend {
 public:
  explicit CountingBackend(std::shared_ptr<PinLedger> ledger) : ledger_(std::move(ledger)) {}
  const char* name() const override { return "host+pins"; }
  int device_count() override { return host_.device_count(); }
  uint64_t granularity(int d) override { return host_.granularity(d); }
  uintptr_t reserve(int d, uint64_t n) override { return host_.reserve(d, n); }
  void unreserve(int d, uintptr_t a, uint64_t n) override { host_.unreserve(d, a, n); }
  vse::PhysicalHandle create(int d, uint64_t n) override { return host_.create(d, n); }
  void release(int d, vse::PhysicalHandle h) override { host_.release(d, h); }
  void map(int d, uintptr_t a, uint64_t n, vse::PhysicalHandle h) override { host_.map(d, a, n, h); }
  void unmap(int d, uintptr_t a, uint64_t n) override { host_.unmap(d, a, n); }
  vse::MemoryInfo memory_info(int d) override { return host_.memory_info(d); }
  void synchronize(int d) override { host_.synchronize(d); }
  void pin(int, void* p, uint64_t n) override {
    std::lock_guard<std::mutex> lock(ledger_->mutex);
    ledger_->pinned[p] = n;
    ledger_->pinned_ever += n;
  }
  void unpin(int, void* p) override {
    std::lock_guard<std::mutex> lock(ledger_->mutex);
    if (ledger_->pinned.erase(p) != 1) ++ledger_->bad_unpins;
  }
  void enqueue_copies(int d, vse::CopyDirection dir, const std::vector<vse::CopySpan>& s) override {
    host_.enqueue_copies(d, dir, s);
  }
  void wait_copies(int d) override { host_.wait_copies(d); }
  void fill(int d, uintptr_t a, uint64_t n, uint8_t v) override { host_.fill(d, a, n, v); }
  uint64_t record_mark(int d) override { return host_.record_mark(d); }
  void wait_mark(int d, uint64_t m) override { host_.wait_mark(d, m); }
  void release_mark(int d, uint64_t m) noexcept override { host_.release_mark(d, m); }

 private:
  vse::HostBackend host_{512 * MiB};
  std::shared_ptr<PinLedger> ledger_;
};

std::unique_ptr<vse::Allocator> make(const std::shared_ptr<PinLedger>& ledger, vse::HostPolicy policy,
                                     uint64_t rate = 0) {
  auto a = std::make_unique<vse::Allocator>(std::make_unique<CountingBackend>(ledger));
  vse::AllocatorOptions o = a->options();
  o.host_policy = policy;
  o.staging.piece_bytes = 2 * MiB;
  o.staging.threads = 2;
  if (rate) o.host_prepare_rate = rate;
  a->set_options(o);
  return a;
}

void fill(uintptr_t p, uint64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  auto* b = reinterpret_cast<uint8_t*>(p);
  for (uint64_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(rng() | 1);
}

bool holds(uintptr_t p, uint64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  auto* b = reinterpret_cast<const uint8_t*>(p);
  for (uint64_t i = 0; i < n; ++i)
    if (b[i] != static_cast<uint8_t>(rng() | 1)) return false;
  return true;
}

void reclaimable_holds_nothing_pinned_while_awake_and_survives_reclaim() {
  auto ledger = std::make_shared<PinLedger>();
  {
    auto a = make(ledger, vse::HostPolicy::Reclaimable);
    const uint64_t n = 9 * MiB + 77;
    uintptr_t p = a->allocate(n, 0, "weights");
    for (unsigned cycle = 0; cycle < 4; ++cycle) {
      fill(p, n, cycle);
      a->sleep({"weights"}, {}, {});
      CHECK(ledger->bytes() >= n);  // pinned while asleep
      a->simulate_host_reclaim();   // must not touch the backup in use
      a->wake(std::nullopt);
      CHECK(holds(p, n, cycle));
      a->wait_host();
      CHECK(ledger->bytes() == 0);  // nothing pinned while awake
      CHECK(a->host_bytes() > 0);   // but the arena is kept
      a->simulate_host_reclaim();   // the kernel took every page
    }
    a->free(p);
  }
  CHECK(ledger->bytes() == 0);
  CHECK(ledger->bad_unpins == 0);
}

// A share of the kept arena stays pinned (its start); the kernel may take only the rest, and a level-2
// sized backup takes the kept arena instead of new memory.
void reclaimable_keeps_its_pinned_share_and_serves_smaller_backups() {
  auto ledger = std::make_shared<PinLedger>();
  {
    auto a = make(ledger, vse::HostPolicy::Reclaimable);
    vse::AllocatorOptions o = a->options();
    o.reclaimable_pinned_share = 0.5;
    a->set_options(o);
    const uint64_t n = 16 * MiB;
    uintptr_t p = a->allocate(n, 0, "weights");
    for (unsigned cycle = 0; cycle < 3; ++cycle) {
      fill(p, n, 20 + cycle);
      a->sleep({"weights"}, {}, {});
      a->wake(std::nullopt);
      CHECK(holds(p, n, 20 + cycle));
      a->wait_host();
      CHECK(ledger->bytes() >= 6 * MiB && ledger->bytes() <= 8 * MiB);  // about half, whole pieces
      a->simulate_host_reclaim();  // takes only the unpinned half
    }
    const uint64_t held = a->host_bytes();
    fill(p, n, 40);
    const std::vector<uint8_t> kept(reinterpret_cast<uint8_t*>(p + MiB), reinterpret_cast<uint8_t*>(p + 3 * MiB));
    a->sleep({}, {{p + MiB, p + 3 * MiB}}, {});  // level 2: 2 MiB preserved
    CHECK(a->host_bytes() == held);            // in the kept arena, no new one
    a->wake(std::nullopt);
    CHECK(std::memcmp(kept.data(), reinterpret_cast<void*>(p + MiB), kept.size()) == 0);
    a->free(p);
  }
  CHECK(ledger->bytes() == 0);
  CHECK(ledger->bad_unpins == 0);
}

void first_sleep_after_prepare_host_finds_memory_ready() {
  auto ledger = std::make_shared<PinLedger>();
  auto a = make(ledger, vse::HostPolicy::Pinned);
  const uint64_t n = 20 * MiB;
  uintptr_t p = a->allocate(n, 0, "weights");
  fill(p, n, 7);
  a->prepare_host(n, 0, /*wait=*/true);
  CHECK(a->host_error().empty());
  CHECK(ledger->bytes() >= n);
  const uint64_t held = a->host_bytes();
  a->sleep({"weights"}, {}, {});
  CHECK(a->last_sleep()->staging.populate_seconds == 0);
  CHECK(a->last_sleep()->staging.pin_seconds == 0);
  CHECK(a->host_bytes() == held);
  a->wake(std::nullopt);
  CHECK(holds(p, n, 7));
}

void destruction_during_background_prepare_is_clean() {
  auto ledger = std::make_shared<PinLedger>();
  for (int i = 0; i < 20; ++i) {
    auto a = make(ledger, vse::HostPolicy::Reclaimable, /*rate=*/64 * MiB);
    uintptr_t p = a->allocate(4 * MiB, 0, "weights");
    a->prepare_host(64 * MiB, 0, false);
    if (i % 2) std::this_thread::sleep_for(std::chrono::milliseconds(i));
    (void)p;
  }
  CHECK(ledger->bytes() == 0);
  CHECK(ledger->bad_unpins == 0);
}

void sleep_takes_over_a_background_prepare() {
  auto ledger = std::make_shared<PinLedger>();
  auto a = make(ledger, vse::HostPolicy::Pinned, /*rate=*/8 * MiB);
  const uint64_t n = 24 * MiB;
  uintptr_t p = a->allocate(n, 0, "weights");
  fill(p, n, 3);
  a->prepare_host(n, 0, false);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // a few pieces ready, not all
  a->sleep({"weights"}, {}, {});
  CHECK(a->host_bytes() <= n + n / 100 + 4096);
  a->wake(std::nullopt);
  CHECK(holds(p, n, 3));
  CHECK(a->host_error().empty());
}

void host_work_races_nothing_under_concurrent_calls() {
  auto ledger = std::make_shared<PinLedger>();
  {
    auto a = make(ledger, vse::HostPolicy::Reclaimable, /*rate=*/256 * MiB);
    const uint64_t n = 3 * MiB;
    std::vector<uintptr_t> ptrs;
    for (unsigned i = 0; i < 4; ++i) {
      ptrs.push_back(a->allocate(n, 0, "weights"));
      fill(ptrs.back(), n, 100 + i);
    }
    std::atomic<bool> done{false};
    std::thread reader([&] {
      while (!done) {
        (void)a->host_bytes();
        (void)a->host_pinned_bytes();
        (void)a->tag_stats();
      }
    });
    std::vector<std::thread> workers;
    for (int t = 0; t < 3; ++t) {
      workers.emplace_back([&, t] {
        for (int k = 0; k < 6; ++k) {
          a->sleep({"weights"}, {}, {});
          a->wake(std::nullopt);
          if ((k + t) % 2) a->prepare_host(12 * MiB, 0, false);
          if (k % 3 == 2) a->release_host_cache();
        }
      });
    }
    for (auto& w : workers) w.join();
    done = true;
    reader.join();
    for (unsigned i = 0; i < 4; ++i) CHECK(holds(ptrs[i], n, 100 + i));
  }
  CHECK(ledger->bytes() == 0);
  CHECK(ledger->bad_unpins == 0);
}

// Waits for the background host work at most `limit`; if it is still running then, cancels it (so the
// test can go on) and says so.
bool host_work_finishes_within(vse::Allocator& a, std::chrono::seconds limit) {
  std::atomic<bool> done{false};
  std::thread waiter([&] {
    a.wait_host();
    done = true;
  });
  const auto due = std::chrono::steady_clock::now() + limit;
  while (!done && std::chrono::steady_clock::now() < due) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  const bool finished = done;
  if (!finished) a.release_host_cache();  // cancels the job, so wait_host() returns
  waiter.join();
  return finished;
}

// A piece size below a huge page was accepted (0 too), and a background prepare then spun at 100% CPU
// pinning nothing, so wait_host() never returned.
void staging_piece_bytes_below_a_huge_page_is_refused_naming_the_option() {
  auto ledger = std::make_shared<PinLedger>();
  auto a = make(ledger, vse::HostPolicy::Pinned);
  for (uint64_t piece : {uint64_t(0), uint64_t(1), MiB, 2 * MiB - 1}) {
    vse::AllocatorOptions o = a->options();
    o.staging.piece_bytes = piece;
    std::string what;
    try {
      a->set_options(o);
    } catch (const vse::InvalidArgument& e) {
      what = e.what();
    }
    CHECK(what.find("staging_piece_bytes") != std::string::npos);
    CHECK(what.find("between 2.00 MiB") != std::string::npos);
    CHECK(a->options().staging.piece_bytes == 2 * MiB);  // unchanged
  }
}

// Whatever piece size is asked for, a background prepare either is refused up front or finishes.
void background_prepare_finishes_or_is_refused_for_any_piece_size() {
  for (uint64_t piece : {uint64_t(0), uint64_t(1), MiB, 3 * MiB, 5 * MiB + 1}) {
    auto ledger = std::make_shared<PinLedger>();
    auto a = make(ledger, vse::HostPolicy::Pinned, /*rate=*/1ull << 30);
    vse::AllocatorOptions o = a->options();
    o.staging.piece_bytes = piece;
    try {
      a->set_options(o);
    } catch (const vse::InvalidArgument&) {
      continue;
    }
    const uint64_t n = 16 * MiB;
    a->prepare_host(n, 0, false);
    const bool finished = host_work_finishes_within(*a, std::chrono::seconds(5));
    if (!finished) std::fprintf(stderr, "background prepare with pieces of %llu bytes did not finish\n",
                                static_cast<unsigned long long>(piece));
    CHECK(finished);
    CHECK(a->host_error().empty());
    CHECK(ledger->bytes() >= n);
  }
}

// The background loop itself, given pieces set_options would refuse: it steps by what the arena really
// makes ready, so it finishes (it used to add piece_bytes = 0 to its target forever).
void background_preparation_steps_by_whole_pieces_whatever_it_is_given() {
  for (uint64_t piece : {uint64_t(0), uint64_t(1), MiB, 3 * MiB}) {
    vse::HostBackend backend;
    vse::HostArena arena(backend, 0, 9 * MiB + 4096);
    std::atomic<bool> cancelled{false};
    std::atomic<bool> done{false};
    const std::atomic<uint64_t> rate{1ull << 30};
    std::thread worker([&] {
      vse::HostCache::prepare_in_pieces(arena, 9 * MiB + 100, {1, piece}, &rate, cancelled);
      done = true;
    });
    const auto due = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!done && std::chrono::steady_clock::now() < due) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    CHECK(done);
    cancelled = true;
    worker.join();
    CHECK(arena.ready_bytes() >= 9 * MiB + 100);
  }
}

// Note [Prepare rate]: a preparation started at a crawl finishes at once when the rate is lifted to 0
// (full speed) part way; at the old rate it would take a minute.
void lifting_the_prepare_rate_speeds_up_the_preparation_under_way() {
  auto ledger = std::make_shared<PinLedger>();
  auto a = make(ledger, vse::HostPolicy::Pinned, /*rate=*/1 * MiB);
  const uint64_t n = 64 * MiB;
  uintptr_t p = a->allocate(n, 0, "weights");
  fill(p, n, 41);
  a->prepare_host(n, 0, /*wait=*/false);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(ledger->bytes() < n / 2);  // throttled: a piece or two of 2 MiB
  a->update_options([](vse::AllocatorOptions& o) { o.host_prepare_rate = 0; });
  CHECK(host_work_finishes_within(*a, std::chrono::seconds(10)));
  CHECK(a->host_error().empty());
  CHECK(ledger->bytes() >= n);
  a->sleep({"weights"}, {}, {});
  CHECK(a->last_sleep()->staging.pin_seconds == 0);  // the sleep found it all ready
  a->wake(std::nullopt);
  CHECK(holds(p, n, 41));
}

// The other way: a preparation at full speed slows to the rate as soon as one is set, and speeds up
// again when it is lifted. The rate is set as soon as the first piece is ready (a thread watches).
void setting_the_prepare_rate_slows_the_preparation_under_way() {
  vse::HostBackend backend;
  const uint64_t n = 256 * MiB;
  vse::HostArena arena(backend, 0, n);
  std::atomic<bool> cancelled{false};
  std::atomic<uint64_t> rate{0};
  std::atomic<bool> done{false};
  std::thread worker([&] {
    vse::HostCache::prepare_in_pieces(arena, n, {1, 2 * MiB}, &rate, cancelled);
    done = true;
  });
  while (arena.pinned_bytes() == 0 && !done) std::this_thread::yield();
  rate = 1 * MiB;  // 2 s a piece from here
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const uint64_t throttled = arena.pinned_bytes();
  CHECK(!done);
  CHECK(throttled < n);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(arena.pinned_bytes() <= throttled + 2 * MiB);  // at most the piece under way when it was read
  rate = 0;
  const auto due = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!done && std::chrono::steady_clock::now() < due) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK(done);
  cancelled = true;
  worker.join();
  CHECK(arena.pinned_bytes() >= n);
}

// Under TSan: the rate flipped from several threads while a preparation runs, sleeps and wakes come and
// options are read; everything finishes and the data comes back.
void prepare_rate_changes_race_nothing() {
  auto ledger = std::make_shared<PinLedger>();
  auto a = make(ledger, vse::HostPolicy::Pinned, /*rate=*/8 * MiB);
  const uint64_t n = 32 * MiB;
  uintptr_t p = a->allocate(n, 0, "weights");
  fill(p, n, 43);
  a->prepare_host(n, 0, /*wait=*/false);
  std::atomic<bool> stop{false};
  std::vector<std::thread> flippers;
  for (int t = 0; t < 3; ++t)
    flippers.emplace_back([&, t] {
      for (int i = 0; !stop; ++i) {
        a->update_options([&](vse::AllocatorOptions& o) { o.host_prepare_rate = (i + t) % 2 ? 0 : 4 * MiB; });
        (void)a->options().host_prepare_rate;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
  for (int cycle = 0; cycle < 3; ++cycle) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    a->sleep({"weights"}, {}, {});
    a->wake(std::nullopt);
    CHECK(holds(p, n, 43));
    a->prepare_host(n, 0, /*wait=*/false);
  }
  stop = true;
  for (auto& t : flippers) t.join();
  a->update_options([](vse::AllocatorOptions& o) { o.host_prepare_rate = 0; });
  CHECK(host_work_finishes_within(*a, std::chrono::seconds(10)));
  CHECK(a->host_error().empty());
}

// A second preparation used to make and pin a second arena beside the idle one that fits: 64 MiB of
// weights ended with 128 MiB of host memory after a cycle and another prepare_host().
void prepare_host_after_a_cycle_reuses_the_idle_arena() {
  for (vse::HostPolicy policy : {vse::HostPolicy::Pinned, vse::HostPolicy::Reclaimable}) {
    auto ledger = std::make_shared<PinLedger>();
    {
      auto a = make(ledger, policy);
      const uint64_t n = 16 * MiB;
      uintptr_t p = a->allocate(n, 0, "weights");
      fill(p, n, 30);
      a->sleep({"weights"}, {}, {});
      a->wake(std::nullopt);
      a->wait_host();
      const uint64_t held = a->host_bytes();
      a->prepare_host(n, 0, /*wait=*/true);
      CHECK(a->host_bytes() == held);
      CHECK(ledger->bytes() >= n && ledger->bytes() <= held);  // pinned again (reclaimable), once
      a->prepare_host(n, 0, /*wait=*/false);  // and again, in the background
      a->wait_host();
      CHECK(a->host_error().empty());
      CHECK(a->host_bytes() == held);
      CHECK(ledger->bytes() <= held);
      a->sleep({"weights"}, {}, {});
      CHECK(a->last_sleep()->staging.pin_seconds == 0);  // found ready
      CHECK(a->host_bytes() == held);
      a->wake(std::nullopt);
      CHECK(holds(p, n, 30));
      a->free(p);
    }
    CHECK(ledger->bytes() == 0);
    CHECK(ledger->bad_unpins == 0);
  }
}

// fork() gives the child the parent's memory but not its threads, and not its arenas (MADV_DONTFORK).
// A child forked while a background prepare ran inherited the worker's "running" state with no thread
// behind it, and hung in its first sleep waiting for that job.
void forked_child_starts_with_an_empty_host_cache_and_never_waits_for_the_parents_thread() {
  auto ledger = std::make_shared<PinLedger>();
  auto a = make(ledger, vse::HostPolicy::Pinned, /*rate=*/8 * MiB);
  const uint64_t n = 8 * MiB;
  uintptr_t p = a->allocate(n, 0, "weights");
  fill(p, n, 50);
  a->sleep({"weights"}, {}, {});
  a->wake(std::nullopt);                // an idle arena, kept pinned
  a->prepare_host(64 * MiB, 0, false);  // a new one: 8 s at this rate, running when the fork comes
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  pid_t child;
  {
    std::lock_guard<std::mutex> hold(ledger->mutex);  // the child's copy of the ledger is consistent
    child = fork();
  }
  if (child == 0) {
    // Only this thread runs here: no thread may be started under TSan, so the child's sleep keeps
    // nothing (a level-2 sleep with nothing preserved) and needs no staging threads.
    alarm(20);  // a hang ends the child with SIGALRM
    const std::map<void*, uint64_t> inherited = ledger->pinned;
    int failures = 0;
    if (a->host_bytes() != 0) failures |= 1;  // nothing of the parent's cache is this process's
    if (a->host_pinned_bytes() != 0) failures |= 2;
    a->sleep({}, {}, {});
    a->wake(std::nullopt);
    a->release_host_cache();
    if (ledger->pinned != inherited || ledger->bad_unpins != 0) failures |= 4;  // the parent's pins untouched
    _exit(failures);
  }
  int status = -1;
  CHECK(child > 0 && waitpid(child, &status, 0) == child);
  if (WIFSIGNALED(status)) std::fprintf(stderr, "child killed by signal %d\n", WTERMSIG(status));
  if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
    std::fprintf(stderr, "child failed its checks: %d\n", WEXITSTATUS(status));
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  // The parent goes on as if nothing happened.
  a->sleep({"weights"}, {}, {});
  a->wake(std::nullopt);
  CHECK(holds(p, n, 50));
  CHECK(a->host_error().empty());
  a->free(p);
  a.reset();
  CHECK(ledger->bytes() == 0);
  CHECK(ledger->bad_unpins == 0);
}

// ---- host arenas that grow in place (vLLM 0.33: level 1 backs up "runtime" and "cudagraph" too) -----

constexpr uint64_t kGrowthTags = 22 * MiB;  // 16 MiB of weights, 4 of runtime, 2 of CUDA graphs

// The permissions of the mapping that holds `address` in this process ("" when none does).
std::string protection_at(const void* address) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  const auto a = reinterpret_cast<uintptr_t>(address);
  while (std::getline(maps, line)) {
    std::istringstream fields(line);
    std::string range, perms;
    fields >> range >> perms;
    const size_t dash = range.find('-');
    const uintptr_t begin = std::stoull(range.substr(0, dash), nullptr, 16);
    const uintptr_t end = std::stoull(range.substr(dash + 1), nullptr, 16);
    if (begin <= a && a < end) return perms.substr(0, 3);
  }
  return "";
}

void host_arena_extends_within_its_reservation_keeping_its_ready_part() {
  auto ledger = std::make_shared<PinLedger>();
  {
    CountingBackend backend(ledger);
    vse::HostArena arena(backend, 0, 16 * MiB + 4096);
    CHECK(arena.capacity() == 16 * MiB + 4096);
    CHECK(arena.max_capacity() >= 16 * MiB + 4096 + (1ull << 30));  // a quarter, at least 1 GiB, to grow
    CHECK(protection_at(arena.data() + arena.capacity()) == "---");  // reserved only: no memory, no charge
    const vse::StagingOptions staging{2, 2 * MiB};
    arena.prepare(arena.capacity(), staging, [](uint64_t, uint64_t) {});
    fill(reinterpret_cast<uintptr_t>(arena.data()), arena.capacity(), 60);
    const uint64_t pinned = ledger->pinned_ever;
    CHECK(pinned == 16 * MiB + 4096);

    CHECK(arena.extend(24 * MiB + 1));
    CHECK(arena.capacity() == 24 * MiB + 4096);  // whole pages
    CHECK(arena.ready_bytes() == 16 * MiB + 4096);
    CHECK(protection_at(arena.data() + 20 * MiB) == "rw-");
    CHECK(protection_at(arena.data() + arena.capacity()) == "---");
    uint64_t first = ~uint64_t(0), last = 0;
    arena.prepare(arena.capacity(), staging, [&](uint64_t begin, uint64_t end) {
      if (begin >= 16 * MiB + 4096) first = std::min(first, begin);
      last = std::max(last, end);
    });
    CHECK(first == 16 * MiB + 4096 && last == arena.capacity());
    CHECK(ledger->pinned_ever - pinned == 8 * MiB);  // only the new part was pinned
    CHECK(holds(reinterpret_cast<uintptr_t>(arena.data()), 16 * MiB + 4096, 60));  // the old part kept its bytes
    std::memset(arena.data() + 16 * MiB + 4096, 7, 8 * MiB);  // and the new part is writable

    CHECK(arena.extend(MiB));  // holds that much already
    CHECK(arena.capacity() == 24 * MiB + 4096);
    const uint64_t max = arena.max_capacity();
    CHECK(!arena.extend(max + 1));  // beyond the reservation: refused, nothing changed
    CHECK(arena.capacity() == 24 * MiB + 4096);
    CHECK(arena.extend(max));  // to its very end
    CHECK(arena.capacity() == max);
    arena.data()[max - 1] = 1;
  }
  CHECK(ledger->bytes() == 0);  // every registration went with the arena
  CHECK(ledger->bad_unpins == 0);
}

// fork(): the child has none of the reservation, what was opened by extend() nor what is still reserved.
void extended_host_arena_is_not_inherited_by_fork() {
  vse::HostBackend backend;
  vse::HostArena arena(backend, 0, 4 * MiB);
  CHECK(arena.extend(8 * MiB));
  arena.prepare(8 * MiB, {1, 2 * MiB}, [](uint64_t, uint64_t) {});
  std::memset(arena.data(), 1, 8 * MiB);
  uint8_t* const reserved_end = arena.data() + arena.max_capacity() - 4096;
  CHECK(msync(reserved_end, 4096, MS_ASYNC) == 0);  // the parent holds the whole reservation
  pid_t child = fork();
  if (child == 0) {
    int failures = 0;
    for (uint8_t* p : {arena.data(), arena.data() + 6 * MiB, reserved_end})
      if (!(msync(p, 4096, MS_ASYNC) != 0 && errno == ENOMEM)) failures |= 1;  // ENOMEM: not mapped here
    _exit(failures);
  }
  int status = -1;
  CHECK(child > 0 && waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(arena.data()[6 * MiB] == 1);
}

struct GrowthTensors {
  uintptr_t weights, runtime, cudagraph;
};

GrowthTensors allocate_growth_tags(vse::Allocator& a) {
  GrowthTensors t{a.allocate(16 * MiB, 0, "weights"), a.allocate(4 * MiB, 0, "runtime"),
                  a.allocate(2 * MiB, 0, "cudagraph")};
  fill(t.weights, 16 * MiB, 71);
  fill(t.runtime, 4 * MiB, 72);
  fill(t.cudagraph, 2 * MiB, 73);
  return t;
}

bool growth_tags_hold(const GrowthTensors& t) {
  return holds(t.weights, 16 * MiB, 71) && holds(t.runtime, 4 * MiB, 72) && holds(t.cudagraph, 2 * MiB, 73);
}

// The weights' preparation was made for 16 MiB; the level-1 sleep backs up 22. It used to make and pin
// a second arena during the sleep and drop the prepared one.
void level1_sleep_grows_the_arena_prepared_for_the_weights() {
  auto ledger = std::make_shared<PinLedger>();
  {
    auto a = make(ledger, vse::HostPolicy::Pinned);
    const GrowthTensors t = allocate_growth_tags(*a);
    a->prepare_host(16 * MiB, 0, /*wait=*/true);
    const uint64_t pinned = ledger->pinned_ever;
    CHECK(pinned >= 16 * MiB && a->host_bytes() < 17 * MiB);
    a->sleep({"weights", "runtime", "cudagraph"}, {}, {});
    CHECK(a->host_bytes() == kGrowthTags);                   // one arena, of the backup's size
    CHECK(ledger->pinned_ever - pinned <= 6 * MiB + 2 * MiB);  // what it lacked, not all of it again
    a->wake(std::nullopt);
    CHECK(growth_tags_hold(t));
  }
  CHECK(ledger->bytes() == 0);
  CHECK(ledger->bad_unpins == 0);
}

// Leaving the runtime pool and the graph pool starts the preparation again, for more bytes: it goes on
// in the same arena from what is ready, and the sleep then finds everything ready.
void preparation_restarted_for_more_bytes_grows_the_same_arena() {
  for (bool wait_first : {true, false}) {
    auto ledger = std::make_shared<PinLedger>();
    {
      auto a = make(ledger, vse::HostPolicy::Pinned, /*rate=*/wait_first ? 0 : 16 * MiB);
      const GrowthTensors t = allocate_growth_tags(*a);
      a->prepare_host(16 * MiB, 0, wait_first);
      if (!wait_first) std::this_thread::sleep_for(std::chrono::milliseconds(300));  // under way
      a->prepare_host(20 * MiB, 0, /*wait=*/false);
      a->prepare_host(kGrowthTags, 0, /*wait=*/true);
      CHECK(a->host_error().empty());
      const uint64_t held = a->host_bytes();
      CHECK(held >= kGrowthTags && held <= kGrowthTags + kGrowthTags / 100);  // one arena
      CHECK(ledger->pinned_ever <= held);                                      // each byte pinned once
      a->sleep({"weights", "runtime", "cudagraph"}, {}, {});
      CHECK(a->last_sleep()->staging.populate_seconds == 0);
      CHECK(a->last_sleep()->staging.pin_seconds == 0);
      CHECK(a->host_bytes() == held);
      a->wake(std::nullopt);
      CHECK(growth_tags_hold(t));
    }
    CHECK(ledger->bytes() == 0);
    CHECK(ledger->bad_unpins == 0);
  }
}

// The host memory limit counts what an arena holds, not what it may grow to; a growth that would pass
// it is refused like a new arena, and a sleep drops other idle arenas before it grows the prepared one.
void arena_growth_keeps_to_the_host_memory_limit() {
  auto ledger = std::make_shared<PinLedger>();
  auto a = make(ledger, vse::HostPolicy::Pinned);
  const GrowthTensors t = allocate_growth_tags(*a);
  uintptr_t other = a->allocate(8 * MiB, 0, "other");
  vse::AllocatorOptions o = a->options();
  o.host_memory_limit = 20 * MiB;
  a->set_options(o);
  a->prepare_host(16 * MiB, 0, /*wait=*/true);  // 16.08 MiB: within the limit, with room to grow
  const uint64_t prepared = a->host_bytes();
  CHECK_THROWS(a->prepare_host(kGrowthTags, 0, /*wait=*/true), vse::HostOutOfMemory);
  CHECK(a->host_bytes() == prepared);  // not grown
  CHECK_THROWS(a->sleep({"weights", "runtime", "cudagraph"}, {}, {}), vse::HostOutOfMemory);
  CHECK(a->host_bytes() == prepared);
  CHECK(growth_tags_hold(t));  // nothing was released

  // An idle arena beside the prepared one: a sleep of "other" while the preparation is made.
  o.host_memory_limit = 0;
  a->set_options(o);
  fill(other, 8 * MiB, 74);
  a->release_host_cache();
  a->sleep({"other"}, {}, {});  // its arena is in use: the preparation below makes a second one
  a->prepare_host(16 * MiB, 0, /*wait=*/true);
  a->wake(std::nullopt);
  CHECK(holds(other, 8 * MiB, 74));
  const uint64_t two = a->host_bytes();
  CHECK(two >= 24 * MiB && two <= 25 * MiB);
  o.host_memory_limit = 26 * MiB;  // 8 + 22 would pass it: the 8 MiB arena goes, the prepared one grows
  a->set_options(o);
  fill(t.weights, 16 * MiB, 71);
  fill(t.runtime, 4 * MiB, 72);
  fill(t.cudagraph, 2 * MiB, 73);
  const uint64_t pinned = ledger->pinned_ever;
  a->sleep({"weights", "runtime", "cudagraph"}, {}, {});
  CHECK(a->host_bytes() == kGrowthTags);
  CHECK(ledger->pinned_ever - pinned <= 6 * MiB + 2 * MiB);
  a->wake(std::nullopt);
  CHECK(growth_tags_hold(t));
  a.reset();
  CHECK(ledger->bytes() == 0);
  CHECK(ledger->bad_unpins == 0);
}

using vse_test::Test;

const Test kTests[] = {
    {"reclaimable_holds_nothing_pinned_while_awake_and_survives_reclaim",
     reclaimable_holds_nothing_pinned_while_awake_and_survives_reclaim},
    {"reclaimable_keeps_its_pinned_share_and_serves_smaller_backups",
     reclaimable_keeps_its_pinned_share_and_serves_smaller_backups},
    {"first_sleep_after_prepare_host_finds_memory_ready", first_sleep_after_prepare_host_finds_memory_ready},
    {"destruction_during_background_prepare_is_clean", destruction_during_background_prepare_is_clean},
    {"sleep_takes_over_a_background_prepare", sleep_takes_over_a_background_prepare},
    {"host_work_races_nothing_under_concurrent_calls", host_work_races_nothing_under_concurrent_calls},
    {"staging_piece_bytes_below_a_huge_page_is_refused_naming_the_option",
     staging_piece_bytes_below_a_huge_page_is_refused_naming_the_option},
    {"background_prepare_finishes_or_is_refused_for_any_piece_size",
     background_prepare_finishes_or_is_refused_for_any_piece_size},
    {"background_preparation_steps_by_whole_pieces_whatever_it_is_given",
     background_preparation_steps_by_whole_pieces_whatever_it_is_given},
    {"prepare_host_after_a_cycle_reuses_the_idle_arena", prepare_host_after_a_cycle_reuses_the_idle_arena},
    {"lifting_the_prepare_rate_speeds_up_the_preparation_under_way",
     lifting_the_prepare_rate_speeds_up_the_preparation_under_way},
    {"setting_the_prepare_rate_slows_the_preparation_under_way",
     setting_the_prepare_rate_slows_the_preparation_under_way},
    {"prepare_rate_changes_race_nothing", prepare_rate_changes_race_nothing},
    {"forked_child_starts_with_an_empty_host_cache_and_never_waits_for_the_parents_thread",
     forked_child_starts_with_an_empty_host_cache_and_never_waits_for_the_parents_thread},
    {"host_arena_extends_within_its_reservation_keeping_its_ready_part",
     host_arena_extends_within_its_reservation_keeping_its_ready_part},
    {"extended_host_arena_is_not_inherited_by_fork", extended_host_arena_is_not_inherited_by_fork},
    {"level1_sleep_grows_the_arena_prepared_for_the_weights", level1_sleep_grows_the_arena_prepared_for_the_weights},
    {"preparation_restarted_for_more_bytes_grows_the_same_arena", preparation_restarted_for_more_bytes_grows_the_same_arena},
    {"arena_growth_keeps_to_the_host_memory_limit", arena_growth_keeps_to_the_host_memory_limit},
};

}  // namespace

int main(int argc, char** argv) { return vse_test::run_tests(kTests, argc, argv); }
