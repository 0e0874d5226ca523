#include "compress_pipeline.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "errors.h"

namespace vse {
namespace {

uint64_t align_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

constexpr unsigned kMaxChunkPieces = 1024;
constexpr unsigned kMaxSlots = 16;
constexpr unsigned kMissesBeforePause = 2;  // auto: chunks in a row that did not pay before the sleep goes plain
constexpr size_t kRetryEvery = 4;           // ... trying one chunk in this many again

}  // namespace

const char* compress_mode_name(CompressMode mode) {
  switch (mode) {
    case CompressMode::Off: return "off";
    case CompressMode::Auto: return "auto";
    case CompressMode::On: return "on";
  }
  return "?";
}

CompressMode parse_compress_mode(const std::string& name) {
  if (name == "off") return CompressMode::Off;
  if (name == "auto") return CompressMode::Auto;
  if (name == "on") return CompressMode::On;
  throw InvalidArgument("compress must be one of 'off', 'auto', 'on', got '" + name + "'");
}

void check_compress_options(const CompressOptions& o) {
  if (o.piece_bytes < 4096 || o.piece_bytes > (1ull << 30) || o.piece_bytes % 16 != 0)
    throw InvalidArgument("compress piece bytes must be a multiple of 16 between 4 KiB and 1 GiB, got " +
                          std::to_string(o.piece_bytes));
  if (o.chunk_pieces == 0 || o.chunk_pieces > kMaxChunkPieces)
    throw InvalidArgument("compress chunk pieces must be between 1 and " + std::to_string(kMaxChunkPieces) + ", got " +
                          std::to_string(o.chunk_pieces));
  if (o.slots < 2 || o.slots > kMaxSlots)
    throw InvalidArgument("compress slots must be between 2 and " + std::to_string(kMaxSlots) + ", got " +
                          std::to_string(o.slots));
}

std::shared_ptr<Codec> CodecCache::get(DeviceBackend& backend) {
  if (!codec_) {  // tried again until it loads
    why_.clear();
    codec_ = codec_for(backend, why_);
    if (!codec_ && why_.empty()) why_ = std::string("no codec for backend ") + backend.name();
  }
  return codec_;
}

DeviceScratch::DeviceScratch(DeviceBackend& backend, int device, uint64_t bytes)
    : backend_(backend), device_(device) {
  span_ = align_up(std::max<uint64_t>(bytes, 1), backend.granularity(device));
  address_ = backend.reserve(device, span_);
  try {
    handle_ = backend.create(device, span_);
    try {
      backend.map(device, address_, span_, handle_);
      mapped_ = true;
    } catch (...) {
      backend.release(device, handle_);
      throw;
    }
  } catch (...) {
    backend.unreserve(device, address_, span_);
    throw;
  }
}

DeviceScratch::~DeviceScratch() {
  warn_on_failure("giving back compression staging", [&] {
    backend_.unmap(device_, address_, span_);
    backend_.release(device_, handle_);
    backend_.unreserve(device_, address_, span_);
  });
}

Staging::Layout Staging::layout(Codec& codec, const CompressOptions& o) {
  Layout l;
  const uint64_t piece = std::min(o.piece_bytes, codec.max_piece_bytes());
  l.stride = align_up(codec.max_packed_bytes(piece), 256);
  l.sizes_at = l.stride * o.chunk_pieces;
  l.slot_bytes = align_up(l.sizes_at + 8ull * o.chunk_pieces, 256);
  l.temp_at = l.slot_bytes * o.slots;
  l.temp_bytes = align_up(codec.temp_bytes(o.chunk_pieces, piece), 256);
  l.total = l.temp_at + l.temp_bytes;
  return l;
}

uint64_t Staging::device_bytes(DeviceBackend& backend, Codec& codec, int device, const CompressOptions& options) {
  CodecScope scope(*backend.codec_stream(device));  // the codec may ask its library, which wants the device current
  return align_up(layout(codec, options).total, backend.granularity(device));
}

Staging::Staging(DeviceBackend& b, CodecStream& s, Codec& c, int d, const CompressOptions& options)
    : backend(b), stream(s), codec(c), device(d), options_(options),
      memory_(b, d, device_bytes(b, c, d, options)) {
  CodecScope scope(s);
  const Layout l = layout(c, options);
  stride_ = l.stride;
  sizes_at_ = l.sizes_at;
  slot_bytes_ = l.slot_bytes;
  temp_at_ = l.temp_at;
  temp_bytes_ = l.temp_bytes;
  const uint64_t host_bytes = align_up(8ull * options.chunk_pieces * options.slots * (1 + kCodecHostWords), 4096);
  host_sizes_ = static_cast<uint64_t*>(std::aligned_alloc(4096, host_bytes));
  if (!host_sizes_) throw HostOutOfMemory("cannot allocate " + format_bytes(host_bytes) + " for compressed sizes");
  std::memset(host_sizes_, 0, host_bytes);
  try {
    backend.pin(device, host_sizes_, host_bytes);
    pinned_ = true;
  } catch (...) {
    std::free(host_sizes_);
    throw;
  }
}

CodecScratch Staging::scratch(unsigned slot) const {
  const uint64_t words = uint64_t{options_.chunk_pieces} * options_.slots;  // past the sizes
  return {memory_.address() + temp_at_, temp_bytes_, sizes(slot),
          host_sizes_ + words + uint64_t{slot} * options_.chunk_pieces * kCodecHostWords};
}

void Staging::drain() noexcept {
  warn_on_failure("waiting for the codec stream", [&] { stream.synchronize(); });
  for (uint64_t& m : marks)
    if (m) {
      stream.release(m);
      m = 0;
    }
}

Staging::~Staging() {
  drain();
  if (pinned_) warn_on_failure("unpinning compressed sizes", [&] { backend.unpin(device, host_sizes_); });
  std::free(host_sizes_);
}

// ---- sleep ---------------------------------------------------------------------------------------

CompressedSleep::CompressedSleep(DeviceBackend& backend, CodecStream& stream, Codec& codec, int device,
                                 const CompressOptions& options, HostArena& arena)
    : options_(options), arena_(arena), staging_(backend, stream, codec, device, options) {
  totals_.staging_bytes = staging_.bytes();
}

CompressedSleep::~CompressedSleep() {
  staging_.drain();  // nothing compresses into staging any more
  if (copied_) drain_copies(staging_.backend, {staging_.device});  // nor copies out of it
}

void CompressedSleep::add(size_t step, uintptr_t address, uint64_t row_offset, uint64_t plain_offset, uint64_t bytes) {
  const uint64_t piece = std::min(options_.piece_bytes, staging_.codec.max_piece_bytes());
  for (uint64_t done = 0; done < bytes; done += piece) {
    Piece p;
    p.step = step;
    p.address = address + done;
    p.plain_offset = plain_offset + done;
    p.stored.row_offset = row_offset + done;
    p.stored.plain_bytes = std::min(piece, bytes - done);
    pieces_.push_back(p);
  }
}

// Chunk c's pieces through the codec into slot c % slots, its sizes behind it to pinned memory.
void CompressedSleep::compress_chunk(size_t chunk) {
  const size_t first = chunk * options_.chunk_pieces;
  const size_t last = std::min(pieces_.size(), first + options_.chunk_pieces);
  const unsigned slot = chunk % options_.slots;
  const bool paused = options_.mode == CompressMode::Auto && missed_chunks_ >= kMissesBeforePause &&
                      chunk % kRetryEvery != 0;
  std::vector<CodecPiece> batch;
  for (size_t i = first; i < last; ++i) {
    Piece& p = pieces_[i];
    p.coded = !paused && !plain_steps_.count(p.step) && staging_.codec.accepts(p.address, p.stored.plain_bytes);
    if (p.coded) batch.push_back({p.address, p.stored.plain_bytes, staging_.packed(slot, batch.size()), 0});
  }
  if (batch.empty()) return;
  staging_.stream.after_copies();  // the slot's last copies out, and the pending work on this memory
  {
    CodecScope scope(staging_.stream);
    staging_.codec.compress(batch, staging_.scratch(slot), staging_.stream);
  }
  staging_.stream.to_host(staging_.sizes(slot), staging_.host_sizes(slot), 8 * batch.size());
  staging_.marks[chunk] = staging_.stream.record();
}

StagingTimes CompressedSleep::run(const StagingOptions& staging) {
  StagingTimes times;
  const size_t chunks = (pieces_.size() + options_.chunk_pieces - 1) / options_.chunk_pieces;
  staging_.marks.assign(chunks, 0);
  DeviceBackend& backend = staging_.backend;
  const int device = staging_.device;
  for (size_t c = 0; c < std::min<size_t>(chunks, options_.slots); ++c) compress_chunk(c);
  uint64_t stored_end = 0;
  uint64_t plain_left = 0;  // plain bytes of the pieces not placed yet: stored_end + plain_left fits the arena
  for (const Piece& p : pieces_) plain_left += p.stored.plain_bytes;
  std::vector<CopySpan> spans;
  for (size_t c = 0; c < chunks; ++c) {
    const unsigned slot = c % options_.slots;
    if (staging_.marks[c]) {
      staging_.stream.wait(staging_.marks[c]);
      staging_.stream.release(staging_.marks[c]);
      staging_.marks[c] = 0;
    }
    const size_t first = c * options_.chunk_pieces;
    const size_t last = std::min(pieces_.size(), first + options_.chunk_pieces);
    std::map<size_t, bool> step_paid;  // auto: per row coded in this chunk, whether any piece paid
    uint64_t coded = 0;  // bytes through the codec
    bool paid = false;
    size_t k = 0;  // index in the chunk's batch
    for (size_t i = first; i < last; ++i) {
      Piece& p = pieces_[i];
      PackedPiece& s = p.stored;
      uintptr_t source = p.address;
      s.packed = false;
      s.stored_bytes = s.plain_bytes;
      if (p.coded) {
        const uint64_t size = staging_.host_sizes(slot)[k];
        const double limit = options_.mode == CompressMode::On ? 1.0 : kAutoKeepRatio;
        if (size > 0 && static_cast<double>(size) <= limit * static_cast<double>(s.plain_bytes)) {
          s.packed = true;
          s.stored_bytes = size;
          source = staging_.packed(slot, k);
        }
        step_paid[p.step] = step_paid[p.step] || s.packed;
        coded += s.plain_bytes;
        paid = paid || s.packed;
        ++k;
      }
      if (!s.packed) {  // Note [Compressed backups]: a plain piece starts on a page where the arena has room
        const uint64_t aligned = align_up(stored_end, kPlainPieceAlign);
        if (aligned + plain_left <= arena_.capacity()) stored_end = aligned;  // for every piece still to come
      }
      s.host_offset = stored_end;
      stored_end += s.stored_bytes;
      plain_left -= s.plain_bytes;
      (s.packed ? totals_.pieces_packed : totals_.pieces_plain) += 1;
      totals_.plain_bytes += s.plain_bytes;
      totals_.stored_bytes += s.stored_bytes;
      spans.push_back({source, arena_.data() + s.host_offset, s.stored_bytes});
    }
    if (options_.mode == CompressMode::Auto) {
      for (const auto& [step, any] : step_paid)
        if (!any) plain_steps_.insert(step);
      // A chunk of a few small pieces says little: only one at least half full counts as a miss.
      if (paid) missed_chunks_ = 0;
      else if (2 * coded >= options_.piece_bytes * options_.chunk_pieces) missed_chunks_ += 1;
    }
    if (arena_.ready_bytes() < stored_end) {
      const StagingTimes t = arena_.prepare(stored_end, staging, [](uint64_t, uint64_t) {});
      times.populate_seconds += t.populate_seconds;
      times.pin_seconds += t.pin_seconds;
    }
    std::vector<CopySpan> parts;
    for (const CopySpan& s : spans) arena_.split_at_registrations(s, parts);
    spans.clear();
    copied_ = true;
    backend.enqueue_copies(device, CopyDirection::ToHost, parts);
    fences_.emplace_back(backend, device);
    if (c + options_.slots < chunks) compress_chunk(c + options_.slots);
  }
  return times;
}

void CompressedSleep::wait_copied(int, uint64_t plain_end) {
  // The chunk of the last piece that starts before plain_end: its fence follows every copy before it.
  auto it = std::lower_bound(pieces_.begin(), pieces_.end(), plain_end,
                             [](const Piece& p, uint64_t end) { return p.plain_offset < end; });
  if (it == pieces_.begin()) return;
  const size_t last = static_cast<size_t>(it - pieces_.begin()) - 1;
  fences_[last / options_.chunk_pieces].wait();
}

std::vector<PackedPiece> CompressedSleep::pieces_of(size_t step) const {
  std::vector<PackedPiece> out;
  for (const Piece& p : pieces_)
    if (p.step == step) out.push_back(p.stored);
  return out;
}

// ---- wake ----------------------------------------------------------------------------------------

void PackedLoad::add(const std::vector<PackedPiece>& backup) {
  for (const PackedPiece& p : backup)
    if (p.packed) {
      pieces += 1;
      largest = std::max(largest, p.plain_bytes);
    }
}

// The sleep cut the pieces by the piece size of its time; the slots fit the largest of them.
CompressOptions CompressedWake::sized(const CompressOptions& options, const PackedLoad& load) {
  CompressOptions o = options;
  o.piece_bytes = std::max<uint64_t>(load.largest, 1);
  o.chunk_pieces = static_cast<unsigned>(std::clamp<uint64_t>(load.pieces, 1, o.chunk_pieces));
  const uint64_t chunks = (load.pieces + o.chunk_pieces - 1) / o.chunk_pieces;
  o.slots = static_cast<unsigned>(std::clamp<uint64_t>(chunks, 1, o.slots));  // one chunk needs one slot
  return o;
}

uint64_t CompressedWake::staging_bytes(DeviceBackend& backend, Codec& codec, int device,
                                       const CompressOptions& options, const PackedLoad& load) {
  return load.pieces == 0 ? 0 : Staging::device_bytes(backend, codec, device, sized(options, load));
}

CompressedWake::CompressedWake(DeviceBackend& backend, int device, const CompressOptions& options, Codec* codec,
                               const PackedLoad& load)
    : options_(sized(options, load)), backend_(backend), device_(device), packed_left_(load.pieces) {
  if (load.pieces == 0) return;
  staging_ = std::make_unique<Staging>(backend, *backend.codec_stream(device), *codec, device, options_);
  totals_.staging_bytes = staging_->bytes();
}

CompressedWake::~CompressedWake() {
  if (staging_) staging_->drain();
}

void CompressedWake::add(uintptr_t address, const uint8_t* host_base, const HostArena& arena,
                         const std::vector<PackedPiece>& pieces) {
  std::vector<CopySpan> plain;
  CopySpan run;  // plain pieces so far that follow each other in the allocation and in the arena
  auto end_run = [&] {
    if (run.bytes != 0) arena.split_at_registrations(run, plain);
    run = CopySpan{};
  };
  for (const PackedPiece& p : pieces) {
    totals_.plain_bytes += p.plain_bytes;
    totals_.stored_bytes += p.stored_bytes;
    uint8_t* host = const_cast<uint8_t*>(host_base + p.host_offset);
    const uintptr_t device = address + p.row_offset;
    if (p.packed) {
      if (packed_left_ == 0 || p.plain_bytes > options_.piece_bytes)
        throw Error("a wake was made for other packed pieces than its backups hold");
      packed_left_ -= 1;
      totals_.pieces_packed += 1;
      pending_.push_back({{device, p.plain_bytes, 0, p.stored_bytes}, host, &arena});
      continue;
    }
    totals_.pieces_plain += 1;
    if (run.bytes != 0 && run.device + run.bytes == device && static_cast<uint8_t*>(run.host) + run.bytes == host) {
      run.bytes += p.plain_bytes;
    } else {
      end_run();
      run = {device, host, p.plain_bytes};
    }
  }
  end_run();
  if (!plain.empty()) backend_.enqueue_copies(device_, CopyDirection::ToDevice, plain);
  while (pending_.size() >= options_.chunk_pieces) flush();
  if (packed_left_ == 0) flush();  // the last chunk, short: decoded beside the plain copies still to come
}

// The next chunk of pending packed pieces: into slot c % slots once that slot's last decode is done,
// then decoded into place on the codec stream after the copies.
void CompressedWake::flush() {
  if (pending_.empty()) return;
  Staging& st = *staging_;
  const size_t chunk = chunks_.size();
  const unsigned slot = chunk % options_.slots;
  if (chunk >= options_.slots) {
    const size_t before = chunk - options_.slots;
    check(before);  // its sizes are read from the slot's host array, which this chunk reuses
    st.stream.copies_after(st.marks[before]);
    st.stream.release(st.marks[before]);
    st.marks[before] = 0;
  }
  const size_t n = std::min<size_t>(pending_.size(), options_.chunk_pieces);
  std::vector<CodecPiece> batch;
  std::vector<CopySpan> spans;
  for (size_t i = 0; i < n; ++i) {
    Pending& p = pending_[i];
    p.piece.packed_address = st.packed(slot, i);
    p.arena->split_at_registrations({p.piece.packed_address, p.host, p.piece.packed_bytes}, spans);
    batch.push_back(p.piece);
  }
  pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(n));
  st.backend.enqueue_copies(st.device, CopyDirection::ToDevice, spans);
  st.stream.after_copies();
  chunks_.push_back(batch);
  st.marks.push_back(0);
  {
    CodecScope scope(st.stream);
    st.codec.decompress(batch, st.scratch(slot), st.stream);
  }
  st.stream.to_host(st.sizes(slot), st.host_sizes(slot), 8 * n);
  st.marks[chunk] = st.stream.record();
}

void CompressedWake::check(size_t chunk) {
  Staging& st = *staging_;
  for (; checked_ <= chunk; ++checked_) {
    st.stream.wait(st.marks[checked_]);
    const std::vector<CodecPiece>& batch = chunks_[checked_];
    const uint64_t* sizes = st.host_sizes(checked_ % options_.slots);
    for (size_t i = 0; i < batch.size(); ++i)
      if (sizes[i] != batch[i].plain_bytes)
        throw Error(std::string(st.codec.name()) + " could not decode a piece of " +
                    format_bytes(batch[i].plain_bytes) + " (" + format_bytes(batch[i].packed_bytes) +
                    " stored) for 0x" + [&] {
                      char buf[32];
                      std::snprintf(buf, sizeof buf, "%llx", static_cast<unsigned long long>(batch[i].plain_address));
                      return std::string(buf);
                    }() + ": decoded " + std::to_string(sizes[i]) + " bytes. The backup is intact; the wake was undone");
  }
}

void CompressedWake::finish() {
  while (!pending_.empty()) flush();
  if (!chunks_.empty()) check(chunks_.size() - 1);
}

}  // namespace vse
