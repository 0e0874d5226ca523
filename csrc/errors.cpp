#include "errors.h"

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

}  // namespace vse
