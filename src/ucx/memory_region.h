// MemoryRegion: owns one ucp_mem_h (ucp_mem_map .. ucp_mem_unmap); keeps its
// Context alive. Either over memory the caller allocated (Map), or over
// memory UCX allocated for it (Allocate), which the region then owns:
// ucp_mem_unmap frees it. PackedRkey: owns the buffer from ucp_rkey_pack.
//
// Both are move-only with a valid empty state. Thread-compatible.
// REQUIRES (Map): the mapped memory outlives the MemoryRegion.
#ifndef KVFERRY_SRC_UCX_MEMORY_REGION_H_
#define KVFERRY_SRC_UCX_MEMORY_REGION_H_

#include <cstddef>
#include "kvferry/source_location.h"
#include "absl/strings/string_view.h"

#include <ucp/api/ucp.h>

#include "absl/status/statusor.h"
#include "kvferry/kv_pool.h"
#include "src/ucx/context.h"

namespace kvferry::internal {

class PackedRkey {
 public:
  PackedRkey() = default;
  ~PackedRkey() { Reset(); }
  PackedRkey(PackedRkey&& other) noexcept;
  PackedRkey& operator=(PackedRkey&& other) noexcept;
  PackedRkey(const PackedRkey&) = delete;
  PackedRkey& operator=(const PackedRkey&) = delete;

  void Reset() noexcept;
  bool empty() const { return buffer_ == nullptr; }
  absl::string_view bytes() const { return {static_cast<const char*>(buffer_), length_}; }

 private:
  friend class MemoryRegion;
  PackedRkey(void* buffer, size_t length, Tracked tracked)
      : buffer_(buffer), length_(length), tracked_(std::move(tracked)) {}

  void* buffer_ = nullptr;
  size_t length_ = 0;
  Tracked tracked_;
};

class MemoryRegion {
 public:
  // Registers [address, address + length). kInvalidArgument for a null
  // address, zero length or null context; UCX failures are mapped.
  // `type` other than kHost is passed to UCX as the memory type (it must
  // support it: Context::SupportsMemoryType).
  static absl::StatusOr<MemoryRegion> Map(
      ContextPtr context, void* address, size_t length,
      SourceLocation site = SourceLocation::current()) {
    return Map(std::move(context), address, length, MemoryType::kHost, site);
  }
  static absl::StatusOr<MemoryRegion> Map(ContextPtr context, void* address, size_t length,
                                          MemoryType type, SourceLocation site);
  // Asks UCX to allocate `length` bytes and registers them
  // (UCP_MEM_MAP_ALLOCATE): UCX picks the allocation method by its
  // ALLOC_PRIO setting, e.g. a System V segment of its sysv transport, which
  // peers on this host can then map. address() and length() are what UCX
  // returned (ucp_mem_query): length() may exceed `length` (rounded up to a
  // page, or a huge page). The region owns the memory. kInvalidArgument for
  // zero length or null context; kResourceExhausted when UCX cannot allocate.
  static absl::StatusOr<MemoryRegion> Allocate(
      ContextPtr context, size_t length,
      SourceLocation site = SourceLocation::current());

  MemoryRegion() = default;
  ~MemoryRegion() { Reset(); }
  MemoryRegion(MemoryRegion&& other) noexcept;
  MemoryRegion& operator=(MemoryRegion&& other) noexcept;
  MemoryRegion(const MemoryRegion&) = delete;
  MemoryRegion& operator=(const MemoryRegion&) = delete;

  // Unmaps (ucp_mem_unmap) and drops the context reference. Idempotent.
  void Reset() noexcept;
  bool empty() const { return handle_ == nullptr; }
  ucp_mem_h native_handle() const { return handle_; }
  void* address() const { return address_; }
  size_t length() const { return length_; }
  // Whether UCX allocated the memory (Allocate): Reset() frees it.
  bool owns_memory() const { return owns_memory_; }

  absl::StatusOr<PackedRkey> PackRkey(
      SourceLocation site = SourceLocation::current()) const;

 private:
  MemoryRegion(ContextPtr context, ucp_mem_h handle, void* address, size_t length,
               bool owns_memory, Tracked tracked)
      : context_(std::move(context)), handle_(handle), address_(address),
        length_(length), owns_memory_(owns_memory), tracked_(std::move(tracked)) {}

  ContextPtr context_;
  ucp_mem_h handle_ = nullptr;
  void* address_ = nullptr;
  size_t length_ = 0;
  bool owns_memory_ = false;
  Tracked tracked_;
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_UCX_MEMORY_REGION_H_
