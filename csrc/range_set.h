// Byte ranges as values: the preserved regions of an allocation and the parts of a backup.
#pragma once

#include <cstdint>
#include <vector>

namespace vse {

// Half-open [begin, end).
struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;

  uint64_t size() const { return end > begin ? end - begin : 0; }
  bool empty() const { return end <= begin; }
  bool operator==(const ByteRange& o) const { return begin == o.begin && end == o.end; }
};

// A set of bytes kept as sorted, disjoint, non-touching ranges: adding merges, subtracting splits.
class RangeSet {
 public:
  RangeSet() = default;
  explicit RangeSet(ByteRange whole) { add(whole); }

  void add(ByteRange r);
  void subtract(ByteRange r);
  void subtract(const RangeSet& other);

  // The part inside `window`, shifted so that window.begin becomes 0.
  RangeSet clipped_relative(ByteRange window) const;

  uint64_t bytes() const;
  bool empty() const { return ranges_.empty(); }
  const std::vector<ByteRange>& ranges() const { return ranges_; }

 private:
  std::vector<ByteRange> ranges_;
};

}  // namespace vse
