#include "src/ucx/memory_region.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "src/ucx/status.h"

namespace kvferry::internal {

PackedRkey::PackedRkey(PackedRkey&& other) noexcept
    : buffer_(std::exchange(other.buffer_, nullptr)),
      length_(std::exchange(other.length_, 0)),
      tracked_(std::move(other.tracked_)) {}

PackedRkey& PackedRkey::operator=(PackedRkey&& other) noexcept {
  if (this != &other) {
    Reset();
    buffer_ = std::exchange(other.buffer_, nullptr);
    length_ = std::exchange(other.length_, 0);
    tracked_ = std::move(other.tracked_);
  }
  return *this;
}

void PackedRkey::Reset() noexcept {
  if (buffer_ != nullptr) ucp_rkey_buffer_release(std::exchange(buffer_, nullptr));
  length_ = 0;
  tracked_.Reset();
}

absl::StatusOr<MemoryRegion> MemoryRegion::Map(ContextPtr context, void* address,
                                               size_t length, MemoryType type,
                                               SourceLocation site) {
  if (context == nullptr) return absl::InvalidArgumentError("MemoryRegion::Map: null context");
  if (address == nullptr) return absl::InvalidArgumentError("MemoryRegion::Map: null address");
  if (length == 0) return absl::InvalidArgumentError("MemoryRegion::Map: length 0");
  ucp_mem_map_params_t params = {};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  params.address = address;
  params.length = length;
  if (type == MemoryType::kCuda) {
    params.field_mask |= UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
    params.memory_type = UCS_MEMORY_TYPE_CUDA;
  }
  ucp_mem_h handle = nullptr;
  ucs_status_t st = ucp_mem_map(context->native_handle(), &params, &handle);
  if (st != UCS_OK) {
    return UcsToStatus(st, absl::StrCat("ucp_mem_map of ", length, " bytes"));
  }
  if (context->ledger() != nullptr) {
    Access::AddRegisteredBytes(*context->ledger(), static_cast<int64_t>(length));
  }
  Tracked tracked(context->ledger(), ResourceKind::kMemoryRegion, site);
  return MemoryRegion(std::move(context), handle, address, length, /*owns_memory=*/false,
                      std::move(tracked));
}

absl::StatusOr<MemoryRegion> MemoryRegion::Allocate(ContextPtr context, size_t length,
                                                    SourceLocation site) {
  if (context == nullptr) {
    return absl::InvalidArgumentError("MemoryRegion::Allocate: null context");
  }
  if (length == 0) return absl::InvalidArgumentError("MemoryRegion::Allocate: length 0");
  ucp_mem_map_params_t params = {};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                      UCP_MEM_MAP_PARAM_FIELD_FLAGS;
  params.address = nullptr;  // no hint: UCX places it
  params.length = length;
  params.flags = UCP_MEM_MAP_ALLOCATE;
  ucp_mem_h handle = nullptr;
  ucs_status_t st = ucp_mem_map(context->native_handle(), &params, &handle);
  if (st != UCS_OK) {
    absl::Status status = UcsToStatus(
        st, absl::StrCat("ucp_mem_map of ", length, " bytes with UCP_MEM_MAP_ALLOCATE"));
    // Every allocation method UCX tried failed: out of memory, whatever
    // status UCX chose to say so with.
    return absl::ResourceExhaustedError(status.message());
  }
  ucp_mem_attr_t attr = {};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  st = ucp_mem_query(handle, &attr);
  if (st != UCS_OK || attr.address == nullptr || attr.length < length) {
    ucp_mem_unmap(context->native_handle(), handle);
    if (st != UCS_OK) return UcsToStatus(st, "ucp_mem_query");
    return absl::InternalError(absl::StrCat("ucp_mem_query: UCX allocated ", attr.length,
                                            " bytes at ", absl::Hex(attr.address), " for ",
                                            length, " requested"));
  }
  if (context->ledger() != nullptr) {
    Access::AddRegisteredBytes(*context->ledger(), static_cast<int64_t>(attr.length));
  }
  Tracked tracked(context->ledger(), ResourceKind::kMemoryRegion, site);
  return MemoryRegion(std::move(context), handle, attr.address, attr.length,
                      /*owns_memory=*/true, std::move(tracked));
}

MemoryRegion::MemoryRegion(MemoryRegion&& other) noexcept
    : context_(std::move(other.context_)),
      handle_(std::exchange(other.handle_, nullptr)),
      address_(std::exchange(other.address_, nullptr)),
      length_(std::exchange(other.length_, 0)),
      owns_memory_(std::exchange(other.owns_memory_, false)),
      tracked_(std::move(other.tracked_)) {}

MemoryRegion& MemoryRegion::operator=(MemoryRegion&& other) noexcept {
  if (this != &other) {
    Reset();
    context_ = std::move(other.context_);
    handle_ = std::exchange(other.handle_, nullptr);
    address_ = std::exchange(other.address_, nullptr);
    length_ = std::exchange(other.length_, 0);
    owns_memory_ = std::exchange(other.owns_memory_, false);
    tracked_ = std::move(other.tracked_);
  }
  return *this;
}

void MemoryRegion::Reset() noexcept {
  if (handle_ != nullptr) {
    // For allocated memory this also frees it (UCX's own alloc method).
    ucs_status_t st = ucp_mem_unmap(context_->native_handle(), handle_);
    if (st != UCS_OK) UcsToStatus(st, "ucp_mem_unmap").IgnoreError();
    if (context_->ledger() != nullptr) {
      Access::AddRegisteredBytes(*context_->ledger(), -static_cast<int64_t>(length_));
    }
    handle_ = nullptr;
  }
  address_ = nullptr;
  length_ = 0;
  owns_memory_ = false;
  tracked_.Reset();
  context_.reset();
}

absl::StatusOr<PackedRkey> MemoryRegion::PackRkey(SourceLocation site) const {
  if (handle_ == nullptr) return absl::FailedPreconditionError("PackRkey on an empty MemoryRegion");
  void* buffer = nullptr;
  size_t length = 0;
  ucs_status_t st = ucp_rkey_pack(context_->native_handle(), handle_, &buffer, &length);
  if (st != UCS_OK) return UcsToStatus(st, "ucp_rkey_pack");
  return PackedRkey(buffer, length, Tracked(context_->ledger(), ResourceKind::kPackedRkey, site));
}

}  // namespace kvferry::internal
