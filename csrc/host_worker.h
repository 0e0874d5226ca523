// One background thread for host-memory chores that must not lengthen a sleep or a wake: making a
// cached arena ready before the first sleep (Allocator::prepare_host) and unpinning idle arenas
// after a wake under the "reclaimable" host policy. Jobs run one at a time, in order.
//
// Jobs touch only arenas no backup uses, and only through a shared_ptr they hold; the allocator
// calls cancel_and_wait() before it hands an arena to a sleep, and the destructor does the same, so
// a job never races the allocator for an arena. A job never throws out of the thread: what went
// wrong is kept for last_error(), and the work is simply left for the next sleep to do.
//
// In a forked child the thread is gone, and a job it was running would never finish: the child's
// worker starts afresh (no job, no thread, no error), and what the parent's held is left untouched
// (fork_guard.h).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "fork_guard.h"

namespace vse {

class HostWorker {
 public:
  // `cancelled` turns true when the allocator needs the worker idle: a job should return soon.
  using Job = std::function<void(const std::atomic<bool>& cancelled)>;

  HostWorker();
  ~HostWorker();  // cancels, drops queued jobs, joins
  HostWorker(const HostWorker&) = delete;
  HostWorker& operator=(const HostWorker&) = delete;

  // Queues a job; starts the thread on first use. Returns false (job dropped, error kept) when no
  // thread can be started.
  bool post(Job job);
  // Drops queued jobs, asks the running one to stop, and waits until it has.
  void cancel_and_wait();
  // Waits until every queued job has run.
  void wait();
  // What the last failed job said ("" when none failed since the last take_error()).
  std::string take_error();
  void set_error(const std::string& what);

 private:
  struct State {
    std::mutex mutex;
    std::condition_variable changed;
    std::deque<Job> queue;
    bool running = false;  // a job is out of the queue and running
    bool stopping = false;
    std::atomic<bool> cancelled{false};
    std::string error;
    std::thread thread;
  };
  static void run(State& s);

  // On the heap so that a forked child can leave the parent's (a mutex perhaps held, a thread that is
  // not there, jobs holding the parent's arenas) as it is and start a new one.
  std::unique_ptr<State> state_;
  ForkChildHook fork_hook_;
};

}  // namespace vse
