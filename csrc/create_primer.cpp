#include "create_primer.h"

#include <algorithm>
#include <exception>
#include <system_error>

namespace vse {
namespace {

std::vector<double> ascending(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v;
}

}  // namespace

CreatePrimer::CreatePrimer(std::vector<double> delays, std::function<void(int)> prime, std::function<bool()> idle)
    : delays_(ascending(std::move(delays))),
      prime_(std::move(prime)),
      idle_(std::move(idle)),
      state_(std::make_unique<State>()),
      fork_hook_([this] {
        (void)state_.release();  // the parent's: a thread that is not here, a mutex perhaps held
        state_ = std::make_unique<State>();
      }) {}

CreatePrimer::~CreatePrimer() {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.stopping = true;
    s.due.clear();
  }
  s.changed.notify_all();
  if (s.thread.joinable()) s.thread.join();
}

void CreatePrimer::released(const std::set<int>& devices) {
  if (delays_.empty() || devices.empty()) return;
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  if (!s.thread.joinable()) {
    try {
      s.thread = std::thread([this, &s] { run(s); });
    } catch (const std::system_error& e) {
      ++s.stats.failures;  // no thread: the wake takes the driver's work, as without a primer
      s.stats.last_error = std::string("cannot start the primer's thread: ") + e.what();
      return;
    }
  }
  const Clock::time_point now = Clock::now();
  s.due.clear();
  for (double d : delays_)  // ascending: sorted when made
    s.due.push_back(now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(d)));
  s.devices.insert(devices.begin(), devices.end());
  s.changed.notify_all();
}

void CreatePrimer::cancel() {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  s.due.clear();
  s.devices.clear();
}

PrimeStats CreatePrimer::stats() const {
  const State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.stats;
}

void CreatePrimer::run(State& s) {
  std::unique_lock<std::mutex> lock(s.mutex);
  for (;;) {
    if (s.stopping) return;
    if (s.due.empty()) {
      s.changed.wait(lock);
      continue;
    }
    if (Clock::now() < s.due.front()) {
      s.changed.wait_until(lock, s.due.front());  // then looks again: stopping, cancelled or rescheduled
      continue;
    }
    s.due.erase(s.due.begin());
    const std::set<int> devices = s.devices;
    if (s.due.empty()) s.devices.clear();
    lock.unlock();
    const bool idle = idle_();
    std::vector<std::pair<double, std::string>> done;  // seconds, error
    if (idle) {
      for (int device : devices) {
        const auto start = Clock::now();
        std::string error;
        try {
          prime_(device);
        } catch (const std::exception& e) {
          error = e.what();
        } catch (...) {
          error = "unknown error";
        }
        done.emplace_back(std::chrono::duration<double>(Clock::now() - start).count(), error);
      }
    }
    lock.lock();
    if (!idle) ++s.stats.skipped;
    for (const auto& [seconds, error] : done) {
      ++s.stats.rounds;
      s.stats.last_seconds = seconds;
      s.stats.longest_seconds = std::max(s.stats.longest_seconds, seconds);
      if (!error.empty()) {
        ++s.stats.failures;
        s.stats.last_error = error;
      }
    }
  }
}

}  // namespace vse
