#include "fork_guard.h"

#include <pthread.h>

#include <atomic>
#include <mutex>
#include <set>

namespace vse {
namespace {

using Reset = const std::function<void()>*;

std::atomic<uint64_t> epoch{0};

// The live hooks. fork() holds `hooks_mutex` from the prepare handler on, so no hook comes or goes
// half way through a fork; in the child only the forking thread lives, which unlocks it. Never
// destroyed: a fork may come during static destruction.
std::mutex& hooks_mutex() {
  static auto* mutex = new std::mutex();
  return *mutex;
}
std::set<Reset>& hooks() {
  static auto* set = new std::set<Reset>();
  return *set;
}

void register_handlers_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    hooks_mutex();  // made before any fork can need them
    hooks();
    pthread_atfork([] { hooks_mutex().lock(); }, [] { hooks_mutex().unlock(); },
                   [] {
                     epoch.fetch_add(1);
                     for (Reset reset : hooks()) (*reset)();
                     hooks_mutex().unlock();
                   });
  });
}

}  // namespace

uint64_t fork_epoch() {
  register_handlers_once();
  return epoch.load();
}

ForkChildHook::ForkChildHook(std::function<void()> reset) : reset_(std::move(reset)) {
  register_handlers_once();
  std::lock_guard<std::mutex> lock(hooks_mutex());
  hooks().insert(&reset_);
}

ForkChildHook::~ForkChildHook() {
  std::lock_guard<std::mutex> lock(hooks_mutex());
  hooks().erase(&reset_);
}

}  // namespace vse
