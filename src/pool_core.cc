#include "src/pool_core.h"

#include <sys/mman.h>

#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <fstream>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "src/populate.h"
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


PoolCore::PoolCore(std::string name, const KvLayout& layout, bool exported,
                   std::vector<PoolRegion> regions, PoolMemorySource source,
                   MemoryType memory_type, std::string backing, bool shared, Tracked tracked)
    : name_(std::move(name)), layout_(layout), exported_(exported), source_(source),
      memory_type_(memory_type), backing_(std::move(backing)), shared_(shared),
      regions_(std::move(regions)), tracked_(std::move(tracked)) {
  internal::MutexLock l(&mu_);
  for (uint32_t i = 0; i < layout_.num_blocks; ++i) free_.insert(free_.end(), i);
  in_flight_.assign(layout_.num_blocks, 0);
}

namespace {

absl::Status CheckPoolName(const std::string& name) {
  if (name.empty()) return absl::InvalidArgumentError("pool name must not be empty");
  if (name.size() > 255) {
    return absl::InvalidArgumentError(absl::StrCat("pool name of ", name.size(),
                                                   " characters is longer than 255"));
  }
  return absl::OkStatus();
}

// "region 3 (layer 1, plane V)" for error messages.
std::string RegionName(const KvLayout& layout, size_t count, size_t index) {
  if (count == 1) return "region 0 (the whole pool)";
  if (count == layout.num_layers) return absl::StrCat("region ", index, " (layer ", index, ")");
  const uint32_t planes = layout.num_planes();
  return absl::StrCat("region ", index, " (layer ", index / planes, ", plane ",
                      planes == 1 ? "KV" : (index % planes == 0 ? "K" : "V"), ")");
}

// kInvalidArgument unless every page of [base, base + length) is mapped.
absl::Status CheckMapped(const std::string& what, const std::byte* base, uint64_t length) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t begin = reinterpret_cast<uint64_t>(base) & ~(page - 1);
  const uint64_t end = reinterpret_cast<uint64_t>(base) + length;
  const uint64_t pages = (end - begin + page - 1) / page;
  // mincore wants a vector entry per page; probe in slices to bound it.
  constexpr uint64_t kSlicePages = 1 << 16;
  std::vector<unsigned char> vec(std::min(pages, kSlicePages));
  for (uint64_t done = 0; done < pages; done += kSlicePages) {
    const uint64_t n = std::min(kSlicePages, pages - done);
    if (mincore(reinterpret_cast<void*>(begin + done * page), n * page, vec.data()) != 0) {
      const int err = errno;
      return absl::InvalidArgumentError(absl::StrCat(
          what, " [0x", absl::Hex(base), ", +", length, ") is not mapped memory of this process (",
          std::strerror(err), ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PoolCorePtr> PoolCore::Finish(ContextPtr context, std::string name,
                                             const KvLayout& layout, bool exported,
                                             std::vector<PoolRegion> regions,
                                             PoolMemorySource source, MemoryType memory_type,
                                             std::string backing, bool shared,
                                             SourceLocation site) {
  if (exported) {
    for (size_t i = 0; i < regions.size(); ++i) {
      absl::StatusOr<PackedRkey> rkey = regions[i].registration.PackRkey(site);
      if (!rkey.ok()) {
        return absl::Status(rkey.status().code(),
                            absl::StrCat("pool '", name, "' ",
                                         RegionName(layout, regions.size(), i), ": ",
                                         rkey.status().message()));
      }
      regions[i].packed_rkey = std::string(rkey->bytes());
    }
  }
  Tracked tracked(context->ledger(), ResourceKind::kPool, site);
  return PoolCorePtr(new PoolCore(std::move(name), layout, exported, std::move(regions), source,
                                  memory_type, std::move(backing), shared, std::move(tracked)));
}

absl::StatusOr<PoolCorePtr> PoolCore::Create(ContextPtr context, std::string name,
                                             const KvLayout& layout, bool exported,
                                             PoolMemorySource source, bool populate,
                                             SourceLocation site) {
  KVFERRY_RETURN_IF_ERROR(CheckPoolName(name));
  if (absl::Status s = layout.Validate(); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("pool '", name, "': ", s.message()));
  }
  const uint64_t size = layout.total_bytes();
  // Set only for an arena kvferry mmap'd itself (UCX frees its own). Declared
  // before `regions`, so that on failure the registration goes first.
  void* mapped = nullptr;
  absl::Cleanup unmap = [&mapped, size] {
    if (mapped != nullptr) munmap(mapped, size);
  };
  std::vector<PoolRegion> regions(1);
  PoolRegion& arena = regions[0];
  arena.length = size;
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
    arena.base = static_cast<std::byte*>(allocated->address());
    arena.registration = *std::move(allocated);
  } else {
    void* mem = mmap(nullptr, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      int err = errno;
      return absl::ResourceExhaustedError(absl::StrCat("pool '", name, "': mmap of ", size,
                                                       " bytes failed: ", std::strerror(err)));
    }
    mapped = mem;
    arena.base = static_cast<std::byte*>(mem);
    KVFERRY_ASSIGN_OR_RETURN(arena.registration, MemoryRegion::Map(context, mem, size, site));
    backing = {"anonymous-mmap", false};
  }
  if (populate) {
    if (absl::Status st = PopulatePages(arena.base, size); !st.ok()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("pool '", name, "': populating its ", size, " bytes: ", st.message()));
    }
  }
  // On failure the registration unregisters (and frees UCX's arena) on return.
  KVFERRY_ASSIGN_OR_RETURN(
      PoolCorePtr core,
      Finish(context, std::move(name), layout, exported, std::move(regions), source,
             MemoryType::kHost, std::move(backing.name), backing.shared, site));
  mapped = nullptr;  // the pool owns it now
  return core;
}

absl::StatusOr<PoolCorePtr> PoolCore::Register(ContextPtr context, std::string name,
                                               const KvLayout& layout,
                                               std::span<const KvRegion> regions,
                                               MemoryType memory_type, bool exported,
                                               SourceLocation site) {
  KVFERRY_RETURN_IF_ERROR(CheckPoolName(name));
  auto fail = [&name](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat("pool '", name, "': ", s.message()));
  };
  if (absl::Status s = layout.Validate(); !s.ok()) return fail(s);
  if (memory_type != MemoryType::kHost && memory_type != MemoryType::kCuda) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat("memory type ", static_cast<int>(memory_type), " is not a MemoryType")));
  }
  if (absl::Status s = CheckRegionCount("the pool", layout, regions.size()); !s.ok()) {
    return fail(s);
  }
  const uint64_t want = RegionBytes(layout, regions.size());
  for (size_t i = 0; i < regions.size(); ++i) {
    const KvRegion& r = regions[i];
    const std::string what = RegionName(layout, regions.size(), i);
    const uint64_t addr = reinterpret_cast<uint64_t>(r.base);
    if (r.base == nullptr) return fail(absl::InvalidArgumentError(what + ": null base"));
    if (addr % KvLayout::kChunkAlignment != 0) {
      return fail(absl::InvalidArgumentError(absl::StrCat(
          what, ": base 0x", absl::Hex(addr), " is not aligned to ", KvLayout::kChunkAlignment,
          " bytes")));
    }
    if (r.length != want) {
      return fail(absl::InvalidArgumentError(absl::StrCat(
          what, ": length ", r.length, " bytes, but the layout puts ", want, " bytes in each of ",
          regions.size(), " regions (", layout.ToString(), ")")));
    }
    if (addr > UINT64_MAX - want) {
      return fail(absl::InvalidArgumentError(
          absl::StrCat(what, ": base 0x", absl::Hex(addr), " + ", want, " bytes wraps around")));
    }
    for (size_t j = 0; j < i; ++j) {
      const uint64_t other = reinterpret_cast<uint64_t>(regions[j].base);
      if (addr < other + want && other < addr + want) {
        return fail(absl::InvalidArgumentError(absl::StrCat(
            what, " [0x", absl::Hex(addr), ", +", want, ") overlaps ",
            RegionName(layout, regions.size(), j), " [0x", absl::Hex(other), ", +", want, ")")));
      }
    }
    if (memory_type == MemoryType::kHost) {
      if (absl::Status s = CheckMapped(what, static_cast<const std::byte*>(r.base), want); !s.ok()) return fail(s);
    }
  }
  if (memory_type != MemoryType::kHost && !context->SupportsMemoryType(memory_type)) {
    return fail(absl::FailedPreconditionError(absl::StrCat(
        "this UCX cannot register ", MemoryTypeName(memory_type),
        " memory (its context reports no such memory type; UCX must be built with it, "
        "see `ucx_info -d`)")));
  }
  std::vector<PoolRegion> registered(regions.size());
  for (size_t i = 0; i < regions.size(); ++i) {
    absl::StatusOr<MemoryRegion> mr =
        MemoryRegion::Map(context, regions[i].base, want, memory_type, site);
    if (!mr.ok()) {
      // `registered` unmaps what was registered so far on return.
      return fail(absl::Status(mr.status().code(),
                               absl::StrCat(RegionName(layout, regions.size(), i), ": ",
                                            mr.status().message())));
    }
    registered[i].base = static_cast<std::byte*>(regions[i].base);
    registered[i].length = want;
    registered[i].registration = *std::move(mr);
  }
  return Finish(std::move(context), std::move(name), layout, exported, std::move(registered),
                PoolMemorySource::kEngineOwned, memory_type, "engine-owned", false, site);
}

PoolCore::~PoolCore() {
  // Unregister before the memory goes away; a UCX-allocated arena goes with
  // the registration (ucp_mem_unmap frees it) and must not be munmap'ed;
  // engine memory is the engine's.
  std::byte* const base = regions_.front().base;
  regions_.clear();
  if (source_ == PoolMemorySource::kAnonymousMmap) munmap(base, layout_.total_bytes());
}

uint32_t PoolCore::free_blocks() const {
  internal::MutexLock l(&mu_);
  return static_cast<uint32_t>(free_.size());
}

absl::Status PoolCore::RemovingError() const {
  return absl::FailedPreconditionError(
      absl::StrCat("pool '", name_, "' is being removed (Agent::RemovePool)"));
}

void PoolCore::SetRemoving(bool removing) {
  internal::MutexLock l(&mu_);
  removing_ = removing;
}

bool PoolCore::removing() const {
  internal::MutexLock l(&mu_);
  return removing_;
}

absl::StatusOr<BlockSet> PoolCore::Lease(uint32_t count, SourceLocation site) {
  if (count == 0) {
    return absl::InvalidArgumentError(absl::StrCat("pool '", name_, "': lease of 0 blocks"));
  }
  std::vector<uint32_t> ids;
  {
    internal::MutexLock l(&mu_);
    if (removing_) return RemovingError();
    if (count > free_.size()) {
      return absl::ResourceExhaustedError(absl::StrCat("pool '", name_, "': ", count,
                                                       " blocks requested but only ",
                                                       free_.size(), " of ", layout_.num_blocks,
                                                       " are free"));
    }
    ids.reserve(count);
    if (busy_blocks_ == 0) {
      auto it = free_.begin();
      for (uint32_t i = 0; i < count; ++i) ids.push_back(*it++);
      free_.erase(free_.begin(), it);
    } else {
      // Free blocks that transfers posted by id still name are not handed out.
      for (auto it = free_.begin(); it != free_.end() && ids.size() < count; ++it) {
        if (in_flight_[*it] == 0) ids.push_back(*it);
      }
      if (ids.size() < count) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "pool '", name_, "': ", count, " blocks requested but only ", ids.size(), " of ",
            layout_.num_blocks, " are free and not named by a transfer in flight (",
            free_.size() - ids.size(), " more are free but still named by one)"));
      }
      for (uint32_t id : ids) free_.erase(id);
    }
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
    if (removing_) return RemovingError();
    for (uint32_t id : ids) {
      if (!free_.contains(id)) {
        return absl::ResourceExhaustedError(
            absl::StrCat("pool '", name_, "': block ", id, " is already leased"));
      }
      if (in_flight_[id] != 0) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "pool '", name_, "': block ", id, " is still named by ", in_flight_[id],
            " transfers in flight (posted by id; Agent::FenceBlocks waits for them)"));
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

void PoolCore::Pin(std::span<const uint32_t> ids) {
  internal::MutexLock l(&mu_);
  for (uint32_t id : ids) {
    if (in_flight_[id]++ == 0) ++busy_blocks_;
  }
}

void PoolCore::Unpin(std::span<const uint32_t> ids) {
  internal::MutexLock l(&mu_);
  for (uint32_t id : ids) {
    if (--in_flight_[id] == 0) --busy_blocks_;
  }
}

uint32_t PoolCore::InFlight(uint32_t id) const {
  internal::MutexLock l(&mu_);
  return in_flight_[id];
}

PoolCore::Busy PoolCore::BusyAmong(std::span<const uint32_t> ids) const {
  Busy busy;
  internal::MutexLock l(&mu_);
  if (busy_blocks_ == 0) return busy;
  for (uint32_t id : ids) {
    if (in_flight_[id] == 0) continue;
    if (busy.blocks++ == 0) busy.first = id;
  }
  return busy;
}

uint32_t PoolCore::busy_blocks() const {
  internal::MutexLock l(&mu_);
  return busy_blocks_;
}

}  // namespace kvferry::internal
