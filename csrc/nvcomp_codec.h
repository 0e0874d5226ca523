// nvCOMP's batched ANS on the GPU, reached through dlopen("libnvcomp.so.6") so that the build needs no
// nvCOMP headers and the module imports where the library is absent. bf16 and fp16 backups are coded
// with data type float16 (benchmarks/RESULTS.md section 10: 0.685 of the size at 531 GB/s compress,
// 946 GB/s decompress on an H200); other data takes the same path and is sent plain when it does not pay.
#pragma once

#include <memory>
#include <string>

#include "codec.h"

namespace vse {

// nullptr when libnvcomp.so.6 (or one of its entry points) cannot be had, with `why` saying so.
std::shared_ptr<Codec> load_nvcomp_codec(std::string& why);

}  // namespace vse
