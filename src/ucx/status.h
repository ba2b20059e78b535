// The one place that translates UCX statuses into absl::Status, and sorts a
// ucs_status_ptr_t into "done", "error" or "in flight".
#ifndef KVFERRY_SRC_UCX_STATUS_H_
#define KVFERRY_SRC_UCX_STATUS_H_

#include "absl/strings/string_view.h"

#include <ucs/type/status.h>

#include "absl/status/status.h"

namespace kvferry::internal {

// UCS_OK -> OkStatus. Otherwise an error whose message is
// "<what>: <ucs_status_string>" with the code chosen as in STYLE.md:
// reset/timeout/unreachable -> kUnavailable, canceled -> kCancelled,
// no memory/resource -> kResourceExhausted, invalid param -> kInvalidArgument,
// unsupported -> kUnimplemented, anything else -> kInternal.
// UCS_INPROGRESS is not an error and must not be passed here.
absl::Status UcsToStatus(ucs_status_t status, absl::string_view what);

// Result of a non-blocking UCX call.
enum class PtrKind { kDone, kError, kInFlight };
PtrKind SortStatusPtr(ucs_status_ptr_t ptr);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_UCX_STATUS_H_
