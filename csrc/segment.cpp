#include "segment.h"

#include <algorithm>

#include "errors.h"

namespace vse {

Segment::Segment(DeviceBackend& backend, int device, std::string tag, uint64_t size, bool shared)
    : backend_(backend), device_(device), tag_(std::move(tag)), size_(size), shared_(shared), free_({0, size}) {
  address_ = backend_.reserve(device_, size_);
}

Segment::~Segment() {
  while (!runs_.empty()) {
    const uint64_t offset = runs_.begin()->first;
    warn_on_failure("giving back device memory", [&] { release(offset); });
    runs_.erase(offset);  // a handle that cannot be released now never will be
  }
  warn_on_failure("freeing a reserved address range", [&] { backend_.unreserve(device_, address_, size_); });
}

std::optional<uint64_t> Segment::take(uint64_t bytes) {
  if (!shared_ && !rows_.empty()) return std::nullopt;
  for (const auto& [offset, run] : runs_) {
    if (!run.mapped) continue;
    const RangeSet room = free_.clipped_relative({offset, offset + run.size});
    for (const ByteRange& r : room.ranges()) {
      if (r.size() < bytes) continue;
      const uint64_t at = offset + r.begin;
      free_.subtract({at, at + bytes});
      rows_.emplace(at, bytes);
      return at;
    }
  }
  return std::nullopt;
}

void Segment::free_row(uint64_t offset, bool mapped) {
  auto it = rows_.find(offset);
  if (it == rows_.end()) throw Error("segment has no row at offset " + std::to_string(offset));
  (mapped ? quarantine_ : free_).add({offset, offset + it->second});
  rows_.erase(it);
}

void Segment::end_quarantine() {
  for (const ByteRange& r : quarantine_.ranges()) free_.add(r);
  quarantine_ = RangeSet();
}

Segment::Run& Segment::run_at(uint64_t offset) {
  auto it = runs_.find(offset);
  if (it == runs_.end()) throw Error("segment has no physical memory at offset " + std::to_string(offset));
  return it->second;
}

void Segment::map(ByteRange range) {
  auto next = runs_.lower_bound(range.end);
  if (next != runs_.begin() && std::prev(next)->first + std::prev(next)->second.size > range.begin)
    throw Error("segment range [" + std::to_string(range.begin) + ", " + std::to_string(range.end) +
                ") already holds physical memory");
  const PhysicalHandle handle = backend_.create(device_, range.size());
  try {
    backend_.map(device_, address_ + range.begin, range.size(), handle);
  } catch (...) {
    // The new handle goes back at once; if even that fails it stays held for a later release.
    bool released = false;
    warn_on_failure("releasing physical memory after a failed map", [&] {
      backend_.release(device_, handle);
      released = true;
    });
    if (!released) runs_[range.begin] = {range.size(), handle, false};
    throw;
  }
  runs_[range.begin] = {range.size(), handle, true};
}

void Segment::unmap(uint64_t offset) {
  Run& run = run_at(offset);
  if (!run.mapped) return;
  backend_.unmap(device_, address_ + offset, run.size);
  run.mapped = false;
}

void Segment::release(uint64_t offset) {
  unmap(offset);
  backend_.release(device_, run_at(offset).handle);
  runs_.erase(offset);
}

std::vector<ByteRange> Segment::mapped_runs() const {
  std::vector<ByteRange> out;
  for (const auto& [offset, run] : runs_)
    if (run.mapped) out.push_back({offset, offset + run.size});
  return out;
}

bool Segment::in_use(ByteRange range) const {
  auto it = rows_.lower_bound(range.end);
  if (it != rows_.begin() && std::prev(it)->first + std::prev(it)->second > range.begin) return true;
  return !quarantine_.clipped_relative(range).empty();
}

void Segment::release_unused() {
  std::vector<uint64_t> unused;
  for (const auto& [offset, run] : runs_)
    if (!run.mapped || !in_use({offset, offset + run.size})) unused.push_back(offset);
  for (uint64_t offset : unused) release(offset);
}

}  // namespace vse
