#include "host_cache.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <thread>

#include "allocator.h"
#include "errors.h"

namespace vse {
namespace {

constexpr size_t kMaxIdleArenas = 4;

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

bool idle(const std::shared_ptr<HostArena>& arena) { return arena.use_count() == 1; }  // held only by the cache

uint64_t reclaimable_keep_pinned(const HostArena& arena, const AllocatorOptions& options) {
  return static_cast<uint64_t>(options.reclaimable_pinned_share * static_cast<double>(arena.capacity()));
}

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

HostCache::HostCache(DeviceBackend& backend) : backend_(backend), fork_hook_([this] { forget_after_fork(); }) {}

// In a forked child, with only the forking thread alive: the arenas are the parent's (and not mapped
// here); their destructors leave them alone (HostArena checks the fork epoch).
void HostCache::forget_after_fork() {
  arenas_.clear();
  prepared_ = nullptr;
  prepared_target_ = 0;
}

void HostCache::settle() {
  worker_.cancel_and_wait();
  prepared_target_ = 0;  // a preparation cancelled part way promises nothing
  for (auto it = arenas_.begin(); it != arenas_.end();) {
    if (idle(*it) && (*it)->unusable()) {
      if (it->get() == prepared_) prepared_ = nullptr;
      it = arenas_.erase(it);
    } else {
      ++it;
    }
  }
}

std::shared_ptr<HostArena> HostCache::smallest_idle(uint64_t bytes) const {
  std::shared_ptr<HostArena> best;
  for (const auto& arena : arenas_)
    if (idle(arena) && arena->capacity() >= bytes && (!best || arena->capacity() < best->capacity())) best = arena;
  return best;
}

std::shared_ptr<HostArena> HostCache::extendable_idle(uint64_t bytes) const {
  std::shared_ptr<HostArena> best;
  for (const auto& arena : arenas_) {
    if (!idle(arena) || arena->max_capacity() < bytes) continue;
    if (arena.get() == prepared_) return arena;  // it was made ready for the next sleep: grow that one
    if (!best || arena->capacity() > best->capacity()) best = arena;
  }
  return best;
}

void HostCache::extend_to(HostArena& arena, uint64_t bytes) {
  if (!arena.extend(bytes))  // extendable_idle() chose it because it fits
    throw Error("host arena of " + format_bytes(arena.capacity()) + " cannot grow to " + format_bytes(bytes));
}

void HostCache::drop_prepared_unless(const HostArena* taken) {
  if (prepared_ && prepared_ != taken) {
    auto it = std::find_if(arenas_.begin(), arenas_.end(), [&](const auto& a) { return a.get() == prepared_; });
    if (it != arenas_.end() && idle(*it)) arenas_.erase(it);
  }
  prepared_ = nullptr;
  prepared_target_ = 0;
}

std::shared_ptr<HostArena> HostCache::acquire(uint64_t bytes, int device, const AllocatorOptions& options) {
  std::shared_ptr<HostArena> arena;
  if (bytes > 0) {
    const uint64_t limit = options.host_memory_limit;
    bytes = round_up(bytes, 4096);  // what the arena will hold
    if (limit != 0) {
      uint64_t in_use = 0;  // idle arenas are only a cache and can be dropped
      for (const auto& a : arenas_)
        if (!idle(a)) in_use += a->capacity();
      if (in_use + bytes > limit)
        throw HostOutOfMemory("sleep needs " + format_bytes(bytes) + " of host memory for backups, but the host " +
                              "memory limit is " + format_bytes(limit) + " with " + format_bytes(in_use) +
                              " in use. Nothing was released");
    }
    // Its memory is held anyway, and pinned or about to be, so the copies start at once.
    arena = smallest_idle(bytes);
    if (!arena) {
      // Growing an idle arena keeps what of it is ready; a new one starts from nothing.
      std::shared_ptr<HostArena> grown = extendable_idle(bytes);
      const uint64_t held_after = held_bytes() - (grown ? grown->capacity() : 0) + bytes;
      if (limit != 0 && held_after > limit)  // the other idle arenas go (in_use + bytes fits: checked above)
        arenas_.erase(std::remove_if(arenas_.begin(), arenas_.end(),
                                     [&](const auto& a) { return idle(a) && a != grown; }),
                      arenas_.end());
      if (grown) {
        extend_to(*grown, bytes);
        arena = std::move(grown);
      } else {
        arena = std::make_shared<HostArena>(backend_, device, bytes);
        arenas_.push_back(arena);
      }
    }
  }
  drop_prepared_unless(arena.get());
  return arena;
}

void HostCache::forget_failed(const std::shared_ptr<HostArena>& arena) {
  auto it = std::find(arenas_.begin(), arenas_.end(), arena);
  if (it != arenas_.end()) arenas_.erase(it);
}

void HostCache::post_reclaim(const std::shared_ptr<HostArena>& arena, uint64_t keep_pinned) {
  auto reclaim = [arena, keep_pinned] {
    try {
      arena->make_reclaimable(keep_pinned);
    } catch (...) {
      arena->mark_unusable();
      throw;
    }
  };
  if (worker_.post([reclaim](const std::atomic<bool>& cancelled) {
        if (!cancelled) reclaim();
      }))
    return;
  try {
    reclaim();  // no thread: do it here
  } catch (const std::exception& e) {
    worker_.set_error(e.what());
  }
}

void HostCache::recycle(const AllocatorOptions& options) {
  const HostPolicy policy = options.effective_host_policy();
  auto is_idle = [&](const std::shared_ptr<HostArena>& a) { return idle(a) && a.get() != prepared_; };
  size_t count = static_cast<size_t>(std::count_if(arenas_.begin(), arenas_.end(), is_idle));
  const size_t keep = policy == HostPolicy::Release ? 0 : kMaxIdleArenas;
  // Drop the oldest idle arenas beyond what is kept.
  for (auto it = arenas_.begin(); it != arenas_.end() && count > keep;) {
    if (is_idle(*it)) {
      it = arenas_.erase(it);
      --count;
    } else {
      ++it;
    }
  }
  if (policy == HostPolicy::Reclaimable)
    for (const auto& arena : arenas_) {
      const uint64_t keep_pinned = reclaimable_keep_pinned(*arena, options);
      if (is_idle(arena) && arena->pinned_bytes() > keep_pinned) post_reclaim(arena, keep_pinned);
    }
}

uint64_t HostCache::room(const AllocatorOptions& options) const {
  const uint64_t limit = options.host_memory_limit;
  if (limit == 0 || options.disk.dir.empty()) return UINT64_MAX;
  uint64_t in_use = 0;
  for (const auto& a : arenas_)
    if (!idle(a)) in_use += a->capacity();
  return limit > in_use ? (limit - in_use) / kDiskAlign * kDiskAlign : 0;
}

uint64_t HostCache::held_bytes() const {
  uint64_t total = 0;
  for (const auto& arena : arenas_) total += arena->capacity();
  return total;
}

uint64_t HostCache::pinned_bytes() const {
  uint64_t total = 0;
  for (const auto& arena : arenas_) total += arena->pinned_bytes();
  return total;
}

void HostCache::release_idle() {
  settle();
  prepared_ = nullptr;
  arenas_.erase(std::remove_if(arenas_.begin(), arenas_.end(), idle), arenas_.end());
}

void HostCache::prepare_in_pieces(HostArena& arena, uint64_t bytes, const StagingOptions& staging,
                                  const std::atomic<uint64_t>* rate, const std::atomic<bool>& cancelled) {
  using clock = std::chrono::steady_clock;
  const uint64_t target = std::min(bytes, arena.capacity());
  StagingOptions paced = staging;
  paced.threads = 1;  // throttled: one thread, so that serving does not notice
  const uint64_t piece = HostArena::piece_bytes(staging);
  auto current_rate = [rate] { return rate ? rate->load(std::memory_order_relaxed) : 0; };
  while (!cancelled && arena.ready_bytes() < target) {
    const auto piece_start = clock::now();
    const uint64_t before = arena.ready_bytes();
    const uint64_t paced_rate = current_rate();
    // At full speed a step is a piece per staging thread (they fault pieces in side by side); all at
    // once when nothing can change the rate. Throttled, one piece on one thread.
    const uint64_t step = !rate ? target : paced_rate ? piece : piece * std::max(1u, staging.threads);
    arena.prepare(std::min(target, before + step), paced_rate ? paced : staging, [](uint64_t, uint64_t) {});
    if (arena.ready_bytes() <= before)  // never spin: a step that makes nothing ready ends the work
      throw Error("preparing host memory for backups made no progress at " + format_bytes(before) + " of " +
                  format_bytes(target));
    // Wait until this piece would have taken at the rate read now, in short naps so a cancel, or a
    // switch to full speed, is quick (Note [Prepare rate]).
    const uint64_t now_rate = current_rate();
    if (now_rate == 0) continue;
    const auto due = piece_start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(
                                       static_cast<double>(arena.ready_bytes() - before) / static_cast<double>(now_rate)));
    while (!cancelled && current_rate() != 0 && clock::now() < due)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

void HostCache::prepare(uint64_t bytes, uint64_t hold, int device, bool wait, const AllocatorOptions& options,
                        std::unique_lock<std::mutex>& lock) {
  // With a disk tier, what passes the limit goes to disk: only what stays is prepared (Note [Disk tier]).
  const uint64_t host_room = room(options);
  bytes = std::min(bytes, host_room);
  hold = std::min(std::max(hold, bytes), host_room);
  if (bytes == 0) return;
  // vLLM leaves the CUDA-graph pool once per captured graph, each time with a few bytes more: while the
  // preparation under way covers them, it goes on undisturbed.
  if (!wait && prepared_ && bytes <= prepared_target_ && hold <= prepared_->capacity() && !prepared_->unusable())
    return;
  settle();
  // Half a percent over `bytes` and `hold`: the sleep may back up a little more (preserved buffers of
  // other tags) and still take this arena, which stays within 1% of its backup.
  const uint64_t ready = std::min(round_up(bytes + bytes / 200, 4096), host_room);
  const uint64_t capacity = std::max(ready, std::min(round_up(hold + hold / 200, 4096), host_room));
  std::shared_ptr<HostArena> arena = smallest_idle(hold);
  if (!arena) arena = extendable_idle(capacity);  // a preparation started for fewer bytes goes on from its ready part
  drop_prepared_unless(arena.get());
  if (!arena || arena->capacity() < hold) {
    try {
      const uint64_t limit = options.host_memory_limit;
      const uint64_t held_after = held_bytes() - (arena ? arena->capacity() : 0) + capacity;
      if (limit != 0 && held_after > limit)
        throw HostOutOfMemory("preparing " + format_bytes(capacity) + " of host memory for backups would pass the " +
                              "host memory limit of " + format_bytes(limit));
      if (arena) {
        extend_to(*arena, capacity);
      } else {
        arena = std::make_shared<HostArena>(backend_, device, capacity);
        arenas_.push_back(arena);
      }
    } catch (const std::exception& e) {
      worker_.set_error(e.what());
      if (wait) throw;
      return;
    }
  }
  prepared_ = arena.get();
  // Up to the margin, so that a few bytes more later need no new start (see above).
  const uint64_t target = std::min(ready, arena->capacity());
  prepared_target_ = target;
  if (arena->ready_bytes() >= target) return;  // an idle arena already ready

  const StagingOptions staging = options.staging;
  // A preparation waited for runs at once; one in the background paces itself by prepare_rate_.
  const std::atomic<uint64_t>* rate = wait ? nullptr : &prepare_rate_;
  std::function<void(const std::atomic<bool>&)> job = [arena, target, staging, rate](const std::atomic<bool>& cancelled) {
    try {
      prepare_in_pieces(*arena, target, staging, rate, cancelled);
    } catch (...) {
      arena->mark_unusable();
      throw;
    }
  };
  const HostArena* const preparing = arena.get();
  arena.reset();
  const bool posted = worker_.post(job);
  if (!wait) {
    if (!posted) prepared_target_ = 0;  // dropped: nothing is under way, and the next call tries again
    return;
  }
  lock.unlock();
  if (!posted) job(std::atomic<bool>{false});  // no thread could start: do it here
  job = nullptr;  // its arena goes back before settle() looks at it
  worker_.wait();
  lock.lock();
  settle();
  if (!prepared_) throw HostOutOfMemory("cannot prepare host memory for backups: " + worker_.take_error());
  if (prepared_ == preparing) prepared_target_ = target;  // done (unless another call came in meanwhile)
}

void HostCache::wait() { worker_.wait(); }

std::string HostCache::take_error() { return worker_.take_error(); }

void HostCache::simulate_reclaim() {
  worker_.wait();
  for (const auto& arena : arenas_)
    if (idle(arena) && arena.get() != prepared_) arena->simulate_reclaim();
}

}  // namespace vse
