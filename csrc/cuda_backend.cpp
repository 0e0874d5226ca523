#include "cuda_backend.h"

#include <string>

#include "errors.h"

// Checks a driver call of this backend, naming it in the error.
#define VSE_CU(call) ::vse::check_cuda(driver_, (call), #call)

namespace vse {

CudaBackend::CudaBackend() : CudaBackend(cuda_driver()) {}

CudaBackend::CudaBackend(const CudaDriver& driver) : driver_(driver) {
  VSE_CU(driver_.cuDeviceGetCount(&device_count_));
  if (device_count_ == 0) throw DriverUnavailable("CUDA driver found but it reports no device");
  devices_.resize(device_count_);
}

CudaBackend::Device& CudaBackend::device(int index) {
  if (index < 0 || index >= device_count_)
    throw InvalidArgument("CUDA device " + std::to_string(index) + " does not exist (" +
                          std::to_string(device_count_) + " devices)");
  std::lock_guard<std::mutex> lock(mutex_);
  std::unique_ptr<Device>& slot = devices_[index];
  if (!slot) {
    const CudaDriver& d = driver_;
    auto dev = std::make_unique<Device>();
    VSE_CU(d.cuDeviceGet(&dev->handle, index));
    VSE_CU(d.cuDevicePrimaryCtxRetain(&dev->context, dev->handle));
    VSE_CU(d.cuCtxPushCurrent(dev->context));
    CUcontext popped = nullptr;
    CUresult stream_result = d.cuStreamCreate(&dev->copy_stream, CU_STREAM_NON_BLOCKING);
    d.cuCtxPopCurrent(&popped);
    VSE_CU(stream_result);

    int rdma = 0;
    VSE_CU(d.cuDeviceGetAttribute(&rdma, CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED, dev->handle));
    CUmemAllocationProp& prop = dev->properties;
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev->handle;
    prop.allocFlags.gpuDirectRDMACapable = rdma ? 1 : 0;
    size_t granularity = 0;
    VSE_CU(d.cuMemGetAllocationGranularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    dev->granularity = granularity;

    auto read_write = [](CUdevice on) {
      CUmemAccessDesc access{};
      access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
      access.location.id = on;
      access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
      return access;
    };
    dev->access.push_back(read_write(dev->handle));
    for (int other = 0; other < device_count_; ++other) {
      if (other == index) continue;
      CUdevice peer = 0;
      int can_access = 0;
      VSE_CU(d.cuDeviceGet(&peer, other));
      VSE_CU(d.cuDeviceCanAccessPeer(&can_access, peer, dev->handle));
      if (can_access) dev->access.push_back(read_write(peer));
    }
    slot = std::move(dev);
  }
  return *slot;
}

CudaBackend::ContextScope::ContextScope(CudaBackend& backend, int device) {
  check_cuda(backend.driver_, backend.driver_.cuCtxPushCurrent(backend.device(device).context), "cuCtxPushCurrent");
  driver_ = &backend.driver_;
}

CudaBackend::ContextScope::~ContextScope() {
  CUcontext popped = nullptr;
  driver_->cuCtxPopCurrent(&popped);
}

uint64_t CudaBackend::granularity(int device_index) { return device(device_index).granularity; }

uintptr_t CudaBackend::reserve(int device_index, uint64_t size) {
  ContextScope scope(*this, device_index);
  CUdeviceptr address = 0;
  VSE_CU(driver_.cuMemAddressReserve(&address, size, device(device_index).granularity, 0, 0));
  return static_cast<uintptr_t>(address);
}

void CudaBackend::unreserve(int device_index, uintptr_t address, uint64_t size) {
  ContextScope scope(*this, device_index);
  VSE_CU(driver_.cuMemAddressFree(static_cast<CUdeviceptr>(address), size));
}

PhysicalHandle CudaBackend::create(int device_index, uint64_t size) {
  ContextScope scope(*this, device_index);
  CUmemGenericAllocationHandle handle = 0;
  VSE_CU(driver_.cuMemCreate(&handle, size, &device(device_index).properties, 0));
  return static_cast<PhysicalHandle>(handle);
}

void CudaBackend::release(int device_index, PhysicalHandle handle) {
  ContextScope scope(*this, device_index);
  VSE_CU(driver_.cuMemRelease(static_cast<CUmemGenericAllocationHandle>(handle)));
}

// The first prime comes when the driver's work after releasing 96 GiB has appeared on the H200 (0.3 s),
// the later ones for larger releases, cleared for longer (Note [Priming the next create]).
std::vector<double> CudaBackend::prime_delays() const { return {0.3, 1.0, 3.0}; }

void CudaBackend::prime(int device_index) { release(device_index, create(device_index, granularity(device_index))); }

void CudaBackend::map(int device_index, uintptr_t address, uint64_t size, PhysicalHandle handle) {
  ContextScope scope(*this, device_index);
  const std::vector<CUmemAccessDesc>& access = device(device_index).access;
  CUdeviceptr ptr = static_cast<CUdeviceptr>(address);
  VSE_CU(driver_.cuMemMap(ptr, size, 0, static_cast<CUmemGenericAllocationHandle>(handle), 0));
  CUresult r = driver_.cuMemSetAccess(ptr, size, access.data(), access.size());
  if (r != CUDA_SUCCESS) {
    driver_.cuMemUnmap(ptr, size);  // the access error is the one to report
    VSE_CU(r);
  }
}

void CudaBackend::unmap(int device_index, uintptr_t address, uint64_t size) {
  ContextScope scope(*this, device_index);
  VSE_CU(driver_.cuMemUnmap(static_cast<CUdeviceptr>(address), size));
}

MemoryInfo CudaBackend::memory_info(int device_index) {
  ContextScope scope(*this, device_index);
  size_t free = 0, total = 0;
  VSE_CU(driver_.cuMemGetInfo(&free, &total));
  return {free, total};
}

void CudaBackend::synchronize(int device_index) {
  ContextScope scope(*this, device_index);
  VSE_CU(driver_.cuCtxSynchronize());
}

CudaBackend::RelaxedCaptureScope::RelaxedCaptureScope(const CudaDriver& driver) : driver_(driver) {
  CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
  check_cuda(driver_, driver_.cuThreadExchangeStreamCaptureMode(&mode), "cuThreadExchangeStreamCaptureMode");
  previous_ = mode;
}

CudaBackend::RelaxedCaptureScope::~RelaxedCaptureScope() {
  CUstreamCaptureMode mode = static_cast<CUstreamCaptureMode>(previous_);
  driver_.cuThreadExchangeStreamCaptureMode(&mode);
}

bool CudaBackend::stream_is_capturing(const CudaDriver& driver, CUstream stream) noexcept {
  try {
    RelaxedCaptureScope relaxed(driver);
    CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_ACTIVE;
    return driver.cuStreamIsCapturing(stream, &status) != CUDA_SUCCESS || status != CU_STREAM_CAPTURE_STATUS_NONE;
  } catch (...) {
    return true;
  }
}

bool stream_is_capturing(CUstream stream) noexcept {
  try {
    return CudaBackend::stream_is_capturing(cuda_driver(), stream);
  } catch (...) {
    return true;
  }
}

void CudaBackend::pin(int device_index, void* host, uint64_t bytes) {
  ContextScope scope(*this, device_index);
  RelaxedCaptureScope relaxed(driver_);
  // PORTABLE: the pinning holds for every context, so one backup arena serves any device.
  check_cuda(driver_, driver_.cuMemHostRegister(host, bytes, CU_MEMHOSTREGISTER_PORTABLE),
             "cuMemHostRegister(host, bytes, CU_MEMHOSTREGISTER_PORTABLE)", OutOfMemory::Host);
}

void CudaBackend::unpin(int device_index, void* host) {
  ContextScope scope(*this, device_index);
  RelaxedCaptureScope relaxed(driver_);
  VSE_CU(driver_.cuMemHostUnregister(host));
}

void CudaBackend::enqueue_copies(int device_index, CopyDirection direction, const std::vector<CopySpan>& spans) {
  ContextScope scope(*this, device_index);
  CUstream stream = device(device_index).copy_stream;
  for (const CopySpan& s : spans) {
    if (direction == CopyDirection::ToHost)
      VSE_CU(driver_.cuMemcpyDtoHAsync(s.host, static_cast<CUdeviceptr>(s.device), s.bytes, stream));
    else
      VSE_CU(driver_.cuMemcpyHtoDAsync(static_cast<CUdeviceptr>(s.device), s.host, s.bytes, stream));
  }
}

void CudaBackend::fill(int device_index, uintptr_t address, uint64_t bytes, uint8_t value) {
  ContextScope scope(*this, device_index);
  // On the copy stream, so the fill lands before the copies enqueued after it.
  VSE_CU(driver_.cuMemsetD8Async(static_cast<CUdeviceptr>(address), value, bytes, device(device_index).copy_stream));
}

uint64_t CudaBackend::record_mark(int device_index) {
  ContextScope scope(*this, device_index);
  Device& dev = device(device_index);
  CUevent event = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!dev.spare_events.empty()) {
      event = dev.spare_events.back();
      dev.spare_events.pop_back();
    }
  }
  if (!event) VSE_CU(driver_.cuEventCreate(&event, CU_EVENT_DISABLE_TIMING));
  CUresult r = driver_.cuEventRecord(event, dev.copy_stream);
  if (r != CUDA_SUCCESS) release_mark(device_index, reinterpret_cast<uint64_t>(event));
  VSE_CU(r);
  return reinterpret_cast<uint64_t>(event);
}

void CudaBackend::wait_mark(int device_index, uint64_t mark) {
  ContextScope scope(*this, device_index);
  VSE_CU(driver_.cuEventSynchronize(reinterpret_cast<CUevent>(mark)));
}

void CudaBackend::release_mark(int device_index, uint64_t mark) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  devices_[device_index]->spare_events.push_back(reinterpret_cast<CUevent>(mark));
}

void CudaBackend::wait_copies(int device_index) {
  ContextScope scope(*this, device_index);
  VSE_CU(driver_.cuStreamSynchronize(device(device_index).copy_stream));
}

}  // namespace vse
