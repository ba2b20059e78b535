#include "src/pool_core.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "src/status_macros.h"

namespace kvferry::internal {

void intrusive_ptr_add_ref(PoolCore* p) { p->refs_.fetch_add(1, std::memory_order_relaxed); }
void intrusive_ptr_release(PoolCore* p) {
  if (p->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete p;
}
void intrusive_ptr_add_ref(LeaseCore* p) { p->refs_.fetch_add(1, std::memory_order_relaxed); }
void intrusive_ptr_release(LeaseCore* p) {
  if (p->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete p;
}

PoolCore::PoolCore(std::string name, const KvLayout& layout, bool exported, std::byte* base,
                   uint64_t size, Tracked tracked)
    : name_(std::move(name)), layout_(layout), exported_(exported), base_(base), size_(size),
      tracked_(std::move(tracked)) {
  internal::MutexLock l(&mu_);
  for (uint32_t i = 0; i < layout_.num_blocks; ++i) free_.insert(free_.end(), i);
}

absl::StatusOr<PoolCorePtr> PoolCore::Create(ContextPtr context, std::string name,
                                             const KvLayout& layout, bool exported,
                                             SourceLocation site) {
  if (name.empty()) return absl::InvalidArgumentError("pool name must not be empty");
  if (name.size() > 255) {
    return absl::InvalidArgumentError(absl::StrCat("pool name of ", name.size(),
                                                   " characters is longer than 255"));
  }
  if (absl::Status s = layout.Validate(); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("pool '", name, "': ", s.message()));
  }
  const uint64_t size = layout.total_bytes();
  void* mem = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
  if (mem == MAP_FAILED) {
    int err = errno;
    return absl::ResourceExhaustedError(absl::StrCat("pool '", name, "': mmap of ", size,
                                                     " bytes failed: ", std::strerror(err)));
  }
  absl::Cleanup unmap = [mem, size] { munmap(mem, size); };
  KVFERRY_ASSIGN_OR_RETURN(MemoryRegion region, MemoryRegion::Map(context, mem, size, site));
  std::string packed;
  if (exported) {
    KVFERRY_ASSIGN_OR_RETURN(PackedRkey rkey, region.PackRkey(site));
    packed = std::string(rkey.bytes());
  }
  Tracked tracked(context->ledger(), ResourceKind::kPool, site);
  PoolCorePtr core(new PoolCore(std::move(name), layout, exported, static_cast<std::byte*>(mem),
                                size, std::move(tracked)));
  core->region_ = std::move(region);
  core->packed_rkey_ = std::move(packed);
  std::move(unmap).Cancel();
  return core;
}

PoolCore::~PoolCore() {
  region_.Reset();  // unregister before the memory goes away
  munmap(base_, size_);
}

uint32_t PoolCore::free_blocks() const {
  internal::MutexLock l(&mu_);
  return static_cast<uint32_t>(free_.size());
}

absl::StatusOr<BlockSet> PoolCore::Lease(uint32_t count, SourceLocation site) {
  if (count == 0) {
    return absl::InvalidArgumentError(absl::StrCat("pool '", name_, "': lease of 0 blocks"));
  }
  std::vector<uint32_t> ids;
  {
    internal::MutexLock l(&mu_);
    if (count > free_.size()) {
      return absl::ResourceExhaustedError(absl::StrCat("pool '", name_, "': ", count,
                                                       " blocks requested but only ",
                                                       free_.size(), " of ", layout_.num_blocks,
                                                       " are free"));
    }
    ids.reserve(count);
    auto it = free_.begin();
    for (uint32_t i = 0; i < count; ++i) ids.push_back(*it++);
    free_.erase(free_.begin(), it);
  }
  Tracked tracked(tracked_.ledger_ptr(), ResourceKind::kBlockSet, site);
  return BlockSet(LeaseCorePtr(new LeaseCore(PoolCorePtr(this), std::move(ids), std::move(tracked))));
}

absl::StatusOr<BlockSet> PoolCore::LeaseIds(std::span<const uint32_t> ids,
                                            SourceLocation site) {
  if (ids.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("pool '", name_, "': lease of 0 blocks"));
  }
  absl::btree_set<uint32_t> wanted;
  for (uint32_t id : ids) {
    if (id >= layout_.num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("pool '", name_, "': block id ", id,
                                                     " out of range [0, ", layout_.num_blocks,
                                                     ")"));
    }
    if (!wanted.insert(id).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("pool '", name_, "': block id ", id, " listed twice"));
    }
  }
  {
    internal::MutexLock l(&mu_);
    for (uint32_t id : ids) {
      if (!free_.contains(id)) {
        return absl::ResourceExhaustedError(
            absl::StrCat("pool '", name_, "': block ", id, " is already leased"));
      }
    }
    for (uint32_t id : ids) free_.erase(id);
  }
  Tracked tracked(tracked_.ledger_ptr(), ResourceKind::kBlockSet, site);
  return BlockSet(LeaseCorePtr(new LeaseCore(
      PoolCorePtr(this), std::vector<uint32_t>(ids.begin(), ids.end()), std::move(tracked))));
}

void PoolCore::Return(const std::vector<uint32_t>& ids) {
  internal::MutexLock l(&mu_);
  for (uint32_t id : ids) free_.insert(id);
}

}  // namespace kvferry::internal
