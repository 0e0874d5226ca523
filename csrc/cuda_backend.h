// CUDA VMM backend: cuMemAddressReserve / cuMemCreate / cuMemMap / cuMemSetAccess / cuMemUnmap /
// cuMemRelease on each device's primary context (the one PyTorch uses), copies on a stream of our own.
// Memory is created gpuDirectRDMACapable where the device supports it with VMM (weight sync over NCCL
// with GPUDirect RDMA lands in the weights pool), and made accessible to every device that can access
// it as a peer (peer copies), as PyTorch's ExpandableSegment does.
#pragma once

#include <cuda.h>

#include <memory>
#include <mutex>
#include <vector>

#include "backend.h"
#include "cuda_codec_stream.h"
#include "cuda_driver.h"

namespace vse {

class CudaBackend final : public DeviceBackend {
 public:
  CudaBackend();  // over the process's libcuda; throws DriverUnavailable
  // Over `driver`, which outlives the backend (tests pass a table of fakes).
  explicit CudaBackend(const CudaDriver& driver);

  const char* name() const override { return "cuda"; }
  int device_count() override { return device_count_; }
  uint64_t granularity(int device) override;

  uintptr_t reserve(int device, uint64_t size) override;
  void unreserve(int device, uintptr_t address, uint64_t size) override;
  PhysicalHandle create(int device, uint64_t size) override;
  void release(int device, PhysicalHandle handle) override;
  void map(int device, uintptr_t address, uint64_t size, PhysicalHandle handle) override;
  void unmap(int device, uintptr_t address, uint64_t size) override;

  MemoryInfo memory_info(int device) override;
  void synchronize(int device) override;

  void pin(int device, void* host, uint64_t bytes) override;
  void unpin(int device, void* host) override;
  void enqueue_copies(int device, CopyDirection direction, const std::vector<CopySpan>& spans) override;
  void wait_copies(int device) override;
  void fill(int device, uintptr_t address, uint64_t bytes, uint8_t value) override;
  uint64_t record_mark(int device) override;
  void wait_mark(int device, uint64_t mark) override;
  void release_mark(int device, uint64_t mark) noexcept override;
  CodecStream* codec_stream(int device) override;  // cuda_codec_stream.cpp
  std::vector<double> prime_delays() const override;
  void prime(int device) override;

  // Whether `stream` is capturing a CUDA graph: asked in relaxed capture mode, so that asking never
  // breaks another thread's capture. Any error (no driver, an implicit capture of the legacy stream)
  // reads as capturing: the answer decides whether synchronizing is safe.
  static bool stream_is_capturing(const CudaDriver& driver, CUstream stream) noexcept;

 private:
  struct Device {
    CUdevice handle = 0;
    CUcontext context = nullptr;  // primary context, retained for the life of the process
    CUstream copy_stream = nullptr;
    uint64_t granularity = 0;
    CUmemAllocationProp properties{};     // what cuMemCreate gets (RDMA flag where supported)
    std::vector<CUmemAccessDesc> access;  // read-write for the device itself and each peer that can access it
    std::vector<CUevent> spare_events;  // guarded by CudaBackend::mutex_
    std::unique_ptr<CudaCodecStream> codec;  // made on first use, guarded by CudaBackend::mutex_
  };
  // Makes the device's primary context current for the scope (retaining it on first use).
  class ContextScope {
   public:
    ContextScope(CudaBackend& backend, int device);
    ~ContextScope();
    ContextScope(const ContextScope&) = delete;
    ContextScope& operator=(const ContextScope&) = delete;

   private:
    const CudaDriver* driver_ = nullptr;
  };
  // Pinning and unpinning are "potentially unsafe" calls for stream capture: made on any thread
  // while another thread captures a CUDA graph in global mode (torch.cuda.graph's default, vLLM's
  // capture at startup), they invalidate that capture. In relaxed mode for the call they do not
  // (PyTorch does the same around cudaMalloc). The background prepare runs during vLLM's capture.
  class RelaxedCaptureScope {
   public:
    explicit RelaxedCaptureScope(const CudaDriver& driver);
    ~RelaxedCaptureScope();
    RelaxedCaptureScope(const RelaxedCaptureScope&) = delete;
    RelaxedCaptureScope& operator=(const RelaxedCaptureScope&) = delete;

   private:
    const CudaDriver& driver_;
    int previous_ = 0;
  };
  Device& device(int index);

  const CudaDriver& driver_;
  int device_count_ = 0;
  std::mutex mutex_;  // guards lazy set-up of devices_
  std::vector<std::unique_ptr<Device>> devices_;
};

// stream_is_capturing over the process's libcuda.
bool stream_is_capturing(CUstream stream) noexcept;

}  // namespace vse
