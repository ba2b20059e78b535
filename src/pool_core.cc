#include "src/pool_core.h"

#include <sys/mman.h>

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "src/status_macros.h"

namespace kvferry::internal {
namespace {

struct Backing {
  std::string name;
  bool shared = false;
};

// What UCX gave: the /proc/self/maps line of the mapping that holds `base`.
// UCX does not say which of its allocation methods succeeded (ucp_mem_query
// reports address and length only), and the answer decides how the memory
// report counts the pool (shared or anonymous memory) and what peers on this
// host can do with it.
Backing UcxBacking(const void* base) {
  const uint64_t addr = reinterpret_cast<uint64_t>(base);
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    // "start-end perms offset dev inode [path]"
    std::vector<absl::string_view> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (f.size() < 5) continue;
    std::vector<absl::string_view> range = absl::StrSplit(f[0], '-');
    uint64_t lo = 0, hi = 0;
    if (range.size() != 2 || !absl::SimpleHexAtoi(range[0], &lo) ||
        !absl::SimpleHexAtoi(range[1], &hi) || addr < lo || addr >= hi) {
      continue;
    }
    const bool shared = f[1].size() >= 4 && f[1][3] == 's';
    const absl::string_view path = f.size() >= 6 ? f[5] : "";
    if (absl::StartsWith(path, "/SYSV")) return {"ucx-sysv", shared};
    if (absl::StrContains(path, "ucx_shm_posix")) return {"ucx-posix", shared};
    if (path.empty() && !shared) return {"ucx-mmap", false};
    return {absl::StrCat("ucx-other ", path), shared};
  }
  return {"ucx-unknown", false};
}

}  // namespace

void intrusive_ptr_add_ref(PoolCore* p) { p->refs_.fetch_add(1, std::memory_order_relaxed); }
void intrusive_ptr_release(PoolCore* p) {
  if (p->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete p;
}
void intrusive_ptr_add_ref(LeaseCore* p) { p->refs_.fetch_add(1, std::memory_order_relaxed); }
void intrusive_ptr_release(LeaseCore* p) {
  if (p->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete p;
}

PoolCore::PoolCore(std::string name, const KvLayout& layout, bool exported, std::byte* base,
                   uint64_t size, PoolMemorySource source, std::string backing, bool shared,
                   Tracked tracked)
    : name_(std::move(name)), layout_(layout), exported_(exported), base_(base), size_(size),
      source_(source), backing_(std::move(backing)), shared_(shared),
      tracked_(std::move(tracked)) {
  internal::MutexLock l(&mu_);
  for (uint32_t i = 0; i < layout_.num_blocks; ++i) free_.insert(free_.end(), i);
}

absl::StatusOr<PoolCorePtr> PoolCore::Create(ContextPtr context, std::string name,
                                             const KvLayout& layout, bool exported,
                                             PoolMemorySource source, SourceLocation site) {
  if (name.empty()) return absl::InvalidArgumentError("pool name must not be empty");
  if (name.size() > 255) {
    return absl::InvalidArgumentError(absl::StrCat("pool name of ", name.size(),
                                                   " characters is longer than 255"));
  }
  if (absl::Status s = layout.Validate(); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("pool '", name, "': ", s.message()));
  }
  const uint64_t size = layout.total_bytes();
  // Set only for an arena kvferry mmap'd itself (UCX frees its own). Declared
  // before `region`, so that on failure the region unregisters first.
  void* mapped = nullptr;
  absl::Cleanup unmap = [&mapped, size] {
    if (mapped != nullptr) munmap(mapped, size);
  };
  MemoryRegion region;
  Backing backing;
  if (source == PoolMemorySource::kUcxAllocated) {
    absl::StatusOr<MemoryRegion> allocated = MemoryRegion::Allocate(context, size, site);
    if (!allocated.ok()) {
      return absl::Status(
          allocated.status().code(),
          absl::StrCat("pool '", name, "': UCX could not allocate ", size, " bytes (",
                       allocated.status().message(), "; allocation methods tried: ALLOC_PRIO=",
                       context->settings().alloc_prio, ")"));
    }
    // Every user of the arena needs pages: mincore in the memory report,
    // page-granular residency, blocks that never share a page with foreign
    // data. UCX's "heap" method (malloc) would break that.
    const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    if (reinterpret_cast<uint64_t>(allocated->address()) % page != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "pool '", name, "': UCX allocated ", size, " bytes at ",
          absl::Hex(allocated->address()), ", which is not page-aligned (an ALLOC_PRIO with "
          "'heap'?); drop 'heap' from UCX_ALLOC_PRIO or use "
          "AgentOptions::pool_memory = kAnonymousMmap"));
    }
    backing = UcxBacking(allocated->address());
    region = *std::move(allocated);
  } else {
    void* mem = mmap(nullptr, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      int err = errno;
      return absl::ResourceExhaustedError(absl::StrCat("pool '", name, "': mmap of ", size,
                                                       " bytes failed: ", std::strerror(err)));
    }
    mapped = mem;
    KVFERRY_ASSIGN_OR_RETURN(region, MemoryRegion::Map(context, mem, size, site));
    backing = {"anonymous-mmap", false};
  }
  std::string packed;
  if (exported) {
    // On failure `region` unregisters (and frees UCX's arena) on return.
    KVFERRY_ASSIGN_OR_RETURN(PackedRkey rkey, region.PackRkey(site));
    packed = std::string(rkey.bytes());
  }
  Tracked tracked(context->ledger(), ResourceKind::kPool, site);
  PoolCorePtr core(new PoolCore(std::move(name), layout, exported,
                                static_cast<std::byte*>(region.address()), size, source,
                                std::move(backing.name), backing.shared, std::move(tracked)));
  core->region_ = std::move(region);
  core->packed_rkey_ = std::move(packed);
  mapped = nullptr;  // the pool owns it now
  return core;
}

PoolCore::~PoolCore() {
  // Unregister before the memory goes away; a UCX-allocated arena goes with
  // the registration (ucp_mem_unmap frees it) and must not be munmap'ed.
  region_.Reset();
  if (source_ == PoolMemorySource::kAnonymousMmap) munmap(base_, size_);
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
