// Note [Priming the next create]
// After a sleep gives a large amount of device memory back, the CUDA driver leaves work for the
// process's next cuMemCreate: on the H200 (driver 580) the first create 0.3-3 s after releasing 96 GiB
// took 22-32 ms whatever its size, the next ones 0.02-0.07 ms, and one granule created and released
// 0.05 or 0.5 s before took it away (benchmarks/probe_first_create.py, RESULTS.md section 18; 0.6-0.9 ms
// with nothing released, 4-6 ms after 16 GiB). A wake's first create is on its critical path: no copy
// starts before the first segment is mapped. So after a sleep or discard releases memory, a background
// thread primes the driver: one granule created and released on each device released on, at each of the
// backend's delays after the release (the work appears within 0.3 s of releasing 96 GiB; later rounds
// cover larger releases, which the driver takes longer to clear, and cost ~0.2 ms when there is nothing
// left to take). A wake cancels the rounds still to come: its own creates take what is left.
//
// The primer never holds the allocator's lock and skips a round while a sleep or wake runs (it asks
// `idle`), so it never delays one; a round that finds the device full (a trainer may hold all of it)
// fails harmlessly and is counted. Backends with nothing to prime (the host backend) give no delays,
// and then no thread is ever started. In a forked child the thread is gone: the child's primer starts
// afresh, the parent's state is left untouched (fork_guard.h).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "fork_guard.h"

namespace vse {

struct PrimeStats {
  uint64_t rounds = 0;          // primes done (one device, one granule)
  uint64_t skipped = 0;         // rounds skipped because an operation was running
  uint64_t failures = 0;        // primes that failed (a full device); last_error says why
  double last_seconds = 0;      // how long the last prime took
  double longest_seconds = 0;   // the longest prime: the driver work taken off a wake's path
  std::string last_error;
};

class CreatePrimer {
 public:
  // `prime(device)` creates and releases one granule (it may throw); `idle()` says whether no
  // operation runs now. `delays`: seconds after a release at which to prime; empty disables.
  CreatePrimer(std::vector<double> delays, std::function<void(int)> prime, std::function<bool()> idle);
  ~CreatePrimer();  // cancels what is scheduled, waits for a prime under way, joins
  CreatePrimer(const CreatePrimer&) = delete;
  CreatePrimer& operator=(const CreatePrimer&) = delete;

  // Memory was released on `devices`: prime each at every delay from now (replacing what was scheduled).
  void released(const std::set<int>& devices);
  // Drops the rounds still to come (a wake starts); a prime under way finishes on its own.
  void cancel();
  PrimeStats stats() const;

 private:
  using Clock = std::chrono::steady_clock;
  struct State {
    mutable std::mutex mutex;
    std::condition_variable changed;
    std::vector<Clock::time_point> due;  // ascending
    std::set<int> devices;
    bool stopping = false;
    PrimeStats stats;
    std::thread thread;
  };
  void run(State& s);

  const std::vector<double> delays_;  // ascending
  const std::function<void(int)> prime_;
  const std::function<bool()> idle_;
  std::unique_ptr<State> state_;  // on the heap: a forked child leaves the parent's as it is
  ForkChildHook fork_hook_;
};

}  // namespace vse
