#include "kvferry/end_reason.h"

#include <optional>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "src/end_reason_internal.h"

namespace kvferry {
namespace {

constexpr EndReason kAllReasons[] = {
    EndReason::kNone,          EndReason::kPeerFailed,      EndReason::kPeerDisconnected,
    EndReason::kTicketRevoked, EndReason::kTicketExpired,   EndReason::kPeerTransferFailed,
    EndReason::kLayoutMismatch, EndReason::kAgentShutDown,  EndReason::kCancelled,
    EndReason::kPoolRemoved,   EndReason::kUnauthenticated, EndReason::kTransportError,
};

std::optional<EndReason> ReasonNamed(absl::string_view name) {
  for (EndReason r : kAllReasons) {
    if (name == EndReasonName(r)) return r;
  }
  return std::nullopt;
}

constexpr absl::string_view kTagOpen = "[reason:";

}  // namespace

const char* EndReasonName(EndReason reason) {
  switch (reason) {
    case EndReason::kNone: return "none";
    case EndReason::kPeerFailed: return "peer-failed";
    case EndReason::kPeerDisconnected: return "peer-disconnected";
    case EndReason::kTicketRevoked: return "ticket-revoked";
    case EndReason::kTicketExpired: return "ticket-expired";
    case EndReason::kPeerTransferFailed: return "peer-transfer-failed";
    case EndReason::kLayoutMismatch: return "layout-mismatch";
    case EndReason::kAgentShutDown: return "agent-shut-down";
    case EndReason::kCancelled: return "cancelled";
    case EndReason::kPoolRemoved: return "pool-removed";
    case EndReason::kUnauthenticated: return "unauthenticated";
    case EndReason::kTransportError: return "transport-error";
  }
  return "unknown";
}

EndReason ReasonOf(const absl::Status& status) {
  if (status.ok()) return EndReason::kNone;
  auto payload = status.GetPayload(kEndReasonTypeUrl);
  if (!payload) return EndReason::kNone;
  return ReasonNamed(std::string(*payload)).value_or(EndReason::kNone);
}

namespace internal {

absl::Status WithReason(absl::Status status, EndReason reason) {
  if (status.ok() || reason == EndReason::kNone) return status;
  status.SetPayload(kEndReasonTypeUrl, absl::Cord(EndReasonName(reason)));
  return status;
}

EndReason PeerEndReason(PeerState state, const absl::Status& status) {
  if (ReasonOf(status) == EndReason::kAgentShutDown) return EndReason::kAgentShutDown;
  return state == PeerState::kFailed ? EndReason::kPeerFailed : EndReason::kPeerDisconnected;
}

EndReason UcsFailureReason(ucs_status_t status) {
  switch (status) {
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_REJECTED:
      return EndReason::kPeerFailed;
    default:
      return EndReason::kTransportError;
  }
}

absl::Status PeerGoneStatus(const std::string& name, PeerState state, const absl::Status& why) {
  const EndReason reason = PeerEndReason(state, why);
  if (state == PeerState::kFailed) {
    return WithReason(
        absl::UnavailableError(absl::StrCat("peer '", name, "' failed: ", why.message())), reason);
  }
  return WithReason(absl::FailedPreconditionError(
                        absl::StrCat("peer '", name, "' is disconnected: ", why.message())),
                    reason);
}

std::string TagText(EndReason reason, absl::string_view text) {
  if (reason == EndReason::kNone) return std::string(text);
  return absl::StrCat(kTagOpen, EndReasonName(reason), "] ", text);
}

EndReason TakeTextTag(absl::string_view* text) {
  if (!absl::StartsWith(*text, kTagOpen)) return EndReason::kNone;
  const size_t close = text->find("] ", kTagOpen.size());
  if (close == absl::string_view::npos) return EndReason::kNone;
  std::optional<EndReason> reason =
      ReasonNamed(text->substr(kTagOpen.size(), close - kTagOpen.size()));
  if (!reason) return EndReason::kNone;
  text->remove_prefix(close + 2);
  return *reason;
}

}  // namespace internal
}  // namespace kvferry
