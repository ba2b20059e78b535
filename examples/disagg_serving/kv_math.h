// The engine's "model": no neural network, only deterministic functions of
// token id, layer, K/V plane, position and head, cheap enough to compute and
// to check on every byte. Prefill writes them, decode verifies them, and the
// router recomputes each request's expected output from the prompt alone.
//
// A chunk (one block of one layer and plane) holds tokens_per_block rows per
// head, ordered [slot][head][head_dim]; each row is filled with 64-bit words
// derived from RowSeed. Slots past the end of a prompt are zero.
#ifndef KVFERRY_EXAMPLES_DISAGG_SERVING_KV_MATH_H_
#define KVFERRY_EXAMPLES_DISAGG_SERVING_KV_MATH_H_

#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "kvferry/kv_layout.h"

namespace kvferry::serving {

inline uint64_t Mix(uint64_t x) {  // splitmix64's finalizer
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The first word of the K or V row of `token` at `position`, in one layer and head.
inline uint64_t RowSeed(uint32_t token, uint32_t layer, uint32_t plane, uint32_t position,
                        uint32_t head) {
  uint64_t h = Mix((uint64_t{token} << 32) | position);
  return Mix(h ^ (uint64_t{layer} << 1 | plane) ^ (uint64_t{head} << 40));
}

inline uint64_t RowBytes(const KvLayout& l) { return uint64_t{l.head_dim} * l.element_bytes; }

// Fills (or, with `token` < 0, zeroes) the rows of slot `slot` in one chunk.
inline void WriteSlot(std::span<std::byte> chunk, const KvLayout& l, uint32_t slot,
                      int64_t token, uint32_t layer, uint32_t plane, uint32_t position) {
  const uint64_t row = RowBytes(l);
  std::byte* base = chunk.data() + uint64_t{slot} * l.num_kv_heads * row;
  if (token < 0) {
    std::memset(base, 0, row * l.num_kv_heads);
    return;
  }
  for (uint32_t head = 0; head < l.num_kv_heads; ++head) {
    const uint64_t seed = RowSeed(static_cast<uint32_t>(token), layer, plane, position, head);
    std::byte* p = base + head * row;
    for (uint64_t w = 0; w < row / 8; ++w) {
      const uint64_t v = seed + w * 0x9E3779B97F4A7C15ull;
      std::memcpy(p + w * 8, &v, 8);
    }
  }
}

// Whether the rows of slot `slot` hold what WriteSlot wrote; `scratch` is
// reused between calls.
inline bool CheckSlot(std::span<const std::byte> chunk, const KvLayout& l, uint32_t slot,
                      int64_t token, uint32_t layer, uint32_t plane, uint32_t position,
                      std::vector<std::byte>& scratch) {
  const uint64_t bytes = RowBytes(l) * l.num_kv_heads;
  scratch.resize(bytes);
  WriteSlot(std::span<std::byte>(scratch.data(), bytes), l, 0, token, layer, plane, position);
  return std::memcmp(chunk.data() + slot * bytes, scratch.data(), bytes) == 0;
}

// The next token after the one whose K row (last layer, head 0) starts with
// `k_word`: decode reads that word from its cache, the router from RowSeed.
inline uint32_t NextToken(uint64_t k_word, uint32_t vocab) {
  return static_cast<uint32_t>(Mix(k_word ^ 0x5bd1e995ull) % vocab);
}

// What decode must return for `prompt`: `count` tokens, each following from
// the previous token's KV at the next position.
inline std::vector<uint32_t> ExpectedOutput(const std::vector<uint32_t>& prompt, uint32_t count,
                                            const KvLayout& l, uint32_t vocab) {
  std::vector<uint32_t> out;
  uint32_t prev = prompt.back();
  uint32_t pos = static_cast<uint32_t>(prompt.size()) - 1;
  for (uint32_t i = 0; i < count; ++i) {
    prev = NextToken(RowSeed(prev, l.num_layers - 1, 0, pos, 0), vocab);
    out.push_back(prev);
    ++pos;
  }
  return out;
}

inline uint32_t BlocksFor(uint64_t tokens, const KvLayout& l) {
  return static_cast<uint32_t>((tokens + l.tokens_per_block - 1) / l.tokens_per_block);
}

}  // namespace kvferry::serving

#endif  // KVFERRY_EXAMPLES_DISAGG_SERVING_KV_MATH_H_
