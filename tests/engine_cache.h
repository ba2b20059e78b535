// EngineCache: an engine's own KV cache for the tests of engine memory
// (Agent::RegisterPool): one region holding a whole KvLayout, 64-byte
// aligned but not page-aligned (as an engine's allocator may give), zeroed.
// Fills and checks blocks chunk by chunk, the way tests/kv_pattern.h does for
// kvferry's pools.
#ifndef KVFERRY_TESTS_ENGINE_CACHE_H_
#define KVFERRY_TESTS_ENGINE_CACHE_H_

#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "kvferry/kv_layout.h"
#include "tests/kv_pattern.h"

namespace kvferry::test {

class EngineCache {
 public:
  static constexpr unsigned char kCanary = 0xC5;

  explicit EngineCache(const KvLayout& layout) : layout_(layout) {
    raw_ = static_cast<std::byte*>(std::aligned_alloc(4096, layout.total_bytes() + 4096));
    base_ = raw_ + 64;
    std::memset(base_, 0, layout.total_bytes());
  }
  ~EngineCache() { std::free(raw_); }
  EngineCache(const EngineCache&) = delete;
  EngineCache& operator=(const EngineCache&) = delete;

  KvRegion region() const { return {base_, layout_.total_bytes()}; }
  std::byte* chunk(uint32_t layer, uint32_t plane, uint32_t block) const {
    return base_ + layout_.Offset(layer, plane, block);
  }
  // As FillBlock does for a BlockSet: block `block` holds (seed, tag).
  void Fill(uint32_t block, uint64_t seed, uint32_t tag) const {
    ForEachChunk(block, [&](uint32_t layer, uint32_t plane, std::byte* c) {
      for (uint64_t w = 0; w < layout_.chunk_bytes() / 8; ++w) {
        const uint64_t v = PatternWord(seed, tag, layer, plane, w);
        std::memcpy(c + w * 8, &v, 8);
      }
    });
  }
  // As BlockChecksum does for a BlockSet.
  uint64_t Checksum(uint32_t block) const {
    uint64_t sum = 0;
    ForEachChunk(block, [&](uint32_t, uint32_t, std::byte* c) {
      for (uint64_t w = 0; w < layout_.chunk_bytes() / 8; ++w) {
        uint64_t v;
        std::memcpy(&v, c + w * 8, 8);
        sum = Mix(sum ^ v) + w;
      }
    });
    return sum;
  }
  void WriteCanary(uint32_t block) const {
    ForEachChunk(block, [&](uint32_t, uint32_t, std::byte* c) {
      std::memset(c, kCanary, layout_.chunk_bytes());
    });
  }
  // The first offset in `block` (over all its chunks) that is not the
  // canary, or -1.
  int64_t FirstNonCanary(uint32_t block) const {
    int64_t at = -1, offset = 0;
    ForEachChunk(block, [&](uint32_t, uint32_t, std::byte* c) {
      for (uint64_t i = 0; i < layout_.chunk_bytes() && at < 0; ++i) {
        if (static_cast<unsigned char>(c[i]) != kCanary) at = offset + static_cast<int64_t>(i);
      }
      offset += static_cast<int64_t>(layout_.chunk_bytes());
    });
    return at;
  }
  // The first (layer, plane, byte) where bytes [from, from + n) of block
  // `a`'s chunks differ from bytes [at, at + n) of block `b`'s, or "".
  std::string Differs(uint32_t a, uint64_t from, uint32_t b, uint64_t at, uint64_t n) const {
    std::string where;
    ForEachChunk(a, [&](uint32_t layer, uint32_t plane, std::byte* c) {
      const std::byte* y = chunk(layer, plane, b) + at;
      for (uint64_t i = 0; i < n && where.empty(); ++i) {
        if (c[from + i] != y[i]) where = absl::StrCat("layer ", layer, " plane ", plane, " byte ", i);
      }
    });
    return where;
  }
  // Whether bytes [from, from + n) of every chunk of `block` are zero.
  bool AllZero(uint32_t block, uint64_t from, uint64_t n) const {
    bool zero = true;
    ForEachChunk(block, [&](uint32_t, uint32_t, std::byte* c) {
      for (uint64_t i = 0; i < n && zero; ++i) zero = c[from + i] == std::byte{0};
    });
    return zero;
  }

 private:
  template <typename F>
  void ForEachChunk(uint32_t block, F f) const {
    for (uint32_t layer = 0; layer < layout_.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < layout_.num_planes(); ++plane) {
        f(layer, plane, chunk(layer, plane, block));
      }
    }
  }

  const KvLayout layout_;
  std::byte* raw_ = nullptr;
  std::byte* base_ = nullptr;
};

}  // namespace kvferry::test

#endif  // KVFERRY_TESTS_ENGINE_CACHE_H_
