#include "range_set.h"

#include <algorithm>

namespace vse {

void RangeSet::add(ByteRange r) {
  if (r.empty()) return;
  // First range that ends at or after r.begin can touch r; merge every range up to r.end.
  auto first = std::lower_bound(ranges_.begin(), ranges_.end(), r.begin,
                                [](const ByteRange& x, uint64_t v) { return x.end < v; });
  auto last = first;
  while (last != ranges_.end() && last->begin <= r.end) {
    r.begin = std::min(r.begin, last->begin);
    r.end = std::max(r.end, last->end);
    ++last;
  }
  first = ranges_.erase(first, last);
  ranges_.insert(first, r);
}

void RangeSet::subtract(ByteRange r) {
  if (r.empty()) return;
  std::vector<ByteRange> out;
  out.reserve(ranges_.size() + 1);
  for (const ByteRange& x : ranges_) {
    if (x.end <= r.begin || x.begin >= r.end) {
      out.push_back(x);
      continue;
    }
    if (x.begin < r.begin) out.push_back({x.begin, r.begin});
    if (x.end > r.end) out.push_back({r.end, x.end});
  }
  ranges_.swap(out);
}

void RangeSet::subtract(const RangeSet& other) {
  for (const ByteRange& r : other.ranges_) subtract(r);
}

RangeSet RangeSet::clipped_relative(ByteRange window) const {
  RangeSet out;
  auto it = std::lower_bound(ranges_.begin(), ranges_.end(), window.begin,
                             [](const ByteRange& x, uint64_t v) { return x.end <= v; });
  for (; it != ranges_.end() && it->begin < window.end; ++it) {
    ByteRange part{std::max(it->begin, window.begin) - window.begin,
                   std::min(it->end, window.end) - window.begin};
    if (!part.empty()) out.ranges_.push_back(part);
  }
  return out;
}

uint64_t RangeSet::bytes() const {
  uint64_t total = 0;
  for (const ByteRange& r : ranges_) total += r.size();
  return total;
}

}  // namespace vse
