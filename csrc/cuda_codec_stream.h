// The codec queue of a CUDA device: a stream of its own beside the backend's copy stream, ordered
// against it by events, so compression of one chunk overlaps the copies of another.
#pragma once

#include <cuda.h>

#include <mutex>
#include <vector>

#include "codec.h"
#include "cuda_driver.h"

namespace vse {

class CudaCodecStream final : public CodecStream {
 public:
  // In `context`, beside `copy_stream` (both the backend's, outliving this).
  CudaCodecStream(const CudaDriver& driver, CUcontext context, CUstream copy_stream);
  ~CudaCodecStream() override;  // never destroyed in the process-wide allocator (the driver may be gone)
  CudaCodecStream(const CudaCodecStream&) = delete;
  CudaCodecStream& operator=(const CudaCodecStream&) = delete;

  void* handle() override { return stream_; }
  void to_host(uintptr_t device, void* host, uint64_t bytes) override;
  void after_copies() override;
  uint64_t record() override;
  void wait(uint64_t mark) override;
  void release(uint64_t mark) noexcept override;
  void copies_after(uint64_t mark) override;
  void synchronize() override;
  void push() override;
  void pop() noexcept override;

 private:
  class Scope;  // makes context_ current for a call
  const CudaDriver& driver_;
  CUcontext context_;
  CUstream copy_stream_;
  CUstream stream_ = nullptr;
  CUevent copies_done_ = nullptr;  // recorded on the copy stream for after_copies()
  std::mutex mutex_;               // guards spare_
  std::vector<CUevent> spare_;
};

}  // namespace vse
