// AgentImpl: notifications on their own (Agent::SendNotification) and
// connection metadata (Agent::LocalMetadata, Agent::ConnectFromMetadata).
#include <algorithm>
#include <limits>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "src/agent_impl.h"
#include "src/end_reason_internal.h"
#include "src/metadata.h"
#include "src/status_macros.h"

namespace kvferry::internal {
namespace {

// As for a transfer's notification (agent_transfer.cc): a notification waits
// while this many bytes or more to its peer are still queued unsent.
constexpr size_t kHoldNotesAt = 1u << 20;

}  // namespace

absl::Status AgentImpl::SendNotification(const std::string& peer_name, std::string payload) {
  if (payload.empty()) {
    return absl::InvalidArgumentError("empty notification (a peer could not tell it from none)");
  }
  if (payload.size() > wire::kMaxPayloadBytes) {
    return absl::InvalidArgumentError(absl::StrCat("notification of ", payload.size(),
                                                   " bytes exceeds ", wire::kMaxPayloadBytes));
  }
  ControlLock l(this);
  PeerPtr peer = peers_.Find(peer_name);
  if (peer == nullptr) {
    if (const PeerInfo* ended = peers_.FindEnded(peer_name)) {
      return PeerGoneStatus(peer_name, ended->state, ended->status);
    }
    return absl::NotFoundError(absl::StrCat("unknown peer '", peer_name, "'"));
  }
  if (peer->state != PeerState::kConnected) {
    if (peer->state == PeerState::kHandshaking) {
      return absl::FailedPreconditionError(
          absl::StrCat("peer '", peer_name, "' is still in its handshake"));
    }
    return PeerGoneStatus(peer_name, peer->state, peer->status);
  }
  if (peer->closing) {
    return WithReason(absl::FailedPreconditionError(absl::StrCat(
                          "peer '", peer_name, "' is being disconnected by this agent")),
                      EndReason::kPeerDisconnected);
  }
  if (peer->notes_waiting.size() >= kMaxWaitingNotes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        kMaxWaitingNotes, " notifications to peer '", peer_name,
        "' already wait for its earlier transfers or for it to read"));
  }
  // Every transfer posted before this call has a smaller id.
  peer->notes_waiting.push_back(
      {next_transfer_id_.load(std::memory_order_relaxed), std::move(payload)});
  SendWaitingNotesLocked(*peer);
  if (!peer->notes_waiting.empty()) worker_->Signal();
  return absl::OkStatus();
}

void AgentImpl::SendWaitingNotesLocked(Peer& peer) {
  if (peer.notes_waiting.empty()) return;
  if (peer.state != PeerState::kConnected) {
    peer.notes_waiting.clear();  // nothing reaches an ended peer
    return;
  }
  uint64_t oldest = std::numeric_limits<uint64_t>::max();  // in flight to the peer
  if (peer.transfers_in_flight != 0) {
    for (const TransferCore& t : in_flight_) {
      if (t.peer.get() == &peer) oldest = std::min(oldest, t.id());
    }
  }
  while (!peer.notes_waiting.empty() && peer.notes_waiting.front().first <= oldest &&
         peer.conn != nullptr && peer.conn->queued_bytes() < kHoldNotesAt) {
    SendLocked(peer, {.type = wire::MessageType::kNotify,
                      .text = std::move(peer.notes_waiting.front().second)});
    peer.notes_waiting.pop_front();
  }
}

void AgentImpl::SendAllWaitingNotesLocked() {
  for (const PeerPtr& peer : peers_.All()) SendWaitingNotesLocked(*peer);
}

absl::StatusOr<std::string> AgentImpl::LocalMetadata(const std::string& advertise) const {
  ControlLock l(this);
  if (!listen_fd_.valid()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "agent '", options_.name, "' does not listen: call Listen before LocalMetadata"));
  }
  const std::string host = advertise.empty() ? listen_host_ : advertise;
  KVFERRY_ASSIGN_OR_RETURN(SocketAddress parsed, ParseSocketAddress(host, listen_port_));
  if (parsed.IsWildcard()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "agent '", options_.name, "' listens on the wildcard address ", host,
        ": pass the address peers should connect to (advertise_address)"));
  }
  if (host.size() > kMaxMetadataAddressBytes) {
    return absl::InvalidArgumentError(absl::StrCat("address '", host, "' is longer than ",
                                                   kMaxMetadataAddressBytes, " bytes"));
  }
  return EncodeMetadata({.wire_version = wire::kVersion,
                         .name = options_.name,
                         .incarnation = incarnation_,
                         .addresses = {{host, listen_port_}}});
}

absl::StatusOr<PeerInfo> AgentImpl::ConnectFromMetadata(absl::string_view metadata,
                                                        absl::Duration timeout) {
  KVFERRY_ASSIGN_OR_RETURN(AgentMetadata m, ParseMetadata(metadata));
  if (m.name == options_.name) {
    return absl::InvalidArgumentError(
        absl::StrCat("the metadata names this agent ('", m.name, "')"));
  }
  const absl::Time deadline = absl::Now() + timeout;
  absl::Status last;
  for (const auto& [address, port] : m.addresses) {
    absl::StatusOr<PeerInfo> got =
        Connect(address, port, std::max(deadline - absl::Now(), absl::ZeroDuration()));
    if (!got.ok()) {
      last = got.status();
      if (absl::IsAlreadyExists(last) || absl::IsUnauthenticated(last) ||
          absl::IsFailedPrecondition(last)) {
        return last;  // it reached an agent: another address would reach the same
      }
      continue;
    }
    if (got->name != m.name) {
      // Authenticated, but another agent than the metadata names.
      Disconnect(got->name).IgnoreError();
      return absl::FailedPreconditionError(absl::StrCat(
          "the metadata names agent '", m.name, "', but ", address, ":", port, " is agent '",
          got->name, "' (disconnected)"));
    }
    return got;
  }
  return last;
}

}  // namespace kvferry::internal

namespace kvferry {

absl::Status Agent::SendNotification(const std::string& peer, std::string payload) {
  return impl_->SendNotification(peer, std::move(payload));
}

absl::StatusOr<std::string> Agent::LocalMetadata(const std::string& advertise_address) const {
  return impl_->LocalMetadata(advertise_address);
}

absl::StatusOr<PeerInfo> Agent::ConnectFromMetadata(absl::string_view metadata,
                                                    absl::Duration timeout) {
  return impl_->ConnectFromMetadata(metadata, timeout);
}

}  // namespace kvferry
