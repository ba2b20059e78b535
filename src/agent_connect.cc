// AgentImpl: listener, handshake, peer liveness and teardown.
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "src/agent_impl.h"
#include "src/status_macros.h"
#include "src/ucx/status.h"

namespace kvferry::internal {
namespace {

constexpr size_t kMaxEndedPeers = 1024;

// Constant-time comparison, so a wrong secret's timing says nothing.
bool SecretsEqual(absl::string_view a, absl::string_view b) {
  unsigned diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i]) ^ static_cast<unsigned char>(b[i]);
  }
  return diff == 0;
}

}  // namespace

absl::StatusOr<uint16_t> AgentImpl::Listen(const std::string& address, uint16_t port) {
  internal::MutexLock l(&mu_);
  if (listener_ != nullptr) {
    return absl::AlreadyExistsError(absl::StrCat("agent '", options_.name,
                                                 "' already listens on ", listener_->address(),
                                                 ":", listener_->port()));
  }
  KVFERRY_ASSIGN_OR_RETURN(
      listener_,
      Listener::Create(worker_, address, port,
                       [this](ucp_conn_request_h r) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                         conn_requests_.push_back(r);  // inside progress, mu_ held
                       }));
  return listener_->port();
}

void AgentImpl::HandleConnRequestsLocked() {
  std::vector<ucp_conn_request_h> requests;
  requests.swap(conn_requests_);
  for (ucp_conn_request_h r : requests) {
    auto ep = Endpoint::Accept(worker_, r);
    if (!ep.ok()) {
      std::fprintf(stderr, "kvferry: agent '%s' could not accept a connection: %s\n",
                   options_.name.c_str(), ep.status().ToString().c_str());
      continue;
    }
    PeerPtr peer(new Peer(Tracked(ledger_, ResourceKind::kPeer, SourceLocation::current())));
    peer->control = *ep;
    peer->last_heard = absl::Now();
    peers_by_ep_[peer->control->native_handle()] = peer;
  }
}

absl::StatusOr<PeerInfo> AgentImpl::Connect(const std::string& address, uint16_t port,
                                            absl::Duration timeout) {
  KVFERRY_ASSIGN_OR_RETURN(auto target, ParseSockaddr(address, port));
  internal::MutexLock l(&mu_);
  KVFERRY_ASSIGN_OR_RETURN(
      EndpointPtr ep,
      Endpoint::ConnectToSockaddr(worker_, reinterpret_cast<const sockaddr*>(&target.first),
                                  target.second));
  PeerPtr peer(new Peer(Tracked(ledger_, ResourceKind::kPeer, SourceLocation::current())));
  peer->is_client = true;
  peer->control = std::move(ep);
  peer->last_heard = absl::Now();
  peers_by_ep_[peer->control->native_handle()] = peer;
  SendLocked(*peer, {.type = wire::MessageType::kHello, .agent = DescribeSelfLocked()});
  worker_->Signal();

  auto answered = [&peer]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return peer->state != PeerState::kHandshaking;
  };
  if (options_.progress_thread) {
    mu_.AwaitWithTimeout(answered, timeout);
  } else {
    absl::Time deadline = absl::Now() + timeout;
    while (!answered() && absl::Now() < deadline) ProgressLocked();
  }
  if (peer->state == PeerState::kHandshaking) {
    ClosePeerLocked(peer, PeerState::kFailed,
                    absl::DeadlineExceededError(absl::StrCat(
                        "no handshake answer from ", address, ":", port, " within ",
                        absl::FormatDuration(timeout))),
                    /*graceful=*/false);
  }
  if (peer->state == PeerState::kConnected) return peer->Info();
  absl::Status status = peer->status;
  peer.reset();  // released under mu_
  return status;
}

wire::AgentDescriptor AgentImpl::DescribeSelfLocked() const {
  wire::AgentDescriptor d;
  d.name = options_.name;
  d.host_id = host_id_;
  auto address = worker_->Address();
  if (address.ok()) d.worker_address = std::string(address->bytes());
  d.secret = options_.shared_secret;
  for (const auto& [name, pool] : pools_) {
    if (!pool->exported()) continue;
    d.pools.push_back({.name = name,
                       .layout = pool->layout(),
                       .base = reinterpret_cast<uint64_t>(pool->base()),
                       .length = pool->size_bytes(),
                       .rkey = pool->core()->packed_rkey()});
  }
  return d;
}

void AgentImpl::SendLocked(Peer& peer, const wire::Message& message) {
  if (peer.control == nullptr || peer.control->native_handle() == nullptr) return;
  auto bytes = std::make_unique<std::string>(wire::Encode(message));
  ucp_request_param_t param = {};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_REPLY;
  ucs_status_ptr_t ptr = ucp_am_send_nbx(peer.control->native_handle(), kControlAmId, nullptr, 0,
                                         bytes->data(), bytes->size(), &param);
  switch (SortStatusPtr(ptr)) {
    case PtrKind::kDone:
      return;
    case PtrKind::kError:
      // The endpoint's error callback reports the failure; the peer is closed
      // by CheckPeersLocked.
      return;
    case PtrKind::kInFlight:
      peer.sends.push_back({std::move(bytes), Request::Adopt(worker_, ptr)});
      return;
  }
}

void AgentImpl::HandleControlEventsLocked() {
  while (!control_events_.empty()) {
    std::vector<ControlEvent> events;
    events.swap(control_events_);
    for (ControlEvent& e : events) {
      auto it = peers_by_ep_.find(e.ep);
      if (it == peers_by_ep_.end()) continue;  // a peer already closed
      PeerPtr peer = it->second;
      peer->last_heard = absl::Now();
      auto message = wire::Decode(e.bytes);
      if (!message.ok()) {
        std::fprintf(stderr, "kvferry: agent '%s' dropped peer '%s' after a bad message: %s\n",
                     options_.name.c_str(), peer->name.c_str(),
                     message.status().ToString().c_str());
        if (peer->state == PeerState::kHandshaking && !peer->is_client) {
          SendLocked(*peer, {.type = wire::MessageType::kReject,
                             .code = static_cast<uint32_t>(message.status().code()),
                             .text = std::string(message.status().message())});
        }
        ClosePeerLocked(peer, PeerState::kFailed, message.status(), /*graceful=*/true);
        continue;
      }
      HandleMessageLocked(peer, *std::move(message));
    }
  }
}

void AgentImpl::HandleMessageLocked(const PeerPtr& peer, wire::Message message) {
  using wire::MessageType;
  const bool handshaking = peer->state == PeerState::kHandshaking;
  switch (message.type) {
    case MessageType::kHello:
    case MessageType::kWelcome: {
      const bool expected = handshaking && (message.type == MessageType::kHello) != peer->is_client;
      absl::Status status =
          expected ? AdoptDescriptorLocked(*peer, message.agent)
                   : absl::InvalidArgumentError("handshake message out of order");
      if (!status.ok()) {
        std::fprintf(stderr, "kvferry: agent '%s' refused %s '%s': %s\n", options_.name.c_str(),
                     peer->is_client ? "the answer of" : "a connection from",
                     message.agent.name.c_str(), status.ToString().c_str());
        if (peer->is_client) {
          SendLocked(*peer, {.type = MessageType::kBye});
        } else {
          SendLocked(*peer, {.type = MessageType::kReject,
                             .code = static_cast<uint32_t>(status.code()),
                             .text = std::string(status.message())});
        }
        ClosePeerLocked(peer, PeerState::kFailed, status, /*graceful=*/true);
        return;
      }
      auto existing = peers_by_name_.find(peer->name);
      if (existing != peers_by_name_.end() && existing->second != peer) {
        // A restarted agent reconnects under the same name: the new
        // connection wins, and the old one's transfers fail.
        ClosePeerLocked(existing->second, PeerState::kFailed,
                        absl::UnavailableError(absl::StrCat(
                            "peer '", peer->name, "' was replaced by a new connection")),
                        /*graceful=*/false);
      }
      peers_by_name_[peer->name] = peer;
      ended_peers_.erase(peer->name);
      peer->state = PeerState::kConnected;
      peer->last_ping = absl::Now();
      if (!peer->is_client) {
        SendLocked(*peer, {.type = MessageType::kWelcome, .agent = DescribeSelfLocked()});
      }
      return;
    }
    case MessageType::kReject:
      if (peer->is_client && handshaking) {
        ClosePeerLocked(peer, PeerState::kFailed,
                        absl::Status(static_cast<absl::StatusCode>(message.code),
                                     absl::StrCat("the peer refused the connection: ",
                                                  message.text)),
                        /*graceful=*/false);
      }
      return;
    case MessageType::kNotify:
      if (peer->state == PeerState::kConnected) {
        internal::MutexLock l(&notify_mu_);
        notifications_.push_back({peer->name, std::move(message.text)});
      }
      return;
    case MessageType::kPing:
      return;
    case MessageType::kBye:
      ClosePeerLocked(peer, PeerState::kClosed,
                      absl::UnavailableError(absl::StrCat("peer '", peer->name,
                                                          "' disconnected")),
                      /*graceful=*/true);
      return;
  }
}

absl::Status AgentImpl::AdoptDescriptorLocked(Peer& peer, const wire::AgentDescriptor& remote) {
  if (!SecretsEqual(remote.secret, options_.shared_secret)) {
    return absl::PermissionDeniedError(
        absl::StrCat("shared secret mismatch with agent '", remote.name, "'"));
  }
  for (const wire::PoolDescriptor& rp : remote.pools) {
    auto local = pools_.find(rp.name);
    if (local == pools_.end()) continue;
    absl::Status compatible = local->second->layout().CheckCompatible(rp.layout);
    if (!compatible.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("pool '", rp.name, "': ", compatible.message()));
    }
  }
  const bool same_host = !host_id_.empty() && remote.host_id == host_id_;
  const bool peer_mode = options_.data_error_handling;
  KVFERRY_ASSIGN_OR_RETURN(
      EndpointPtr data,
      Endpoint::ConnectToAddress(worker_, remote.worker_address,
                                 peer_mode ? Endpoint::ErrorMode::kPeer
                                           : Endpoint::ErrorMode::kNone));
  std::vector<RemotePool> pools;
  for (const wire::PoolDescriptor& rp : remote.pools) {
    auto rkey = RemoteKey::Unpack(data, rp.rkey);
    if (!rkey.ok()) {
      pools.clear();
      data->Close(/*force=*/peer_mode, absl::Seconds(1)).IgnoreError();
      return absl::InvalidArgumentError(
          absl::StrCat("pool '", rp.name, "': ", rkey.status().message()));
    }
    pools.push_back({rp, *std::move(rkey)});
  }
  peer.name = remote.name;
  peer.same_host = same_host;
  peer.data_peer_mode = peer_mode;
  peer.data = std::move(data);
  peer.pools = std::move(pools);
  return absl::OkStatus();
}

void AgentImpl::CheckPeersLocked() {
  if (peers_by_ep_.empty()) return;
  const absl::Time now = absl::Now();
  std::vector<PeerPtr> peers;
  peers.reserve(peers_by_ep_.size());
  for (const auto& [ep, peer] : peers_by_ep_) peers.push_back(peer);
  for (const PeerPtr& peer : peers) {
    std::erase_if(peer->sends, [](const PendingSend& s) { return s.request.Check() != UCS_INPROGRESS; });
    ucs_status_t failure = peer->control->failure();
    if (failure == UCS_OK && peer->data != nullptr) failure = peer->data->failure();
    const std::string who = peer->name.empty() ? "(handshaking)" : peer->name;
    if (failure != UCS_OK) {
      ClosePeerLocked(peer, PeerState::kFailed,
                      absl::UnavailableError(absl::StrCat("peer '", who, "' failed: ",
                                                          ucs_status_string(failure))),
                      /*graceful=*/false);
    } else if (now - peer->last_heard > options_.peer_timeout &&
               !(peer->is_client && peer->state == PeerState::kHandshaking)) {
      // (A handshake we started is bounded by Connect's own timeout.)
      ClosePeerLocked(peer, PeerState::kFailed,
                      absl::UnavailableError(absl::StrCat(
                          "peer '", who, "' sent nothing for ",
                          absl::FormatDuration(now - peer->last_heard), " (peer_timeout ",
                          absl::FormatDuration(options_.peer_timeout), ")")),
                      /*graceful=*/false);
    } else if (peer->state == PeerState::kConnected &&
               now - peer->last_ping >= options_.peer_timeout / 4) {
      SendLocked(*peer, {.type = wire::MessageType::kPing});
      peer->last_ping = now;
    }
  }
}

void AgentImpl::ClosePeerLocked(const PeerPtr& peer, PeerState state, absl::Status status,
                                bool graceful) {
  if (peer->state == PeerState::kFailed || peer->state == PeerState::kClosed) return;
  PeerPtr keep = peer;  // `peer` may refer into a map entry erased below
  keep->state = state;
  keep->status = std::move(status);
  ForgetPeerLocked(keep);
  const absl::Duration drain = graceful ? options_.peer_timeout : absl::Milliseconds(100);
  if (keep->data != nullptr) {
    absl::Status s = keep->data->Close(/*force=*/!graceful, drain);
    keep->data_fenced = s.ok();
    if (!s.ok()) {
      std::fprintf(stderr, "kvferry: agent '%s', peer '%s': %s\n", options_.name.c_str(),
                   keep->name.c_str(), s.ToString().c_str());
    }
  } else {
    keep->data_fenced = true;
  }
  keep->control->Close(/*force=*/!graceful, graceful ? absl::Seconds(1) : drain).IgnoreError();
  keep->sends.clear();
  if (keep->transfers_in_flight == 0) keep->pools.clear();  // else when the last one ends
}

void AgentImpl::ForgetPeerLocked(const PeerPtr& peer) {
  PeerPtr keep = peer;
  if (keep->control != nullptr) peers_by_ep_.erase(keep->control->native_handle());
  if (keep->name.empty()) return;
  auto it = peers_by_name_.find(keep->name);
  if (it != peers_by_name_.end() && it->second == keep) {
    peers_by_name_.erase(it);
    if (ended_peers_.size() >= kMaxEndedPeers) ended_peers_.clear();
    ended_peers_[keep->name] = keep->Info();
  }
}

PeerPtr AgentImpl::FindPeerLocked(const std::string& name) const {
  auto it = peers_by_name_.find(name);
  return it == peers_by_name_.end() ? nullptr : it->second;
}

absl::StatusOr<PeerInfo> AgentImpl::GetPeer(const std::string& name) const {
  internal::MutexLock l(&mu_);
  if (PeerPtr peer = FindPeerLocked(name)) return peer->Info();
  auto it = ended_peers_.find(name);
  if (it != ended_peers_.end()) return it->second;
  return absl::NotFoundError(absl::StrCat("unknown peer '", name, "'"));
}

std::vector<PeerInfo> AgentImpl::ListPeers() const {
  internal::MutexLock l(&mu_);
  std::vector<PeerInfo> out;
  for (const auto& [name, peer] : peers_by_name_) out.push_back(peer->Info());
  return out;
}

absl::StatusOr<PeerInfo> AgentImpl::WaitForPeer(const std::string& name,
                                                absl::Duration timeout) {
  internal::MutexLock l(&mu_);
  auto connected = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    PeerPtr p = FindPeerLocked(name);
    return p != nullptr && p->state == PeerState::kConnected;
  };
  if (options_.progress_thread) {
    mu_.AwaitWithTimeout(connected, timeout);
  } else {
    absl::Time deadline = absl::Now() + timeout;
    while (!connected() && absl::Now() < deadline) ProgressLocked();
  }
  if (!connected()) {
    return absl::DeadlineExceededError(absl::StrCat("peer '", name, "' did not connect within ",
                                                    absl::FormatDuration(timeout)));
  }
  return FindPeerLocked(name)->Info();
}

absl::Status AgentImpl::Disconnect(const std::string& name) {
  internal::MutexLock l(&mu_);
  PeerPtr peer = FindPeerLocked(name);
  if (peer == nullptr) {
    if (ended_peers_.contains(name)) {
      return absl::FailedPreconditionError(absl::StrCat("peer '", name, "' is not connected"));
    }
    return absl::NotFoundError(absl::StrCat("unknown peer '", name, "'"));
  }
  SendLocked(*peer, {.type = wire::MessageType::kBye});
  ClosePeerLocked(peer, PeerState::kClosed,
                  absl::FailedPreconditionError(
                      absl::StrCat("peer '", name, "' was disconnected by this agent")),
                  /*graceful=*/true);
  return absl::OkStatus();
}

}  // namespace kvferry::internal
