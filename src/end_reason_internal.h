// Setting the EndReason payload (include/kvferry/end_reason.h) where the
// library builds a status, and carrying a reason inside the text of a wire
// message between two agents of this version (REJECT, OFFER_REVOKE), so
// that the other side's status says the same reason.
#ifndef KVFERRY_SRC_END_REASON_INTERNAL_H_
#define KVFERRY_SRC_END_REASON_INTERNAL_H_

#include <string>

#include <ucs/type/status.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "kvferry/end_reason.h"
#include "kvferry/transfer.h"

namespace kvferry::internal {

// `status` with the reason attached (replacing any earlier one); OK and
// kNone leave it unchanged.
absl::Status WithReason(absl::Status status, EndReason reason);

// Why a peer's end ends what depended on it: kAgentShutDown when this
// agent's own shutdown closed it (its status says so), else kPeerFailed for
// a failed peer and kPeerDisconnected for a closed one.
EndReason PeerEndReason(PeerState state, const absl::Status& status);

// The reason for copies UCX failed with `status` while the agent still had
// the peer connected: kPeerFailed when UCX says the peer's endpoint failed
// (timed out, reset, unreachable: the agent fails the peer on its next
// pass), kTransportError otherwise.
EndReason UcsFailureReason(ucs_status_t status);

// The refusal or end of what needed a peer that ended: kUnavailable "peer
// '<name>' failed: ..." for a failed peer, kFailedPrecondition "... is
// disconnected: ..." for a closed one, with PeerEndReason's reason.
absl::Status PeerGoneStatus(const std::string& name, PeerState state, const absl::Status& why);

// "[reason:<name>] <text>" for a reason other than kNone; `text` otherwise.
std::string TagText(EndReason reason, absl::string_view text);
// Strips a tag TagText made from the front of *text and returns its reason;
// kNone (and *text unchanged) when there is none or it names no reason.
EndReason TakeTextTag(absl::string_view* text);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_END_REASON_INTERNAL_H_
