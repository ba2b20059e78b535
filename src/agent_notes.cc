// AgentImpl: notifications on their own (Agent::SendNotification), ordered
// after the transfers to the same peer posted before them.
#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "src/agent_impl.h"
#include "src/end_reason_internal.h"
#include "src/status_macros.h"

namespace kvferry::internal {

absl::Status AgentImpl::SendNotification(const std::string& peer_name, std::string payload) {
  if (payload.empty()) {
    return absl::InvalidArgumentError("empty notification (a peer could not tell it from none)");
  }
  if (payload.size() > wire::kMaxPayloadBytes) {
    return absl::InvalidArgumentError(absl::StrCat("notification of ", payload.size(),
                                                   " bytes exceeds ", wire::kMaxPayloadBytes));
  }
  ControlLock l(this);
  if (PeerPtr early = peers_.Find(peer_name);
      early != nullptr && early->state() == PeerState::kHandshaking) {
    return absl::FailedPreconditionError(
        absl::StrCat("peer '", peer_name, "' is still in its handshake"));
  }
  KVFERRY_ASSIGN_OR_RETURN(PeerPtr peer, PeerForWorkLocked(peer_name));
  if (peer->control().notes_waiting().size() >= kMaxWaitingNotes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        kMaxWaitingNotes, " notifications to peer '", peer_name,
        "' already wait for its earlier transfers or for it to read"));
  }
  // Every transfer posted before this call has a smaller id.
  peer->control().notes_waiting().push_back(
      {next_transfer_id_.load(std::memory_order_relaxed), std::move(payload)});
  SendWaitingNotesLocked(*peer);
  if (!peer->control().notes_waiting().empty()) worker_->Signal();
  return absl::OkStatus();
}

void AgentImpl::SendWaitingNotesLocked(Peer& peer) {
  if (peer.control().notes_waiting().empty()) return;
  if (peer.state() != PeerState::kConnected) {
    peer.control().notes_waiting().clear();  // nothing reaches an ended peer
    return;
  }
  uint64_t oldest = std::numeric_limits<uint64_t>::max();  // in flight to the peer
  if (peer.link().transfers_in_flight() != 0) {
    for (const TransferCore& t : in_flight_) {
      if (t.peer.get() == &peer) oldest = std::min(oldest, t.id());
    }
  }
  while (!peer.control().notes_waiting().empty() &&
         peer.control().notes_waiting().front().first <= oldest &&
         peer.control().conn() != nullptr &&
         peer.control().conn()->queued_bytes() < kHoldNotificationsAt) {
    SendLocked(peer, {.type = wire::MessageType::kNotify,
                      .text = std::move(peer.control().notes_waiting().front().second)});
    peer.control().notes_waiting().pop_front();
  }
}

void AgentImpl::SendAllWaitingNotesLocked() {
  for (const PeerPtr& peer : peers_.All()) SendWaitingNotesLocked(*peer);
}

}  // namespace kvferry::internal

namespace kvferry {

absl::Status Agent::SendNotification(const std::string& peer, std::string payload) {
  return impl_->SendNotification(peer, std::move(payload));
}

}  // namespace kvferry
