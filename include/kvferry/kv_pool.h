// KvPool: the KV blocks of one KvLayout, in memory registered with UCX:
// either one page-aligned arena kvferry allocates (Agent::CreatePool: one
// ucp_mem_map), or regions the engine allocated (Agent::RegisterPool: one
// ucp_mem_map per region). BlockSet: a move-only lease of some of its blocks.
// PoolMemorySource: who allocates a pool's memory.
//
// Ownership: the Agent owns its pools (Agent::CreatePool hands out a pointer
// valid until the Agent is destroyed). A BlockSet keeps the pool's memory and
// registration alive; its blocks return to the pool when the BlockSet and
// every transfer posted on it are gone ("fence before reuse": a transfer holds
// the lease until UCX can no longer touch the blocks).
//
// Sealed: users cannot construct, copy, move or delete a KvPool, nor reach
// the reference-counted state behind a KvPool or a BlockSet; the library
// reaches it through internal::Access (src/access.h, not installed). A
// KvPool* is valid exactly as long as its Agent: after the Agent is
// destroyed it dangles like any pointer into a destroyed owner, and no other
// KvPool object exists through which a dead agent's pool could be leased.
//
// Thread safety: KvPool is thread-safe. BlockSet is thread-compatible; its
// destruction may happen on any thread.
#ifndef KVFERRY_KV_POOL_H_
#define KVFERRY_KV_POOL_H_

#include <cstddef>
#include <cstdint>
#include "kvferry/source_location.h"
#include <span>
#include <string>

#include <boost/smart_ptr/intrusive_ptr.hpp>

#include "absl/status/statusor.h"
#include "kvferry/kv_layout.h"

namespace kvferry {

// Who allocates a pool's memory (AgentOptions::pool_memory).
enum class PoolMemorySource {
  // UCX allocates it (ucp_mem_map with UCP_MEM_MAP_ALLOCATE) from the
  // allocation methods in UcxSettings::alloc_prio: with UCX's shared-memory
  // transports enabled, a System V segment that peers on this host map, so
  // their put/get are plain copies into it ("shm-direct"); otherwise (e.g.
  // UCX_TLS=tcp) private anonymous memory, as kAnonymousMmap. The pool
  // shares the segment's fate: ucp_mem_unmap frees it.
  kUcxAllocated,
  // kvferry mmaps private anonymous memory (MAP_NORESERVE) and registers it.
  // UCX 1.13's shared-memory transports cannot map such memory, so peers on
  // this host reach it by kvferry's kernel copy ("shm-kernel-copy"; see
  // AgentOptions::kernel_copy), or else through put/get emulated with active
  // messages ("am-emulated": both processes copy every byte through FIFOs,
  // and this process's progress moves them). RDMA between hosts is
  // unaffected.
  kAnonymousMmap,
  // The engine allocated it and registered it with Agent::RegisterPool;
  // kvferry never frees it. Not a choice for AgentOptions::pool_memory.
  kEngineOwned,
};

// "ucx-allocated", "anonymous-mmap" or "engine-owned".
const char* PoolMemorySourceName(PoolMemorySource source);

// The kind of memory an engine registers (Agent::RegisterPool).
enum class MemoryType {
  kHost,
  // GPU memory, registered through UCX's CUDA support. Needs a UCX built
  // with CUDA (Debian's libucx is not); otherwise RegisterPool fails with
  // kFailedPrecondition. See docs/data-paths.md, "Engine-owned memory".
  kCuda,
};
// "host" or "cuda".
const char* MemoryTypeName(MemoryType type);

// One range of engine memory: for example one layer's K tensor. The layout
// says how many regions a pool has and what each holds (Agent::RegisterPool).
struct KvRegion {
  void* base = nullptr;  // aligned to KvLayout::kChunkAlignment
  uint64_t length = 0;   // exactly the bytes the layout puts in the region
};

namespace internal {
class PoolCore;
class LeaseCore;
class Access;
}  // namespace internal

class BlockSet {
 public:
  // The special members are defined in the library, where the reference
  // count of the lease is reachable.
  BlockSet() noexcept;  // empty: holds no blocks
  BlockSet(BlockSet&&) noexcept;
  BlockSet& operator=(BlockSet&&) noexcept;
  BlockSet(const BlockSet&) = delete;
  BlockSet& operator=(const BlockSet&) = delete;
  ~BlockSet();

  // Gives the blocks back (once no transfer holds them). Idempotent.
  void Reset();
  bool empty() const { return core_ == nullptr; }
  size_t size() const;
  std::span<const uint32_t> ids() const;
  const std::string& pool_name() const;
  const KvLayout& layout() const;

  // The chunk of block ids()[index] in one layer and plane (0 = K, 1 = V).
  // An empty span, in every build mode, when the set is empty or index,
  // layer or plane is out of range (index >= size(), layer >= num_layers,
  // plane >= num_planes()).
  std::span<std::byte> Chunk(size_t index, uint32_t layer, uint32_t plane) const;

 private:
  friend class KvPool;
  friend class internal::PoolCore;
  friend class internal::Access;
  explicit BlockSet(boost::intrusive_ptr<internal::LeaseCore> core) noexcept;
  boost::intrusive_ptr<internal::LeaseCore> core_;
};

// Created and destroyed only by its Agent (Agent::CreatePool).
class KvPool {
 public:
  KvPool(const KvPool&) = delete;
  KvPool& operator=(const KvPool&) = delete;

  const std::string& name() const;
  const KvLayout& layout() const;
  bool exported() const;  // reachable by peers
  // The first region's start (the arena's, page-aligned, for a pool kvferry
  // allocated). Use BlockSet::Chunk for a block's bytes.
  std::byte* base() const;
  uint64_t size_bytes() const;  // layout().total_bytes()
  // 1 for an arena; for engine memory, as registered (Agent::RegisterPool).
  uint32_t num_regions() const;
  MemoryType memory_type() const;
  uint32_t free_blocks() const;
  // Who allocated the memory (the agent's pool_memory when CreatePool made
  // it; kEngineOwned for RegisterPool).
  PoolMemorySource memory_source() const;
  // What the memory turned out to be, from /proc/self/maps at creation:
  // "ucx-sysv" or "ucx-posix" (a UCX shared-memory segment), "ucx-mmap" (UCX
  // fell back to anonymous memory: no shared-memory transport, or the
  // segment could not be had), "anonymous-mmap" (kAnonymousMmap), or
  // "ucx-other <path>"; "engine-owned" for RegisterPool.
  const std::string& backing() const;
  // Whether the memory is a shared-memory segment (counted by the kernel as
  // shared memory, not anonymous memory; peers on this host can map it).
  bool shared_memory() const;

  // Transfers of this agent in flight that name block `id` as a local
  // block, posted by ids (TransferSpec::local_pool) or on a BlockSet: from
  // PostTransfer until the transfer is fenced (no byte of it can move any
  // more). kInvalidArgument naming an id past the pool.
  absl::StatusOr<uint32_t> InFlight(uint32_t id) const;
  // How many blocks InFlight counts above zero.
  uint32_t busy_blocks() const;

  // Leases and transfers posted by ids: the engine owns its ids, so a
  // transfer may name a leased block by id (RemovePool waits for both). A
  // block some transfer still names is never handed out by Lease or
  // LeaseIds, even when it is not leased: it could still be written.

  // Leases `count` free blocks, lowest ids first (so runs coalesce), passing
  // over blocks that transfers still name. kInvalidArgument for count 0;
  // kResourceExhausted naming the pool, the count and the free blocks when
  // not enough are free.
  absl::StatusOr<BlockSet> Lease(uint32_t count,
                                 SourceLocation site = SourceLocation::current());
  // Leases exactly these ids (an engine whose scheduler picks block ids).
  // kInvalidArgument for an empty list, an id out of range or a duplicate;
  // kResourceExhausted naming the first id already leased or still named by
  // a transfer in flight. All or nothing.
  absl::StatusOr<BlockSet> LeaseIds(std::span<const uint32_t> ids,
                                    SourceLocation site = SourceLocation::current());

 private:
  friend class internal::Access;
  explicit KvPool(boost::intrusive_ptr<internal::PoolCore> core);
  ~KvPool();
  boost::intrusive_ptr<internal::PoolCore> core_;
};

}  // namespace kvferry

#endif  // KVFERRY_KV_POOL_H_
