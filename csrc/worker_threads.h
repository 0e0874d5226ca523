// Threads that are always joined: an exception unwinding past a joinable std::thread calls
// std::terminate, which is how a failed thread start (std::system_error, or std::bad_alloc for its
// state) used to end the whole process.
#pragma once

#include <functional>
#include <thread>
#include <vector>

namespace vse {

class WorkerThreads {
 public:
  using Spawn = std::thread (*)(const std::function<void()>& work);
  // `spawn` starts one thread; tests pass one that fails.
  explicit WorkerThreads(Spawn spawn = nullptr) : spawn_(spawn) {}
  ~WorkerThreads() { join(); }
  WorkerThreads(const WorkerThreads&) = delete;
  WorkerThreads& operator=(const WorkerThreads&) = delete;

  // Starts up to `count` threads running `work`; returns how many started. A thread that cannot start
  // ends the starting and is not an error: the caller does the work with fewer (or on its own thread).
  unsigned start(unsigned count, const std::function<void()>& work) {
    for (unsigned i = 0; i < count; ++i) {
      try {
        threads_.reserve(count);
        threads_.push_back(spawn_ ? spawn_(work) : std::thread(work));
      } catch (...) {
        break;
      }
    }
    return static_cast<unsigned>(threads_.size());
  }
  void join() noexcept {
    for (std::thread& t : threads_)
      if (t.joinable()) t.join();
    threads_.clear();
  }

 private:
  Spawn spawn_;
  std::vector<std::thread> threads_;
};

}  // namespace vse
