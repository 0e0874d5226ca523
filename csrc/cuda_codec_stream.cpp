#include "cuda_codec_stream.h"

#include "cuda_backend.h"
#include "errors.h"

#define VSE_CU(call) ::vse::check_cuda(driver_, (call), #call)

namespace vse {

class CudaCodecStream::Scope {
 public:
  explicit Scope(CudaCodecStream& s) : driver_(s.driver_) { VSE_CU(driver_.cuCtxPushCurrent(s.context_)); }
  ~Scope() {
    CUcontext popped = nullptr;
    driver_.cuCtxPopCurrent(&popped);
  }

 private:
  const CudaDriver& driver_;
};

CudaCodecStream::CudaCodecStream(const CudaDriver& driver, CUcontext context, CUstream copy_stream)
    : driver_(driver), context_(context), copy_stream_(copy_stream) {
  Scope scope(*this);
  VSE_CU(driver_.cuStreamCreate(&stream_, CU_STREAM_NON_BLOCKING));
  VSE_CU(driver_.cuEventCreate(&copies_done_, CU_EVENT_DISABLE_TIMING));
}

CudaCodecStream::~CudaCodecStream() {
  // Streams and events go with the context; only the events are given back here.
  if (copies_done_) driver_.cuEventDestroy(copies_done_);
  for (CUevent e : spare_) driver_.cuEventDestroy(e);
}

void CudaCodecStream::to_host(uintptr_t device, void* host, uint64_t bytes) {
  Scope scope(*this);
  VSE_CU(driver_.cuMemcpyDtoHAsync(host, static_cast<CUdeviceptr>(device), bytes, stream_));
}

void CudaCodecStream::after_copies() {
  Scope scope(*this);
  VSE_CU(driver_.cuEventRecord(copies_done_, copy_stream_));
  VSE_CU(driver_.cuStreamWaitEvent(stream_, copies_done_, 0));
}

uint64_t CudaCodecStream::record() {
  Scope scope(*this);
  CUevent event = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!spare_.empty()) {
      event = spare_.back();
      spare_.pop_back();
    }
  }
  if (!event) VSE_CU(driver_.cuEventCreate(&event, CU_EVENT_DISABLE_TIMING));
  CUresult r = driver_.cuEventRecord(event, stream_);
  if (r != CUDA_SUCCESS) release(reinterpret_cast<uint64_t>(event));
  VSE_CU(r);
  return reinterpret_cast<uint64_t>(event);
}

void CudaCodecStream::wait(uint64_t mark) {
  Scope scope(*this);
  VSE_CU(driver_.cuEventSynchronize(reinterpret_cast<CUevent>(mark)));
}

void CudaCodecStream::release(uint64_t mark) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  spare_.push_back(reinterpret_cast<CUevent>(mark));
}

void CudaCodecStream::copies_after(uint64_t mark) {
  Scope scope(*this);
  VSE_CU(driver_.cuStreamWaitEvent(copy_stream_, reinterpret_cast<CUevent>(mark), 0));
}

void CudaCodecStream::synchronize() {
  Scope scope(*this);
  VSE_CU(driver_.cuStreamSynchronize(stream_));
}

void CudaCodecStream::push() { VSE_CU(driver_.cuCtxPushCurrent(context_)); }

void CudaCodecStream::pop() noexcept {
  CUcontext popped = nullptr;
  driver_.cuCtxPopCurrent(&popped);
}

CodecStream* CudaBackend::codec_stream(int device_index) {
  Device& dev = device(device_index);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!dev.codec) dev.codec = std::make_unique<CudaCodecStream>(driver_, dev.context, dev.copy_stream);
  return dev.codec.get();
}

}  // namespace vse
