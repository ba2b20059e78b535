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
  uint64_t local_offset;   // from the local pool's base
  uint64_t remote_offset;  // from the remote pool's base
  uint64_t bytes;
  friend bool operator==(const CopyOp&, const CopyOp&) = default;
};

// REQUIRES: layouts compatible (same chunk bytes and planes), ids in range,
// local.size() == remote.size(), layer_begin < layer_end <= num_layers.
std::vector<CopyOp> PlanCopies(const KvLayout& local_layout, const KvLayout& remote_layout,
                               std::span<const uint32_t> local, std::span<const uint32_t> remote,
                               uint32_t layer_begin, uint32_t layer_end);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_TRANSFER_PLAN_H_
