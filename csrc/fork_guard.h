// What a fork() leaves a child of the host-memory side: the parent's memory, except ranges marked
// MADV_DONTFORK (host arenas, which are not mapped in the child at all), and none of its threads, only
// the one that called fork(). Objects that own such memory or such a thread learn here that they are
// in a child: fork_epoch() tells which process made something, and a ForkChildHook resets an object in
// the child before fork() returns there.
#pragma once

#include <cstdint>
#include <functional>

namespace vse {

// 0 in the process that first asked; each fork() adds 1 in the child. Something made under another
// epoch belongs to an ancestor process and must not be given back from here.
uint64_t fork_epoch();

// Runs `reset` in the child of every fork() while it lives, before fork() returns there, with only the
// forking thread alive. `reset` must not make or destroy hooks, and must not wait for a lock that a
// thread of the parent may have held.
class ForkChildHook {
 public:
  explicit ForkChildHook(std::function<void()> reset);
  ~ForkChildHook();
  ForkChildHook(const ForkChildHook&) = delete;
  ForkChildHook& operator=(const ForkChildHook&) = delete;

 private:
  std::function<void()> reset_;
};

}  // namespace vse
