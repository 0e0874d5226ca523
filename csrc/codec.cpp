#include "codec.h"

#include <cstring>

#include "backend.h"
#include "nvcomp_codec.h"
#include "reference_codec.h"

namespace vse {

std::shared_ptr<Codec> codec_for(DeviceBackend& backend, std::string& why) {
  if (std::strcmp(backend.name(), "cuda") == 0) return load_nvcomp_codec(why);
  return std::make_shared<ReferenceCodec>();  // host memory stands for the device
}

}  // namespace vse
