#include "host_codec_stream.h"

#include <cstring>

namespace vse {

void HostCodecStream::to_host(uintptr_t device, void* host, uint64_t bytes) {
  std::memcpy(host, reinterpret_cast<const void*>(device), bytes);
}

}  // namespace vse
