#include "host_worker.h"

#include <exception>
#include <system_error>

namespace vse {

HostWorker::~HostWorker() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    queue_.clear();
    cancelled_ = true;
  }
  changed_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool HostWorker::post(Job job) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!thread_.joinable()) {
    try {
      thread_ = std::thread([this] { run(); });
    } catch (const std::system_error& e) {
      error_ = std::string("cannot start the host-memory thread: ") + e.what();
      return false;
    }
  }
  queue_.push_back(std::move(job));
  changed_.notify_all();
  return true;
}

void HostWorker::cancel_and_wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  queue_.clear();
  if (!running_) return;
  cancelled_ = true;
  changed_.wait(lock, [&] { return !running_; });
  cancelled_ = false;
}

void HostWorker::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return queue_.empty() && !running_; });
}

std::string HostWorker::take_error() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string out;
  out.swap(error_);
  return out;
}

void HostWorker::set_error(const std::string& what) {
  std::lock_guard<std::mutex> lock(mutex_);
  error_ = what;
}

void HostWorker::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (stopping_) return;
    Job job = std::move(queue_.front());
    queue_.pop_front();
    running_ = true;
    lock.unlock();
    std::string failure;
    try {
      job(cancelled_);
    } catch (const std::exception& e) {
      failure = e.what();
    } catch (...) {
      failure = "unknown error";
    }
    job = nullptr;  // its arena goes back to the allocator before anyone is told the job is done
    lock.lock();
    if (!failure.empty()) error_ = failure;
    running_ = false;
    changed_.notify_all();
  }
}

}  // namespace vse
