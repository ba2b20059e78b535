// AgentImpl: the control plane. kvferry's own TCP listener and one TCP
// connection per peer, the authenticated handshake (each peer's Handshake,
// src/handshake.h, checks and seals the frames; this file supplies what needs
// the agent: its descriptor, the peer table's name rule, the data path), peer
// identity, liveness and teardown.
//
// Nothing an unauthenticated peer sends reaches UCX: its worker address and
// rkeys arrive only in PROOF, which is parsed after the proof checks out.
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

#include "src/agent_impl.h"
#include "src/end_reason_internal.h"
#include "src/region_extent.h"
#include "src/status_macros.h"
#include "src/ucx/data_path.h"
#include "src/ucx/status.h"

namespace kvferry::internal {

std::atomic<void (*)()> adopt_test_hook{nullptr};

namespace {

// What one control pass reads from one peer at most.
constexpr size_t kReadBudget = 4u << 20;
constexpr int kListenBacklog = 1024;

// What one peer's pools may hold here, over its handshake descriptor and
// every POOL_ADDED (each region is one unpacked remote key): kMaxPools pools
// of 256 regions, and their packed keys.
constexpr size_t kMaxRemoteRegions = wire::kMaxPools * 256;
constexpr size_t kMaxRemoteKeyBytes = 8u << 20;

// kResourceExhausted when `added` would take the peer past those bounds.
absl::Status CheckRemotePoolBounds(const std::vector<RemotePool>& held,
                                   const std::vector<wire::PoolDescriptor>& added) {
  size_t regions = 0, key_bytes = 0;
  auto count = [&](const wire::PoolDescriptor& p) {
    regions += p.regions.size();
    for (const wire::RegionDescriptor& r : p.regions) key_bytes += r.rkey.size();
  };
  for (const RemotePool& p : held) count(p.desc());
  for (const wire::PoolDescriptor& p : added) count(p);
  if (regions > kMaxRemoteRegions || key_bytes > kMaxRemoteKeyBytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the peer's pools would have ", regions, " regions with ", key_bytes,
        " bytes of remote keys; the limit is ", kMaxRemoteRegions, " regions and ",
        kMaxRemoteKeyBytes, " bytes per peer"));
  }
  return absl::OkStatus();
}

// A status with the same code and `prefix` in front of the message.
absl::Status Prefixed(const absl::Status& s, absl::string_view prefix) {
  absl::Status out(s.code(), absl::StrCat(prefix, s.message()));
  s.ForEachPayload([&](absl::string_view url, const absl::Cord& payload) {
    out.SetPayload(url, payload);
  });
  return out;
}

}  // namespace

absl::StatusOr<uint16_t> AgentImpl::Listen(const std::string& address, uint16_t port) {
  KVFERRY_ASSIGN_OR_RETURN(SocketAddress where, ParseSocketAddress(address, port));
  ControlLock l(this);
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
  listen_host_ = address;
  listen_port_ = bound;
  listen_tracked_ = Tracked(ledger_, ResourceKind::kListener, SourceLocation::current());
  accept_paused_until_ = absl::InfinitePast();
  accept_failing_ = false;
  if (!secured && !where.IsLoopback()) {
    Log(LogSeverity::kWarning, absl::StrCat("listening on ", listen_address_,
                     " without a shared secret: any host that reaches it may connect"));
  }
  worker_->Signal();  // the progress thread polls the new socket
  return bound;
}

ListenerStats AgentImpl::GetListenerStats() const {
  ControlLock l(this);
  ListenerStats stats = listener_stats_;
  stats.accept_paused = listen_fd_.valid() && accept_failing_;
  return stats;
}

PeerPtr AgentImpl::EvictableLocked(absl::string_view source, absl::Time now) const {
  PeerPtr oldest;
  for (const PeerPtr& p : peers_.All()) {
    if (p->is_client || p->state() != PeerState::kHandshaking || !p->admission().read_once()) {
      continue;
    }
    if (!source.empty() && p->admission().source() != source) continue;
    // A peer answers a CHALLENGE as fast as it sent its HELLO: one that
    // takes longer than hello_timeout is as suspect as one with no HELLO.
    const Handshake::Stage stage = p->control().handshake().stage();
    const bool stalled = stage == Handshake::Stage::kAwaitHello ||
                         (stage == Handshake::Stage::kAwaitProof &&
                          now - p->control().handshake().challenged() >= options_.hello_timeout);
    if (!stalled) continue;
    if (oldest == nullptr || p->admission().accepted() < oldest->admission().accepted() ||
        (p->admission().accepted() == oldest->admission().accepted() && p->id() < oldest->id())) {
      oldest = p;
    }
  }
  return oldest;
}

int AgentImpl::AcceptLocked() {
  // Pauses after a failed accept(): 100 ms, doubling to 1 s.
  constexpr absl::Duration kFirstPause = absl::Milliseconds(100);
  constexpr absl::Duration kLongestPause = absl::Seconds(1);
  if (!listen_fd_.valid() || absl::Now() < accept_paused_until_) return 0;
  int accepted = 0;
  // Bounded per pass, so that every connection accepted is read once (by
  // this pass's ServiceConnectionsLocked) before a newer one may evict it:
  // a peer's HELLO is usually waiting in the socket by then.
  while (listen_fd_.valid() && accepted < options_.max_pending_handshakes) {
    SocketAddress from;
    absl::StatusOr<Fd> fd = AcceptTcp(listen_fd_.get(), &from);
    const absl::Time now = absl::Now();
    if (!fd.ok()) {
      // The connection stays in the backlog and the socket readable: stop
      // accepting (and polling) for a while instead of spinning on it.
      ++listener_stats_.accept_failures;
      ++accept_failures_this_episode_;
      if (!accept_failing_) {
        accept_failing_ = true;
        accept_failing_since_ = now;
        accept_backoff_ = kFirstPause;
        ++listener_stats_.accept_failure_episodes;
        Log(LogSeverity::kWarning,
            absl::StrCat("accept on ", listen_address_, " failed: ", fd.status().message(),
                         "; new connections wait in the backlog while it fails (retried after ",
                         absl::FormatDuration(kFirstPause), ", backing off to ",
                         absl::FormatDuration(kLongestPause), "; logged once)"));
      } else {
        accept_backoff_ = std::min(2 * accept_backoff_, kLongestPause);
      }
      accept_paused_until_ = now + accept_backoff_;
      break;
    }
    if (accept_failing_) {
      accept_failing_ = false;
      Log(LogSeverity::kWarning,
          absl::StrCat("accept on ", listen_address_, " works again after ",
                       accept_failures_this_episode_, " failures over ",
                       absl::FormatDuration(absl::Trunc(now - accept_failing_since_,
                                                        absl::Milliseconds(1)))));
      accept_failures_this_episode_ = 0;
    }
    if (!fd->valid()) break;
    ++accepted;
    ++listener_stats_.accepted;
    const std::string source = from.SourceKey();
    int pending = 0;
    int from_source = 0;
    for (const PeerPtr& p : peers_.All()) {
      if (p->is_client || p->state() != PeerState::kHandshaking) continue;
      ++pending;
      if (p->admission().source() == source) ++from_source;
    }
    // Room first from the same source, so that one host churns only its
    // own connections; then from anyone.
    std::string limit;
    PeerPtr victim;
    if (from_source >= options_.max_pending_handshakes_per_source) {
      limit = absl::StrCat(from_source, " handshakes pending from ", source,
                           " (max_pending_handshakes_per_source)");
      victim = EvictableLocked(source, now);
    } else if (pending >= options_.max_pending_handshakes) {
      limit = absl::StrCat(pending, " handshakes pending (max_pending_handshakes)");
      victim = EvictableLocked("", now);
    }
    if (!limit.empty()) {
      if (victim == nullptr) {
        ++listener_stats_.refused_at_accept;
        LogRefusal(absl::StrCat("refused a connection from ", from.ToString(), ": ", limit,
                                ", none of them stalled long enough to evict"));
        continue;  // the Fd closes the socket
      }
      ++listener_stats_.evicted;
      LogRefusal(absl::StrCat("evicted the connection from ", victim->Describe(), " (",
                              victim->control().handshake().stage() == Handshake::Stage::kAwaitHello
                                  ? "no HELLO"
                                  : "no PROOF",
                              " after ",
                              absl::FormatDuration(absl::Trunc(now - victim->admission().accepted(),
                                                               absl::Milliseconds(1))),
                              ") for one from ", from.ToString(), ": ", limit));
      ClosePeerLocked(victim, PeerState::kFailed,
                      absl::ResourceExhaustedError(absl::StrCat(
                          "evicted for a newer connection: ", limit)),
                      /*graceful=*/false);
    }
    PeerPtr peer(new Peer(Tracked(ledger_, ResourceKind::kPeer, SourceLocation::current()),
                          from.ToString(), /*is_client=*/false));
    peers_.Add(peer);
    PeerControl& control = peer->control();
    control.set_handshake(Handshake::Server(
        {.name = options_.name, .incarnation = incarnation_, .secret = options_.shared_secret},
        peer->address, now, options_.hello_timeout, options_.handshake_timeout));
    control.Attach(std::make_unique<Connection>(*std::move(fd), peer->address),
                   Tracked(ledger_, ResourceKind::kConnection, SourceLocation::current()));
    control.conn()->set_max_frame(control.handshake().max_frame());
    peer->admission().Accepted(now, source);
    control.MarkHeard(now);
  }
  return accepted;
}

absl::StatusOr<PeerInfo> AgentImpl::Connect(const std::string& address, uint16_t port,
                                            absl::Duration timeout) {
  constexpr absl::Duration kFirstBackoff = absl::Milliseconds(10);
  constexpr absl::Duration kLongestBackoff = absl::Milliseconds(500);
  KVFERRY_ASSIGN_OR_RETURN(SocketAddress target, ParseSocketAddress(address, port));
  const std::string where = target.ToString();
  const absl::Time deadline = absl::Now() + timeout;
  absl::Duration backoff = kFirstBackoff;
  for (int attempt = 1;; ++attempt) {
    bool at_door = false;
    absl::StatusOr<PeerInfo> got = ConnectOnce(target, where, deadline, timeout, &at_door);
    if (got.ok() || !at_door) return got;
    // Refused at the door: the listener's table of pending handshakes was
    // full (perhaps of an attacker's idle sockets). Eviction makes room
    // within a pass or two; try again while the time lasts.
    if (absl::Now() + backoff >= deadline) {
      return absl::Status(
          got.status().code(),
          absl::StrCat(got.status().message(), " (the listener refused the connection before "
                       "its handshake ", attempt, attempt == 1 ? " time" : " times", " within ",
                       absl::FormatDuration(timeout), ")"));
    }
    absl::SleepFor(backoff);
    backoff = std::min(2 * backoff, kLongestBackoff);
  }
}

absl::StatusOr<PeerInfo> AgentImpl::ConnectOnce(const SocketAddress& target,
                                                const std::string& where, absl::Time deadline,
                                                absl::Duration timeout, bool* at_door) {
  KVFERRY_ASSIGN_OR_RETURN(std::string nonce, wire::RandomNonce());
  ControlLock l(this);
  absl::StatusOr<Fd> fd = ConnectTcp(target);
  if (!fd.ok()) return Prefixed(fd.status(), absl::StrCat("connect to ", where, ": "));
  PeerPtr peer(new Peer(Tracked(ledger_, ResourceKind::kPeer, SourceLocation::current()), where,
                        /*is_client=*/true));
  peers_.Add(peer);
  PeerControl& control = peer->control();
  control.set_handshake(Handshake::Client(
      {.name = options_.name, .incarnation = incarnation_, .secret = options_.shared_secret}, where,
      std::move(nonce), deadline));
  control.Attach(std::make_unique<Connection>(*std::move(fd), where),
                 Tracked(ledger_, ResourceKind::kConnection, SourceLocation::current()));
  control.conn()->set_max_frame(control.handshake().max_frame());  // until the server proved itself
  control.MarkHeard(absl::Now());
  control.conn()->Queue(control.handshake().Hello());
  // CheckPeersLocked ends the handshake at its deadline; the extra second
  // only covers a progress pass that is late.
  AwaitLocked([&peer]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(
                  mu_, kAgentControl) { return peer->state() != PeerState::kHandshaking; },
              deadline - absl::Now() + absl::Seconds(1));
  if (peer->state() == PeerState::kHandshaking) {
    DataLock u(this);
    ClosePeerLocked(peer, PeerState::kFailed,
                    absl::DeadlineExceededError(absl::StrCat("no handshake answer from ", where,
                                                             " within ",
                                                             absl::FormatDuration(timeout))),
                    /*graceful=*/false);
  }
  if (peer->state() == PeerState::kConnected) return peer->Info();
  absl::Status status = peer->status();
  // Before the listener's CHALLENGE, with time left: it closed or reset the
  // established connection (not a refused TCP connect: nothing listens
  // there), or refused it for a passing reason.
  *at_door = peer->control().handshake().stage() == Handshake::Stage::kAwaitChallenge &&
             absl::Now() < deadline &&
             ((peer->control().conn() != nullptr && peer->control().conn()->closed_by_peer()) ||
              (peer->control().handshake().rejected() &&
               (absl::IsUnavailable(status) || absl::IsResourceExhausted(status) ||
                absl::IsDeadlineExceeded(status))));
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

// Pools from `first` on whose path is kernel copy (not mapped here, and
// the peer's process verified) must lie in that process's memory
// (src/region_extent.h).
absl::Status CheckKernelCopyPools(const Peer& peer, size_t first)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
  if (peer.kernel_copy().target() == nullptr) return absl::OkStatus();
  std::vector<const wire::PoolDescriptor*> copied;
  for (size_t i = first; i < peer.link().pools().size(); ++i) {
    if (peer.link().pools()[i].path->kind() == RemotePoolPath::Kind::kKernelCopy) {
      copied.push_back(&peer.link().pools()[i].desc());
    }
  }
  return CheckKernelCopyExtents(*peer.kernel_copy().target(), copied);
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
    d.probe_address = to.kernel_copy().ExposeProbe(probe);
    d.pid = static_cast<uint64_t>(getpid());
  }
  auto address = worker_->Address();
  if (address.ok()) d.worker_address = std::string(address->bytes());
  for (const auto& [name, pool] : pools_) {
    // A pool being removed is not described: a removal that is undone
    // announces it again (POOL_ADDED).
    if (pool->exported() && !Access::Pool(*pool).removing()) {
      d.pools.push_back(DescribePool(Access::Pool(*pool)));
    }
  }
  return d;
}

void AgentImpl::AnnouncePoolLocked(const PoolCore& pool) {
  wire::Message added{.type = wire::MessageType::kPoolAdded};
  added.agent.pools.push_back(DescribePool(pool));
  // Every peer that has this agent's descriptor, connected or still waiting
  // for its data path: its descriptor lacks the new pool.
  for (const PeerPtr& peer : peers_.All()) {
    if (peer->control().described() && peer->state() != PeerState::kFailed &&
        peer->state() != PeerState::kClosed) {
      SendLocked(*peer, added);
    }
  }
}

void AgentImpl::AnnouncePoolRemovedLocked(const PoolCore& pool) {
  const wire::Message removed{.type = wire::MessageType::kPoolRemoved, .name = pool.name()};
  // The same peers AnnouncePoolLocked reaches: those that have the pool.
  for (const PeerPtr& peer : peers_.All()) {
    if (peer->control().described() && peer->state() != PeerState::kFailed &&
        peer->state() != PeerState::kClosed) {
      SendLocked(*peer, removed);
    }
  }
}

absl::Status AgentImpl::DropRemotePoolLocked(Peer& peer, const std::string& pool) {
  auto it = std::find_if(peer.link().pools().begin(), peer.link().pools().end(),
                         [&pool](const RemotePool& p) { return p.desc().name == pool; });
  if (it == peer.link().pools().end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("POOL_REMOVED for pool '", pool, "', which it has not announced"));
  }
  // Transfers on it hold its path (and keys) until they are fenced; the
  // keys go here, under ucx_mu_, if none does.
  peer.link().pools().erase(it);
  JudgeDataPathLocked(peer);
  return absl::OkStatus();
}

void AgentImpl::SendLocked(Peer& peer, const wire::Message& message) {
  if (peer.control().conn() == nullptr || !peer.control().conn()->open()) return;
  peer.control().conn()->Queue(
      peer.control().handshake().Seal(message));  // errors show on the next flush
}

int AgentImpl::ServiceConnectionsLocked() {
  connections_serviced_ns_.store(absl::ToUnixNanos(absl::Now()), std::memory_order_release);
  copier_->NoteConnectionsServiced();
  if (peers_.empty()) return 0;
  int handled = 0;
  for (const PeerPtr& peer : peers_.Snapshot()) handled += ServiceConnectionLocked(peer);
  return handled;
}

int AgentImpl::ServiceConnectionLocked(const PeerPtr& peer) {
  if (peer->control().conn() == nullptr || !peer->control().conn()->open()) return 0;
  int handled = 0;
  absl::Status read;
  // One frame at a time, so that the peer's notification bound is checked
  // before each frame is taken from the socket; at most kReadBudget bytes a
  // pass, so that one peer cannot starve the others.
  size_t budget = kReadBudget;
  std::vector<std::string> frames;
  while (peer->control().conn()->open() && budget > 0) {
    if (!NotificationRoomLocked(*peer)) {
      // Its frames wait in the socket (TCP holds the peer back) until the
      // application polls.
      if (!ServicePausedPeerLocked(peer)) return handled;
      break;
    }
    if (peer->control().ResumeReading()) {
      --peers_paused_;
      peer->control().MarkHeard(absl::Now());  // its silence was this agent's
    }
    frames.clear();
    read = peer->control().conn()->Read(&frames, budget, /*max_frames=*/1);
    peer->admission().MarkRead();  // evictable from here on (AcceptLocked)
    peer->control().set_control_ended(!read.ok());
    for (const std::string& frame : frames) {
      if (!peer->control().conn()->open()) break;  // closed by an earlier frame
      budget -= std::min(budget, frame.size());
      HandleFrameLocked(peer, frame);
      ++handled;
    }
    if (!read.ok() || frames.empty()) break;
  }
  if (!peer->control().conn()->open()) return handled;
  if (read.ok()) read = peer->control().conn()->Flush();
  if (read.ok()) return handled;
  const bool handshaking = peer->state() == PeerState::kHandshaking;
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

bool AgentImpl::ServicePausedPeerLocked(const PeerPtr& peer) {
  const absl::Time now = absl::Now();
  if (peer->control().PauseReading()) {
    ++peers_paused_;
    ++notification_pauses_;
    {
      internal::MutexLock n(&notify_mu_);
      wake_on_poll_ = true;
    }
    if (peer->control().FirstPause()) {
      Log(LogSeverity::kWarning,
          absl::StrCat("stopped reading peer ", peer->Describe(),
                       ": the application has not polled its notifications (at most ",
                       options_.max_notifications_per_peer, " and ",
                       options_.max_notification_bytes_per_peer,
                       " bytes per peer); the peer is held back until PollNotifications "
                       "takes them"));
    }
  }
  if (peer->control().paused_hangup_deadline() == absl::InfiniteFuture()) {
    // The frames wait unread, but a close (FIN) or reset still shows.
    pollfd p = {peer->control().conn()->fd(), POLLRDHUP, 0};
    if (::poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0) {
      peer->control().HungUpWhilePaused(now + options_.ended_peer_notification_retention);
    }
    return true;
  }
  if (now < peer->control().paused_hangup_deadline()) return true;
  int unread = 0;
  (void)::ioctl(peer->control().conn()->fd(), FIONREAD, &unread);
  const std::string why = absl::StrCat(
      "peer ", peer->Describe(),
      " closed its control connection while this agent had stopped "
      "reading it (its notifications were not polled for ",
      absl::FormatDuration(options_.ended_peer_notification_retention),
      ", ended_peer_notification_retention); ", unread + peer->control().conn()->buffered_input(),
      " bytes it sent were not read");
  Log(LogSeverity::kWarning, why);
  ClosePeerLocked(peer, PeerState::kFailed, absl::UnavailableError(why), /*graceful=*/false);
  return false;
}

void AgentImpl::HandleFrameLocked(const PeerPtr& peer, absl::string_view frame) {
  using wire::MessageType;
  peer->control().MarkHeard(absl::Now());
  Handshake::Step step = peer->control().handshake().Receive(frame, peer->control().last_heard());
  if (step.kind == Handshake::Step::Kind::kDrop) {
    Log(LogSeverity::kWarning,
        absl::StrCat("dropped peer ", peer->Describe(), ": ", step.status.message()));
    ClosePeerLocked(peer, PeerState::kFailed, std::move(step.status), /*graceful=*/false);
    return;
  }
  if (step.kind != Handshake::Step::Kind::kMessage) {
    HandleHandshakeLocked(peer, std::move(step));
    return;
  }
  wire::Message* message = &step.message;
  switch (message->type) {
    case MessageType::kNotify:
      QueueNotificationLocked(*peer, std::move(message->text));
      return;
    case MessageType::kPing:
      return;
    case MessageType::kOfferDone:
    case MessageType::kOfferRevoke:
    case MessageType::kOfferRevoked:
    case MessageType::kOfferRelease:
    case MessageType::kOfferBound:
    case MessageType::kOfferEnded:
      HandleOfferMessageLocked(peer, *message);
      return;
    case MessageType::kPoolAdded: {
      absl::Status adopted = AdoptPoolsLocked(*peer, message->agent.pools);
      if (!adopted.ok()) {
        Log(LogSeverity::kWarning, absl::StrCat("dropped peer ", peer->Describe(), ": its new pool: ",
                         adopted.message()));
        ClosePeerLocked(peer, PeerState::kFailed,
                        WithReason(absl::Status(adopted.code(), absl::StrCat("peer '", peer->name(),
                                                                             "' announced a pool: ",
                                                                             adopted.message())),
                                   ReasonOf(adopted)),
                        /*graceful=*/false);
      }
      return;
    }
    case MessageType::kPoolRemoved: {
      absl::Status dropped = DropRemotePoolLocked(*peer, message->name);
      if (!dropped.ok()) {
        Log(LogSeverity::kWarning,
            absl::StrCat("dropped peer ", peer->Describe(), ": ", dropped.message()));
        ClosePeerLocked(peer, PeerState::kFailed,
                        absl::InvalidArgumentError(absl::StrCat(
                            "peer '", peer->name(), "' broke the protocol: ", dropped.message())),
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
      ClosePeerLocked(
          peer, PeerState::kClosed,
          absl::UnavailableError(absl::StrCat("peer '", peer->name(), "' disconnected")),
          /*graceful=*/!peer->control().control_ended() && !peer->control().conn()->RemoteHungUp());
      return;
    default:
      Log(LogSeverity::kWarning, absl::StrCat("dropped peer ", peer->Describe(), ": ",
                       wire::MessageTypeName(message->type), " after the handshake"));
      ClosePeerLocked(peer, PeerState::kFailed,
                      absl::UnavailableError(absl::StrCat(
                          "peer '", peer->name(), "' broke the protocol: ",
                          wire::MessageTypeName(message->type), " after the handshake")),
                      /*graceful=*/false);
      return;
  }
}

void AgentImpl::HandleHandshakeLocked(const PeerPtr& peer, Handshake::Step step) {
  using Kind = Handshake::Step::Kind;
  Handshake& handshake = peer->control().handshake();
  // Proven by its proof (the CHALLENGE's, or the PROOF's) from here on.
  if (peer->name().empty()) peer->set_name(handshake.peer_name());
  switch (step.kind) {
    case Kind::kRejected:
      if (!peer->is_client) {
        LogRefusal(absl::StrCat(peer->Describe(), " gave up the handshake: ", step.reason));
      }
      ClosePeerLocked(peer, PeerState::kFailed, std::move(step.status), /*graceful=*/false);
      return;
    case Kind::kRefuse:
      RefuseLocked(peer, step.status);
      return;
    case Kind::kSend:  // the server's CHALLENGE
      peer->control().conn()->Queue(std::move(step.frame));
      peer->control().conn()->set_max_frame(handshake.max_frame());
      return;
    case Kind::kProven: {  // the client, by the server's CHALLENGE
      PeerTable::NameClaim claim =
          peers_.ClaimName(peer->name(), handshake.peer_incarnation(), peer.get());
      if (claim.refused()) {
        RefuseLocked(peer, absl::AlreadyExistsError(absl::StrCat(
                               "agent '", options_.name, "' is already connected to agent '",
                               peer->name(), "' (at ", claim.holder->address, ")")));
        return;
      }
      peer->set_incarnation(handshake.peer_incarnation());
      peer->control().conn()->set_max_frame(handshake.max_frame());
      wire::AgentDescriptor self = DescribeSelfLocked(*peer);
      peer->control().conn()->Queue(handshake.Proof(self));
      peer->control().MarkDescribed();
      return;
    }
    case Kind::kAuthenticated: {
      peer->set_incarnation(handshake.peer_incarnation());
      absl::Status done = CompleteHandshakeLocked(peer, step.descriptor);
      if (!done.ok()) RefuseLocked(peer, done);
      return;
    }
    case Kind::kMessage:
    case Kind::kDrop:
      return;  // HandleFrameLocked's
  }
}

absl::Status AgentImpl::CompleteHandshakeLocked(const PeerPtr& peer,
                                                const wire::AgentDescriptor& remote) {
  // (The handshake checked that the descriptor names the authenticated peer.)
  PeerTable::NameClaim claim = peers_.ClaimName(peer->name(), peer->incarnation(), peer.get());
  if (claim.refused()) return claim.refusal;
  KVFERRY_RETURN_IF_ERROR(AdoptDescriptorLocked(*peer, remote));
  // A flush of the new endpoint completes once UCX's wireup of it is done.
  ucp_request_param_t param = {};
  ucs_status_ptr_t flush = ucp_ep_flush_nbx(peer->link().data()->native_handle(), &param);
  if (UCS_PTR_IS_ERR(flush)) {
    return UcsToStatus(UCS_PTR_STATUS(flush),
                       absl::StrCat("wireup of the data endpoint to ", peer->Describe()));
  }
  peer->link().StartWireup(Request::Adopt(worker_, flush),
                           absl::Now() + options_.handshake_timeout);
  if (!peer->is_client) {
    // The client creates its side of the data path when it has this. The
    // listener does not wait for its wireup (the client's Connect does);
    // only a close of the endpoint does (ClosePeerLocked).
    wire::AgentDescriptor self = DescribeSelfLocked(*peer);
    peer->control().conn()->Queue(peer->control().handshake().Welcome(self));
    peer->control().MarkDescribed();
    FinishHandshakeLocked(peer);
    return absl::OkStatus();
  }
  // Connect returns once the data path is wired up: the handshake stays
  // kAuthenticated until then (CheckPeersLocked).
  if (peer->link().wireup().Check() != UCS_INPROGRESS) FinishHandshakeLocked(peer);
  return absl::OkStatus();
}

void AgentImpl::FinishHandshakeLocked(const PeerPtr& peer) {
  if (peer->is_client) {
    const ucs_status_t wired = peer->link().wireup().Check();
    peer->link().wireup().Reset();
    if (wired != UCS_OK) {
      RefuseLocked(peer, absl::UnavailableError(absl::StrCat(
                             "the data path to ", peer->Describe(),
                             " did not come up: ", ucs_status_string(wired))));
      return;
    }
  }
  PeerTable::NameClaim claim = peers_.ClaimName(peer->name(), peer->incarnation(), peer.get());
  if (claim.refused()) {
    RefuseLocked(peer, claim.refusal);
    return;
  }
  if (claim.outcome == PeerTable::NameClaim::Outcome::kReplace) {
    // The same agent restarted: its old connection belongs to a process that
    // is gone. Fail it cleanly (transfers end kUnavailable, data endpoint
    // fenced) before the new one takes the name.
    ClosePeerLocked(
        claim.holder, PeerState::kFailed,
        absl::UnavailableError(absl::StrCat(
            "peer '", peer->name(), "' restarted (new incarnation from ", peer->address, ")")),
        /*graceful=*/false);
  }
  peers_.TakeName(peer);
  peer->control().conn()->set_max_frame(wire::kMaxMessageBytes);
  peer->set_state(PeerState::kConnected);
  peer->control().handshake().Finish();
  work_metrics_.PeerConnected();
  peer->control().MarkPinged(absl::Now());
  BindOffersLocked(peer);  // offers made for its name before it connected
  if (peer->link().path_emulated()) {
    // Once per connected peer, so that nobody runs at a tenth of the speed
    // without knowing.
    Log(LogSeverity::kWarning,
        absl::StrCat(
            "data path to peer ", peer->Describe(), " is ", peer->link().path(), " (",
            peer->link().path_detail(),
            "): UCX emulates put/get with active messages, copied by "
            "both processes and moved only as the peer progresses",
            peer->link().path() == kDataPathTcp
                ? " (UCX 1.13's tcp has no RMA)"
                : "; on one host that is a small fraction of shm-direct speed: the peer's pools "
                  "are not UCX shared memory (AgentOptions::pool_memory = kAnonymousMmap, or UCX "
                  "could not allocate a segment)"));
  }
}

void AgentImpl::RefuseLocked(const PeerPtr& peer, const absl::Status& why) {
  if (peer->control().conn() != nullptr && peer->control().conn()->open()) {
    peer->control().conn()->Queue(peer->control().handshake().Refuse(why));  // unsealed
  }
  if (!peer->is_client) {
    LogRefusal(absl::StrCat("refused a connection from ", peer->Describe(), ": ", why.message()));
  } else {
    Log(LogSeverity::kWarning, absl::StrCat("refused the answer of ", peer->Describe(), ": ", why.message()));
  }
  absl::Status status =
      peer->is_client ? Prefixed(why, absl::StrCat("connect to ", peer->address, ": ")) : why;
  ClosePeerLocked(peer, PeerState::kFailed, std::move(status), /*graceful=*/false);
}

namespace {

// Pools of one name on two agents: compatible (whole chunks move), or
// head-sliced peers (heterogeneous TP: transfers name a slice of each chunk).
absl::Status CheckPeerLayout(const KvLayout& here, const KvLayout& there) {
  absl::Status compatible = here.CheckCompatible(there);
  if (compatible.ok()) return compatible;
  absl::Status sliced = here.CheckHeadSliced(there);
  if (sliced.ok()) return sliced;
  return absl::FailedPreconditionError(
      absl::StrCat(compatible.message(), "; nor head-sliced: ", sliced.message()));
}

}  // namespace

absl::Status AgentImpl::AdoptDescriptorLocked(Peer& peer, const wire::AgentDescriptor& remote) {
  KVFERRY_RETURN_IF_ERROR(CheckRemotePoolBounds({}, remote.pools));
  for (const wire::PoolDescriptor& rp : remote.pools) {
    auto local = pools_.find(rp.name);
    if (local == pools_.end()) continue;
    // A head-sliced peer (heterogeneous TP) is a peer too: its transfers name a slice.
    absl::Status compatible = CheckPeerLayout(local->second->layout(), rp.layout);
    if (!compatible.ok()) {
      return WithReason(absl::FailedPreconditionError(
                            absl::StrCat("pool '", rp.name, "': ", compatible.message())),
                        EndReason::kLayoutMismatch);
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
  absl::StatusOr<std::vector<RemotePoolKeysPtr>> unpacked =
      UnpackRemotePools(data, remote.pools, same_host);
  if (!unpacked.ok()) {
    data->Close(/*force=*/peer_mode, absl::Seconds(1)).IgnoreError();
    return unpacked.status();
  }
  peer.kernel_copy().SetRemoteProbe(remote.pid, remote.probe_address);
  peer.link().Adopt(std::move(data), same_host, peer_mode);
  for (RemotePoolKeysPtr& keys : *unpacked) {
    peer.link().pools().push_back({.keys = std::move(keys)});
  }
  JudgeDataPathLocked(peer);
  // A refusal closes the peer, which releases its endpoint and keys.
  return CheckKernelCopyPools(peer, 0);
}

absl::Status AgentImpl::AdoptPoolsLocked(Peer& peer,
                                         const std::vector<wire::PoolDescriptor>& added) {
  if (peer.link().data() == nullptr) {
    return absl::FailedPreconditionError("POOL_ADDED before the data endpoint exists");
  }
  for (const wire::PoolDescriptor& rp : added) {
    if (peer.FindPool(rp.name) != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("pool '", rp.name, "' was already announced"));
    }
    if (peer.link().pools().size() + added.size() > wire::kMaxPools) {
      return absl::InvalidArgumentError(
          absl::StrCat("more than ", wire::kMaxPools, " pools announced"));
    }
    auto local = pools_.find(rp.name);
    if (local != pools_.end()) {
      absl::Status compatible = CheckPeerLayout(local->second->layout(), rp.layout);
      if (!compatible.ok()) {
        return WithReason(absl::FailedPreconditionError(
                              absl::StrCat("pool '", rp.name, "': ", compatible.message())),
                          EndReason::kLayoutMismatch);
      }
    }
  }
  KVFERRY_RETURN_IF_ERROR(CheckRemotePoolBounds(peer.link().pools(), added));
  KVFERRY_ASSIGN_OR_RETURN(std::vector<RemotePoolKeysPtr> pools,
                           UnpackRemotePools(peer.link().data(), added, peer.link().same_host()));
  const size_t first = peer.link().pools().size();
  for (RemotePoolKeysPtr& keys : pools) peer.link().pools().push_back({.keys = std::move(keys)});
  // Judge the path again over every pool; say so if it became emulated.
  const bool was_emulated = peer.link().path_emulated();
  JudgeDataPathLocked(peer);
  // A refusal fails the peer, which releases its endpoint and keys.
  KVFERRY_RETURN_IF_ERROR(CheckKernelCopyPools(peer, first));
  if (peer.link().path_emulated() && !was_emulated) {
    Log(LogSeverity::kWarning,
        absl::StrCat("data path to peer ", peer.Describe(), " is now ", peer.link().path(), " (",
                     peer.link().path_detail(), "): UCX emulates put/get with active messages"));
  }
  return absl::OkStatus();
}

void AgentImpl::JudgeDataPathLocked(Peer& peer) {
  // Ask UCX which path put/get will take, now that the endpoint and the
  // keys exist: an emulated path runs at a fraction of the speed, and an
  // operator should not have to guess.
  if (peer.link().pools().empty()) {
    peer.link().SetPath(kDataPathNone, /*emulated=*/false);
    peer.link().set_serves_emulated(false);
    return;
  }
  std::vector<std::string> unmapped;
  for (RemotePool& p : peer.link().pools()) {
    p.mapped = p.keys->MapsEveryRegion();
    if (!p.mapped) unmapped.push_back(p.keys->name());
    if (p.mapped && !p.populated && options_.populate_pools) {
      p.populated = true;
      if (absl::Status st = p.keys->PopulateMapping(); !st.ok()) {
        Log(LogSeverity::kWarning, absl::StrCat("peer ", peer.Describe(), ": ", st.message(),
                                                " (its pages fault in on first use)"));
      }
    }
  }
  // Each pool's path follows from what was judged, whichever return below
  // is taken (a path is replaced, never changed: transfers hold theirs).
  absl::Cleanup choose_paths = [&peer]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    for (RemotePool& p : peer.link().pools()) {
      p.path = ChooseRemotePoolPath(p.keys, p.mapped, peer.kernel_copy().target());
    }
  };
  DataPath path =
      ClassifyDataPath(EndpointInfo(peer.link().data()->native_handle()), unmapped.empty());
  peer.link().SetPath(std::move(path.name), path.emulated);
  peer.link().set_serves_emulated(peer.link().path() == kDataPathAmEmulated);
  std::string detail = absl::StrCat("over ", path.transports.empty() ? "?" : path.transports);
  if (!unmapped.empty() && unmapped.size() < peer.link().pools().size()) {
    absl::StrAppend(&detail, " for pools ", absl::StrJoin(unmapped, ", "),
                    " (the others are shm-direct)");
  }
  peer.link().set_path_detail(std::move(detail));
  if (!peer.link().serves_emulated() || !options_.kernel_copy || !peer.link().same_host()) return;
  if (peer.kernel_copy().target() == nullptr && !peer.kernel_copy().refused()) {
    absl::StatusOr<KernelCopyPtr> target = KernelCopyTarget::Open(
        peer.kernel_copy().remote_pid(), peer.kernel_copy().remote_probe_address(),
        wire::KernelCopyProbe(peer.receive_key()));
    if (!target.ok()) {
      // Once per peer: UCX's emulated path stays (logged as such).
      peer.kernel_copy().Refuse();
      // No probe offered, or an agent of this process: nothing to say.
      if (!absl::IsInvalidArgument(target.status())) {
        Log(LogSeverity::kWarning, absl::StrCat("no kernel copy to peer ", peer.Describe(),
                                                ": ", target.status().message()));
      }
      return;
    }
    peer.kernel_copy().set_target(*std::move(target));
  }
  if (peer.kernel_copy().target() == nullptr) return;
  peer.link().SetPath(kDataPathKernelCopy, /*emulated=*/false);
  peer.link().set_path_detail(
      absl::StrCat("process_vm_writev/readv to pid ", peer.kernel_copy().target()->pid(),
                   unmapped.size() < peer.link().pools().size()
                       ? absl::StrCat(" for pools ", absl::StrJoin(unmapped, ", "),
                                      " (the others are shm-direct)")
                       : ""));
}

void AgentImpl::CheckPeersLocked() {
  const absl::Time now = absl::Now();
  DropExpiredNotificationsLocked(now);
  if (peers_.empty()) return;
  for (const PeerPtr& peer : peers_.Snapshot()) {
    if (peer->state() == PeerState::kHandshaking) {
      // Authenticated while handshaking: the client's data path is wiring up.
      if (peer->control().handshake().stage() == Handshake::Stage::kAuthenticated &&
          peer->link().wireup().Check() != UCS_INPROGRESS) {
        FinishHandshakeLocked(peer);
        continue;
      }
      absl::Status expired = peer->control().handshake().Expired(now);
      if (expired.ok()) continue;
      if (peer->is_client) {
        ClosePeerLocked(peer, PeerState::kFailed, std::move(expired), /*graceful=*/false);
        continue;
      }
      if (peer->control().handshake().stage() == Handshake::Stage::kAwaitHello) {
        ++listener_stats_.hello_timeouts;
      }
      RefuseLocked(peer, expired);
      continue;
    }
    // The listener's wireup (see CompleteHandshakeLocked) is over, or is
    // no longer waited for (a close would wait only this long too). A flush
    // touches no memory: freed without waiting.
    if (!peer->link().wireup().empty() &&
        (peer->link().wireup().Check() != UCS_INPROGRESS || now > peer->link().wireup_deadline())) {
      peer->link().wireup().Abandon();
    }
    ucs_status_t failure = peer->link().data() != nullptr ? peer->link().data()->failure() : UCS_OK;
    if (failure != UCS_OK) {
      ClosePeerLocked(peer, PeerState::kFailed,
                      absl::UnavailableError(absl::StrCat(
                          "peer '", peer->name(), "' failed: ", ucs_status_string(failure))),
                      /*graceful=*/false);
    } else if (!peer->control().reading_paused() &&
               now - peer->control().last_heard() > options_.peer_timeout) {
      // (A paused peer's pings wait behind its notifications: not silence.)
      ClosePeerLocked(peer, PeerState::kFailed,
                      absl::UnavailableError(absl::StrCat(
                          "peer '", peer->name(), "' sent nothing for ",
                          absl::FormatDuration(now - peer->control().last_heard()),
                          " (peer_timeout ", absl::FormatDuration(options_.peer_timeout), ")")),
                      /*graceful=*/false);
    } else if (now - peer->control().last_ping() >= options_.peer_timeout / 4) {
      SendLocked(*peer, {.type = wire::MessageType::kPing});
      peer->control().MarkPinged(now);
    }
    peer->tickets().Forget(now);
  }
}

void AgentImpl::ClosePeerLocked(const PeerPtr& peer, PeerState state, absl::Status status,
                                bool graceful) {
  if (peer->state() == PeerState::kFailed || peer->state() == PeerState::kClosed) return;
  PeerPtr keep = peer;  // `peer` may refer into a map entry erased below
  DrainSubmissionsLocked();  // nothing queued may be posted after the close
  // No kernel copy into the peer starts from here on (those queued fail at
  // once), and one in progress returns before the peer can hear of the
  // close.
  if (keep->kernel_copy().target() != nullptr) {
    copier_->CloseTarget(
        *keep->kernel_copy().target(),
        absl::UnavailableError(absl::StrCat("the connection to peer '", keep->name(),
                                            "' ended before the transfer's copy started")));
  }
  work_metrics_.PeerEnded(keep->state(), state);
  keep->End(state, std::move(status));
  if (keep->control().ResumeReading()) --peers_paused_;
  OrphanNotificationsLocked(*keep);  // freed after the retention if unpolled
  peers_.Remove(keep);  // forgotten by name unless a newer incarnation took it
  keep->CloseConnection();
  if (keep->link().data() == nullptr) {
    DataClosedLocked(*keep, absl::OkStatus());
    return;
  }
  // Closed by later passes: no caller waits here for UCX (a graceful close
  // drains for up to peer_timeout).
  const absl::Duration drain = graceful ? options_.peer_timeout : absl::Milliseconds(100);
  closing_peers_[keep->id()] = keep;
  closing_.Add(keep->id(), keep->link().data(), std::move(keep->link().wireup()),
               keep->link().wireup_deadline(),
               /*force=*/!graceful, drain);
  AdvanceClosesLocked();
}

int AgentImpl::AdvanceClosesLocked() {
  if (closing_.empty()) return 0;
  std::vector<ClosingEndpoints::Ended> ended = closing_.Advance(absl::Now());
  for (ClosingEndpoints::Ended& e : ended) {
    auto it = closing_peers_.find(e.key);
    PeerPtr peer = std::move(it->second);
    closing_peers_.erase(it);
    DataClosedLocked(*peer, e.status);
  }
  return static_cast<int>(ended.size());
}

void AgentImpl::DataClosedLocked(Peer& peer, const absl::Status& status) {
  peer.link().MarkClosed(/*fenced=*/status.ok());
  if (!status.ok()) {
    Log(LogSeverity::kWarning, absl::StrCat("peer '", peer.name(), "': ", status.message()));
  }
  // Its transfers hold the paths and keys they use until they end.
  peer.link().pools().clear();
  // Its data endpoint here is closed and its connection gone: what it was
  // lent goes back.
  EndPeerOffersLocked(peer);
}

absl::StatusOr<PeerInfo> AgentImpl::GetPeer(const std::string& name) const {
  ControlLock l(this);
  if (PeerPtr peer = peers_.Find(name)) return peer->Info();
  if (const PeerInfo* ended = peers_.FindEnded(name)) return *ended;
  return absl::NotFoundError(absl::StrCat("unknown peer '", name, "'"));
}

std::vector<PeerInfo> AgentImpl::ListPeers() const {
  ControlLock l(this);
  std::vector<PeerInfo> out;
  for (const PeerPtr& peer : peers_.Named()) out.push_back(peer->Info());
  return out;
}

absl::StatusOr<PeerInfo> AgentImpl::WaitForPeer(const std::string& name,
                                                absl::Duration timeout) {
  ControlLock l(this);
  auto connected = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl) {
    PeerPtr p = peers_.Find(name);
    return p != nullptr && p->state() == PeerState::kConnected;
  };
  if (!AwaitLocked(connected, timeout)) {
    // Only a connected peer counts: one that connected and ended before the
    // wait saw it does not. Say so, since that is a race in the caller's
    // protocol (a listener that waits after its client came and went).
    const PeerInfo* ended = peers_.FindEnded(name);
    return absl::DeadlineExceededError(absl::StrCat(
        "peer '", name, "' did not connect within ", absl::FormatDuration(timeout),
        ended == nullptr ? std::string()
                         : std::string(" (a peer of that name had connected, and ended "
                                       "before or during the wait)")));
  }
  return peers_.Find(name)->Info();
}

absl::Status AgentImpl::Disconnect(const std::string& name) {
  ControlLock l(this);
  PeerPtr peer = peers_.Find(name);
  if (peer == nullptr) {
    if (peers_.FindEnded(name) != nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("peer '", name, "' is not connected"));
    }
    return absl::NotFoundError(absl::StrCat("unknown peer '", name, "'"));
  }
  // Refuse new posts, then let what was posted finish: each completed
  // transfer ends kDone and queues its notification ahead of the goodbye.
  // Offers to the peer end too, once it has fenced what it posted on them.
  peer->BeginClosing();
  for (uint64_t id : offers_.OffersTo(*peer)) {
    ApplyOfferDecisionsLocked(offers_.Revoke(
        id, OfferState::kPeerFailed,
        WithReason(absl::FailedPreconditionError(absl::StrCat(
                       "offer ", id, " ended: peer '", name, "' was disconnected by this agent")),
                   EndReason::kPeerDisconnected)));
  }
  // No offer to a closing peer is made, so none is added meanwhile.
  AwaitLocked(
      [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl) {
        if (peer->state() != PeerState::kConnected) return true;
        if (peer->link().transfers_in_flight() != 0 || !peer->control().notes_waiting().empty()) {
          return false;
        }
        return !offers_.HasOffersTo(*peer);
      },
      options_.peer_timeout);
  if (peer->state() != PeerState::kConnected) return absl::OkStatus();  // it went first
  {
    DataLock u(this);
    // Notifications still held for room go ahead of the goodbye.
    for (auto& [id, payload] : peer->control().notes_waiting()) {
      SendLocked(*peer, {.type = wire::MessageType::kNotify, .text = std::move(payload)});
    }
    peer->control().notes_waiting().clear();
    SendLocked(*peer, {.type = wire::MessageType::kBye});
    ClosePeerLocked(peer, PeerState::kClosed,
                    absl::FailedPreconditionError(
                        absl::StrCat("peer '", name, "' was disconnected by this agent")),
                    /*graceful=*/peer->link().transfers_in_flight() == 0);
  }
  // The data endpoint's close goes on in the progress passes; returns once
  // it ended (a graceful close drains for up to peer_timeout).
  AwaitLocked(
      [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl) { return peer->link().closed(); },
      options_.peer_timeout + options_.handshake_timeout + absl::Seconds(2));
  return absl::OkStatus();
}

}  // namespace kvferry::internal
