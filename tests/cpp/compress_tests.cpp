// Tests of compressed backups (Note [Compressed backups], compress_pipeline.h) with the reference codec,
// over the host backend and the async one (copies finish later on another thread, so a slot reused or
// an allocation released before its copies were done shows). Faults are injected into copies, codec
// work and fences at every point of a sleep and of a wake: nothing is lost, and the same call succeeds
// when retried. Built as target `compress_tests` with -DVSE_BUILD_TESTS=ON; tests/cpp/run_sanitizers.sh
// runs it under ASan, UBSan and TSan. The last line of output is "N passed, M failed".
//
// Usage: compress_tests [substring]   -- runs only the tests whose name contains the substring.
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "allocator.h"
#include "compress_pipeline.h"
#include "async_host_backend.h"
#include "errors.h"
#include "host_backend.h"
#include "reference_codec.h"
#include "test_harness.h"

namespace {

constexpr uint64_t KiB = 1ull << 10;
constexpr uint64_t MiB = 1ull << 20;

using vse::Allocator;
using vse::State;
using vse_test::Fault;

// The codec stream of the inner backend, with its codec work failing where the test says.
class FaultyStream final : public vse::CodecStream {
 public:
  FaultyStream(vse::CodecStream& inner, Fault& fault) : inner_(inner), fault_(fault) {}
  void* handle() override { return inner_.handle(); }
  void to_host(uintptr_t device, void* host, uint64_t bytes) override {
    if (fault_.fire()) throw vse::Error("injected: codec sizes");
    inner_.to_host(device, host, bytes);
  }
  void after_copies() override {
    if (fault_.fire()) throw vse::Error("injected: codec");
    inner_.after_copies();
  }
  uint64_t record() override { return inner_.record(); }
  void wait(uint64_t mark) override { inner_.wait(mark); }
  void release(uint64_t mark) noexcept override { inner_.release(mark); }
  void copies_after(uint64_t mark) override { inner_.copies_after(mark); }
  void synchronize() override { inner_.synchronize(); }

 private:
  vse::CodecStream& inner_;
  Fault& fault_;
};

// A host backend ("host" or "host-async") whose copies, codec work and fences fail on demand.
class FaultyBackend final : public vse::DeviceBackend {
 public:
  explicit FaultyBackend(bool async, uint64_t capacity = 0) {
    if (async) {
      auto inner = std::make_unique<vse::AsyncHostBackend>(capacity, 100, 11);
      async_ = inner.get();
      inner_ = std::move(inner);
    } else {
      inner_ = std::make_unique<vse::HostBackend>(capacity);
    }
    stream_ = std::make_unique<FaultyStream>(*inner_->codec_stream(0), codec_fault);
  }
  Fault copy_fault, codec_fault, mark_fault;
  uint64_t to_device_spans = 0;  // copies asked for towards the device
  std::vector<vse::CopySpan> to_host;  // every copy asked for towards the host
  vse::AsyncHostBackend* async_ = nullptr;

  const char* name() const override { return inner_->name(); }
  int device_count() override { return inner_->device_count(); }
  uint64_t granularity(int d) override { return inner_->granularity(d); }
  uintptr_t reserve(int d, uint64_t size) override { return inner_->reserve(d, size); }
  void unreserve(int d, uintptr_t a, uint64_t size) override { inner_->unreserve(d, a, size); }
  vse::PhysicalHandle create(int d, uint64_t size) override { return inner_->create(d, size); }
  void release(int d, vse::PhysicalHandle h) override { inner_->release(d, h); }
  void map(int d, uintptr_t a, uint64_t size, vse::PhysicalHandle h) override { inner_->map(d, a, size, h); }
  void unmap(int d, uintptr_t a, uint64_t size) override { inner_->unmap(d, a, size); }
  vse::MemoryInfo memory_info(int d) override { return inner_->memory_info(d); }
  void synchronize(int d) override { inner_->synchronize(d); }
  void pin(int d, void* host, uint64_t bytes) override { inner_->pin(d, host, bytes); }
  void unpin(int d, void* host) override { inner_->unpin(d, host); }
  void enqueue_copies(int d, vse::CopyDirection dir, const std::vector<vse::CopySpan>& spans) override {
    if (copy_fault.fire()) throw vse::Error("injected: copy");
    if (dir == vse::CopyDirection::ToDevice) to_device_spans += spans.size();
    if (dir == vse::CopyDirection::ToHost) to_host.insert(to_host.end(), spans.begin(), spans.end());
    inner_->enqueue_copies(d, dir, spans);
  }
  void wait_copies(int d) override { inner_->wait_copies(d); }
  void fill(int d, uintptr_t a, uint64_t bytes, uint8_t value) override { inner_->fill(d, a, bytes, value); }
  uint64_t record_mark(int d) override { return inner_->record_mark(d); }
  void wait_mark(int d, uint64_t mark) override {
    if (mark_fault.fire()) throw vse::Error("injected: a copy the device reports failed");
    inner_->wait_mark(d, mark);
  }
  void release_mark(int d, uint64_t mark) noexcept override { inner_->release_mark(d, mark); }
  vse::CodecStream* codec_stream(int) override { return stream_.get(); }

 private:
  std::unique_ptr<vse::DeviceBackend> inner_;
  std::unique_ptr<FaultyStream> stream_;
};

// Words like bf16 weights (few high bytes, any low byte), or random bytes.
std::vector<uint8_t> make_data(uint64_t bytes, uint32_t seed, bool compressible) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> out(bytes);
  for (uint64_t i = 0; i < bytes; ++i) {
    const uint32_t r = rng();
    out[i] = compressible && i % 2 == 1 ? static_cast<uint8_t>(0x3A + r % 6 + (r & 0x100 ? 0x80 : 0)) : static_cast<uint8_t>(r);
  }
  return out;
}

struct Row {
  uintptr_t address;
  std::vector<uint8_t> data;
};

// Which of the fixture's 5 rows hold bf16-like words (the rest random bytes, which auto sends plain).
using Kinds = std::vector<bool>;
const Kinds kMixed = {true, true, true, true, false};
const Kinds kAllRandom = {false, false, false, false, false};
const Kinds kFirstRowPacks = {true, false, false, false, false};  // 3 packed pieces: one chunk, one slot
const Kinds kFourthRowPacks = {false, false, false, true, false};  // 5 packed: a short chunk before the last row

struct Fixture {
  FaultyBackend* backend;
  std::unique_ptr<Allocator> allocator;
  std::vector<Row> rows;

  Fixture(bool async, vse::CompressMode mode, const Kinds& compressible = kMixed) {
    auto b = std::make_unique<FaultyBackend>(async, 64 * MiB);
    backend = b.get();
    allocator = std::make_unique<Allocator>(std::move(b));
    allocator->update_options([&](vse::AllocatorOptions& o) {
      o.compress.mode = mode;
      o.compress.piece_bytes = 64 * KiB;
      o.compress.chunk_pieces = 3;
      o.compress.slots = 2;
      o.staging.threads = 2;
      o.staging.piece_bytes = 2 * MiB;
    });
    // 19 pieces in 7 chunks: every piece and chunk boundary kind, few enough that a fault at every
    // point stays quick under the sanitizers.
    const uint64_t sizes[] = {3 * 64 * KiB + 5, 256 * KiB, 17, 320 * KiB + 1, 200 * KiB};
    for (size_t i = 0; i < 5; ++i) {
      Row r{allocator->allocate(sizes[i], 0, "weights"),
            make_data(sizes[i], static_cast<uint32_t>(i), compressible[i])};
      std::memcpy(reinterpret_cast<void*>(r.address), r.data.data(), r.data.size());
      rows.push_back(std::move(r));
    }
  }

  State state_of(uintptr_t address) const {
    for (const vse::AllocationInfo& a : allocator->allocations())
      if (a.address == address) return a.state;
    return State::Discarded;
  }
  // Mapped rows hold their data; sleeping ones are backed up (checked by the wake that follows).
  bool nothing_lost() const {
    for (const Row& r : rows) {
      const State s = state_of(r.address);
      if (s == State::Discarded) return false;
      if (s == State::Mapped && std::memcmp(reinterpret_cast<void*>(r.address), r.data.data(), r.data.size()) != 0)
        return false;
    }
    return true;
  }
  bool all_exact() const {
    for (const Row& r : rows)
      if (std::memcmp(reinterpret_cast<void*>(r.address), r.data.data(), r.data.size()) != 0) return false;
    return true;
  }
  bool all(State state) const {
    for (const Row& r : rows)
      if (state_of(r.address) != state) return false;
    return true;
  }
};

void round_trip_is_exact(bool async) {
  for (vse::CompressMode mode : {vse::CompressMode::Auto, vse::CompressMode::On}) {
    Fixture f(async, mode);
    f.allocator->sleep({"weights"}, {}, {});
    const vse::OpStats s = *f.allocator->last_sleep();
    CHECK(s.compress.pieces_packed > 0);
    CHECK(s.compress.pieces_plain > 0);  // the random row, and the 17-byte one
    CHECK(s.compress.stored_bytes < s.compress.plain_bytes);
    CHECK(f.all(State::BackedUp));
    f.allocator->wake(std::nullopt);
    CHECK(f.all_exact());
    if (f.backend->async_) CHECK(f.backend->async_->early_releases() == 0);
  }
}

void test_round_trip_host() { round_trip_is_exact(false); }
void test_round_trip_async() { round_trip_is_exact(true); }

// A sleep that fails at its k-th copy, codec call or fence, for every k until one succeeds.
void sleep_faults(bool async, Fault FaultyBackend::*which) {
  int failures = 0;
  for (int k = 0; k < 200; ++k) {
    Fixture f(async, vse::CompressMode::On);
    (f.backend->*which).arm(k);
    bool failed = false;
    try {
      f.allocator->sleep({"weights"}, {}, {});
    } catch (const vse::Error&) {
      failed = true;
    }
    (f.backend->*which).disarm();
    if (!failed) break;
    ++failures;
    CHECK(f.nothing_lost());
    f.allocator->sleep({"weights"}, {}, {});  // the same sleep again: the rest goes
    CHECK(f.all(State::BackedUp));
    f.allocator->wake(std::nullopt);
    CHECK(f.all_exact());
    if (f.backend->async_) CHECK(f.backend->async_->early_releases() == 0);
  }
  CHECK(failures > 0);
}

void wake_faults(bool async, Fault FaultyBackend::*which, vse::CompressMode mode = vse::CompressMode::On,
                 const Kinds& compressible = kMixed) {
  int failures = 0;
  for (int k = 0; k < 200; ++k) {
    Fixture f(async, mode, compressible);
    f.allocator->sleep({"weights"}, {}, {});
    (f.backend->*which).arm(k);
    bool failed = false;
    try {
      f.allocator->wake(std::nullopt);
    } catch (const vse::Error&) {
      failed = true;
    }
    (f.backend->*which).disarm();
    if (!failed) {
      CHECK(f.all_exact());
      break;
    }
    ++failures;
    CHECK(f.all(State::BackedUp));  // a failed wake is undone whole
    f.allocator->wake(std::nullopt);
    CHECK(f.all_exact());
  }
  CHECK(failures > 0);
}

void test_sleep_copy_fault_host() { sleep_faults(false, &FaultyBackend::copy_fault); }
void test_sleep_copy_fault_async() { sleep_faults(true, &FaultyBackend::copy_fault); }
void test_sleep_codec_fault_host() { sleep_faults(false, &FaultyBackend::codec_fault); }
void test_sleep_codec_fault_async() { sleep_faults(true, &FaultyBackend::codec_fault); }
void test_sleep_fence_fault_async() { sleep_faults(true, &FaultyBackend::mark_fault); }
void test_wake_copy_fault_host() { wake_faults(false, &FaultyBackend::copy_fault); }
void test_wake_copy_fault_async() { wake_faults(true, &FaultyBackend::copy_fault); }
void test_wake_codec_fault_host() { wake_faults(false, &FaultyBackend::codec_fault); }
void test_wake_codec_fault_async() { wake_faults(true, &FaultyBackend::codec_fault); }

// A wake of backups whose pieces auto sent all plain costs what a plain backup's does: the same copies
// (runs of adjacent pieces as one), no staging, no codec work.
void plain_pieces_wake_as_a_plain_backup(bool async) {
  Fixture off(async, vse::CompressMode::Off, kAllRandom);
  off.allocator->sleep({"weights"}, {}, {});
  off.backend->to_device_spans = 0;
  off.allocator->wake(std::nullopt);
  CHECK(off.all_exact());
  const uint64_t plain_spans = off.backend->to_device_spans;
  CHECK(plain_spans >= 5);  // a copy per row at least

  Fixture f(async, vse::CompressMode::Auto, kAllRandom);
  f.allocator->sleep({"weights"}, {}, {});
  const vse::OpStats s = *f.allocator->last_sleep();
  CHECK(s.compress.pieces_packed == 0);
  CHECK(s.compress.pieces_plain > plain_spans);  // more pieces than the plain wake's copies
  f.backend->codec_fault.arm(0);  // the wake must not touch the codec stream
  f.backend->to_device_spans = 0;
  f.allocator->wake(std::nullopt);
  f.backend->codec_fault.disarm();
  CHECK(f.all_exact());
  CHECK(f.backend->to_device_spans == plain_spans);
  const vse::OpStats w = *f.allocator->last_wake();
  CHECK(w.compress.staging_bytes == 0);
  CHECK(w.compress.pieces_plain == s.compress.pieces_plain && w.compress.pieces_packed == 0);
  CHECK(w.compress.plain_bytes == s.compress.plain_bytes && w.compress.stored_bytes == s.compress.stored_bytes);
  if (f.backend->async_) CHECK(f.backend->async_->early_releases() == 0);
}

// Plain pieces start on a page of the arena, also right after a packed piece of odd size (a copy from
// or to any byte of host memory is slower than one from a page); packed ones follow each other.
void plain_pieces_start_on_a_page(bool async) {
  for (vse::CompressMode mode : {vse::CompressMode::Auto, vse::CompressMode::On}) {
    Fixture f(async, mode);
    f.allocator->sleep({"weights"}, {}, {});
    const vse::OpStats s = *f.allocator->last_sleep();
    CHECK(s.compress.pieces_packed > 0 && s.compress.pieces_plain > 0);
    uint64_t plain = 0, odd = 0;
    for (const vse::CopySpan& c : f.backend->to_host) {
      bool from_a_row = false;
      for (const Row& r : f.rows) from_a_row = from_a_row || (c.device >= r.address && c.device < r.address + r.data.size());
      if (!from_a_row) continue;  // a packed piece, from staging
      plain += 1;
      if (reinterpret_cast<uintptr_t>(c.host) % vse::kPlainPieceAlign != 0) odd += 1;
    }
    CHECK(plain >= 2);  // the random row's pieces and the 5-byte tail after the first row's packed ones
    CHECK(odd == 0);
    f.allocator->wake(std::nullopt);
    CHECK(f.all_exact());
  }
}

void test_plain_pieces_start_on_a_page_host() { plain_pieces_start_on_a_page(false); }
void test_plain_pieces_start_on_a_page_async() { plain_pieces_start_on_a_page(true); }

void test_plain_pieces_wake_host() { plain_pieces_wake_as_a_plain_backup(false); }
void test_plain_pieces_wake_async() { plain_pieces_wake_as_a_plain_backup(true); }
void test_wake_copy_fault_plain_pieces_host() {
  wake_faults(false, &FaultyBackend::copy_fault, vse::CompressMode::Auto, kAllRandom);
}
void test_wake_copy_fault_plain_pieces_async() {
  wake_faults(true, &FaultyBackend::copy_fault, vse::CompressMode::Auto, kAllRandom);
}
void test_wake_copy_fault_mixed_auto_async() { wake_faults(true, &FaultyBackend::copy_fault, vse::CompressMode::Auto); }
void test_wake_codec_fault_mixed_auto_async() {
  wake_faults(true, &FaultyBackend::codec_fault, vse::CompressMode::Auto);
}

// A wake's staging is cut to the packed pieces it decodes: one chunk of 3 in one slot; 5 in two chunks,
// the short one decoded before the last row's plain copies. Exact, and faults at every point lose nothing.
// Mode on: only the bf16-like rows pack (auto may pause on the random rows first, by the table's order).
void few_packed_pieces(bool async, const Kinds& kinds, uint64_t expected_packed) {
  Fixture f(async, vse::CompressMode::On, kinds);
  f.allocator->sleep({"weights"}, {}, {});
  CHECK(f.allocator->last_sleep()->compress.pieces_packed == expected_packed);
  f.allocator->wake(std::nullopt);
  CHECK(f.all_exact());
  const vse::OpStats w = *f.allocator->last_wake();
  CHECK(w.compress.pieces_packed == expected_packed);
  CHECK(w.compress.staging_bytes > 0);
  for (Fault FaultyBackend::*which : {&FaultyBackend::copy_fault, &FaultyBackend::codec_fault})
    wake_faults(async, which, vse::CompressMode::On, kinds);
}

void test_one_chunk_packed_host() { few_packed_pieces(false, kFirstRowPacks, 3); }
void test_one_chunk_packed_async() { few_packed_pieces(true, kFirstRowPacks, 3); }
void test_short_chunk_packed_host() { few_packed_pieces(false, kFourthRowPacks, 5); }
void test_short_chunk_packed_async() { few_packed_pieces(true, kFourthRowPacks, 5); }

void test_reference_codec_round_trips_and_rejects_corrupt_streams() {
  vse::ReferenceCodec codec;
  for (uint64_t bytes : {1ull, 2ull, 3ull, 4096ull, 65537ull}) {
    for (bool compressible : {true, false}) {
      const std::vector<uint8_t> plain = make_data(bytes, 3, compressible);
      std::vector<uint8_t> packed(codec.max_packed_bytes(bytes));
      const uint64_t size = vse::ReferenceCodec::encode(plain.data(), bytes, packed.data());
      CHECK(size <= packed.size());
      if (compressible && bytes >= 4096) CHECK(size < 0.8 * static_cast<double>(bytes));
      std::vector<uint8_t> back(bytes, 0);
      CHECK(vse::ReferenceCodec::decode(packed.data(), size, back.data(), bytes) == bytes);
      CHECK(back == plain);
      if (size > 20) CHECK(vse::ReferenceCodec::decode(packed.data(), size - 1, back.data(), bytes) == 0);
    }
  }
}

// Each slot's codec words (the batch arrays a device codec sends from pinned memory) hold a full chunk, apart
// from the sizes and from every other slot's, so a chunk's arrays are never rewritten while an earlier chunk's
// copy of them may still be queued; the codec gets the words of the slot it works for.
void test_each_slot_has_its_own_codec_words() {
  vse::HostBackend backend(64 * MiB);
  vse::ReferenceCodec codec;
  vse::CompressOptions o;
  o.mode = vse::CompressMode::On;
  o.piece_bytes = 64 * KiB;
  o.chunk_pieces = 3;
  o.slots = 3;
  vse::Staging staging(backend, *backend.codec_stream(0), codec, 0, o);
  const auto* sizes_begin = staging.host_sizes(0);
  const auto* sizes_end = staging.host_sizes(o.slots - 1) + o.chunk_pieces;
  for (unsigned a = 0; a < o.slots; ++a) {
    const uint64_t* words = staging.scratch(a).host_words;
    const uint64_t* end = words + o.chunk_pieces * vse::kCodecHostWords;
    CHECK(end <= sizes_begin || words >= sizes_end);
    for (unsigned b = a + 1; b < o.slots; ++b) {
      const uint64_t* other = staging.scratch(b).host_words;
      CHECK(end <= other || other + o.chunk_pieces * vse::kCodecHostWords <= words);
    }
    CHECK(staging.scratch(a).sizes == staging.sizes(a));
  }
  std::vector<uint8_t> plain(3 * 64 * KiB, 7);
  std::vector<vse::CodecPiece> batch;
  for (size_t i = 0; i < 3; ++i)
    batch.push_back({reinterpret_cast<uintptr_t>(plain.data() + i * 64 * KiB), 64 * KiB, staging.packed(1, i), 0});
  codec.compress(batch, staging.scratch(1), *backend.codec_stream(0));
  const uint64_t* words = staging.scratch(1).host_words;
  CHECK(words[0] == batch[0].plain_address && words[3 + 2] == 64 * KiB && words[6 + 1] == staging.packed(1, 1));
  CHECK(staging.host_sizes(0)[0] == 0 && staging.scratch(0).host_words[0] == 0);  // other slots untouched
}

void test_bad_compress_options_are_rejected() {
  Allocator a(std::make_unique<vse::HostBackend>(64 * MiB));
  CHECK_THROWS(a.update_options([](vse::AllocatorOptions& o) { o.compress.piece_bytes = 100; }), vse::InvalidArgument);
  CHECK_THROWS(a.update_options([](vse::AllocatorOptions& o) { o.compress.slots = 1; }), vse::InvalidArgument);
  CHECK_THROWS(a.update_options([](vse::AllocatorOptions& o) { o.compress.chunk_pieces = 0; }), vse::InvalidArgument);
  CHECK_THROWS(vse::parse_compress_mode("sometimes"), vse::InvalidArgument);
  CHECK(a.options().compress.mode == vse::CompressMode::Off);
}

}  // namespace

int main(int argc, char** argv) {
  static const vse_test::Test tests[] = {
      {"round_trip_host", test_round_trip_host},
      {"round_trip_async", test_round_trip_async},
      {"sleep_copy_fault_host", test_sleep_copy_fault_host},
      {"sleep_copy_fault_async", test_sleep_copy_fault_async},
      {"sleep_codec_fault_host", test_sleep_codec_fault_host},
      {"sleep_codec_fault_async", test_sleep_codec_fault_async},
      {"sleep_fence_fault_async", test_sleep_fence_fault_async},
      {"wake_copy_fault_host", test_wake_copy_fault_host},
      {"wake_copy_fault_async", test_wake_copy_fault_async},
      {"wake_codec_fault_host", test_wake_codec_fault_host},
      {"wake_codec_fault_async", test_wake_codec_fault_async},
      {"plain_pieces_start_on_a_page_host", test_plain_pieces_start_on_a_page_host},
      {"plain_pieces_start_on_a_page_async", test_plain_pieces_start_on_a_page_async},
      {"plain_pieces_wake_host", test_plain_pieces_wake_host},
      {"plain_pieces_wake_async", test_plain_pieces_wake_async},
      {"wake_copy_fault_plain_pieces_host", test_wake_copy_fault_plain_pieces_host},
      {"wake_copy_fault_plain_pieces_async", test_wake_copy_fault_plain_pieces_async},
      {"wake_copy_fault_mixed_auto_async", test_wake_copy_fault_mixed_auto_async},
      {"wake_codec_fault_mixed_auto_async", test_wake_codec_fault_mixed_auto_async},
      {"one_chunk_packed_host", test_one_chunk_packed_host},
      {"one_chunk_packed_async", test_one_chunk_packed_async},
      {"short_chunk_packed_host", test_short_chunk_packed_host},
      {"short_chunk_packed_async", test_short_chunk_packed_async},
      {"reference_codec", test_reference_codec_round_trips_and_rejects_corrupt_streams},
      {"each_slot_has_its_own_codec_words", test_each_slot_has_its_own_codec_words},
      {"bad_options", test_bad_compress_options_are_rejected},
  };
  return vse_test::run_tests(tests, argc, argv);
}
