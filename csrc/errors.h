// Error kinds the core raises. Each carries the whole story in its message; nothing is kept in global
// state, so a failed call never poisons the next one. The bindings map each kind to one Python type.
#pragma once

#include <stdexcept>
#include <string>

namespace vse {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad input from the caller (unknown pointer, size 0, bad option). Maps to ValueError.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// The device has no room for the physical memory asked for. Nothing was changed.
class DeviceOutOfMemory : public Error {
 public:
  using Error::Error;
};

// Host memory for a backup could not be had. Nothing was changed.
class HostOutOfMemory : public Error {
 public:
  using Error::Error;
};

// libcuda is missing or has no usable device.
class DriverUnavailable : public Error {
 public:
  using Error::Error;
};

std::string format_bytes(unsigned long long bytes);

// A failure that cannot be raised because another one is already on its way (undoing a failed call) or
// nothing is there to catch it (a destructor): said once on the warning sink, never swallowed. The sink
// is stderr unless replaced (tests capture it); it is not error state: nothing reads it back.
using WarningSink = void (*)(const std::string& message);
void warn(const std::string& message) noexcept;
WarningSink set_warning_sink(WarningSink sink);  // nullptr restores stderr; returns the previous sink

// Runs `step`; a failure is passed to warn() with `what` in front.
template <typename F>
void warn_on_failure(const char* what, F&& step) noexcept {
  try {
    step();
  } catch (const std::exception& e) {
    warn(std::string(what) + ": " + e.what());
  } catch (...) {
    warn(std::string(what) + ": unknown exception");
  }
}

}  // namespace vse
