// Lossless codecs for level-1 backups, and the device queue they run on (compress_pipeline.h drives them).
//
// A Codec turns a batch of pieces of device memory into compressed pieces and back, ordered on a
// CodecStream; the sizes it produces are written to device memory, so the caller can read them later
// without waiting for the codec on the host. The pipeline does not know which codec it drives:
//   ReferenceCodec (reference_codec.h) - plain C++ on host memory, for the host backends and the tests;
//   NvcompCodec (nvcomp_codec.h)       - nvCOMP's batched ANS on the GPU, libnvcomp.so.6 opened at run time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace vse {

class DeviceBackend;

// One piece of a batch: `plain` bytes at `plain_address` and a compressed buffer at `packed_address`.
// Compress reads the plain side and writes the packed side (up to max_packed_bytes(plain_bytes)); decompress
// reads `packed_bytes` of the packed side and writes the plain side.
struct CodecPiece {
  uintptr_t plain_address = 0;
  uint64_t plain_bytes = 0;
  uintptr_t packed_address = 0;
  uint64_t packed_bytes = 0;  // decompress: what was stored
};

// Where one codec call works: device scratch (temp_bytes(count, ...) of it), the device array it writes each
// piece's size to, and pinned host memory (kCodecHostWords words per piece) for the pointer and size arrays it
// sends to the device on the stream. Pinned, because an asynchronous copy from pageable memory may wait for
// the stream it is ordered on (the CUDA driver's API synchronization rules), and the codec stream waits for
// the copy queue: the thread that feeds the copy engine would stall until the copies drain. The caller
// writes host_words again only once the stream has passed the call.
constexpr uint64_t kCodecHostWords = 4;
struct CodecScratch {
  uintptr_t temp = 0;
  uint64_t temp_bytes = 0;
  uintptr_t sizes = 0;
  uint64_t* host_words = nullptr;
};

// A device's queue for codec work, beside the backend's copy queue, and the order between the two.
// The backend owns it (DeviceBackend::codec_stream).
class CodecStream {
 public:
  virtual ~CodecStream() = default;
  virtual void* handle() = 0;  // what codec calls are ordered on (a CUstream; nullptr on the host)
  // Copies `bytes` of device memory into pinned host memory, ordered after the codec work so far.
  virtual void to_host(uintptr_t device, void* host, uint64_t bytes) = 0;
  // Codec work enqueued from now on starts after every copy the backend has enqueued so far.
  virtual void after_copies() = 0;
  // A mark after the codec work enqueued so far; each is released once (wait or not).
  virtual uint64_t record() = 0;
  virtual void wait(uint64_t mark) = 0;  // on the host
  virtual void release(uint64_t mark) noexcept = 0;
  // Copies the backend enqueues from now on start after the codec work before `mark`.
  virtual void copies_after(uint64_t mark) = 0;
  virtual void synchronize() = 0;  // all codec work done (throws what the device reports)
  // Makes the device current on this thread for codec calls (CUDA: pushes its context); pop() undoes it.
  virtual void push() {}
  virtual void pop() noexcept {}
};

// push() for a scope.
class CodecScope {
 public:
  explicit CodecScope(CodecStream& stream) : stream_(stream) { stream_.push(); }
  ~CodecScope() { stream_.pop(); }
  CodecScope(const CodecScope&) = delete;
  CodecScope& operator=(const CodecScope&) = delete;

 private:
  CodecStream& stream_;
};

class Codec {
 public:
  virtual ~Codec() = default;
  virtual const char* name() const = 0;
  // Largest piece it takes, and the alignment it needs of addresses and sizes; a piece it cannot take
  // is sent plain.
  virtual uint64_t max_piece_bytes() const = 0;
  virtual bool accepts(uintptr_t address, uint64_t bytes) const = 0;
  // Size of a packed buffer for a piece of `plain_bytes`.
  virtual uint64_t max_packed_bytes(uint64_t plain_bytes) const = 0;
  // Device scratch memory for a batch of `count` pieces of at most `piece_bytes` (compress or decompress).
  virtual uint64_t temp_bytes(size_t count, uint64_t piece_bytes) = 0;
  // Writes each piece's packed size, as uint64, to scratch.sizes[i] (device memory).
  virtual void compress(const std::vector<CodecPiece>& pieces, const CodecScratch& scratch, CodecStream& stream) = 0;
  // Writes each piece's decoded size to scratch.sizes[i] (device memory): plain_bytes when it decoded, else not.
  virtual void decompress(const std::vector<CodecPiece>& pieces, const CodecScratch& scratch, CodecStream& stream) = 0;
};

// The codec for a backend: the reference codec on the host backends, nvCOMP on CUDA. nullptr when none
// can be had there, with `why` saying why (libnvcomp.so.6 not found, ...).
std::shared_ptr<Codec> codec_for(DeviceBackend& backend, std::string& why);

}  // namespace vse
