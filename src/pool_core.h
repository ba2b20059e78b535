// PoolCore: the shared state behind a KvPool: its memory as registered
// regions (src/region_map.h) — one arena allocated by UCX or mmap'd by
// kvferry, or the engine's own ranges — each with its UCX registration and
// packed rkey, and the free-block set. LeaseCore: the shared state behind a BlockSet; transfers
// hold a reference to it, so blocks return to the pool only when the last
// holder lets go.
//
// Both are reference-counted (boost::intrusive_ref_counter, thread-safe
// counts) and never move. The last reference deletes the object; what goes
// with it (blocks back to the pool, the pool's memory unmapped) is the
// destructors' work.
// Destruction order: the MemoryRegions are unmapped before an mmap'd arena is
// munmap'ed (a UCX-allocated arena is freed by the unmap itself, and never
// munmap'ed here; engine memory is never freed); a LeaseCore keeps its
// PoolCore alive.
#ifndef KVFERRY_SRC_POOL_CORE_H_
#define KVFERRY_SRC_POOL_CORE_H_

#include <atomic>
#include "kvferry/source_location.h"
#include <span>
#include <string>
#include <vector>

#include <boost/smart_ptr/intrusive_ptr.hpp>
#include <boost/smart_ptr/intrusive_ref_counter.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_set.h"
#include "absl/status/statusor.h"
#include "kvferry/internal/mutex.h"
#include "kvferry/kv_layout.h"
#include "kvferry/kv_pool.h"
#include "src/region_map.h"
#include "src/tracked.h"
#include "src/ucx/memory_region.h"

namespace kvferry::internal {

// One registered range of a pool.
struct PoolRegion {
  std::byte* base = nullptr;
  uint64_t length = 0;        // the bytes the layout uses (RegionBytes)
  MemoryRegion registration;  // may cover more: UCX rounds its allocations up
  std::string packed_rkey;    // empty unless the pool is exported
};

class PoolCore : public boost::intrusive_ref_counter<PoolCore, boost::thread_safe_counter> {
 public:
  // Validates the layout, gets page-aligned memory (from UCX, or an anonymous
  // mmap, per `source`) and registers it. Leaves nothing mapped or
  // registered on failure: kResourceExhausted naming the pool and the size
  // when the memory cannot be had. With `populate`, every page is faulted in
  // here (src/populate.h); a failure to is kResourceExhausted too.
  static absl::StatusOr<boost::intrusive_ptr<PoolCore>> Create(
      ContextPtr context, std::string name, const KvLayout& layout, bool exported,
      PoolMemorySource source, bool populate, SourceLocation site);
  // Registers memory the engine owns (Agent::RegisterPool), one ucp_mem_map
  // per region, after checking the regions against the layout (count,
  // lengths, alignment, overlap, mapped pages). kInvalidArgument naming the
  // region; kFailedPrecondition for a memory type this UCX cannot register.
  // Nothing stays registered on failure.
  static absl::StatusOr<boost::intrusive_ptr<PoolCore>> Register(
      ContextPtr context, std::string name, const KvLayout& layout,
      std::span<const KvRegion> regions, MemoryType memory_type, bool exported,
      SourceLocation site);
  ~PoolCore();
  PoolCore(const PoolCore&) = delete;
  PoolCore& operator=(const PoolCore&) = delete;

  const std::string& name() const { return name_; }
  const KvLayout& layout() const { return layout_; }
  bool exported() const { return exported_; }
  std::byte* base() const { return regions_.front().base; }
  uint64_t size_bytes() const { return layout_.total_bytes(); }
  MemoryType memory_type() const { return memory_type_; }
  const std::vector<PoolRegion>& regions() const { return regions_; }
  // Where block 0 of (layer, plane) lives. REQUIRES: layer and plane in range.
  PlaneAt Locate(uint32_t layer, uint32_t plane) const {
    return LocatePlane(layout_, regions_.size(), layer, plane);
  }
  std::byte* ChunkAddress(uint32_t layer, uint32_t plane, uint32_t block) const {
    const PlaneAt at = Locate(layer, plane);
    return regions_[at.region].base + at.offset + uint64_t{block} * layout_.chunk_bytes();
  }
  PoolMemorySource memory_source() const { return source_; }
  const std::string& backing() const { return backing_; }
  bool shared_memory() const { return shared_; }
  uint32_t free_blocks() const ABSL_LOCKS_EXCLUDED(mu_);

  // Agent::RemovePool marks the pool while it waits for its blocks: Lease
  // and LeaseIds then fail with RemovingError() (kFailedPrecondition naming
  // the pool); a removal that is undone clears the mark.
  void SetRemoving(bool removing) ABSL_LOCKS_EXCLUDED(mu_);
  bool removing() const ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status RemovingError() const;

  // Leases skip blocks that transfers of this agent still name (in_flight
  // above zero), whether or not they are leased: see KvPool::Lease.
  absl::StatusOr<BlockSet> Lease(uint32_t count, SourceLocation site)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<BlockSet> LeaseIds(std::span<const uint32_t> ids, SourceLocation site)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Called by ~LeaseCore.
  void Return(const std::vector<uint32_t>& ids) ABSL_LOCKS_EXCLUDED(mu_);

  // Per-block counts of this agent's transfers in flight that name the
  // block locally (posted on a BlockSet or by ids): PostTransfer pins its
  // local ids once its checks have passed, EndTransferLocked unpins them
  // once the transfer is fenced. REQUIRES: ids in range; Unpin only what
  // was pinned.
  void Pin(std::span<const uint32_t> ids) ABSL_LOCKS_EXCLUDED(mu_);
  void Unpin(std::span<const uint32_t> ids) ABSL_LOCKS_EXCLUDED(mu_);
  // REQUIRES: id < layout().num_blocks.
  uint32_t InFlight(uint32_t id) const ABSL_LOCKS_EXCLUDED(mu_);
  // How many of `ids` have a count above zero (an id listed twice counts
  // twice), and the first such id. REQUIRES: ids in range.
  struct Busy {
    size_t blocks = 0;
    uint32_t first = 0;
  };
  Busy BusyAmong(std::span<const uint32_t> ids) const ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks of the pool with a count above zero.
  uint32_t busy_blocks() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  PoolCore(std::string name, const KvLayout& layout, bool exported,
           std::vector<PoolRegion> regions, PoolMemorySource source, MemoryType memory_type,
           std::string backing, bool shared, Tracked tracked);
  // Packs each region's rkey when exported; then builds the core.
  static absl::StatusOr<boost::intrusive_ptr<PoolCore>> Finish(
      ContextPtr context, std::string name, const KvLayout& layout, bool exported,
      std::vector<PoolRegion> regions, PoolMemorySource source, MemoryType memory_type,
      std::string backing, bool shared, SourceLocation site);

  // Constant after construction.
  const std::string name_;
  const KvLayout layout_;
  const bool exported_;
  const PoolMemorySource source_;
  const MemoryType memory_type_;
  const std::string backing_;
  const bool shared_;
  // Never empty. The registrations own a UCX-allocated arena; an mmap'd one
  // (kAnonymousMmap) is regions_[0], munmap'ed after they are unmapped.
  std::vector<PoolRegion> regions_;
  Tracked tracked_;

  mutable internal::Mutex mu_;
  absl::btree_set<uint32_t> free_ ABSL_GUARDED_BY(mu_);
  bool removing_ ABSL_GUARDED_BY(mu_) = false;
  // Indexed by block id (num_blocks entries); see Pin.
  std::vector<uint32_t> in_flight_ ABSL_GUARDED_BY(mu_);
  uint32_t busy_blocks_ ABSL_GUARDED_BY(mu_) = 0;  // entries of in_flight_ above zero
};

class LeaseCore : public boost::intrusive_ref_counter<LeaseCore, boost::thread_safe_counter> {
 public:
  LeaseCore(boost::intrusive_ptr<PoolCore> pool, std::vector<uint32_t> ids, Tracked tracked)
      : pool_(std::move(pool)), ids_(std::move(ids)), tracked_(std::move(tracked)) {}
  ~LeaseCore() { pool_->Return(ids_); }
  LeaseCore(const LeaseCore&) = delete;
  LeaseCore& operator=(const LeaseCore&) = delete;

  PoolCore& pool() const { return *pool_; }
  const std::vector<uint32_t>& ids() const { return ids_; }

 private:
  const boost::intrusive_ptr<PoolCore> pool_;
  const std::vector<uint32_t> ids_;
  Tracked tracked_;
};

using PoolCorePtr = boost::intrusive_ptr<PoolCore>;
using LeaseCorePtr = boost::intrusive_ptr<LeaseCore>;

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_POOL_CORE_H_
