// AgentImpl: the control plane. kvferry's own TCP listener and one TCP
// connection per peer, the authenticated handshake (src/wire/message.h,
// src/wire/auth.h), peer identity, liveness and teardown.
//
// Nothing an unauthenticated peer sends reaches UCX: its worker address and
// rkeys arrive only in PROOF, which is parsed after the proof checks out.
#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

#include "src/agent_impl.h"
#include "src/status_macros.h"
#include "src/ucx/data_path.h"
#include "src/ucx/status.h"

namespace kvferry::internal {

std::atomic<void (*)()> adopt_test_hook{nullptr};

namespace {

constexpr size_t kMaxEndedPeers = 1024;
constexpr int kListenBacklog = 1024;

// A status with the same code and `prefix` in front of the message.
absl::Status Prefixed(const absl::Status& s, absl::string_view prefix) {
  return absl::Status(s.code(), absl::StrCat(prefix, s.message()));
}

// Text a peer chose (a REJECT reason), made safe for a log line or a
// status: at most 512 bytes, control bytes and non-ASCII escaped, so it can
// neither forge log lines nor reach a terminal.
std::string PeerText(absl::string_view text) {
  constexpr size_t kMax = 512;
  std::string out;
  for (char ch : text.substr(0, kMax)) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out.push_back(ch);
    } else {
      absl::StrAppend(&out, "\\x", absl::Hex(c, absl::kZeroPad2));
    }
  }
  if (text.size() > kMax) absl::StrAppend(&out, "... (", text.size(), " bytes)");
  return out;
}

// The refusal when a peer's proof (of the agent `name` at `address`) fails.
absl::Status SecretMismatch(absl::string_view name, absl::string_view address) {
  return absl::PermissionDeniedError(absl::StrCat("shared secret mismatch: the agent '", name,
                                                  "' at ", address,
                                                  " could not prove it knows this agent's secret"));
}

}  // namespace

absl::StatusOr<uint16_t> AgentImpl::Listen(const std::string& address, uint16_t port) {
  KVFERRY_ASSIGN_OR_RETURN(SocketAddress where, ParseSocketAddress(address, port));
  internal::MutexLock l(&mu_);
  if (listen_fd_.valid()) {
    return absl::AlreadyExistsError(
        absl::StrCat("agent '", options_.name, "' already listens on ", listen_address_));
  }
  const bool secured = !options_.shared_secret.empty();
  if (!secured && !where.IsLoopback() && !options_.allow_insecure) {
    return absl::FailedPreconditionError(absl::StrCat(
        "agent '", options_.name, "' has no shared secret, so it listens only on loopback; ",
        address, " can be reached from other hosts. Set AgentOptions::shared_secret (or "
        "KVFERRY_SECRET), or allow unauthenticated peers with AgentOptions::allow_insecure "
        "(or KVFERRY_INSECURE=1)"));
  }
  KVFERRY_ASSIGN_OR_RETURN(Fd fd, ListenTcp(where, kListenBacklog));
  KVFERRY_ASSIGN_OR_RETURN(uint16_t bound, LocalPort(fd.get()));
  listen_fd_ = std::move(fd);
  listen_address_ = absl::StrCat(address, ":", bound);
  listen_tracked_ = Tracked(ledger_, ResourceKind::kListener, SourceLocation::current());
  if (!secured && !where.IsLoopback()) {
    Log(LogSeverity::kWarning, absl::StrCat("listening on ", listen_address_,
                     " without a shared secret: any host that reaches it may connect"));
  }
  worker_->Signal();  // the progress thread polls the new socket
  return bound;
}

int AgentImpl::AcceptLocked() {
  int accepted = 0;
  while (listen_fd_.valid()) {
    SocketAddress from;
    absl::StatusOr<Fd> fd = AcceptTcp(listen_fd_.get(), &from);
    if (!fd.ok()) {
      // Out of descriptors, say: try again on the next pass.
      LogRefusal(absl::StrCat("accept failed: ", fd.status().message()));
      break;
    }
    if (!fd->valid()) break;
    ++accepted;
    int pending = 0;
    for (const auto& [id, p] : peers_by_id_) {
      pending += (!p->is_client && p->state == PeerState::kHandshaking) ? 1 : 0;
    }
    if (pending >= options_.max_pending_handshakes) {
      LogRefusal(absl::StrCat("refused a connection from ", from.ToString(), ": ", pending,
                              " handshakes already pending (max_pending_handshakes)"));
      continue;  // the Fd closes the socket
    }
    PeerPtr peer(new Peer(Tracked(ledger_, ResourceKind::kPeer, SourceLocation::current())));
    peer->id = next_peer_id_++;
    peer->address = from.ToString();
    peer->stage = HandshakeStage::kAwaitHello;
    peer->conn = std::make_unique<Connection>(*std::move(fd), peer->address);
    peer->conn->set_max_frame(wire::kMaxHelloFrameBytes);
    peer->conn_tracked = Tracked(ledger_, ResourceKind::kConnection, SourceLocation::current());
    peer->last_heard = absl::Now();
    peer->handshake_deadline = peer->last_heard + options_.handshake_timeout;
    peers_by_id_[peer->id] = peer;
  }
  return accepted;
}

absl::StatusOr<PeerInfo> AgentImpl::Connect(const std::string& address, uint16_t port,
                                            absl::Duration timeout) {
  KVFERRY_ASSIGN_OR_RETURN(SocketAddress target, ParseSocketAddress(address, port));
  const std::string where = target.ToString();
  KVFERRY_ASSIGN_OR_RETURN(std::string nonce, wire::RandomNonce());
  internal::MutexLock l(&mu_);
  absl::StatusOr<Fd> fd = ConnectTcp(target);
  if (!fd.ok()) return Prefixed(fd.status(), absl::StrCat("connect to ", where, ": "));
  PeerPtr peer(new Peer(Tracked(ledger_, ResourceKind::kPeer, SourceLocation::current())));
  peer->id = next_peer_id_++;
  peer->is_client = true;
  peer->address = where;
  peer->stage = HandshakeStage::kAwaitChallenge;
  peer->conn = std::make_unique<Connection>(*std::move(fd), where);
  peer->conn->set_max_frame(wire::kMaxHelloFrameBytes);  // until the server proved itself
  peer->conn_tracked = Tracked(ledger_, ResourceKind::kConnection, SourceLocation::current());
  peer->last_heard = absl::Now();
  peer->handshake_deadline = peer->last_heard + timeout;
  peer->transcript.client_name = options_.name;
  peer->transcript.client_incarnation = incarnation_;
  peer->transcript.client_nonce = nonce;
  peers_by_id_[peer->id] = peer;
  SendLocked(*peer, {.type = wire::MessageType::kHello,
                     .name = options_.name,
                     .incarnation = incarnation_,
                     .nonce = std::move(nonce)});
  // CheckPeersLocked ends the handshake at its deadline; the extra second
  // only covers a progress pass that is late.
  AwaitLocked([&peer]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return peer->state != PeerState::kHandshaking;
  }, timeout + absl::Seconds(1));
  if (peer->state == PeerState::kHandshaking) {
    internal::MutexLock u(&ucx_mu_);
    ClosePeerLocked(peer, PeerState::kFailed,
                    absl::DeadlineExceededError(absl::StrCat("no handshake answer from ", where,
                                                             " within ",
                                                             absl::FormatDuration(timeout))),
                    /*graceful=*/false);
  }
  if (peer->state == PeerState::kConnected) return peer->Info();
  absl::Status status = peer->status;
  peer.reset();  // released under mu_
  return status;
}

namespace {

wire::PoolDescriptor DescribePool(const PoolCore& pool) {
  wire::PoolDescriptor d{.name = pool.name(), .layout = pool.layout()};
  for (const PoolRegion& region : pool.regions()) {
    d.regions.push_back({.base = reinterpret_cast<uint64_t>(region.base),
                         .length = region.length,
                         .rkey = region.packed_rkey});
  }
  return d;
}

absl::StatusOr<std::vector<RemotePool>> UnpackPools(
    const EndpointPtr& data, const std::vector<wire::PoolDescriptor>& descriptors,
    bool same_host) {
  std::vector<RemotePool> pools;
  for (const wire::PoolDescriptor& rp : descriptors) {
    RemotePool pool{.desc = rp};
    for (size_t i = 0; i < rp.regions.size(); ++i) {
      auto rkey = RemoteKey::Unpack(data, rp.regions[i].rkey, same_host);
      if (!rkey.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("pool '", rp.name, "' region ", i, ": ",
                                                       rkey.status().message()));
      }
      pool.rkeys.push_back(*std::move(rkey));
    }
    pools.push_back(std::move(pool));
  }
  return pools;
}

// Whether every region's key maps the peer's memory into this process
// (shared memory on this host): put/get are then plain copies.
bool MapsEveryRegion(const RemotePool& pool) {
  for (size_t i = 0; i < pool.rkeys.size(); ++i) {
    if (!RkeyMapsRemoteMemory(pool.rkeys[i].native_handle(), pool.desc.regions[i].base)) {
      return false;
    }
  }
  return true;
}

}  // namespace

wire::AgentDescriptor AgentImpl::DescribeSelfLocked(Peer& to) const {
  wire::AgentDescriptor d;
  d.name = options_.name;
  d.host_id = host_id_;
  if (options_.kernel_copy) {
    // The probe the peer reads from this process before it copies into it
    // (src/kernel_copy.h): fresh for this connection, at a fixed address.
    const std::string probe = wire::KernelCopyProbe(to.send_key());
    std::copy(probe.begin(), probe.end(), to.probe.begin());
    d.pid = static_cast<uint64_t>(getpid());
    d.probe_address = reinterpret_cast<uintptr_t>(to.probe.data());
  }
  auto address = worker_->Address();
  if (address.ok()) d.worker_address = std::string(address->bytes());
  for (const auto& [name, pool] : pools_) {
    if (pool->exported()) d.pools.push_back(DescribePool(Access::Pool(*pool)));
  }
  return d;
}

void AgentImpl::AnnouncePoolLocked(const PoolCore& pool) {
  wire::Message added{.type = wire::MessageType::kPoolAdded};
  added.agent.pools.push_back(DescribePool(pool));
  // Every peer that has this agent's descriptor, connected or still waiting
  // for its data path: its descriptor lacks the new pool.
  for (const auto& [id, peer] : peers_by_id_) {
    if (peer->described && peer->state != PeerState::kFailed &&
        peer->state != PeerState::kClosed) {
      SendLocked(*peer, added);
    }
  }
}

void AgentImpl::SendLocked(Peer& peer, const wire::Message& message) {
  if (peer.conn == nullptr || !peer.conn->open()) return;
  std::string frame = wire::Encode(message);
  if (peer.sealed && message.type != wire::MessageType::kReject) {
    frame = wire::SealFrame(peer.send_key(), peer.send_sequence++, std::move(frame));
  }
  peer.conn->Queue(std::move(frame));  // errors show on the next flush
}

int AgentImpl::ServiceConnectionsLocked() {
  connections_serviced_ = absl::Now();
  if (peers_by_id_.empty()) return 0;
  std::vector<PeerPtr> peers;
  peers.reserve(peers_by_id_.size());
  for (const auto& [id, peer] : peers_by_id_) peers.push_back(peer);
  int handled = 0;
  for (const PeerPtr& peer : peers) handled += ServiceConnectionLocked(peer);
  return handled;
}

int AgentImpl::ServiceConnectionLocked(const PeerPtr& peer) {
  if (peer->conn == nullptr || !peer->conn->open()) return 0;
  int handled = 0;
  std::vector<std::string> frames;
  absl::Status read = peer->conn->Read(&frames);
  peer->control_ended = !read.ok();
  for (const std::string& frame : frames) {
    if (!peer->conn->open()) break;  // closed by an earlier frame
    HandleFrameLocked(peer, frame);
    ++handled;
  }
  if (!peer->conn->open()) return handled;
  if (read.ok()) read = peer->conn->Flush();
  if (read.ok()) return handled;
  const bool handshaking = peer->state == PeerState::kHandshaking;
  if (absl::IsInvalidArgument(read)) {
    LogRefusal(absl::StrCat("dropped the connection from ", peer->Describe(),
                            ": not a kvferry frame: ", read.message()));
  } else if (handshaking && !peer->is_client) {
    LogRefusal(absl::StrCat("the connection from ", peer->Describe(),
                            " ended during the handshake: ", read.message()));
  }
  absl::Status why =
      peer->is_client && handshaking
          ? Prefixed(read, absl::StrCat("connect to ", peer->address, ": "))
          : absl::UnavailableError(absl::StrCat(
                "peer ", peer->Describe(), " failed: its control connection ended (",
                read.message(), ")"));
  ClosePeerLocked(peer, PeerState::kFailed, std::move(why), /*graceful=*/false);
  return handled;
}

void AgentImpl::HandleFrameLocked(const PeerPtr& peer, absl::string_view frame) {
  using wire::MessageType;
  peer->last_heard = absl::Now();
  const bool handshaking = peer->state == PeerState::kHandshaking;
  std::string opened;
  // During the handshake a REJECT comes unsealed: it may answer a frame of
  // ours that failed the peer's check.
  if (peer->sealed && !(handshaking && wire::PeekFrameType(frame) ==
                                           static_cast<uint16_t>(MessageType::kReject))) {
    absl::StatusOr<std::string> inner =
        wire::OpenFrame(peer->receive_key(), peer->receive_sequence, frame);
    if (!inner.ok()) {
      if (handshaking) {
        RefuseLocked(peer, absl::PermissionDeniedError(absl::StrCat(
                               "shared secret mismatch: ", peer->Describe(),
                               " could not prove it knows this agent's secret: ",
                               inner.status().message())));
        return;
      }
      Log(LogSeverity::kWarning, absl::StrCat("dropped peer ", peer->Describe(), ": ", inner.status().message()));
      ClosePeerLocked(peer, PeerState::kFailed,
                      absl::UnavailableError(absl::StrCat("peer '", peer->name, "': ",
                                                          inner.status().message())),
                      /*graceful=*/false);
      return;
    }
    ++peer->receive_sequence;
    opened = *std::move(inner);
    frame = opened;
  }
  absl::StatusOr<wire::Message> message = wire::Decode(frame);
  if (!message.ok()) {
    if (handshaking) {
      RefuseLocked(peer, Prefixed(message.status(), "bad handshake message: "));
      return;
    }
    Log(LogSeverity::kWarning, absl::StrCat("dropped peer ", peer->Describe(), " after a bad message: ",
                     message.status().message()));
    ClosePeerLocked(peer, PeerState::kFailed,
                    absl::UnavailableError(absl::StrCat("peer '", peer->name,
                                                        "' sent a bad message: ",
                                                        message.status().message())),
                    /*graceful=*/false);
    return;
  }
  // Once authenticated and waiting for the data path, the peer may already
  // send what a connected peer sends (its side came up first).
  if (handshaking && (peer->stage != HandshakeStage::kAwaitDataPath ||
                      message->type == MessageType::kReject)) {
    HandleHandshakeLocked(peer, *std::move(message));
    return;
  }
  switch (message->type) {
    case MessageType::kNotify: {
      internal::MutexLock l(&notify_mu_);
      notifications_.push_back({peer->name, std::move(message->text)});
      return;
    }
    case MessageType::kPing:
      return;
    case MessageType::kOfferDone:
    case MessageType::kOfferRevoke:
    case MessageType::kOfferRevoked:
      HandleOfferMessageLocked(peer, *message);
      return;
    case MessageType::kPoolAdded: {
      absl::Status adopted = AdoptPoolsLocked(*peer, message->agent.pools);
      if (!adopted.ok()) {
        Log(LogSeverity::kWarning, absl::StrCat("dropped peer ", peer->Describe(), ": its new pool: ",
                         adopted.message()));
        ClosePeerLocked(peer, PeerState::kFailed,
                        absl::Status(adopted.code(), absl::StrCat("peer '", peer->name,
                                                                  "' announced a pool: ",
                                                                  adopted.message())),
                        /*graceful=*/false);
      }
      return;
    }
    case MessageType::kBye:
      // Drained only while the peer is still there to answer: a graceful
      // close progresses UCX, and UCX 1.13 aborts the process when it
      // answers an emulated put of a peer whose connection is gone
      // (ucp_put_handler's reply failing). Force-closed instead, the
      // endpoint's id is released and UCX drops such puts.
      ClosePeerLocked(peer, PeerState::kClosed,
                      absl::UnavailableError(absl::StrCat("peer '", peer->name,
                                                          "' disconnected")),
                      /*graceful=*/!peer->control_ended);
      return;
    default:
      Log(LogSeverity::kWarning, absl::StrCat("dropped peer ", peer->Describe(), ": ",
                       wire::MessageTypeName(message->type), " after the handshake"));
      ClosePeerLocked(peer, PeerState::kFailed,
                      absl::UnavailableError(absl::StrCat(
                          "peer '", peer->name, "' broke the protocol: ",
                          wire::MessageTypeName(message->type), " after the handshake")),
                      /*graceful=*/false);
      return;
  }
}

void AgentImpl::HandleHandshakeLocked(const PeerPtr& peer, wire::Message message) {
  using wire::MessageType;
  if (message.type == MessageType::kReject) {
    absl::Status why(static_cast<absl::StatusCode>(message.code),
                     absl::StrCat(peer->is_client ? "connect to " : "handshake with ",
                                  peer->address, ": the peer refused the connection: ",
                                  PeerText(message.text)));
    if (!peer->is_client) {
      LogRefusal(absl::StrCat(peer->Describe(), " gave up the handshake: ",
                              PeerText(message.text)));
    }
    ClosePeerLocked(peer, PeerState::kFailed, std::move(why), /*graceful=*/false);
    return;
  }
  const MessageType expected = peer->stage == HandshakeStage::kAwaitHello      ? MessageType::kHello
                               : peer->stage == HandshakeStage::kAwaitChallenge ? MessageType::kChallenge
                               : peer->stage == HandshakeStage::kAwaitProof     ? MessageType::kProof
                                                                                : MessageType::kWelcome;
  if (message.type != expected) {
    RefuseLocked(peer, absl::InvalidArgumentError(absl::StrCat(
                           wire::MessageTypeName(message.type), " where ",
                           wire::MessageTypeName(expected), " was expected",
                           peer->name.empty() ? " (before authentication)" : "")));
    return;
  }
  wire::HandshakeTranscript& t = peer->transcript;
  switch (peer->stage) {
    case HandshakeStage::kAwaitHello: {
      absl::StatusOr<std::string> nonce = wire::RandomNonce();
      if (!nonce.ok()) {
        RefuseLocked(peer, nonce.status());
        return;
      }
      t.client_name = message.name;
      t.client_incarnation = message.incarnation;
      t.client_nonce = std::move(message.nonce);
      t.server_name = options_.name;
      t.server_incarnation = incarnation_;
      t.server_nonce = *std::move(nonce);
      peer->stage = HandshakeStage::kAwaitProof;
      SendLocked(*peer, {.type = MessageType::kChallenge,
                         .name = options_.name,
                         .incarnation = incarnation_,
                         .nonce = t.server_nonce,
                         .proof = wire::ComputeProof(options_.shared_secret,
                                                     wire::ProofRole::kServer, t)});
      // From here on both directions are sealed.
      peer->keys = wire::DeriveSessionKeys(options_.shared_secret, t);
      peer->sealed = true;
      peer->conn->set_max_frame(wire::kMaxProofFrameBytes);
      return;
    }
    case HandshakeStage::kAwaitChallenge: {
      t.server_name = message.name;
      t.server_incarnation = message.incarnation;
      t.server_nonce = std::move(message.nonce);
      if (!wire::ProofMatches(options_.shared_secret, wire::ProofRole::kServer, t,
                              message.proof)) {
        RefuseLocked(peer, SecretMismatch(message.name, peer->address));
        return;
      }
      peer->name = message.name;  // proven by the CHALLENGE's proof
      PeerPtr existing = FindPeerLocked(message.name);
      if (existing != nullptr && existing->incarnation >= message.incarnation) {
        RefuseLocked(peer, absl::AlreadyExistsError(absl::StrCat(
                               "agent '", options_.name, "' is already connected to agent '",
                               message.name, "' (at ", existing->address, ")")));
        return;
      }
      peer->incarnation = message.incarnation;
      peer->stage = HandshakeStage::kAwaitWelcome;
      peer->keys = wire::DeriveSessionKeys(options_.shared_secret, t);
      peer->sealed = true;
      peer->conn->set_max_frame(wire::kMaxMessageBytes);
      SendLocked(*peer, {.type = MessageType::kProof,
                         .proof = wire::ComputeProof(options_.shared_secret,
                                                     wire::ProofRole::kClient, t),
                         .agent = DescribeSelfLocked(*peer)});
      peer->described = true;
      return;
    }
    case HandshakeStage::kAwaitProof:
      if (!wire::ProofMatches(options_.shared_secret, wire::ProofRole::kClient, t,
                              message.proof)) {
        RefuseLocked(peer, SecretMismatch(t.client_name, peer->address));
        return;
      }
      peer->name = t.client_name;  // authenticated from here on
      peer->incarnation = t.client_incarnation;
      [[fallthrough]];
    case HandshakeStage::kAwaitWelcome: {
      absl::Status done = CompleteHandshakeLocked(peer, message);
      if (!done.ok()) RefuseLocked(peer, done);
      return;
    }
    case HandshakeStage::kAwaitDataPath:  // only a REJECT gets here, handled above
    case HandshakeStage::kDone:
      return;
  }
}

absl::Status AgentImpl::CompleteHandshakeLocked(const PeerPtr& peer,
                                                const wire::Message& message) {
  if (message.agent.name != peer->name) {
    return absl::InvalidArgumentError(absl::StrCat("the descriptor names agent '",
                                                   message.agent.name, "', the handshake '",
                                                   peer->name, "'"));
  }
  PeerPtr existing = FindPeerLocked(peer->name);
  if (existing != nullptr && existing != peer) {
    if (existing->incarnation >= peer->incarnation) {
      return absl::AlreadyExistsError(absl::StrCat("an agent named '", peer->name,
                                                   "' is already connected (from ",
                                                   existing->address, ")"));
    }
  }
  KVFERRY_RETURN_IF_ERROR(AdoptDescriptorLocked(*peer, message.agent));
  if (!peer->is_client) {
    // The client creates its side of the data path when it has this.
    SendLocked(*peer, {.type = wire::MessageType::kWelcome, .agent = DescribeSelfLocked(*peer)});
    peer->described = true;
    FinishHandshakeLocked(peer);
    return absl::OkStatus();
  }
  // Connect returns once the data path is wired up (its flush completed).
  ucp_request_param_t param = {};
  ucs_status_ptr_t flush = ucp_ep_flush_nbx(peer->data->native_handle(), &param);
  if (UCS_PTR_IS_ERR(flush)) {
    return UcsToStatus(UCS_PTR_STATUS(flush),
                       absl::StrCat("wireup of the data endpoint to ", peer->Describe()));
  }
  peer->wireup = Request::Adopt(worker_, flush);
  peer->stage = HandshakeStage::kAwaitDataPath;
  if (peer->wireup.Check() != UCS_INPROGRESS) FinishHandshakeLocked(peer);
  return absl::OkStatus();
}

void AgentImpl::FinishHandshakeLocked(const PeerPtr& peer) {
  const ucs_status_t wired = peer->wireup.Check();
  peer->wireup.Reset();
  if (wired != UCS_OK) {
    RefuseLocked(peer, absl::UnavailableError(absl::StrCat(
                           "the data path to ", peer->Describe(),
                           " did not come up: ", ucs_status_string(wired))));
    return;
  }
  PeerPtr existing = FindPeerLocked(peer->name);
  if (existing != nullptr && existing != peer) {
    if (existing->incarnation >= peer->incarnation) {
      RefuseLocked(peer, absl::AlreadyExistsError(absl::StrCat(
                             "an agent named '", peer->name, "' is already connected (from ",
                             existing->address, ")")));
      return;
    }
    // The same agent restarted: its old connection belongs to a process that
    // is gone. Fail it cleanly (transfers end kUnavailable, data endpoint
    // fenced) before the new one takes the name.
    ClosePeerLocked(existing, PeerState::kFailed,
                    absl::UnavailableError(absl::StrCat("peer '", peer->name,
                                                        "' restarted (new incarnation from ",
                                                        peer->address, ")")),
                    /*graceful=*/false);
  }
  peers_by_name_[peer->name] = peer;
  ended_peers_.erase(peer->name);
  peer->conn->set_max_frame(wire::kMaxMessageBytes);
  peer->state = PeerState::kConnected;
  peer->stage = HandshakeStage::kDone;
  peer->handshake_deadline = absl::InfiniteFuture();
  peer->last_ping = absl::Now();
  if (peer->data_path_emulated) {
    // Once per connected peer, so that nobody runs at a tenth of the speed
    // without knowing.
    Log(LogSeverity::kWarning, absl::StrCat(
        "data path to peer ", peer->Describe(), " is ", peer->data_path, " (",
        peer->data_path_detail, "): UCX emulates put/get with active messages, copied by "
        "both processes and moved only as the peer progresses",
        peer->data_path == kDataPathTcp
            ? " (UCX 1.13's tcp has no RMA)"
            : "; on one host that is a small fraction of shm-direct speed: the peer's pools "
              "are not UCX shared memory (AgentOptions::pool_memory = kAnonymousMmap, or UCX "
              "could not allocate a segment)"));
  }
}

void AgentImpl::RefuseLocked(const PeerPtr& peer, const absl::Status& why) {
  SendLocked(*peer, {.type = wire::MessageType::kReject,
                     .code = static_cast<uint32_t>(why.code()),
                     .text = std::string(why.message())});
  if (!peer->is_client) {
    LogRefusal(absl::StrCat("refused a connection from ", peer->Describe(), ": ", why.message()));
  } else {
    Log(LogSeverity::kWarning, absl::StrCat("refused the answer of ", peer->Describe(), ": ", why.message()));
  }
  absl::Status status =
      peer->is_client ? Prefixed(why, absl::StrCat("connect to ", peer->address, ": ")) : why;
  ClosePeerLocked(peer, PeerState::kFailed, std::move(status), /*graceful=*/false);
}

absl::Status AgentImpl::AdoptDescriptorLocked(Peer& peer, const wire::AgentDescriptor& remote) {
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
  if (auto* hook = adopt_test_hook.load(std::memory_order_acquire)) hook();
  absl::StatusOr<std::vector<RemotePool>> unpacked = UnpackPools(data, remote.pools, same_host);
  if (!unpacked.ok()) {
    data->Close(/*force=*/peer_mode, absl::Seconds(1)).IgnoreError();
    return unpacked.status();
  }
  peer.same_host = same_host;
  peer.remote_pid = remote.pid;
  peer.remote_probe_address = remote.probe_address;
  peer.data_peer_mode = peer_mode;
  peer.data = std::move(data);
  peer.pools = *std::move(unpacked);
  JudgeDataPathLocked(peer);
  return absl::OkStatus();
}

absl::Status AgentImpl::AdoptPoolsLocked(Peer& peer,
                                         const std::vector<wire::PoolDescriptor>& added) {
  if (peer.data == nullptr) {
    return absl::FailedPreconditionError("POOL_ADDED before the data endpoint exists");
  }
  for (const wire::PoolDescriptor& rp : added) {
    if (peer.FindPool(rp.name) != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("pool '", rp.name, "' was already announced"));
    }
    if (peer.pools.size() + added.size() > wire::kMaxPools) {
      return absl::InvalidArgumentError(
          absl::StrCat("more than ", wire::kMaxPools, " pools announced"));
    }
    auto local = pools_.find(rp.name);
    if (local != pools_.end()) {
      absl::Status compatible = local->second->layout().CheckCompatible(rp.layout);
      if (!compatible.ok()) {
        return absl::FailedPreconditionError(
            absl::StrCat("pool '", rp.name, "': ", compatible.message()));
      }
    }
  }
  KVFERRY_ASSIGN_OR_RETURN(std::vector<RemotePool> pools,
                           UnpackPools(peer.data, added, peer.same_host));
  for (RemotePool& p : pools) peer.pools.push_back(std::move(p));
  // Judge the path again over every pool; say so if it became emulated.
  const bool was_emulated = peer.data_path_emulated;
  JudgeDataPathLocked(peer);
  if (peer.data_path_emulated && !was_emulated) {
    Log(LogSeverity::kWarning,
        absl::StrCat("data path to peer ", peer.Describe(), " is now ", peer.data_path, " (",
                     peer.data_path_detail, "): UCX emulates put/get with active messages"));
  }
  return absl::OkStatus();
}

void AgentImpl::JudgeDataPathLocked(Peer& peer) {
  // Ask UCX which path put/get will take, now that the endpoint and the
  // keys exist: an emulated path runs at a fraction of the speed, and an
  // operator should not have to guess.
  if (peer.pools.empty()) {
    peer.data_path = kDataPathNone;
    peer.data_path_emulated = false;
    peer.serves_emulated = false;
    return;
  }
  std::vector<std::string> unmapped;
  for (RemotePool& p : peer.pools) {
    p.mapped = MapsEveryRegion(p);
    if (!p.mapped) unmapped.push_back(p.desc.name);
  }
  DataPath path = ClassifyDataPath(EndpointInfo(peer.data->native_handle()), unmapped.empty());
  peer.data_path = std::move(path.name);
  peer.data_path_emulated = path.emulated;
  peer.serves_emulated = peer.data_path == kDataPathAmEmulated;
  peer.data_path_detail = absl::StrCat("over ", path.transports.empty() ? "?" : path.transports);
  if (!unmapped.empty() && unmapped.size() < peer.pools.size()) {
    absl::StrAppend(&peer.data_path_detail, " for pools ", absl::StrJoin(unmapped, ", "),
                    " (the others are shm-direct)");
  }
  if (!peer.serves_emulated || !options_.kernel_copy || !peer.same_host) return;
  if (peer.kernel_copy == nullptr && !peer.kernel_copy_refused) {
    absl::StatusOr<KernelCopyPtr> target = KernelCopyTarget::Open(
        peer.remote_pid, peer.remote_probe_address, wire::KernelCopyProbe(peer.receive_key()));
    if (!target.ok()) {
      // Once per peer: UCX's emulated path stays (logged as such).
      peer.kernel_copy_refused = true;
      // No probe offered, or an agent of this process: nothing to say.
      if (!absl::IsInvalidArgument(target.status())) {
        Log(LogSeverity::kWarning, absl::StrCat("no kernel copy to peer ", peer.Describe(),
                                                ": ", target.status().message()));
      }
      return;
    }
    peer.kernel_copy = *std::move(target);
  }
  if (peer.kernel_copy == nullptr) return;
  peer.data_path = kDataPathKernelCopy;
  peer.data_path_emulated = false;
  peer.data_path_detail = absl::StrCat("process_vm_writev/readv to pid ", peer.kernel_copy->pid(),
                                       unmapped.size() < peer.pools.size()
                                           ? absl::StrCat(" for pools ", absl::StrJoin(unmapped, ", "),
                                                          " (the others are shm-direct)")
                                           : "");
}

void AgentImpl::CheckPeersLocked() {
  if (peers_by_id_.empty()) return;
  const absl::Time now = absl::Now();
  std::vector<PeerPtr> peers;
  peers.reserve(peers_by_id_.size());
  for (const auto& [id, peer] : peers_by_id_) peers.push_back(peer);
  for (const PeerPtr& peer : peers) {
    if (peer->state == PeerState::kHandshaking) {
      if (peer->stage == HandshakeStage::kAwaitDataPath &&
          peer->wireup.Check() != UCS_INPROGRESS) {
        FinishHandshakeLocked(peer);
        continue;
      }
      if (now < peer->handshake_deadline) continue;
      if (peer->is_client) {
        ClosePeerLocked(peer, PeerState::kFailed,
                        absl::DeadlineExceededError(absl::StrCat(
                            "no handshake answer from ", peer->address, " within the timeout")),
                        /*graceful=*/false);
      } else {
        RefuseLocked(peer, absl::DeadlineExceededError(absl::StrCat(
                               "no authenticated handshake within ",
                               absl::FormatDuration(options_.handshake_timeout),
                               " (handshake_timeout)")));
      }
      continue;
    }
    ucs_status_t failure = peer->data != nullptr ? peer->data->failure() : UCS_OK;
    if (failure != UCS_OK) {
      ClosePeerLocked(peer, PeerState::kFailed,
                      absl::UnavailableError(absl::StrCat("peer '", peer->name, "' failed: ",
                                                          ucs_status_string(failure))),
                      /*graceful=*/false);
    } else if (now - peer->last_heard > options_.peer_timeout) {
      ClosePeerLocked(peer, PeerState::kFailed,
                      absl::UnavailableError(absl::StrCat(
                          "peer '", peer->name, "' sent nothing for ",
                          absl::FormatDuration(now - peer->last_heard), " (peer_timeout ",
                          absl::FormatDuration(options_.peer_timeout), ")")),
                      /*graceful=*/false);
    } else if (now - peer->last_ping >= options_.peer_timeout / 4) {
      SendLocked(*peer, {.type = wire::MessageType::kPing});
      peer->last_ping = now;
    }
    if (!peer->taken_offers.empty()) ForgetTakenOffersLocked(*peer, now);
  }
}

void AgentImpl::ClosePeerLocked(const PeerPtr& peer, PeerState state, absl::Status status,
                                bool graceful) {
  if (peer->state == PeerState::kFailed || peer->state == PeerState::kClosed) return;
  PeerPtr keep = peer;  // `peer` may refer into a map entry erased below
  // No kernel copy into the peer starts from here on (those queued fail).
  if (keep->kernel_copy != nullptr) keep->kernel_copy->open = false;
  DrainSubmissionsLocked();  // nothing queued may be posted after the close
  keep->state = state;
  keep->status = std::move(status);
  ForgetPeerLocked(keep);
  const absl::Duration drain = graceful ? options_.peer_timeout : absl::Milliseconds(100);
  if (keep->data != nullptr) {
    absl::Status s = keep->data->Close(/*force=*/!graceful, drain);
    keep->data_fenced = s.ok();
    if (!s.ok()) Log(LogSeverity::kWarning, absl::StrCat("peer '", keep->name, "': ", s.message()));
  } else {
    keep->data_fenced = true;
  }
  keep->wireup.Reset();  // the endpoint is closed: it has completed
  keep->CloseConnection();
  if (keep->transfers_in_flight == 0) keep->pools.clear();  // else when the last one ends
  // Its data endpoint here is closed and its connection gone: what it was
  // lent goes back.
  EndPeerOffersLocked(*keep);
}

void AgentImpl::ForgetPeerLocked(const PeerPtr& peer) {
  PeerPtr keep = peer;
  peers_by_id_.erase(keep->id);
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
  if (!AwaitLocked(connected, timeout)) {
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
  // Refuse new posts, then let what was posted finish: each completed
  // transfer ends kDone and queues its notification ahead of the goodbye.
  // Offers to the peer end too, once it has fenced what it posted on them.
  peer->closing = true;
  std::vector<OfferCorePtr> lent;
  for (const auto& [id, offer] : offers_) {
    if (offer->peer == peer) lent.push_back(offer);
  }
  for (const OfferCorePtr& offer : lent) {
    BeginRevokeLocked(*offer, OfferState::kPeerFailed,
                      absl::FailedPreconditionError(absl::StrCat(
                          "offer ", offer->id(), " ended: peer '", name,
                          "' was disconnected by this agent")));
  }
  AwaitLocked([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (peer->state != PeerState::kConnected) return true;
    if (peer->transfers_in_flight != 0) return false;
    for (const OfferCorePtr& offer : lent) {
      if (!offer->released()) return false;
    }
    return true;
  }, options_.peer_timeout);
  if (peer->state != PeerState::kConnected) return absl::OkStatus();  // it went first
  internal::MutexLock u(&ucx_mu_);
  SendLocked(*peer, {.type = wire::MessageType::kBye});
  ClosePeerLocked(peer, PeerState::kClosed,
                  absl::FailedPreconditionError(
                      absl::StrCat("peer '", name, "' was disconnected by this agent")),
                  /*graceful=*/peer->transfers_in_flight == 0);
  return absl::OkStatus();
}

}  // namespace kvferry::internal
