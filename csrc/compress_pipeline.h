// Compressed level-1 backups (option compress: off / auto / on). Sleep compresses on the device and copies
// the compressed bytes to the host arena; wake copies them back and decompresses into the mapped memory.
//
// Note [Compressed backups]
// A backup's bytes are cut into pieces (piece_bytes, 16 MiB: nvCOMP's largest ANS chunk) within each
// contiguous range of an allocation; pieces are grouped in chunks (chunk_pieces of them, 256 MiB), one
// codec call per chunk. GPU memory for staging is bounded: `slots` chunk buffers of compressed bytes,
// each with its sizes, plus the codec's scratch, made once per operation from the backend's physical
// memory and given back at its end (Staging::device_bytes(); nvCOMP ANS: 3 x 16 x 18 MiB = 864 MiB at
// the defaults, its largest output for a 16 MiB piece being 18 MiB).
// Sleep: the codec stream compresses chunks `slots` ahead; the host waits for chunk k's sizes (copied
// to pinned memory on the codec stream behind its compression, so no host wait ever stands between
// the copy engine and its next copy while later chunks compress), decides per piece, and enqueues
// the copies of chunk k into the arena, back to back, then a fence. A slot is compressed into again
// only after the copies out of it (the codec stream waits for the copy queue). A piece is kept packed
// when its packed size is at most 0.95 x its size (auto) or at most its size (on); else its plain
// bytes are copied straight from the allocation. Auto stops compressing an allocation after a chunk
// in which none of its pieces paid, and the rest of the sleep after two such chunks in a row, each at
// least half full (trying one chunk in 4 again), so incompressible data costs only the first chunks'
// codec time, which runs beside the copies. Each segment is released once the fence after its last piece is done, as the
// plain sleep does (copy_pipeline.h).
// Wake: plain pieces are copied straight into the allocation, each run of them adjacent in the
// allocation and in the arena as one copy (as a plain backup is); packed ones into a slot, then decoded
// into the allocation on the codec stream after the copies; a slot is filled again only after its
// decode (the copy queue waits for the codec's mark). The wake's staging is sized to the packed pieces it
// decodes on the device (no more pieces per chunk, nor slots, than they fill; slots as wide as the largest
// of them, whatever the piece size is set to now), and made, with the codec
// used, only where one is packed: a backup that auto sent all plain (incompressible data) wakes at the
// cost of a plain one, with no staging counted in the memory the wake needs; one packed piece among many
// plain (a segment's zero slack beside random bytes) takes one slot of one piece, decoded as soon as it is
// copied rather than after every plain copy. Every decoded size is checked on the host before the wake
// succeeds; a failure undoes the wake as any other, the backup stays as it was.
// The host arena keeps only what is stored: its ready (resident, pinned) prefix grows with the
// compressed bytes, chunk by chunk, so a compressed backup holds about ratio x the model's bytes.
// A plain piece starts on a page of the arena (kPlainPieceAlign), as a plain backup's copies do: after a
// packed piece of odd size it would otherwise start at any byte, and its copies both ways with it. The
// padding (under 4 KiB per plain piece) is taken only from what packed pieces saved before it: the arena
// holds the plain bytes, so every piece still to come must fit at its plain size.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "backend.h"
#include "codec.h"
#include "copy_pipeline.h"
#include "host_arena.h"

namespace vse {

enum class CompressMode { Off, Auto, On };
const char* compress_mode_name(CompressMode mode);
CompressMode parse_compress_mode(const std::string& name);  // throws InvalidArgument

struct CompressOptions {
  CompressMode mode = CompressMode::Off;
  uint64_t piece_bytes = 16ull << 20;  // at most the codec's largest piece (nvCOMP ANS: 16 MiB)
  unsigned chunk_pieces = 16;          // pieces per codec call
  unsigned slots = 3;                  // chunk buffers on the device
};
void check_compress_options(const CompressOptions& options);  // throws InvalidArgument naming the bad value

constexpr double kAutoKeepRatio = 0.95;  // auto keeps a piece packed only at or below this share of its size
constexpr uint64_t kPlainPieceAlign = 4096;  // a plain piece's host offset, where the arena has room

// One piece of a compressed backup (HostBackup::pieces).
struct PackedPiece {
  uint64_t row_offset = 0;    // where its bytes lie in the allocation
  uint64_t plain_bytes = 0;
  uint64_t host_offset = 0;   // where it is stored in the arena
  uint64_t stored_bytes = 0;  // packed size, or plain_bytes when sent plain
  bool packed = false;
};
// What a wake decodes on one device: how many packed pieces, and the plain size of the largest.
struct PackedLoad {
  uint64_t pieces = 0;
  uint64_t largest = 0;
  void add(const std::vector<PackedPiece>& backup);
};

// What one compressed operation moved (OpStats::compress).
struct CompressTotals {
  uint64_t plain_bytes = 0;   // backup bytes that went through the pipeline
  uint64_t stored_bytes = 0;  // host bytes they take
  uint64_t pieces_packed = 0;
  uint64_t pieces_plain = 0;
  uint64_t staging_bytes = 0;  // device memory the operation used for staging

  CompressTotals& operator+=(const CompressTotals& o) {
    plain_bytes += o.plain_bytes;
    stored_bytes += o.stored_bytes;
    pieces_packed += o.pieces_packed;
    pieces_plain += o.pieces_plain;
    staging_bytes += o.staging_bytes;
    return *this;
  }
};

// The codec of an allocator's backend, kept once loaded; `why` says why there is none (yet).
class CodecCache {
 public:
  std::shared_ptr<Codec> get(DeviceBackend& backend);
  const std::string& why() const { return why_; }

 private:
  std::shared_ptr<Codec> codec_;
  std::string why_;
};

// Device memory for staging, from the backend's physical memory; throws DeviceOutOfMemory.
class DeviceScratch {
 public:
  DeviceScratch(DeviceBackend& backend, int device, uint64_t bytes);
  ~DeviceScratch();
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  uintptr_t address() const { return address_; }
  uint64_t bytes() const { return span_; }

 private:
  DeviceBackend& backend_;
  int device_;
  uint64_t span_ = 0;
  uintptr_t address_ = 0;
  PhysicalHandle handle_ = 0;
  bool mapped_ = false;
};

// The staging of one operation on one device: slots of packed bytes, their sizes (device and pinned
// host), the codec's scratch; per slot, pinned host words for the codec's arrays (CodecScratch), written
// again only after the slot's mark was waited for.
class Staging {
 public:
  Staging(DeviceBackend& backend, CodecStream& stream, Codec& codec, int device, const CompressOptions& options);
  ~Staging();
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  // Device bytes it takes for `options` with `codec`, rounded to the granularity (wake's memory check).
  static uint64_t device_bytes(DeviceBackend& backend, Codec& codec, int device, const CompressOptions& options);

  uintptr_t packed(unsigned slot, size_t piece) const { return memory_.address() + slot * slot_bytes_ + piece * stride_; }
  uintptr_t sizes(unsigned slot) const { return memory_.address() + slot * slot_bytes_ + sizes_at_; }
  uint64_t* host_sizes(unsigned slot) const { return host_sizes_ + slot * options_.chunk_pieces; }
  // What a codec call for `slot` works in.
  CodecScratch scratch(unsigned slot) const;
  uint64_t bytes() const { return memory_.bytes(); }
  // Codec work is finished and its marks released: nothing writes into staging any more.
  void drain() noexcept;
  std::vector<uint64_t> marks;  // per chunk in flight (0: no codec work), released by drain() or the owner

  DeviceBackend& backend;
  CodecStream& stream;
  Codec& codec;
  const int device;

 private:
  struct Layout {
    uint64_t stride, sizes_at, slot_bytes, temp_at, temp_bytes, total;
  };
  static Layout layout(Codec& codec, const CompressOptions& options);
  const CompressOptions options_;
  uint64_t stride_, sizes_at_, slot_bytes_, temp_at_, temp_bytes_;
  DeviceScratch memory_;
  // Pinned: slots x chunk_pieces sizes, then slots x chunk_pieces x kCodecHostWords codec words.
  uint64_t* host_sizes_ = nullptr;
  bool pinned_ = false;
};

// A sleep's copies of compressed backups into one arena, on one device.
class CompressedSleep final : public BackupCopies {
 public:
  CompressedSleep(DeviceBackend& backend, CodecStream& stream, Codec& codec, int device,
                  const CompressOptions& options, HostArena& arena);
  ~CompressedSleep() override;  // waits for codec work and copies still in flight (warning of failures)

  // Adds `bytes` of device memory at `address` (a range of row `step`, at `row_offset` in it), whose plain
  // backup would lie at `plain_offset` (the plan's host layout: what wait_copied() is asked about).
  void add(size_t step, uintptr_t address, uint64_t row_offset, uint64_t plain_offset, uint64_t bytes);
  // Compresses and copies everything added; the arena's ready prefix grows to what is stored.
  StagingTimes run(const StagingOptions& staging);
  void wait_copied(int device, uint64_t plain_end) override;
  std::vector<PackedPiece> pieces_of(size_t step) const;
  const CompressTotals& totals() const { return totals_; }

 private:
  struct Piece {
    size_t step;
    uintptr_t address;
    uint64_t plain_offset;
    PackedPiece stored;
    bool coded = false;  // went through the codec in its chunk
  };
  void compress_chunk(size_t chunk);

  const CompressOptions options_;
  HostArena& arena_;
  Staging staging_;
  std::vector<Piece> pieces_;
  std::vector<Fence> fences_;           // per chunk, after its copies
  std::set<size_t> plain_steps_;         // auto: rows whose pieces go plain from now on
  unsigned missed_chunks_ = 0;           // auto: chunks in a row where no coded piece paid
  CompressTotals totals_;
  bool copied_ = false;
};

// A wake's copies of compressed backups on one device.
class CompressedWake {
 public:
  // `load`: the packed pieces of the rows that will be added (none: no staging, no codec; `codec` unused).
  CompressedWake(DeviceBackend& backend, int device, const CompressOptions& options, Codec* codec,
                 const PackedLoad& load);
  // Device bytes of the staging for `load` (0 for none), rounded to the granularity.
  static uint64_t staging_bytes(DeviceBackend& backend, Codec& codec, int device, const CompressOptions& options,
                                const PackedLoad& load);
  ~CompressedWake();  // waits for codec work still in flight (warning of failures)
  CompressedWake(const CompressedWake&) = delete;
  CompressedWake& operator=(const CompressedWake&) = delete;

  // Enqueues the restore of a row's pieces from `host_base` (its arena) into `address`.
  void add(uintptr_t address, const uint8_t* host_base, const HostArena& arena, const std::vector<PackedPiece>& pieces);
  // Enqueues what is pending and waits until every piece is decoded and checked; throws Error naming a
  // piece that did not decode. The plain copies are left to the caller's wait.
  void finish();
  const CompressTotals& totals() const { return totals_; }

 private:
  struct Pending {
    CodecPiece piece;
    uint8_t* host;
    const HostArena* arena;
  };
  void flush();
  void check(size_t chunk);
  static CompressOptions sized(const CompressOptions& options, const PackedLoad& load);

  const CompressOptions options_;  // cut to the load: piece_bytes its largest, chunk_pieces and slots
  DeviceBackend& backend_;
  const int device_;
  std::unique_ptr<Staging> staging_;  // only where a piece is packed
  std::vector<Pending> pending_;
  uint64_t packed_left_;  // packed pieces not added yet
  std::vector<std::vector<CodecPiece>> chunks_;  // per chunk: what it decodes (to check its sizes)
  size_t checked_ = 0;                           // chunks [0, checked_) are decoded and checked
  CompressTotals totals_;
};

}  // namespace vse
