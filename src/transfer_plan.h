// Turns (local block, remote block) pairs over a layer range into the fewest
// contiguous copies: pairs are sorted by local id, and runs where both ids
// advance by one become one copy per layer and plane. With a slice of each
// chunk (heterogeneous tensor parallelism: a rank's heads), each pair moves
// its slice.
#ifndef KVFERRY_SRC_TRANSFER_PLAN_H_
#define KVFERRY_SRC_TRANSFER_PLAN_H_

#include <cstdint>
#include <span>
#include <vector>

#include "kvferry/kv_layout.h"

namespace kvferry::internal {

struct CopyOp {
  uint32_t local_region;   // index into the local pool's regions
  uint64_t local_offset;   // from that region's base
  uint32_t remote_region;  // index into the remote pool's regions
  uint64_t remote_offset;  // from that region's base
  uint64_t bytes;
  friend bool operator==(const CopyOp&, const CopyOp&) = default;
};

// A byte range inside every chunk: `bytes` from `local_offset` of each local
// chunk pair with as many from `remote_offset` of each remote chunk.
// bytes == 0: whole chunks (the two chunk sizes are equal).
struct ChunkSlice {
  uint64_t local_offset = 0;
  uint64_t remote_offset = 0;
  uint64_t bytes = 0;
};

// REQUIRES: same layers and planes; with a whole-chunk slice the same chunk
// bytes, else the slice inside both sides' chunks; region counts valid for
// their layouts (src/region_map.h), ids in range, local.size() ==
// remote.size(), layer_begin < layer_end <= num_layers.
// A slice as wide as both sides' chunks coalesces into runs like whole
// chunks; a narrower one leaves gaps between blocks: one copy per block.
std::vector<CopyOp> PlanCopies(const KvLayout& local_layout, uint64_t local_regions,
                               const KvLayout& remote_layout, uint64_t remote_regions,
                               std::span<const uint32_t> local, std::span<const uint32_t> remote,
                               uint32_t layer_begin, uint32_t layer_end,
                               const ChunkSlice& slice = {});

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_TRANSFER_PLAN_H_
