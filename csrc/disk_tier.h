// The disk tier: backups beyond the host memory limit go to a file in a directory the user names.
//
// Note [Disk tier]
// With a host memory limit and a disk directory set, a sleep keeps in host memory what fits under the
// limit (HostCache::room) and writes the rest of its backups, in the same order, to ONE new file; a
// backup is then two parts (HostBackup in allocator.h): its first bytes in a host arena, its last
// `disk_bytes` in that file. The file is shared by the backups of that sleep and closed when the last
// of them goes (wake, discard, free); it never has a name, so nothing is left behind when the process
// dies:
//   - It is made with O_TMPFILE, mode 0600, in the directory; where the filesystem has no O_TMPFILE,
//     it is made under a random name and unlinked at once.
//   - Its whole size is reserved with fallocate before anything is copied, so a full disk fails the
//     sleep up front with nothing released.
//   - It is written and read with O_DIRECT (the page cache would only hold a second copy of what the
//     disk tier exists to keep out of memory), in chunks of kDiskChunkBytes through pinned staging
//     slots (2 per disk thread), pipelined with the device copies: at sleep the copy of chunk k+1 into
//     a slot runs while chunk k is written from another; at wake the disk threads read ahead while the
//     main thread copies the chunks already read to the device. Where the filesystem refuses O_DIRECT
//     (tmpfs on older kernels), buffered I/O, with a warning naming the directory. Where it cannot
//     fallocate (EOPNOTSUPP), the file is only sized: a full disk then fails a write, still before
//     anything is released.
// Order: a sleep writes the disk part whole first (so a failed write releases nothing), then copies the
// host part; a wake copies the host part back while it maps, then reads the disk part. The two parts
// do not overlap: on one copy queue per device a disk chunk's copy would wait behind the host part's
// copies anyway, so overlapping them needs a second queue (the most it can gain is the host part's
// time at the copy limit, about 0.15 s per 8 GB).
// Faults: every write of a sleep is done before the sleep releases anything, so a failed write fails
// the sleep with every allocation mapped (retryable); at wake a failed or short read fails the wake,
// which undoes its mappings as any failed wake does: the allocations stay asleep with their backups.
// Offsets, lengths and buffers of the I/O are multiples of kDiskAlign (direct I/O needs the logical
// block size; 4096 covers every disk in use); a part of a backup need not be aligned: reads cover the
// aligned range around it and copy the part out of the slot.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "fork_guard.h"

namespace vse {

constexpr uint64_t kDiskChunkBytes = 16ull << 20;
constexpr uint64_t kDiskAlign = 4096;
constexpr unsigned kMaxDiskThreads = 64;

struct DiskOptions {
  std::string dir;       // "": no disk tier (a sleep past the host limit fails, as before)
  unsigned threads = 4;  // threads doing the I/O; staging has two slots per thread
};

// Throws InvalidArgument naming `dir` when it is not an existing, writable directory.
void check_disk_dir(const std::string& dir);
void check_disk_options(const DiskOptions& options);

// One sleep's file of backups: unnamed, 0600, its size reserved.
class DiskFile {
 public:
  // Throws Error (naming the directory and the bytes) when it cannot be made or the room reserved.
  DiskFile(const std::string& dir, uint64_t bytes);
  ~DiskFile();
  DiskFile(const DiskFile&) = delete;
  DiskFile& operator=(const DiskFile&) = delete;

  int fd() const { return fd_; }
  bool direct() const { return direct_; }
  const std::string& dir() const { return dir_; }
  uint64_t bytes() const { return bytes_; }

 private:
  std::string dir_;
  uint64_t bytes_;
  int fd_ = -1;
  bool direct_ = true;
};

// Device memory whose backup lies in a file from `file_offset`.
struct DiskSpan {
  int device;
  uintptr_t address;
  uint64_t file_offset;
  uint64_t bytes;
};

struct DiskTimes {
  uint64_t bytes = 0;
  double seconds = 0;  // from the first chunk to the last, device copies included
};

class DiskTier {
 public:
  explicit DiskTier(DeviceBackend& backend);
  ~DiskTier();
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  // Makes a file in options.dir for `bytes` and copies `spans` (back to back from file offset 0, in
  // that order) into it. Throws, changing no device memory, when the file cannot be made or written.
  std::shared_ptr<DiskFile> write(const DiskOptions& options, const std::vector<DiskSpan>& spans, uint64_t bytes,
                                  DiskTimes& times);
  // Copies `spans` of `file` back to device memory (mapped); returns when the copies are done. Throws
  // on a failed or short read, the copies in flight finished; the file is untouched.
  void read(const DiskOptions& options, const DiskFile& file, std::vector<DiskSpan> spans, DiskTimes& times);

  // Test hooks, each for the next I/O that covers that file offset only (-1: none): a write that fails
  // with EIO, a read that comes back short.
  void inject_write_failure(int64_t file_offset) { fail_write_at_ = file_offset; }
  void inject_short_read(int64_t file_offset) { short_read_at_ = file_offset; }

 private:
  class Staging;
  class IoThreads;
  Staging& staging(const DiskOptions& options, int device);
  void write_at(const DiskFile& file, const uint8_t* data, uint64_t length, uint64_t offset);
  void read_at(const DiskFile& file, uint8_t* data, uint64_t length, uint64_t offset);
  void warn_buffered(const DiskFile& file);

  DeviceBackend& backend_;
  std::unique_ptr<Staging> staging_;
  std::unique_ptr<IoThreads> threads_;
  std::atomic<int64_t> fail_write_at_{-1};
  std::atomic<int64_t> short_read_at_{-1};
  std::string warned_dir_;  // buffered I/O is said once per directory
  // In a forked child the I/O threads are gone (and their lock perhaps held) and the staging is not
  // mapped (MADV_DONTFORK): both are forgotten there, never joined or unpinned, and made anew on use.
  ForkChildHook fork_hook_;
};

}  // namespace vse
