#include "host_worker.h"

#include <exception>
#include <system_error>

namespace vse {

HostWorker::HostWorker()
    : state_(std::make_unique<State>()), fork_hook_([this] {
        (void)state_.release();  // the parent's: left as it is, never destroyed here
        state_ = std::make_unique<State>();
      }) {}

HostWorker::~HostWorker() {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.stopping = true;
    s.queue.clear();
    s.cancelled = true;
  }
  s.changed.notify_all();
  if (s.thread.joinable()) s.thread.join();
}

bool HostWorker::post(Job job) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  if (!s.thread.joinable()) {
    try {
      s.thread = std::thread([&s] { run(s); });
    } catch (const std::system_error& e) {
      s.error = std::string("cannot start the host-memory thread: ") + e.what();
      return false;
    }
  }
  s.queue.push_back(std::move(job));
  s.changed.notify_all();
  return true;
}

void HostWorker::cancel_and_wait() {
  State& s = *state_;
  std::unique_lock<std::mutex> lock(s.mutex);
  s.queue.clear();
  if (!s.running) return;
  s.cancelled = true;
  s.changed.wait(lock, [&] { return !s.running; });
  s.cancelled = false;
}

void HostWorker::wait() {
  State& s = *state_;
  std::unique_lock<std::mutex> lock(s.mutex);
  s.changed.wait(lock, [&] { return s.queue.empty() && !s.running; });
}

std::string HostWorker::take_error() {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  std::string out;
  out.swap(s.error);
  return out;
}

void HostWorker::set_error(const std::string& what) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  s.error = what;
}

void HostWorker::run(State& s) {
  std::unique_lock<std::mutex> lock(s.mutex);
  for (;;) {
    s.changed.wait(lock, [&] { return s.stopping || !s.queue.empty(); });
    if (s.stopping) return;
    Job job = std::move(s.queue.front());
    s.queue.pop_front();
    s.running = true;
    lock.unlock();
    std::string failure;
    try {
      job(s.cancelled);
    } catch (const std::exception& e) {
      failure = e.what();
    } catch (...) {
      failure = "unknown error";
    }
    job = nullptr;  // its arena goes back to the allocator before anyone is told the job is done
    lock.lock();
    if (!failure.empty()) s.error = failure;
    s.running = false;
    s.changed.notify_all();
  }
}

}  // namespace vse
