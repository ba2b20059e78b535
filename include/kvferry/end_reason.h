// EndReason: why a transfer, an offer or a connection ended, as a value an
// engine can switch on instead of reading the status message.
//
// Every status kvferry gives for a transfer or an offer that ended other
// than well (Transfer::status, Offer::status, TransferCompletion::status,
// OfferCompletion::status), and every refusal of Connect or of PostTransfer
// caused by the peer's or the offer's state, carries its reason as a payload
// of the absl::Status (type URL kEndReasonTypeUrl); ReasonOf reads it. A
// status kvferry did not give a reason (OK, or bad input refused by the call
// itself: a bad block id, an oversized notification) reads as kNone. The
// status code stays what each call documents; the reason refines it (a
// kUnavailable transfer may have failed because its peer died, or because
// UCX reported a transport error: kPeerFailed or kTransportError).
//
// Thread safety: plain functions on values.
#ifndef KVFERRY_END_REASON_H_
#define KVFERRY_END_REASON_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvferry {

enum class EndReason : uint8_t {
  // OK, or a status without a reason (see the file comment).
  kNone = 0,
  // The peer process died (its control connection closed without a goodbye),
  // stopped answering for AgentOptions::peer_timeout, broke the protocol,
  // was replaced by a restart of the same name, or was failed here to fence
  // a transfer that a Cancel could not drain; or UCX reported its endpoint
  // failed (timed out, reset, unreachable) for a transfer's copies before
  // this agent had failed the peer. Its transfers and offers ended; this
  // agent may connect to it again.
  kPeerFailed = 1,
  // An orderly end of the connection: either side called Disconnect, or the
  // peer's agent was destroyed (it said goodbye).
  kPeerDisconnected = 2,
  // The offer was revoked by its owner (Offer::Revoke) before the peer moved
  // every layer: on the offering side the offer's status, on the taking
  // side the transfers on its ticket and later posts with it.
  kTicketRevoked = 3,
  // The offer's ttl passed before the peer moved every layer (either side,
  // as for kTicketRevoked).
  kTicketExpired = 4,
  // The peer's transfer on the offer failed, so the offer ended (the
  // offering side; the taker's own transfer says why it failed).
  kPeerTransferFailed = 5,
  // A pool of the two agents has the same name on both sides but layouts
  // that do not fit (Connect and the peer's listener refuse the connection;
  // a pool announced later is refused the same way).
  kLayoutMismatch = 6,
  // This agent was destroyed while the transfer or offer was open.
  kAgentShutDown = 7,
  // Transfer::Cancel ended the transfer.
  kCancelled = 8,
  // Agent::RemovePool cancelled the transfer or revoked the offer (on the
  // taking side: the offering agent removed the offered pool).
  kPoolRemoved = 9,
  // The other side could not prove it knows the shared secret, or a frame of
  // the handshake failed its integrity check (Connect and the listener;
  // status code kUnauthenticated).
  kUnauthenticated = 10,
  // UCX or the kernel copy reported an error for the copies themselves while
  // the peer stayed connected.
  kTransportError = 11,
};

// "none", "peer-failed", "peer-disconnected", "ticket-revoked",
// "ticket-expired", "peer-transfer-failed", "layout-mismatch",
// "agent-shut-down", "cancelled", "pool-removed", "unauthenticated",
// "transport-error"; "unknown" for a value outside the enum.
const char* EndReasonName(EndReason reason);

// The type URL of the payload that carries the reason (its value is
// EndReasonName of the reason).
inline constexpr char kEndReasonTypeUrl[] = "type.kvferry.dev/kvferry.EndReason";

// The reason `status` carries; kNone for OK, a status without the payload,
// or a payload this version does not know.
EndReason ReasonOf(const absl::Status& status);

}  // namespace kvferry

#endif  // KVFERRY_END_REASON_H_
