// AgentImpl: fencing block ids (Agent::FenceBlocks), for engines that post
// transfers by block ids instead of BlockSet leases.
#include <span>

#include "absl/strings/str_cat.h"
#include "src/agent_impl.h"
#include "src/status_macros.h"

namespace kvferry::internal {

absl::Status AgentImpl::FenceBlocks(absl::string_view pool_name, std::span<const uint32_t> ids,
                                    absl::Duration timeout) {
  if (timeout < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("FenceBlocks('", pool_name, "'): timeout ",
                                                   absl::FormatDuration(timeout),
                                                   " is negative"));
  }
  ControlLock l(this);
  auto found = pools_.find(pool_name);
  if (found == pools_.end()) {
    return absl::NotFoundError(
        absl::StrCat("FenceBlocks: this agent has no pool '", pool_name, "'"));
  }
  // Held by reference: a RemovePool running meanwhile may drop the map's.
  const PoolCorePtr pool(&Access::Pool(*found->second));
  const uint32_t blocks = pool->layout().num_blocks;
  for (uint32_t id : ids) {
    if (id >= blocks) {
      return absl::OutOfRangeError(absl::StrCat("FenceBlocks: block id ", id,
                                                " is past the end of pool '", pool_name, "' (",
                                                blocks, " blocks)"));
    }
  }
  // Counts drop in EndTransferLocked, under mu_: its release wakes the wait.
  auto idle = [&pool, ids] { return pool->BusyAmong(ids).blocks == 0; };
  if (AwaitLocked(idle, timeout)) return absl::OkStatus();
  const PoolCore::Busy busy = pool->BusyAmong(ids);
  return absl::DeadlineExceededError(absl::StrCat(
      "FenceBlocks('", pool_name, "'): ", busy.blocks, " of ", ids.size(),
      " blocks are still named by transfers in flight after ", absl::FormatDuration(timeout),
      " (block ", busy.first, ": ", pool->InFlight(busy.first), " transfers)"));
}

}  // namespace kvferry::internal
