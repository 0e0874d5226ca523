// The disk tier (Note [Disk tier], csrc/disk_tier.h) over the host backends: round trips with part of
// the backups in a file, on the async backend whose copies complete later on another thread (a
// release before the disk part is written, or a slot reused before its copy is done, shows there);
// injected write failures and short reads; bad directories. Built as target `disk_tier_tests`;
// tests/cpp/run_sanitizers.sh runs it under ASan, UBSan and TSan. Last line: "N passed, M failed".
#include <dirent.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "allocator.h"
#include "async_host_backend.h"
#include "disk_tier.h"
#include "errors.h"
#include "host_backend.h"
#include "test_harness.h"

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define VSE_TSAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__) || defined(VSE_TSAN)
// The fork test's child starts threads (that is what it checks); ThreadSanitizer refuses that after a
// fork of a multi-threaded process unless told to go on.
extern "C" const char* __tsan_default_options() { return "die_after_fork=0"; }
#endif

namespace {

constexpr uint64_t MiB = 1ull << 20;
using vse::Allocator;

// A fresh empty directory under $TMPDIR (or /tmp), removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/vse-disk-XXXXXX";
    std::vector<char> buf(pattern.begin(), pattern.end());
    buf.push_back('\0');
    if (!::mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed");
    path_ = buf.data();
  }
  ~TempDir() { ::rmdir(path_.c_str()); }  // empty: the disk tier leaves nothing behind
  const std::string& path() const { return path_; }
  size_t entries() const {
    size_t n = 0;
    if (DIR* d = ::opendir(path_.c_str())) {
      while (dirent* e = ::readdir(d))
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) ++n;
      ::closedir(d);
    }
    return n;
  }

 private:
  std::string path_;
};

void fill(uintptr_t address, uint64_t bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto* p = reinterpret_cast<uint8_t*>(address);
  for (uint64_t i = 0; i < bytes; ++i) p[i] = static_cast<uint8_t>(rng() | 1);
}

bool matches(uintptr_t address, uint64_t bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto* p = reinterpret_cast<const uint8_t*>(address);
  for (uint64_t i = 0; i < bytes; ++i)
    if (p[i] != static_cast<uint8_t>(rng() | 1)) return false;
  return true;
}

vse::AllocatorOptions disk_options(const std::string& dir, uint64_t limit) {
  vse::AllocatorOptions o;
  o.staging.threads = 2;
  o.staging.piece_bytes = 2 * MiB;
  o.host_memory_limit = limit;
  o.disk.dir = dir;
  o.disk.threads = 2;
  return o;
}

struct Rows {
  std::vector<uintptr_t> ptrs;
  std::vector<uint64_t> sizes;
};

Rows allocate_filled(Allocator& a, const std::vector<uint64_t>& sizes, uint64_t seed) {
  Rows rows;
  for (size_t i = 0; i < sizes.size(); ++i) {
    rows.ptrs.push_back(a.allocate(sizes[i], 0, i % 3 == 2 ? "kv" : "weights"));
    rows.sizes.push_back(sizes[i]);
    fill(rows.ptrs.back(), sizes[i], seed + i);
  }
  return rows;
}

bool all_in_state(Allocator& a, vse::State state) {
  for (const auto& info : a.allocations())
    if (info.state != state) return false;
  return true;
}

uint64_t disk_bytes(Allocator& a) {
  uint64_t total = 0;
  for (const auto& info : a.allocations()) total += info.disk_bytes;
  return total;
}

const std::vector<uint64_t> kSizes = {3 * MiB + 17, 20 * MiB + 4095, MiB - 1, 7 * MiB + 1, 33 * MiB + 5, 5 * MiB};

// Half of the backups on disk, on copies that complete late: nothing released before its bytes are
// safe, every byte back after the wake, several cycles (the staging slots reused).
void test_round_trip_with_part_on_disk_on_late_copies() {
  TempDir dir;
  auto backend = std::make_unique<vse::AsyncHostBackend>(256 * MiB, 200, 11);
  vse::AsyncHostBackend* b = backend.get();
  Allocator a(std::move(backend));
  a.set_options(disk_options(dir.path(), 30 * MiB));
  Rows rows = allocate_filled(a, kSizes, 100);
  const uintptr_t kv = rows.ptrs[2];
  for (int cycle = 0; cycle < 3; ++cycle) {
    for (size_t i = 0; i < rows.ptrs.size(); ++i) fill(rows.ptrs[i], rows.sizes[i], 10 * cycle + i);
    a.sleep({"weights"}, {{kv + 5, kv + 700005}}, {});
    CHECK(b->early_releases() == 0);
    CHECK(b->open_marks() == 0);
    CHECK(disk_bytes(a) > 30 * MiB);
    CHECK(a.last_sleep()->disk.bytes == disk_bytes(a));
    CHECK(a.host_bytes() <= 30 * MiB);
    CHECK(dir.entries() == 0);
    a.wake(std::vector<std::string>{"weights"});
    a.wake(std::nullopt);
    for (size_t i = 0; i < rows.ptrs.size(); ++i)
      if (i % 3 != 2 && !matches(rows.ptrs[i], rows.sizes[i], 10 * cycle + i)) {
        std::printf("cycle %d row %zu size %llu differs\n", cycle, i, (unsigned long long)rows.sizes[i]);
        CHECK(false);
      }
    CHECK(b->early_releases() == 0);
  }
  for (uintptr_t p : rows.ptrs) a.free(p);
}

// A write that fails part way fails the sleep with every allocation mapped and intact; the retry works.
void test_failed_write_releases_nothing_and_the_retry_works() {
  TempDir dir;
  Allocator a(std::make_unique<vse::AsyncHostBackend>(256 * MiB, 100, 3));
  a.set_options(disk_options(dir.path(), 8 * MiB));
  Rows rows = allocate_filled(a, kSizes, 200);
  a.disk_tier().inject_write_failure(40 * MiB);
  bool threw = false;
  try {
    a.sleep({"weights", "kv"}, {}, {});
  } catch (const vse::Error& e) {
    threw = std::string(e.what()).find("Nothing was released") != std::string::npos;
  }
  CHECK(threw);
  CHECK(all_in_state(a, vse::State::Mapped));
  CHECK(!a.last_sleep().has_value());
  for (size_t i = 0; i < rows.ptrs.size(); ++i) CHECK(matches(rows.ptrs[i], rows.sizes[i], 200 + i));
  a.sleep({"weights", "kv"}, {}, {});
  CHECK(all_in_state(a, vse::State::BackedUp));
  a.wake(std::nullopt);
  for (size_t i = 0; i < rows.ptrs.size(); ++i) CHECK(matches(rows.ptrs[i], rows.sizes[i], 200 + i));
  for (uintptr_t p : rows.ptrs) a.free(p);
}

// A short read fails the wake with every allocation asleep and its backup whole; the retry works.
void test_short_read_keeps_everything_asleep_and_the_retry_works() {
  TempDir dir;
  Allocator a(std::make_unique<vse::AsyncHostBackend>(256 * MiB, 100, 5));
  a.set_options(disk_options(dir.path(), 4 * MiB));
  Rows rows = allocate_filled(a, kSizes, 300);
  a.sleep({"weights", "kv"}, {}, {});
  const uint64_t on_disk = disk_bytes(a);
  a.disk_tier().inject_short_read(50 * MiB + 3);
  CHECK_THROWS(a.wake(std::nullopt), vse::Error);
  CHECK(all_in_state(a, vse::State::BackedUp));
  CHECK(disk_bytes(a) == on_disk);
  CHECK(a.device_memory(0).free == a.device_memory(0).total);  // the failed wake gave back what it mapped
  a.wake(std::nullopt);
  for (size_t i = 0; i < rows.ptrs.size(); ++i) CHECK(matches(rows.ptrs[i], rows.sizes[i], 300 + i));
  for (uintptr_t p : rows.ptrs) a.free(p);
}

// Without a directory a sleep past the limit fails as before; a missing directory, a file, and a
// bad thread count are refused, naming what was wrong, and the options stay as they were.
void test_bad_directories_are_refused_and_no_directory_keeps_the_old_limit() {
  Allocator a(std::make_unique<vse::HostBackend>(64 * MiB));
  vse::AllocatorOptions o = a.options();
  o.host_memory_limit = 2 * MiB;
  a.set_options(o);
  const uintptr_t p = a.allocate(4 * MiB, 0, "weights");
  CHECK_THROWS(a.sleep({"weights"}, {}, {}), vse::HostOutOfMemory);
  CHECK(all_in_state(a, vse::State::Mapped));

  o.disk.dir = "/nonexistent/vse-disk";
  bool named = false;
  try {
    a.set_options(o);
  } catch (const vse::InvalidArgument& e) {
    named = std::string(e.what()).find("/nonexistent/vse-disk") != std::string::npos;
  }
  CHECK(named);
  o.disk.dir = "/proc/self/status";
  CHECK_THROWS(a.set_options(o), vse::InvalidArgument);
  o.disk.dir = "";
  o.disk.threads = 0;
  CHECK_THROWS(a.set_options(o), vse::InvalidArgument);
  CHECK(a.options().disk.dir.empty() && a.options().disk.threads == 4);
  a.free(p);
}

// The file is unnamed, 0600, and its size is reserved before anything is written.
void test_disk_file_is_unnamed_0600_and_reserved() {
  TempDir dir;
  {
    vse::DiskFile file(dir.path(), 5 * MiB + 1);
    struct stat st {};
    CHECK(::fstat(file.fd(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
    CHECK(st.st_nlink == 0);
    CHECK(static_cast<uint64_t>(st.st_size) == 5 * MiB + vse::kDiskAlign);
    CHECK(dir.entries() == 0);
  }
  CHECK_THROWS(vse::DiskFile("/nonexistent/vse-disk", MiB), vse::Error);
}

// A forked child (a trainer's DataLoader worker) finds the disk tier's threads and staging gone: a
// sleep and wake of its own make new ones instead of waiting for threads that are not there.
void test_forked_child_makes_its_own_disk_threads_and_staging() {
  TempDir dir;
  Allocator a(std::make_unique<vse::HostBackend>(128 * MiB));
  a.set_options(disk_options(dir.path(), 4 * MiB));
  const uintptr_t p = a.allocate(40 * MiB + 3, 0, "weights");
  fill(p, 40 * MiB + 3, 77);
  a.sleep({"weights"}, {}, {});  // the parent's threads and staging exist now
  const pid_t pid = ::fork();
  if (pid == 0) {
    int code = 1;
    try {
      const uintptr_t q = a.allocate(30 * MiB + 1, 0, "runtime");
      fill(q, 30 * MiB + 1, 78);
      a.sleep({"runtime"}, {}, {});
      code = a.last_sleep()->disk.bytes > 20 * MiB ? 4 : 5;
      a.wake(std::vector<std::string>{"runtime"});
      if (code == 4) code = matches(q, 30 * MiB + 1, 78) ? 0 : 2;
    } catch (...) {
      code = 3;
    }
    ::_exit(code);
  }
  int status = -1;
  CHECK(pid > 0 && ::waitpid(pid, &status, 0) == pid);
  if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) std::printf("child status %d\n", status);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  a.wake(std::nullopt);
  CHECK(matches(p, 40 * MiB + 3, 77));
  a.free(p);
}

}  // namespace

int main(int argc, char** argv) {
  static const vse_test::Test tests[] = {
      {"round_trip_with_part_on_disk_on_late_copies", test_round_trip_with_part_on_disk_on_late_copies},
      {"failed_write_releases_nothing_and_the_retry_works", test_failed_write_releases_nothing_and_the_retry_works},
      {"short_read_keeps_everything_asleep_and_the_retry_works",
       test_short_read_keeps_everything_asleep_and_the_retry_works},
      {"bad_directories_are_refused_and_no_directory_keeps_the_old_limit",
       test_bad_directories_are_refused_and_no_directory_keeps_the_old_limit},
      {"disk_file_is_unnamed_0600_and_reserved", test_disk_file_is_unnamed_0600_and_reserved},
      {"forked_child_makes_its_own_disk_threads_and_staging",
       test_forked_child_makes_its_own_disk_threads_and_staging},
  };
  return vse_test::run_tests(tests, argc, argv);
}
