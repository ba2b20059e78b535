// KvLayout: the shape of one paged KV cache, and where each block lives.
//
// Memory order, as in vLLM's per-layer KV tensors: for each layer, one plane
// per K and V (one plane only when separate_kv is false, e.g. MLA), each plane
// holding num_blocks chunks of chunk_bytes(). Block b of layer l, plane p
// starts at Offset(l, p, b). Consecutive block ids are adjacent in memory
// within a plane, so runs of them move as one operation.
//
// A plain value type; thread-compatible.
#ifndef KVFERRY_KV_LAYOUT_H_
#define KVFERRY_KV_LAYOUT_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace kvferry {

struct KvLayout {
  uint32_t num_layers = 0;        // transformer layers; 1..1024
  uint32_t num_blocks = 0;        // blocks in the pool; >= 1
  uint32_t tokens_per_block = 0;  // 1..65536
  uint32_t num_kv_heads = 0;      // 1..4096
  uint32_t head_dim = 0;          // 1..65536
  uint32_t element_bytes = 0;     // 1 (fp8), 2 (fp16/bf16), 4 or 8
  bool separate_kv = true;        // K and V planes; false for one latent plane

  // Largest pool kvferry accepts (1 TiB); larger is taken as a mistake.
  static constexpr uint64_t kMaxTotalBytes = uint64_t{1} << 40;
  // Every chunk is a multiple of this, so every block starts cache-aligned.
  static constexpr uint64_t kChunkAlignment = 64;

  // kInvalidArgument naming the field and value for zero, absurd or
  // overflowing sizes and for chunks not a multiple of kChunkAlignment.
  absl::Status Validate() const;

  uint32_t num_planes() const { return separate_kv ? 2 : 1; }
  // Bytes of one block in one layer and one plane.
  // REQUIRES: Validate().ok() (otherwise the products may overflow).
  uint64_t chunk_bytes() const {
    return uint64_t{tokens_per_block} * num_kv_heads * head_dim * element_bytes;
  }
  // Bytes of one block across all layers and planes: what a request's block
  // costs to move.
  uint64_t block_bytes() const { return chunk_bytes() * num_planes() * num_layers; }
  uint64_t plane_bytes() const { return chunk_bytes() * num_blocks; }
  uint64_t layer_bytes() const { return plane_bytes() * num_planes(); }
  uint64_t total_bytes() const { return layer_bytes() * num_layers; }
  uint64_t Offset(uint32_t layer, uint32_t plane, uint32_t block) const {
    return layer * layer_bytes() + plane * plane_bytes() + block * chunk_bytes();
  }

  // Whether a peer's pool can exchange blocks with this one: same chunk bytes,
  // layers, planes, element size and tokens per block (block counts may
  // differ). kFailedPrecondition naming both values when not.
  absl::Status CheckCompatible(const KvLayout& remote) const;
  // Whether a peer's pool holds the same model split over another number of
  // tensor-parallel ranks (heterogeneous TP; see TransferSpec::slice_bytes):
  // same layers, planes, tokens per block, head_dim and element size, and
  // KV heads per rank where one side's count divides the other's (an
  // integer TP ratio), so either side's chunk is a whole number of the
  // other's. Block counts may differ. Equal layouts pass. kFailedPrecondition
  // naming the first mismatch (both values) otherwise.
  absl::Status CheckHeadSliced(const KvLayout& remote) const;
  // One KV head's bytes in a chunk (tokens_per_block * head_dim *
  // element_bytes): the unit of a head slice. With heads outermost in a
  // chunk (vLLM's HND layout), heads [h, h + n) are the n * head_bytes()
  // bytes from h * head_bytes().
  uint64_t head_bytes() const { return uint64_t{tokens_per_block} * head_dim * element_bytes; }

  std::string ToString() const;
  friend bool operator==(const KvLayout&, const KvLayout&) = default;
};

}  // namespace kvferry

#endif  // KVFERRY_KV_LAYOUT_H_
