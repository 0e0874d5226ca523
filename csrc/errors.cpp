#include "errors.h"

#include <atomic>
#include <cstdio>

namespace vse {

std::string format_bytes(unsigned long long bytes) {
  char buf[64];
  if (bytes >= (1ull << 30))
    std::snprintf(buf, sizeof buf, "%.2f GiB (%llu bytes)", bytes / double(1ull << 30), bytes);
  else if (bytes >= (1ull << 20))
    std::snprintf(buf, sizeof buf, "%.2f MiB (%llu bytes)", bytes / double(1ull << 20), bytes);
  else
    std::snprintf(buf, sizeof buf, "%llu bytes", bytes);
  return buf;
}

namespace {
std::atomic<WarningSink> warning_sink{nullptr};
}

void warn(const std::string& message) noexcept {
  if (WarningSink sink = warning_sink.load()) {
    try {
      sink(message);
    } catch (...) {
      std::fprintf(stderr, "vllm_sleep_ext: %s\n", message.c_str());  // a sink that throws is bypassed
    }
    return;
  }
  std::fprintf(stderr, "vllm_sleep_ext: %s\n", message.c_str());
}

WarningSink set_warning_sink(WarningSink sink) { return warning_sink.exchange(sink); }

}  // namespace vse
