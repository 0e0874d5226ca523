#include "cuda_backend.h"

#include <string>

#include "cuda_driver.h"
#include "errors.h"

namespace vse {
namespace {

CUmemAllocationProp device_memory_properties(CUdevice device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  return prop;
}

}  // namespace

CudaBackend::CudaBackend() {
  const CudaDriver& d = cuda_driver();
  VSE_CUDA_CHECK(d.cuDeviceGetCount(&device_count_));
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
    const CudaDriver& d = cuda_driver();
    auto dev = std::make_unique<Device>();
    VSE_CUDA_CHECK(d.cuDeviceGet(&dev->handle, index));
    VSE_CUDA_CHECK(d.cuDevicePrimaryCtxRetain(&dev->context, dev->handle));
    VSE_CUDA_CHECK(d.cuCtxPushCurrent(dev->context));
    CUcontext popped = nullptr;
    CUresult stream_result = d.cuStreamCreate(&dev->copy_stream, CU_STREAM_NON_BLOCKING);
    d.cuCtxPopCurrent(&popped);
    VSE_CUDA_CHECK(stream_result);
    CUmemAllocationProp prop = device_memory_properties(dev->handle);
    size_t granularity = 0;
    VSE_CUDA_CHECK(d.cuMemGetAllocationGranularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    dev->granularity = granularity;
    slot = std::move(dev);
  }
  return *slot;
}

CudaBackend::ContextScope::ContextScope(CudaBackend& backend, int device) {
  VSE_CUDA_CHECK(cuda_driver().cuCtxPushCurrent(backend.device(device).context));
}

CudaBackend::ContextScope::~ContextScope() {
  CUcontext popped = nullptr;
  cuda_driver().cuCtxPopCurrent(&popped);
}

uint64_t CudaBackend::granularity(int device_index) { return device(device_index).granularity; }

uintptr_t CudaBackend::reserve(int device_index, uint64_t size) {
  ContextScope scope(*this, device_index);
  CUdeviceptr address = 0;
  VSE_CUDA_CHECK(cuda_driver().cuMemAddressReserve(&address, size, device(device_index).granularity, 0, 0));
  return static_cast<uintptr_t>(address);
}

void CudaBackend::unreserve(int device_index, uintptr_t address, uint64_t size) {
  ContextScope scope(*this, device_index);
  VSE_CUDA_CHECK(cuda_driver().cuMemAddressFree(static_cast<CUdeviceptr>(address), size));
}

PhysicalHandle CudaBackend::create(int device_index, uint64_t size) {
  ContextScope scope(*this, device_index);
  CUmemAllocationProp prop = device_memory_properties(device(device_index).handle);
  CUmemGenericAllocationHandle handle = 0;
  VSE_CUDA_CHECK(cuda_driver().cuMemCreate(&handle, size, &prop, 0));
  return static_cast<PhysicalHandle>(handle);
}

void CudaBackend::release(int device_index, PhysicalHandle handle) {
  ContextScope scope(*this, device_index);
  VSE_CUDA_CHECK(cuda_driver().cuMemRelease(static_cast<CUmemGenericAllocationHandle>(handle)));
}

void CudaBackend::map(int device_index, uintptr_t address, uint64_t size, PhysicalHandle handle) {
  ContextScope scope(*this, device_index);
  const CudaDriver& d = cuda_driver();
  CUdeviceptr ptr = static_cast<CUdeviceptr>(address);
  VSE_CUDA_CHECK(d.cuMemMap(ptr, size, 0, static_cast<CUmemGenericAllocationHandle>(handle), 0));
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device(device_index).handle;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  CUresult r = d.cuMemSetAccess(ptr, size, &access, 1);
  if (r != CUDA_SUCCESS) {
    d.cuMemUnmap(ptr, size);
    VSE_CUDA_CHECK(r);
  }
}

void CudaBackend::unmap(int device_index, uintptr_t address, uint64_t size) {
  ContextScope scope(*this, device_index);
  VSE_CUDA_CHECK(cuda_driver().cuMemUnmap(static_cast<CUdeviceptr>(address), size));
}

MemoryInfo CudaBackend::memory_info(int device_index) {
  ContextScope scope(*this, device_index);
  size_t free = 0, total = 0;
  VSE_CUDA_CHECK(cuda_driver().cuMemGetInfo(&free, &total));
  return {free, total};
}

void CudaBackend::synchronize(int device_index) {
  ContextScope scope(*this, device_index);
  VSE_CUDA_CHECK(cuda_driver().cuCtxSynchronize());
}

void CudaBackend::pin(int device_index, void* host, uint64_t bytes) {
  ContextScope scope(*this, device_index);
  // PORTABLE: the pinning holds for every context, so one backup arena serves any device.
  VSE_CUDA_CHECK(cuda_driver().cuMemHostRegister(host, bytes, CU_MEMHOSTREGISTER_PORTABLE));
}

void CudaBackend::unpin(int device_index, void* host) {
  ContextScope scope(*this, device_index);
  VSE_CUDA_CHECK(cuda_driver().cuMemHostUnregister(host));
}

void CudaBackend::enqueue_copies(int device_index, CopyDirection direction, const std::vector<CopySpan>& spans) {
  ContextScope scope(*this, device_index);
  const CudaDriver& d = cuda_driver();
  CUstream stream = device(device_index).copy_stream;
  for (const CopySpan& s : spans) {
    if (direction == CopyDirection::ToHost)
      VSE_CUDA_CHECK(d.cuMemcpyDtoHAsync(s.host, static_cast<CUdeviceptr>(s.device), s.bytes, stream));
    else
      VSE_CUDA_CHECK(d.cuMemcpyHtoDAsync(static_cast<CUdeviceptr>(s.device), s.host, s.bytes, stream));
  }
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
  const CudaDriver& d = cuda_driver();
  if (!event) VSE_CUDA_CHECK(d.cuEventCreate(&event, CU_EVENT_DISABLE_TIMING));
  CUresult r = d.cuEventRecord(event, dev.copy_stream);
  if (r != CUDA_SUCCESS) release_mark(device_index, reinterpret_cast<uint64_t>(event));
  VSE_CUDA_CHECK(r);
  return reinterpret_cast<uint64_t>(event);
}

void CudaBackend::wait_mark(int device_index, uint64_t mark) {
  ContextScope scope(*this, device_index);
  VSE_CUDA_CHECK(cuda_driver().cuEventSynchronize(reinterpret_cast<CUevent>(mark)));
}

void CudaBackend::release_mark(int device_index, uint64_t mark) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  devices_[device_index]->spare_events.push_back(reinterpret_cast<CUevent>(mark));
}

void CudaBackend::wait_copies(int device_index) {
  ContextScope scope(*this, device_index);
  VSE_CUDA_CHECK(cuda_driver().cuStreamSynchronize(device(device_index).copy_stream));
}

}  // namespace vse
