// Deterministic block contents for transfer tests, and their layout: block `tag` filled for
// `seed` holds a pattern no other (seed, tag, layer, plane, offset) shares, and
// a 64-bit checksum over all its chunks verifies it.
#ifndef KVFERRY_TESTS_KV_PATTERN_H_
#define KVFERRY_TESTS_KV_PATTERN_H_

#include <cstdint>
#include <cstring>

#include "kvferry/kv_layout.h"
#include "kvferry/kv_pool.h"

namespace kvferry::test {

// The layout the transfer tests (and kvferry_test_peer) move: `layers`
// layers, K and V, chunks of 16 tokens x 2 heads x 64 x 2 bytes (4 KiB), so
// 32 KiB per block with 4 layers.
inline KvLayout Layout(uint32_t blocks, uint32_t layers = 4) {
  return KvLayout{.num_layers = layers, .num_blocks = blocks, .tokens_per_block = 16,
                  .num_kv_heads = 2, .head_dim = 64, .element_bytes = 2};
}

inline uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  return x ^ (x >> 33);
}

inline uint64_t PatternWord(uint64_t seed, uint32_t tag, uint32_t layer, uint32_t plane,
                            uint64_t word) {
  return Mix(seed * 0x9e3779b97f4a7c15ULL ^ (uint64_t{tag} << 40) ^ (uint64_t{layer} << 24) ^
             (uint64_t{plane} << 20) ^ word);
}

// Fills blocks.ids()[index] with the pattern of (seed, tag).
inline void FillBlock(const BlockSet& blocks, size_t index, uint64_t seed, uint32_t tag) {
  const KvLayout& l = blocks.layout();
  for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
    for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
      auto chunk = blocks.Chunk(index, layer, plane);
      for (uint64_t w = 0; w < chunk.size() / 8; ++w) {
        uint64_t v = PatternWord(seed, tag, layer, plane, w);
        std::memcpy(chunk.data() + w * 8, &v, 8);
      }
    }
  }
}

// Checksum of blocks.ids()[index] over layers [layer_begin, layer_end).
inline uint64_t BlockChecksum(const BlockSet& blocks, size_t index, uint32_t layer_begin = 0,
                              uint32_t layer_end = ~0u) {
  const KvLayout& l = blocks.layout();
  uint64_t sum = 0;
  for (uint32_t layer = layer_begin; layer < l.num_layers && layer < layer_end; ++layer) {
    for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
      auto chunk = blocks.Chunk(index, layer, plane);
      for (uint64_t w = 0; w < chunk.size() / 8; ++w) {
        uint64_t v;
        std::memcpy(&v, chunk.data() + w * 8, 8);
        sum = Mix(sum ^ v) + w;
      }
    }
  }
  return sum;
}

// What BlockChecksum gives for a block filled with (seed, tag).
inline uint64_t ExpectedChecksum(const KvLayout& l, uint64_t seed, uint32_t tag,
                                 uint32_t layer_begin = 0, uint32_t layer_end = ~0u) {
  uint64_t sum = 0;
  for (uint32_t layer = layer_begin; layer < l.num_layers && layer < layer_end; ++layer) {
    for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
      for (uint64_t w = 0; w < l.chunk_bytes() / 8; ++w) {
        sum = Mix(sum ^ PatternWord(seed, tag, layer, plane, w)) + w;
      }
    }
  }
  return sum;
}

}  // namespace kvferry::test

#endif  // KVFERRY_TESTS_KV_PATTERN_H_
