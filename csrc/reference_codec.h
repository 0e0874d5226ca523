// The reference codec: plain C++ over host memory, for the host backends (CPU tests, demo). Real lossless
// coding that shrinks bf16-like data, so the tests see pieces kept packed and pieces sent plain:
// 16-bit words split into planes; the high bytes (sign and exponent of bf16/fp16, which take few values
// in weights) as 4-bit codes into a table of the 15 most frequent values, an escape code followed by the
// byte for the rest; the low bytes as they are. bf16 Gaussian weights: ~0.76 of the size; random bytes
// grow (~1.25), so they are sent plain.
#pragma once

#include "codec.h"

namespace vse {

class ReferenceCodec final : public Codec {
 public:
  const char* name() const override { return "reference"; }
  uint64_t max_piece_bytes() const override { return 1ull << 30; }
  bool accepts(uintptr_t, uint64_t bytes) const override { return bytes > 0; }
  uint64_t max_packed_bytes(uint64_t plain_bytes) const override;
  uint64_t temp_bytes(size_t, uint64_t) override { return 0; }
  void compress(const std::vector<CodecPiece>& pieces, const CodecScratch& scratch, CodecStream& stream) override;
  void decompress(const std::vector<CodecPiece>& pieces, const CodecScratch& scratch, CodecStream& stream) override;

  // One piece; encode returns the packed size, decode the plain size it produced (0 for a corrupt stream).
  static uint64_t encode(const uint8_t* plain, uint64_t plain_bytes, uint8_t* packed);
  static uint64_t decode(const uint8_t* packed, uint64_t packed_bytes, uint8_t* plain, uint64_t plain_bytes);
};

}  // namespace vse
