// The allocator's host policies and background host work (Note [Host policies] in allocator.h): apart
// from allocator.cpp, which holds the state machine; everything here is about idle host arenas.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <thread>

#include "allocator.h"
#include "errors.h"

namespace vse {
namespace {

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

}  // namespace

const char* host_policy_name(HostPolicy policy) {
  switch (policy) {
    case HostPolicy::Pinned: return "pinned";
    case HostPolicy::Reclaimable: return "reclaimable";
    case HostPolicy::Release: return "release";
  }
  return "?";
}

HostPolicy parse_host_policy(const std::string& name) {
  for (HostPolicy p : {HostPolicy::Pinned, HostPolicy::Reclaimable, HostPolicy::Release})
    if (name == host_policy_name(p)) return p;
  throw InvalidArgument("host policy must be 'pinned', 'reclaimable' or 'release', got '" + name + "'");
}

// Under mutex_: no background job runs after this, and arenas a failed job left are gone.
void Allocator::settle_host_work() {
  host_worker_.cancel_and_wait();
  for (auto it = arenas_.begin(); it != arenas_.end();) {
    if (it->use_count() == 1 && (*it)->unusable()) {
      if (it->get() == prepared_) prepared_ = nullptr;
      it = arenas_.erase(it);
    } else {
      ++it;
    }
  }
}

// Under mutex_, in sleep: an arena prepare_host() made that this sleep did not take (another size)
// would only hold host memory twice over; it goes.
void Allocator::drop_prepared_unless(const HostArena* taken) {
  if (prepared_ && prepared_ != taken) {
    auto it = std::find_if(arenas_.begin(), arenas_.end(), [&](const auto& a) { return a.get() == prepared_; });
    if (it != arenas_.end() && it->use_count() == 1) arenas_.erase(it);
  }
  prepared_ = nullptr;
}

uint64_t Allocator::reclaimable_keep_pinned(const HostArena& arena) const {
  return static_cast<uint64_t>(options_.reclaimable_pinned_share * static_cast<double>(arena.capacity()));
}

void Allocator::post_reclaim(const std::shared_ptr<HostArena>& arena) {
  auto reclaim = [arena, keep = reclaimable_keep_pinned(*arena)] {
    try {
      arena->make_reclaimable(keep);
    } catch (...) {
      arena->mark_unusable();
      throw;
    }
  };
  if (host_worker_.post([reclaim](const std::atomic<bool>& cancelled) {
        if (!cancelled) reclaim();
      }))
    return;
  try {
    reclaim();  // no thread: do it here
  } catch (const std::exception& e) {
    host_worker_.set_error(e.what());
  }
}

void Allocator::prepare_host(uint64_t bytes, int device, bool wait) {
  if (bytes == 0) return;
  std::function<void(const std::atomic<bool>&)> job;
  std::shared_ptr<HostArena> arena;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    settle_host_work();
    drop_prepared_unless(nullptr);
    // Half a percent over `bytes`: the sleep may back up a little more (preserved buffers of other
    // tags) and still take this arena, which stays within 1% of its backup.
    const uint64_t capacity = round_up(bytes + bytes / 200, 4096);
    try {
      const uint64_t limit = options_.host_memory_limit;
      if (limit != 0 && host_bytes_locked() + capacity > limit)
        throw HostOutOfMemory("preparing " + format_bytes(capacity) + " of host memory for backups would pass the " +
                              "host memory limit of " + format_bytes(limit));
      arena = std::make_shared<HostArena>(*backend_, device, capacity);
    } catch (const std::exception& e) {
      host_worker_.set_error(e.what());
      if (wait) throw;
      return;
    }
    arenas_.push_back(arena);
    prepared_ = arena.get();

    StagingOptions staging = options_.staging;
    uint64_t rate = wait ? 0 : options_.host_prepare_rate;
    if (!wait) staging.threads = 1;
    job = [arena, bytes, staging, rate](const std::atomic<bool>& cancelled) {
      using clock = std::chrono::steady_clock;
      const auto start = clock::now();
      const uint64_t step = rate ? staging.piece_bytes : bytes;
      try {
        for (uint64_t done = arena->ready_bytes(); done < bytes && !cancelled;) {
          done = std::min(bytes, done + step);
          arena->prepare(done, staging, [](uint64_t, uint64_t) {});
          if (rate == 0) continue;
          // Wait until `done` bytes at `rate` would have taken, in short naps so a cancel is quick.
          const auto due = start + std::chrono::duration_cast<clock::duration>(
                                       std::chrono::duration<double>(static_cast<double>(done) / rate));
          while (!cancelled && clock::now() < due) std::this_thread::sleep_for(std::chrono::milliseconds(2));
        }
      } catch (...) {
        arena->mark_unusable();
        throw;
      }
    };
    if (host_worker_.post(job)) job = nullptr;
  }
  if (job && wait) job(std::atomic<bool>{false});  // no thread could start: do it here
  arena.reset();
  if (!wait) return;
  wait_host();
  std::lock_guard<std::mutex> lock(mutex_);
  settle_host_work();
  if (!prepared_) throw HostOutOfMemory("cannot prepare host memory for backups: " + host_worker_.take_error());
}

void Allocator::wait_host() { host_worker_.wait(); }

std::string Allocator::host_error() { return host_worker_.take_error(); }

void Allocator::simulate_host_reclaim() {
  std::lock_guard<std::mutex> lock(mutex_);
  host_worker_.wait();
  for (const auto& arena : arenas_)
    if (arena.use_count() == 1 && arena.get() != prepared_) arena->simulate_reclaim();
}

uint64_t Allocator::host_pinned_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t total = 0;
  for (const auto& arena : arenas_) total += arena->pinned_bytes();
  return total;
}

}  // namespace vse
