#include "nvcomp_codec.h"

#include <dlfcn.h>

#include <cstring>
#include <mutex>

#include "cuda_driver.h"
#include "errors.h"

namespace vse {
namespace {

// The few declarations of nvCOMP 6's C API (nvcomp/ans.h, nvcomp/shared_types.h) used here.
using nvcompStatus = int;
constexpr nvcompStatus kSuccess = 0;
constexpr int kTypeFloat16 = 10;  // NVCOMP_TYPE_FLOAT16
constexpr uint64_t kMaxChunkBytes = 1ull << 24;  // nvcompANSCompressionMaxAllowedChunkSize
constexpr uint64_t kAlignment = 16;              // nvcompANSRequired{C,Dec}ompressionAlignment

struct CompressOpts {  // nvcompBatchedANSCompressOpts_t
  int type;            // nvcomp_rANS = 0
  int data_type;
  uint8_t max_sub_chunk_count;
  uint8_t states_per_lane;
  uint8_t histogram_reduction_log2;
  char reserved[53];
};
struct DecompressOpts {  // nvcompBatchedANSDecompressOpts_t
  int backend;           // NVCOMP_DECOMPRESS_BACKEND_DEFAULT = 0
  int data_type;
  uint8_t max_sub_chunk_count;
  uint8_t states_per_lane;
  uint8_t skip_validate;
  char reserved[53];
};

using CompressTempFn = nvcompStatus (*)(size_t, size_t, CompressOpts, size_t*, size_t, void*);
using MaxOutputFn = nvcompStatus (*)(size_t, CompressOpts, size_t*);
using CompressFn = nvcompStatus (*)(const void* const*, const size_t*, size_t, size_t, void*, size_t, void* const*,
                                    size_t*, CompressOpts, nvcompStatus*, void*);
using DecompressTempFn = nvcompStatus (*)(size_t, size_t, DecompressOpts, size_t*, size_t, void*);
using DecompressFn = nvcompStatus (*)(const void* const*, const size_t*, const size_t*, size_t*, size_t, void* const,
                                      size_t, void* const*, DecompressOpts, nvcompStatus*, void*);

uint64_t align_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

class NvcompCodec final : public Codec {
 public:
  NvcompCodec(CompressTempFn ct, MaxOutputFn mo, CompressFn c, DecompressTempFn dt, DecompressFn d)
      : compress_temp_(ct), max_output_(mo), compress_(c), decompress_temp_(dt), decompress_(d) {
    std::memset(&copts_, 0, sizeof copts_);
    copts_.data_type = kTypeFloat16;
    std::memset(&dopts_, 0, sizeof dopts_);
    dopts_.data_type = kTypeFloat16;
  }
  const char* name() const override { return "nvcomp-ans"; }
  uint64_t max_piece_bytes() const override { return kMaxChunkBytes; }
  bool accepts(uintptr_t address, uint64_t bytes) const override {
    return bytes > 0 && bytes <= kMaxChunkBytes && address % kAlignment == 0 && bytes % 2 == 0;
  }
  uint64_t max_packed_bytes(uint64_t plain_bytes) const override {
    size_t out = 0;
    check(max_output_(plain_bytes, copts_, &out), "nvcompBatchedANSCompressGetMaxOutputChunkSize");
    return align_up(out, kAlignment);
  }
  // nvCOMP's own scratch, then the device arrays of a batch: 5 arrays of 8-byte entries and statuses.
  uint64_t temp_bytes(size_t count, uint64_t piece_bytes) override {
    size_t c = 0, d = 0;
    check(compress_temp_(count, piece_bytes, copts_, &c, count * piece_bytes, nullptr),
          "nvcompBatchedANSCompressGetTempSize");
    check(decompress_temp_(count, piece_bytes, dopts_, &d, count * piece_bytes, nullptr),
          "nvcompBatchedANSDecompressGetTempSize");
    return align_up(std::max(c, d), 256) + arrays_bytes(count);
  }
  void compress(const std::vector<CodecPiece>& pieces, const CodecScratch& scratch, CodecStream& stream) override {
    const size_t n = pieces.size();
    uint64_t* host = scratch.host_words;
    uint64_t largest = 0;
    for (size_t i = 0; i < n; ++i) {
      host[i] = pieces[i].plain_address;
      host[n + i] = pieces[i].plain_bytes;
      host[2 * n + i] = pieces[i].packed_address;
      host[3 * n + i] = 0;
      largest = std::max(largest, pieces[i].plain_bytes);
    }
    const uintptr_t arrays = send_arrays(scratch, n, stream);
    auto* a = reinterpret_cast<uint64_t*>(arrays);
    check(compress_(reinterpret_cast<const void* const*>(a), reinterpret_cast<const size_t*>(a + n), largest, n,
                    reinterpret_cast<void*>(scratch.temp), scratch.temp_bytes - arrays_bytes(n),
                    reinterpret_cast<void* const*>(a + 2 * n), reinterpret_cast<size_t*>(scratch.sizes), copts_,
                    reinterpret_cast<nvcompStatus*>(a + 4 * n), stream.handle()),
          "nvcompBatchedANSCompressAsync");
  }
  void decompress(const std::vector<CodecPiece>& pieces, const CodecScratch& scratch, CodecStream& stream) override {
    const size_t n = pieces.size();
    uint64_t* host = scratch.host_words;
    for (size_t i = 0; i < n; ++i) {
      host[i] = pieces[i].packed_address;
      host[n + i] = pieces[i].packed_bytes;
      host[2 * n + i] = pieces[i].plain_bytes;
      host[3 * n + i] = pieces[i].plain_address;
    }
    const uintptr_t arrays = send_arrays(scratch, n, stream);
    auto* a = reinterpret_cast<uint64_t*>(arrays);
    check(decompress_(reinterpret_cast<const void* const*>(a), reinterpret_cast<const size_t*>(a + n),
                      reinterpret_cast<const size_t*>(a + 2 * n), reinterpret_cast<size_t*>(scratch.sizes), n,
                      reinterpret_cast<void*>(scratch.temp), scratch.temp_bytes - arrays_bytes(n),
                      reinterpret_cast<void* const*>(a + 3 * n), dopts_, reinterpret_cast<nvcompStatus*>(a + 4 * n),
                      stream.handle()),
          "nvcompBatchedANSDecompressAsync");
  }

 private:
  static uint64_t arrays_bytes(size_t count) { return align_up((kCodecHostWords + 1) * 8 * count, 256); }
  static void check(nvcompStatus status, const char* call) {
    if (status != kSuccess) throw Error(std::string(call) + " failed with nvcompStatus_t " + std::to_string(status));
  }
  // The batch's pointer and size arrays (kCodecHostWords per piece, from the caller's pinned words) go to the
  // tail of `temp` on the codec stream, followed there by nvCOMP's statuses.
  static uintptr_t send_arrays(const CodecScratch& scratch, size_t n, CodecStream& stream) {
    const uintptr_t arrays = scratch.temp + scratch.temp_bytes - arrays_bytes(n);
    const CudaDriver& d = cuda_driver();
    check_cuda(d,
               d.cuMemcpyHtoDAsync(static_cast<CUdeviceptr>(arrays), scratch.host_words, kCodecHostWords * 8 * n,
                                   static_cast<CUstream>(stream.handle())),
               "cuMemcpyHtoDAsync (nvCOMP batch arrays)");
    return arrays;
  }

  CompressTempFn compress_temp_;
  MaxOutputFn max_output_;
  CompressFn compress_;
  DecompressTempFn decompress_temp_;
  DecompressFn decompress_;
  CompressOpts copts_;
  DecompressOpts dopts_;
};

}  // namespace

std::shared_ptr<Codec> load_nvcomp_codec(std::string& why) {
  // Opened once per process and never closed: codecs may outlive any one allocator. A failure is not
  // remembered: the library may be loaded later (vllm_sleep_ext.compress preloads it from its wheel).
  static std::mutex mutex;
  static void* library = nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  if (!library) library = dlopen("libnvcomp.so.6", RTLD_NOW | RTLD_GLOBAL);
  if (!library) {
    const char* e = dlerror();
    why = std::string("libnvcomp.so.6 could not be loaded (") + (e ? e : "unknown error") +
          "); install nvidia-libnvcomp-cu13 6.x";
    return nullptr;
  }
  auto sym = [&](const char* name) {
    void* f = dlsym(library, name);
    if (!f) why = std::string("libnvcomp.so.6 lacks ") + name + " (nvCOMP 6 expected)";
    return f;
  };
  auto ct = reinterpret_cast<CompressTempFn>(sym("nvcompBatchedANSCompressGetTempSize"));
  auto mo = reinterpret_cast<MaxOutputFn>(sym("nvcompBatchedANSCompressGetMaxOutputChunkSize"));
  auto c = reinterpret_cast<CompressFn>(sym("nvcompBatchedANSCompressAsync"));
  auto dt = reinterpret_cast<DecompressTempFn>(sym("nvcompBatchedANSDecompressGetTempSize"));
  auto d = reinterpret_cast<DecompressFn>(sym("nvcompBatchedANSDecompressAsync"));
  if (!ct || !mo || !c || !dt || !d) return nullptr;
  return std::make_shared<NvcompCodec>(ct, mo, c, dt, d);
}

}  // namespace vse
