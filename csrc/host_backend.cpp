#include "host_backend.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>

#include "errors.h"

namespace vse {
namespace {

constexpr uint64_t kGranularity = 2ull << 20;  // as on CUDA, so sizes round the same way

std::string errno_text(const char* call) { return std::string(call) + " failed: " + std::strerror(errno); }

int make_memfd() {
#ifdef SYS_memfd_create
  return static_cast<int>(syscall(SYS_memfd_create, "vllm_sleep_ext", 1u /* MFD_CLOEXEC */));
#else
  errno = ENOSYS;
  return -1;
#endif
}

}  // namespace

void HostBackend::check_device(int device) const {
  if (device != 0) throw InvalidArgument("host backend has one device (0), not " + std::to_string(device));
}

uint64_t HostBackend::granularity(int device) {
  check_device(device);
  return kGranularity;
}

uintptr_t HostBackend::reserve(int device, uint64_t size) {
  check_device(device);
  void* p = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw Error(errno_text("mmap(PROT_NONE) reserving an address range"));
  return reinterpret_cast<uintptr_t>(p);
}

void HostBackend::unreserve(int, uintptr_t address, uint64_t size) {
  if (munmap(reinterpret_cast<void*>(address), size) != 0) throw Error(errno_text("munmap"));
}

std::shared_ptr<HostCard> HostCard::named(const std::string& name, uint64_t capacity) {
  if (capacity == 0) throw InvalidArgument("a shared host card needs a capacity (card '" + name + "')");
  static std::mutex mutex;
  static std::map<std::string, std::weak_ptr<HostCard>> cards;
  std::lock_guard<std::mutex> lock(mutex);
  std::shared_ptr<HostCard> card = cards[name].lock();
  if (!card) {
    card = std::make_shared<HostCard>(capacity);
    cards[name] = card;
  } else if (card->capacity != capacity) {
    throw InvalidArgument("host card '" + name + "' has " + format_bytes(card->capacity) + ", not " +
                          format_bytes(capacity));
  }
  return card;
}

PhysicalHandle HostBackend::create(int device, uint64_t size) {
  check_device(device);
  const uint64_t capacity = card_->capacity;
  std::atomic<uint64_t>& taken = card_->used;
  if (capacity != 0) {
    uint64_t used = taken.load();
    do {
      if (used + size > capacity)
        throw DeviceOutOfMemory("host backend: " + format_bytes(size) + " asked, " +
                                format_bytes(capacity - used) + " free of " + format_bytes(capacity));
    } while (!taken.compare_exchange_weak(used, used + size));
  } else {
    taken += size;
  }
  int fd = make_memfd();
  if (fd < 0 || ftruncate(fd, static_cast<off_t>(size)) != 0) {
    std::string why = errno_text(fd < 0 ? "memfd_create" : "ftruncate");
    if (fd >= 0) close(fd);
    taken -= size;
    throw DeviceOutOfMemory("host backend: " + why);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  sizes_[fd] = size;
  return static_cast<PhysicalHandle>(fd);
}

void HostBackend::release(int, PhysicalHandle handle) {
  int fd = static_cast<int>(handle);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = sizes_.find(fd);
    if (it == sizes_.end()) throw InvalidArgument("host backend: release of unknown handle " + std::to_string(fd));
    card_->used -= it->second;
    sizes_.erase(it);
  }
  if (close(fd) != 0) throw Error(errno_text("close(memfd)"));
}

void HostBackend::map(int, uintptr_t address, uint64_t size, PhysicalHandle handle) {
  int fd = static_cast<int>(handle);
  void* p = mmap(reinterpret_cast<void*>(address), size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
  if (p == MAP_FAILED) throw Error(errno_text("mmap(MAP_FIXED) of physical memory"));
}

void HostBackend::unmap(int, uintptr_t address, uint64_t size) {
  // Replacing the mapping (rather than munmap) keeps the address range reserved for this allocation.
  void* p = mmap(reinterpret_cast<void*>(address), size, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  if (p == MAP_FAILED) throw Error(errno_text("mmap(MAP_FIXED, PROT_NONE) unmapping"));
}

MemoryInfo HostBackend::memory_info(int device) {
  check_device(device);
  if (card_->capacity != 0) return {card_->capacity - card_->used.load(), card_->capacity};
  // Page cache can be reclaimed, so "free" is MemAvailable, as the kernel estimates it.
  uint64_t available = 0, total = 0;
  if (FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    unsigned long long kib = 0;
    while (std::fgets(line, sizeof line, f)) {
      if (std::sscanf(line, "MemAvailable: %llu kB", &kib) == 1) available = kib << 10;
      if (std::sscanf(line, "MemTotal: %llu kB", &kib) == 1) total = kib << 10;
    }
    std::fclose(f);
  }
  return {available, total};
}

void HostBackend::enqueue_copies(int, CopyDirection direction, const std::vector<CopySpan>& spans) {
  for (const CopySpan& s : spans) {
    if (direction == CopyDirection::ToHost)
      std::memcpy(s.host, reinterpret_cast<const void*>(s.device), s.bytes);
    else
      std::memcpy(reinterpret_cast<void*>(s.device), s.host, s.bytes);
  }
}

void HostBackend::fill(int, uintptr_t address, uint64_t bytes, uint8_t value) {
  std::memset(reinterpret_cast<void*>(address), value, bytes);
}

CodecStream* HostBackend::codec_stream(int device) {
  check_device(device);
  return &codec_stream_;
}

}  // namespace vse
