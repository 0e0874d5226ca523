// One reserved address range of one (device, tag) and the physical memory mapped inside it: the single
// owner of device memory (Note [Allocation states] in allocator.h). A slab is a segment of many rows;
// an allocation with its own memory is a segment of one row.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "backend.h"
#include "range_set.h"

namespace vse {

// Physical memory is held as runs: one handle mapped over [offset, offset + size). Each method changes
// what the segment holds only after the driver call succeeded, so a failed call (cuMemUnmap,
// cuMemRelease, ...) leaves it describing exactly what the driver holds: a handle whose release failed
// stays a run, unmapped, and a later release_unused() gives it back; it is never lost.
// Rows are segment-relative ranges, each taken (a row of the table), quarantined (freed while mapped:
// still taken until the device is known to be done with it) or free.
class Segment {
 public:
  // Reserves `size` bytes (a multiple of the granularity); nothing is mapped yet. A `shared` segment
  // (a slab) takes many rows; the other kind exactly one, over its whole range.
  Segment(DeviceBackend& backend, int device, std::string tag, uint64_t size, bool shared);
  // Gives back every handle and the reservation, best effort, with a warning for each failure.
  ~Segment();
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  uintptr_t address() const { return address_; }
  uint64_t size() const { return size_; }
  int device() const { return device_; }
  const std::string& tag() const { return tag_; }
  bool shared() const { return shared_; }

  // Rows. take() finds `bytes` (a multiple of the granularity) free inside one mapped run, first fit,
  // and records them as a row; none when no mapped run has room.
  std::optional<uint64_t> take(uint64_t bytes);
  // The row at `offset` goes: into quarantine when its memory is mapped (kernels may still use it),
  // else straight back to the free ranges.
  void free_row(uint64_t offset, bool mapped);
  uint64_t quarantined_bytes() const { return quarantine_.bytes(); }
  // The device is done with everything freed so far: quarantined ranges become free.
  void end_quarantine();
  // No row, nothing quarantined, no physical memory: only the reservation is left.
  bool idle() const { return rows_.empty() && quarantine_.empty() && runs_.empty(); }

  // Physical memory. map() creates a handle for `range` (covered by no run) and maps it; contents are
  // undefined. unmap() and release() take the run that starts at `offset`; release() unmaps it first
  // when mapped.
  void map(ByteRange range);
  void unmap(uint64_t offset);
  void release(uint64_t offset);
  std::vector<ByteRange> mapped_runs() const;
  // Releases every run that no row and no quarantined range lies in, and every handle left unmapped
  // by a release that failed before. Throws at the first failure (the rest stays for the next call).
  void release_unused();

 private:
  struct Run {
    uint64_t size = 0;
    PhysicalHandle handle = 0;
    bool mapped = false;
  };
  Run& run_at(uint64_t offset);
  bool in_use(ByteRange range) const;

  DeviceBackend& backend_;
  const int device_;
  const std::string tag_;
  const uint64_t size_;
  const bool shared_;
  uintptr_t address_ = 0;
  std::map<uint64_t, Run> runs_;        // by offset; disjoint
  std::map<uint64_t, uint64_t> rows_;   // offset -> bytes
  RangeSet free_;
  RangeSet quarantine_;
};

}  // namespace vse
