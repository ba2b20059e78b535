// The whole KV cache of a model with a given number of KV heads, as tensor-
// parallel ranks hold it: chunks in HND order (heads outermost), so rank r
// of a TP split holds heads [first, first + n) as the n * head_bytes() bytes
// of the whole chunk from first * head_bytes(). Word w of the whole chunk of
// block `tag` (layer, plane) is PatternWord(seed, tag, layer, plane, w)
// (tests/kv_pattern.h), whichever rank holds it.
#ifndef KVFERRY_TESTS_TP_PATTERN_H_
#define KVFERRY_TESTS_TP_PATTERN_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvferry/kv_layout.h"
#include "tests/kv_pattern.h"

namespace kvferry::test {

// The transfer tests' layout (4 layers, K and V, 16 tokens, head_dim 64,
// 2-byte elements: 2 KiB per head) with `heads` KV heads per rank.
inline KvLayout HeadLayout(uint32_t blocks, uint32_t heads) {
  KvLayout l = Layout(blocks);
  l.num_kv_heads = heads;
  return l;
}

// Fills one rank's chunk (rank_layout.chunk_bytes() bytes) with heads
// [first_head, ...) of block `tag`'s whole chunk.
inline void FillHeads(std::byte* chunk, const KvLayout& rank_layout, uint32_t first_head,
                      uint64_t seed, uint32_t tag, uint32_t layer, uint32_t plane) {
  const uint64_t first_word = first_head * rank_layout.head_bytes() / 8;
  for (uint64_t w = 0; w < rank_layout.chunk_bytes() / 8; ++w) {
    const uint64_t v = PatternWord(seed, tag, layer, plane, first_word + w);
    std::memcpy(chunk + w * 8, &v, 8);
  }
}

// The first byte offset of `bytes` at `at` that differs from heads
// [first_head, ...) of block `tag`'s whole chunk, or -1.
inline int64_t FirstWrongByte(const std::byte* at, uint64_t bytes, uint64_t head_bytes,
                              uint32_t first_head, uint64_t seed, uint32_t tag, uint32_t layer,
                              uint32_t plane) {
  const uint64_t first_word = first_head * head_bytes / 8;
  for (uint64_t w = 0; w < bytes / 8; ++w) {
    const uint64_t want = PatternWord(seed, tag, layer, plane, first_word + w);
    if (std::memcmp(at + w * 8, &want, 8) != 0) return static_cast<int64_t>(w * 8);
  }
  return -1;
}

}  // namespace kvferry::test

#endif  // KVFERRY_TESTS_TP_PATTERN_H_
