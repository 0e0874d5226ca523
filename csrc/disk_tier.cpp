#include "disk_tier.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <random>

#include "copy_pipeline.h"
#include "errors.h"
#include "worker_threads.h"

namespace vse {
namespace {

uint64_t align_up(uint64_t v) { return (v + kDiskAlign - 1) / kDiskAlign * kDiskAlign; }
uint64_t align_down(uint64_t v) { return v / kDiskAlign * kDiskAlign; }

constexpr const char* kSleepUndone = ". Nothing was released: the sleep can be retried";
constexpr const char* kWakeUndone =
    ". Nothing was changed: the allocations stay asleep with their backups, and the wake can be retried";

std::string errno_text(int error) { return std::string(std::strerror(error)) + " (errno " + std::to_string(error) + ")"; }

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// An unnamed file in `dir`: O_TMPFILE, else a random name unlinked at once. -1 with errno set.
int open_unnamed(const std::string& dir, bool direct) {
  const int flags = O_RDWR | O_CLOEXEC | (direct ? O_DIRECT : 0);
  int fd = ::open(dir.c_str(), O_TMPFILE | flags, 0600);
  if (fd >= 0 || (errno != EOPNOTSUPP && errno != EISDIR && errno != ENOENT)) return fd;
  // No O_TMPFILE here (EINVAL is not among these: it is what a refused O_DIRECT says).
  std::random_device random;
  for (int attempt = 0; attempt < 16; ++attempt) {
    const std::string path = dir + "/.vllm-sleep-ext-" + std::to_string(random()) + std::to_string(random());
    fd = ::open(path.c_str(), flags | O_CREAT | O_EXCL, 0600);
    if (fd >= 0) {
      ::unlink(path.c_str());
      return fd;
    }
    if (errno != EEXIST) return -1;
  }
  return -1;
}

}  // namespace

void check_disk_dir(const std::string& dir) {
  if (dir.empty()) return;
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0)
    throw InvalidArgument("disk directory '" + dir + "' cannot be used: " + errno_text(errno));
  if (!S_ISDIR(st.st_mode)) throw InvalidArgument("disk directory '" + dir + "' is not a directory");
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    throw InvalidArgument("disk directory '" + dir + "' is not writable: " + errno_text(errno));
}

void check_disk_options(const DiskOptions& options) {
  if (options.threads == 0 || options.threads > kMaxDiskThreads)
    throw InvalidArgument("disk threads must be from 1 to " + std::to_string(kMaxDiskThreads) + ", got " +
                          std::to_string(options.threads));
  check_disk_dir(options.dir);
}

DiskFile::DiskFile(const std::string& dir, uint64_t bytes) : dir_(dir), bytes_(bytes) {
  fd_ = open_unnamed(dir, true);
  if (fd_ < 0 && errno == EINVAL) {
    direct_ = false;
    fd_ = open_unnamed(dir, false);
  }
  if (fd_ < 0)
    throw Error("cannot make a file for backups in '" + dir + "': " + errno_text(errno) + kSleepUndone);
  const uint64_t reserved = align_up(bytes);
  // fallocate itself, not posix_fallocate: glibc's emulation writes single bytes, which O_DIRECT refuses.
  int rc;
  do {
    rc = ::fallocate(fd_, 0, 0, static_cast<off_t>(reserved)) == 0 ? 0 : errno;
  } while (rc == EINTR);
  if (rc == EOPNOTSUPP) rc = ::ftruncate(fd_, static_cast<off_t>(reserved)) == 0 ? 0 : errno;
  if (rc != 0) {
    ::close(fd_);
    throw Error("no room for " + format_bytes(reserved) + " of backups on disk in '" + dir + "': " + errno_text(rc) +
                kSleepUndone);
  }
}

DiskFile::~DiskFile() { ::close(fd_); }

// Pinned host memory the I/O goes through: slots of kDiskChunkBytes, aligned for direct I/O.
class DiskTier::Staging {
 public:
  Staging(DeviceBackend& backend, int device, unsigned slots) : backend_(backend), device_(device), slots_(slots) {
    bytes_ = static_cast<uint64_t>(slots) * kDiskChunkBytes;
    void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      throw HostOutOfMemory("cannot map " + format_bytes(bytes_) + " of staging for the disk tier: " + errno_text(errno));
    base_ = static_cast<uint8_t*>(p);
    ::madvise(base_, bytes_, MADV_DONTFORK);
    try {
      backend_.pin(device_, base_, bytes_);
    } catch (...) {
      ::munmap(base_, bytes_);
      throw;
    }
  }
  ~Staging() {
    warn_on_failure("unpinning the disk tier's staging", [&] { backend_.unpin(device_, base_); });
    ::munmap(base_, bytes_);
  }
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;

  uint8_t* slot(size_t k) const { return base_ + (k % slots_) * kDiskChunkBytes; }
  unsigned slots() const { return slots_; }
  int device() const { return device_; }

 private:
  DeviceBackend& backend_;
  int device_;
  unsigned slots_;
  uint64_t bytes_ = 0;
  uint8_t* base_ = nullptr;
};

// The disk threads: run posted I/O in order of posting, several at once; the future carries a failure.
class DiskTier::IoThreads {
 public:
  explicit IoThreads(unsigned count) {
    if (workers_.start(count, [this] { run(); }) == 0) throw Error("cannot start a thread for the disk tier");
    count_ = count;
  }
  ~IoThreads() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    changed_.notify_all();
    workers_.join();
  }
  unsigned count() const { return count_; }
  std::future<void> post(std::function<void()> io) {
    std::packaged_task<void()> task(std::move(io));
    std::future<void> done = task.get_future();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(task));
    }
    changed_.notify_one();
    return done;
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      changed_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and nothing left to run
      std::packaged_task<void()> task = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::packaged_task<void()>> queue_;
  bool stopping_ = false;
  unsigned count_ = 0;
  WorkerThreads workers_;  // last: joined before the rest goes
};

DiskTier::DiskTier(DeviceBackend& backend)
    : backend_(backend), fork_hook_([this] {
        (void)threads_.release();  // the parent's: deliberately leaked in the child
        (void)staging_.release();
      }) {}
DiskTier::~DiskTier() = default;

DiskTier::Staging& DiskTier::staging(const DiskOptions& options, int device) {
  if (!threads_ || threads_->count() != options.threads) {
    threads_.reset();
    threads_ = std::make_unique<IoThreads>(options.threads);
  }
  if (!staging_ || staging_->slots() != 2 * options.threads || staging_->device() != device) {
    staging_.reset();
    staging_ = std::make_unique<Staging>(backend_, device, 2 * options.threads);
  }
  return *staging_;
}

void DiskTier::warn_buffered(const DiskFile& file) {
  if (file.direct() || warned_dir_ == file.dir()) return;
  warned_dir_ = file.dir();
  warn("disk tier: the filesystem of '" + file.dir() +
       "' refuses direct I/O (O_DIRECT); backups there go through the page cache");
}

void DiskTier::write_at(const DiskFile& file, const uint8_t* data, uint64_t length, uint64_t offset) {
  int64_t at = fail_write_at_.load();
  if (at >= 0 && static_cast<uint64_t>(at) >= offset && static_cast<uint64_t>(at) < offset + length &&
      fail_write_at_.compare_exchange_strong(at, -1))
    throw Error("cannot write backups to disk in '" + file.dir() + "' at offset " + std::to_string(offset) + ": " +
                errno_text(EIO) + " (injected)" + kSleepUndone);
  uint64_t done = 0;
  while (done < length) {
    const ssize_t n = ::pwrite(file.fd(), data + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      throw Error("cannot write backups to disk in '" + file.dir() + "' at offset " + std::to_string(offset + done) +
                  ": " + (n < 0 ? errno_text(errno) : std::string("nothing written")) + kSleepUndone);
    done += static_cast<uint64_t>(n);
  }
}

void DiskTier::read_at(const DiskFile& file, uint8_t* data, uint64_t length, uint64_t offset) {
  uint64_t want = length;
  int64_t at = short_read_at_.load();
  if (at >= 0 && static_cast<uint64_t>(at) >= offset && static_cast<uint64_t>(at) < offset + length &&
      short_read_at_.compare_exchange_strong(at, -1))
    want = align_down(static_cast<uint64_t>(at) - offset);  // the file seems to end there
  uint64_t done = 0;
  while (done < want) {
    const ssize_t n = ::pread(file.fd(), data + done, want - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      throw Error("cannot read backups from disk in '" + file.dir() + "' at offset " + std::to_string(offset + done) +
                  ": " + errno_text(errno) + kWakeUndone);
    if (n == 0) break;
    done += static_cast<uint64_t>(n);
  }
  if (done < length)
    throw Error("backup file on disk in '" + file.dir() + "' is short: " + std::to_string(done) + " of " +
                std::to_string(length) + " bytes at offset " + std::to_string(offset) + " could be read" + kWakeUndone);
}

namespace {

// Waits for every I/O still posted (its slot must not be reused or its file closed under it); returns the
// first failure among them, if any.
std::exception_ptr wait_all(std::vector<std::future<void>>& pending) noexcept {
  std::exception_ptr first;
  for (auto& f : pending) {
    if (!f.valid()) continue;
    try {
      f.get();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  return first;
}

// Enqueues `parts` per device and waits until they are done.
void copy_and_wait(DeviceBackend& backend, CopyDirection direction, const std::map<int, std::vector<CopySpan>>& parts) {
  for (const auto& [device, spans] : parts) backend.enqueue_copies(device, direction, spans);
  for (const auto& [device, spans] : parts) Fence(backend, device).wait();
}

std::set<int> devices_of(const std::vector<DiskSpan>& spans) {
  std::set<int> devices;
  for (const DiskSpan& s : spans) devices.insert(s.device);
  return devices;
}

}  // namespace

std::shared_ptr<DiskFile> DiskTier::write(const DiskOptions& options, const std::vector<DiskSpan>& spans,
                                          uint64_t bytes, DiskTimes& times) {
  auto file = std::make_shared<DiskFile>(options.dir, bytes);
  warn_buffered(*file);
  Staging& slots = staging(options, spans.front().device);
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::future<void>> pending(slots.slots());
  try {
    size_t next = 0;      // first span not wholly copied
    uint64_t done = 0;    // bytes of spans[next] copied
    for (uint64_t begin = 0, k = 0; begin < bytes; begin += kDiskChunkBytes, ++k) {
      const uint64_t end = std::min(bytes, begin + kDiskChunkBytes);
      std::future<void>& slot_io = pending[k % slots.slots()];
      if (slot_io.valid()) slot_io.get();  // the slot's last write is done (or its failure raised here)
      uint8_t* slot = slots.slot(k);
      std::map<int, std::vector<CopySpan>> parts;
      while (next < spans.size() && spans[next].file_offset + done < end) {
        const DiskSpan& s = spans[next];
        const uint64_t n = std::min(s.bytes - done, end - (s.file_offset + done));
        parts[s.device].push_back({s.address + done, slot + (s.file_offset + done - begin), n});
        done += n;
        if (done == s.bytes) {
          ++next;
          done = 0;
        }
      }
      copy_and_wait(backend_, CopyDirection::ToHost, parts);
      const uint64_t length = align_up(end - begin);
      slot_io = threads_->post([this, file, slot, length, begin] { write_at(*file, slot, length, begin); });
    }
  } catch (...) {
    drain_copies(backend_, devices_of(spans));
    wait_all(pending);
    throw;
  }
  if (std::exception_ptr failed = wait_all(pending)) std::rethrow_exception(failed);
  times.bytes += bytes;
  times.seconds += seconds_since(start);
  return file;
}

void DiskTier::read(const DiskOptions& options, const DiskFile& file, std::vector<DiskSpan> spans, DiskTimes& times) {
  if (spans.empty()) return;
  warn_buffered(file);
  // Each span cut where the chunk grid of the file cuts it; a chunk reads the aligned cover of its pieces.
  std::sort(spans.begin(), spans.end(), [](const DiskSpan& a, const DiskSpan& b) { return a.file_offset < b.file_offset; });
  struct Chunk {
    uint64_t begin = 0, end = 0;  // aligned file range read into the slot
    std::vector<DiskSpan> pieces;
  };
  std::vector<Chunk> chunks;
  uint64_t bytes = 0;
  for (const DiskSpan& s : spans) {
    bytes += s.bytes;
    for (uint64_t at = s.file_offset; at < s.file_offset + s.bytes;) {
      const uint64_t grid = at / kDiskChunkBytes * kDiskChunkBytes;
      const uint64_t to = std::min(s.file_offset + s.bytes, grid + kDiskChunkBytes);
      if (chunks.empty() || chunks.back().begin / kDiskChunkBytes != grid / kDiskChunkBytes)
        chunks.push_back({align_down(at), 0, {}});
      chunks.back().end = std::max(chunks.back().end, align_up(to));
      chunks.back().pieces.push_back({s.device, s.address + (at - s.file_offset), at, to - at});
      at = to;
    }
  }
  Staging& slots = staging(options, spans.front().device);
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::future<void>> pending(slots.slots());
  auto post_read = [&](size_t k) {
    uint8_t* slot = slots.slot(k);
    const uint64_t begin = chunks[k].begin, length = chunks[k].end - chunks[k].begin;
    pending[k % slots.slots()] =
        threads_->post([this, &file, slot, begin, length] { read_at(file, slot, length, begin); });
  };
  try {
    for (size_t k = 0; k < chunks.size() && k < slots.slots(); ++k) post_read(k);
    for (size_t k = 0; k < chunks.size(); ++k) {
      pending[k % slots.slots()].get();
      uint8_t* slot = slots.slot(k);
      std::map<int, std::vector<CopySpan>> parts;
      for (const DiskSpan& p : chunks[k].pieces)
        parts[p.device].push_back({p.address, slot + (p.file_offset - chunks[k].begin), p.bytes});
      copy_and_wait(backend_, CopyDirection::ToDevice, parts);  // the slot is free again after this
      if (k + slots.slots() < chunks.size()) post_read(k + slots.slots());
    }
  } catch (...) {
    drain_copies(backend_, devices_of(spans));
    wait_all(pending);
    throw;
  }
  times.bytes += bytes;
  times.seconds += seconds_since(start);
}

}  // namespace vse
