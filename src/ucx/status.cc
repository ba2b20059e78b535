#include "src/ucx/status.h"

#include "absl/strings/str_cat.h"

namespace kvferry::internal {

absl::Status UcsToStatus(ucs_status_t status, absl::string_view what) {
  if (status == UCS_OK) return absl::OkStatus();
  std::string msg = absl::StrCat(what, ": ", ucs_status_string(status));
  switch (status) {
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_TIMED_OUT:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_BUSY:
    case UCS_ERR_IO_ERROR:
      return absl::UnavailableError(msg);
    case UCS_ERR_CANCELED:
      return absl::CancelledError(msg);
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
    case UCS_ERR_EXCEEDS_LIMIT:
    case UCS_ERR_OUT_OF_RANGE:
      return absl::ResourceExhaustedError(msg);
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return absl::InvalidArgumentError(msg);
    case UCS_ERR_UNSUPPORTED:
    case UCS_ERR_NOT_IMPLEMENTED:
      return absl::UnimplementedError(msg);
    case UCS_ERR_NO_ELEM:
      return absl::NotFoundError(msg);
    default:
      if (UCS_IS_LINK_ERROR(status) || UCS_IS_ENDPOINT_ERROR(status)) {
        return absl::UnavailableError(msg);
      }
      return absl::InternalError(msg);
  }
}

PtrKind SortStatusPtr(ucs_status_ptr_t ptr) {
  if (ptr == nullptr) return PtrKind::kDone;
  if (UCS_PTR_IS_ERR(ptr)) return PtrKind::kError;
  return PtrKind::kInFlight;
}

}  // namespace kvferry::internal
