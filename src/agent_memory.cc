// AgentImpl::GetMemoryReport: process figures plus what this agent owns.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "src/agent_impl.h"
#include "src/pool_core.h"
#include "src/status_macros.h"

namespace kvferry::internal {
namespace {

// Bytes of the pages of [base, base + size) that are resident, by mincore.
// Engine memory need not start on a page: whole pages are counted.
uint64_t ResidentBytes(const std::byte* base, uint64_t size) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t begin = reinterpret_cast<uint64_t>(base) & ~(page - 1);
  size += reinterpret_cast<uint64_t>(base) - begin;
  std::vector<unsigned char> vec((size + page - 1) / page);
  if (mincore(reinterpret_cast<void*>(begin), size, vec.data()) != 0) return 0;
  uint64_t pages = 0;
  for (unsigned char v : vec) pages += v & 1;
  return pages * page;
}

}  // namespace

absl::StatusOr<MemoryReport> AgentImpl::GetMemoryReport() const {
  MemoryReport r;
  r.taken = absl::Now();
  r.agent = options_.name;
  std::vector<AddressRange> ranges;
  {
    ControlLock l(this);
    for (const auto& [name, pool] : pools_) {
      PoolMemory p;
      p.name = name;
      for (const PoolRegion& region : Access::Pool(*pool).regions()) {
        // What UCX mapped: a UCX-allocated arena is rounded up to its pages.
        const uint64_t length = region.registration.length();
        p.registered_bytes += length;
        p.resident_bytes += ResidentBytes(region.base, length);
        const uint64_t begin = reinterpret_cast<uint64_t>(region.base);
        ranges.push_back({begin, begin + length});
      }
      p.backing = pool->backing();
      p.shared_memory = pool->shared_memory();
      p.blocks_total = pool->layout().num_blocks;
      p.blocks_free = pool->free_blocks();
      r.registered_bytes += p.registered_bytes;
      r.pools.push_back(std::move(p));
    }
    // The work in progress, with the counters taken under the same lock.
    r.work = work_metrics_.Snapshot();
    r.work.transfers_in_flight = in_flight_.size();
    for (const TransferCore& t : in_flight_) {
      r.work.oldest_in_flight_seconds = std::max(
          r.work.oldest_in_flight_seconds, absl::ToDoubleSeconds(r.taken - t.work.started));
    }
    r.work.offers_open = offers_.size();
    for (const PeerPtr& peer : peers_.All()) {
      if (peer->state() == PeerState::kHandshaking) ++r.work.peers_handshaking;
      if (peer->state() != PeerState::kConnected) continue;
      ++r.work.peers_connected;
      r.work.peer_paths.push_back(WorkStats::PeerPath{peer->name(), peer->link().path()});
    }
  }
  // Read after the pools, so pool pages touched in between count as
  // explained rather than unexplained.
  KVFERRY_ASSIGN_OR_RETURN(r.process, ReadProcessMemory(ranges));
  uint64_t explained = r.process.heap_system_bytes;
  // A shared-memory pool's pages are not in the anonymous bytes (the kernel
  // counts them as shared memory), so subtracting them would hide as many
  // unexplained bytes.
  for (const PoolMemory& p : r.pools) explained += p.shared_memory ? 0 : p.resident_bytes;
  // Signed, so growth shows even while the heap malloc holds (not all of it
  // resident) exceeds the anonymous bytes; both sides are far below 2^63.
  r.unexplained_signed_bytes =
      static_cast<int64_t>(r.process.anonymous_bytes) - static_cast<int64_t>(explained);
  r.unexplained_bytes =
      r.unexplained_signed_bytes > 0 ? static_cast<uint64_t>(r.unexplained_signed_bytes) : 0;
  r.live = GetStats();  // with the queue figures
  r.listener = GetListenerStats();
  r.ucx = context_->settings();
  return r;
}

}  // namespace kvferry::internal
