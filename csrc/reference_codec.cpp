#include "reference_codec.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>

namespace vse {
namespace {

// Layout of a packed piece: u32 escape count, 15 table bytes, one pad byte, then the nibble codes of the
// high bytes (two per byte, low nibble first), the escaped high bytes, the low bytes, and an odd last byte.
constexpr uint64_t kHeaderBytes = 20;
constexpr uint8_t kEscape = 15;

}  // namespace

uint64_t ReferenceCodec::max_packed_bytes(uint64_t plain_bytes) const {
  const uint64_t words = plain_bytes / 2;
  return kHeaderBytes + (words + 1) / 2 + 2 * words + plain_bytes % 2;
}

uint64_t ReferenceCodec::encode(const uint8_t* plain, uint64_t plain_bytes, uint8_t* packed) {
  const uint64_t words = plain_bytes / 2;
  std::array<uint64_t, 256> counts{};
  for (uint64_t i = 0; i < words; ++i) counts[plain[2 * i + 1]] += 1;
  std::array<uint8_t, 256> order;
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](uint8_t a, uint8_t b) { return counts[a] > counts[b]; });
  std::array<uint8_t, 256> code;
  code.fill(kEscape);
  for (uint8_t k = 0; k < kEscape; ++k) code[order[k]] = k;

  uint8_t* nibbles = packed + kHeaderBytes;
  uint8_t* escapes = nibbles + (words + 1) / 2;
  std::memset(nibbles, 0, (words + 1) / 2);
  uint32_t escaped = 0;
  for (uint64_t i = 0; i < words; ++i) {
    const uint8_t high = plain[2 * i + 1];
    const uint8_t c = code[high];
    nibbles[i / 2] |= static_cast<uint8_t>(c << (4 * (i % 2)));
    if (c == kEscape) escapes[escaped++] = high;
  }
  uint8_t* low = escapes + escaped;
  for (uint64_t i = 0; i < words; ++i) low[i] = plain[2 * i];
  uint8_t* end = low + words;
  if (plain_bytes % 2) *end++ = plain[plain_bytes - 1];
  std::memcpy(packed, &escaped, 4);
  for (uint8_t k = 0; k < kEscape; ++k) packed[4 + k] = order[k];
  packed[4 + kEscape] = 0;
  return static_cast<uint64_t>(end - packed);
}

uint64_t ReferenceCodec::decode(const uint8_t* packed, uint64_t packed_bytes, uint8_t* plain, uint64_t plain_bytes) {
  const uint64_t words = plain_bytes / 2;
  if (packed_bytes < kHeaderBytes) return 0;
  uint32_t escaped = 0;
  std::memcpy(&escaped, packed, 4);
  const uint64_t expected = kHeaderBytes + (words + 1) / 2 + escaped + words + plain_bytes % 2;
  if (escaped > words || packed_bytes != expected) return 0;
  const uint8_t* table = packed + 4;
  const uint8_t* nibbles = packed + kHeaderBytes;
  const uint8_t* escapes = nibbles + (words + 1) / 2;
  const uint8_t* low = escapes + escaped;
  uint32_t used = 0;
  for (uint64_t i = 0; i < words; ++i) {
    const uint8_t c = (nibbles[i / 2] >> (4 * (i % 2))) & 0xF;
    if (c == kEscape) {
      if (used == escaped) return 0;
      plain[2 * i + 1] = escapes[used++];
    } else {
      plain[2 * i + 1] = table[c];
    }
    plain[2 * i] = low[i];
  }
  if (used != escaped) return 0;
  if (plain_bytes % 2) plain[plain_bytes - 1] = low[words];
  return plain_bytes;
}

namespace {
// The batch's arrays in the caller's host words, as a device codec sends them (so the sanitizers see a
// staging too small for the batch).
void fill_host_words(const std::vector<CodecPiece>& pieces, uint64_t* words) {
  const size_t n = pieces.size();
  for (size_t i = 0; i < n; ++i) {
    words[i] = pieces[i].plain_address;
    words[n + i] = pieces[i].plain_bytes;
    words[2 * n + i] = pieces[i].packed_address;
    words[3 * n + i] = pieces[i].packed_bytes;
  }
}
}  // namespace

// Host memory is the "device" here: pointers are used as they are, and the work is done on the call.
void ReferenceCodec::compress(const std::vector<CodecPiece>& pieces, const CodecScratch& scratch, CodecStream&) {
  fill_host_words(pieces, scratch.host_words);
  auto* out = reinterpret_cast<uint64_t*>(scratch.sizes);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const CodecPiece& p = pieces[i];
    out[i] = encode(reinterpret_cast<const uint8_t*>(p.plain_address), p.plain_bytes,
                    reinterpret_cast<uint8_t*>(p.packed_address));
  }
}

void ReferenceCodec::decompress(const std::vector<CodecPiece>& pieces, const CodecScratch& scratch, CodecStream&) {
  fill_host_words(pieces, scratch.host_words);
  auto* out = reinterpret_cast<uint64_t*>(scratch.sizes);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const CodecPiece& p = pieces[i];
    out[i] = decode(reinterpret_cast<const uint8_t*>(p.packed_address), p.packed_bytes,
                    reinterpret_cast<uint8_t*>(p.plain_address), p.plain_bytes);
  }
}

}  // namespace vse
