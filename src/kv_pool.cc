#include "kvferry/kv_pool.h"

#include "absl/strings/str_cat.h"
#include "src/pool_core.h"

namespace kvferry {

const char* PoolMemorySourceName(PoolMemorySource source) {
  switch (source) {
    case PoolMemorySource::kUcxAllocated:
      return "ucx-allocated";
    case PoolMemorySource::kAnonymousMmap:
      return "anonymous-mmap";
    case PoolMemorySource::kEngineOwned:
      return "engine-owned";
  }
  return "unknown";
}

const char* MemoryTypeName(MemoryType type) {
  switch (type) {
    case MemoryType::kHost:
      return "host";
    case MemoryType::kCuda:
      return "cuda";
  }
  return "unknown";
}

BlockSet::BlockSet() noexcept = default;
BlockSet::BlockSet(boost::intrusive_ptr<internal::LeaseCore> core) noexcept
    : core_(std::move(core)) {}
BlockSet::BlockSet(BlockSet&&) noexcept = default;
BlockSet& BlockSet::operator=(BlockSet&&) noexcept = default;
BlockSet::~BlockSet() = default;
void BlockSet::Reset() { core_.reset(); }

size_t BlockSet::size() const { return core_ ? core_->ids().size() : 0; }

std::span<const uint32_t> BlockSet::ids() const {
  if (!core_) return {};
  return core_->ids();
}

const std::string& BlockSet::pool_name() const {
  static const std::string* const kNone = new std::string();
  return core_ ? core_->pool().name() : *kNone;
}

const KvLayout& BlockSet::layout() const {
  static const KvLayout kEmpty;
  return core_ ? core_->pool().layout() : kEmpty;
}

std::span<std::byte> BlockSet::Chunk(size_t index, uint32_t layer, uint32_t plane) const {
  if (core_ == nullptr || index >= core_->ids().size()) return {};
  const internal::PoolCore& pool = core_->pool();
  const KvLayout& l = pool.layout();
  if (layer >= l.num_layers || plane >= l.num_planes()) return {};
  return {pool.ChunkAddress(layer, plane, core_->ids()[index]), l.chunk_bytes()};
}

KvPool::KvPool(boost::intrusive_ptr<internal::PoolCore> core) : core_(std::move(core)) {}
KvPool::~KvPool() = default;

internal::Access::OwnedPool internal::Access::MakePool(boost::intrusive_ptr<PoolCore> core) {
  return OwnedPool(new KvPool(std::move(core)));
}

const std::string& KvPool::name() const { return core_->name(); }
const KvLayout& KvPool::layout() const { return core_->layout(); }
bool KvPool::exported() const { return core_->exported(); }
std::byte* KvPool::base() const { return core_->base(); }
uint64_t KvPool::size_bytes() const { return core_->size_bytes(); }
uint32_t KvPool::num_regions() const {
  return static_cast<uint32_t>(core_->regions().size());
}
MemoryType KvPool::memory_type() const { return core_->memory_type(); }
uint32_t KvPool::free_blocks() const { return core_->free_blocks(); }
absl::StatusOr<uint32_t> KvPool::InFlight(uint32_t id) const {
  if (id >= core_->layout().num_blocks) {
    return absl::InvalidArgumentError(absl::StrCat("pool '", core_->name(), "': block id ", id,
                                                   " out of range [0, ",
                                                   core_->layout().num_blocks, ")"));
  }
  return core_->InFlight(id);
}
uint32_t KvPool::busy_blocks() const { return core_->busy_blocks(); }
PoolMemorySource KvPool::memory_source() const { return core_->memory_source(); }
const std::string& KvPool::backing() const { return core_->backing(); }
bool KvPool::shared_memory() const { return core_->shared_memory(); }

absl::StatusOr<BlockSet> KvPool::Lease(uint32_t count, SourceLocation site) {
  return core_->Lease(count, site);
}

absl::StatusOr<BlockSet> KvPool::LeaseIds(std::span<const uint32_t> ids,
                                          SourceLocation site) {
  return core_->LeaseIds(ids, site);
}

}  // namespace kvferry
