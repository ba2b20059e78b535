// Turns (local block, remote block) pairs over a layer range into the fewest
// contiguous copies: pairs are sorted by local id, and runs where both ids
// advance by one become one copy per layer and plane.
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

// REQUIRES: layouts compatible (same chunk bytes and planes), region counts
// valid for their layouts (src/region_map.h), ids in range,
// local.size() == remote.size(), layer_begin < layer_end <= num_layers.
std::vector<CopyOp> PlanCopies(const KvLayout& local_layout, uint64_t local_regions,
                               const KvLayout& remote_layout, uint64_t remote_regions,
                               std::span<const uint32_t> local, std::span<const uint32_t> remote,
                               uint32_t layer_begin, uint32_t layer_end);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_TRANSFER_PLAN_H_
