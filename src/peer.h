// internal::Peer: a remote agent as this agent knows it. Owns the control
// connection (kvferry's own TCP socket: handshake, notifications, pings,
// goodbye), the data endpoint (a UCX endpoint to the peer's worker address,
// created only after the peer authenticated; its error mode depends on
// AgentOptions), and the remote keys of the peer's exported pools.
//
// Its state is grouped by concern: identity and lifecycle (Peer itself),
// admission (PeerAdmission), the control connection (PeerControl), the
// data link (PeerLink), kernel copy (PeerKernelCopy) and the offer tickets
// (TicketBook). Every mutable field is private.
//
// Thread safety: `address` and `is_client` are const, fixed at
// construction. Everything else is guarded by kAgentControl
// (src/agent_role.h), the role held exactly while the owning AgentImpl's
// mu_ is: every accessor and operation requires it, so clang's
// -Wthread-safety checks each use. What UCX refers to (the data endpoint,
// its wireup flush, the remote keys in PeerLink::pools()) is changed or
// dropped only with ucx_mu_ held as well (src/agent_impl.h,
// docs/threading.md). The reference count is thread-safe: in-flight
// transfers hold their peer.
#ifndef KVFERRY_SRC_PEER_H_
#define KVFERRY_SRC_PEER_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <boost/smart_ptr/intrusive_ref_counter.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kvferry/transfer.h"
#include "src/agent_role.h"
#include "src/handshake.h"
#include "src/kernel_copy.h"
#include "src/net/connection.h"
#include "src/remote_pool.h"
#include "src/ticket_book.h"
#include "src/tracked.h"
#include "src/ucx/endpoint.h"
#include "src/wire/auth.h"
#include "src/wire/message.h"

namespace kvferry::internal {

// One exported pool of the peer: its keys (src/remote_pool.h) and the path
// its copies take, set by AgentImpl::JudgeDataPathLocked (null only
// between the unpack and that judgement, under the same lock hold).
// Transfers hold the path (and through it the keys) themselves: entries
// may be replaced or dropped whenever the agent's locks are held.
struct RemotePool {
  RemotePoolKeysPtr keys;
  RemotePoolPathPtr path;
  // Every region's key maps the peer's memory here (shared memory on this
  // host): put/get are plain copies by UCX.
  bool mapped = false;
  // Its mapping here was populated (AgentOptions::populate_pools), or tried.
  bool populated = false;
  const wire::PoolDescriptor& desc() const { return keys->desc(); }
};

// Server side, for the listener's limits (AgentImpl::AcceptLocked): when
// the connection was accepted, its source host (max_pending_handshakes_per_
// source counts by it), and whether a control pass has read it since the
// accept (only then may a newer connection evict it).
//
// Thread safety: guarded by kAgentControl (src/agent_role.h), like the
// Peer that holds it; every member requires the role.
class PeerAdmission {
 public:
  void Accepted(absl::Time when, std::string source) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    accepted_ = when;
    source_ = std::move(source);
  }
  // A control pass read the connection: evictable from here on.
  void MarkRead() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { read_once_ = true; }

  absl::Time accepted() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return accepted_; }
  const std::string& source() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return source_; }
  bool read_once() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return read_once_; }

 private:
  absl::Time accepted_ ABSL_GUARDED_BY(kAgentControl);
  std::string source_ ABSL_GUARDED_BY(kAgentControl);
  bool read_once_ ABSL_GUARDED_BY(kAgentControl) = false;
};

// The control connection of a Peer: kvferry's own TCP socket, the
// handshake that authenticates it and then seals its frames, the liveness
// clock (last frame heard, last ping sent), the pause of its reading, and
// the notifications waiting to be sent on it.
//
// Thread safety: guarded by kAgentControl (src/agent_role.h), like the
// Peer that holds it; every member requires the role.
class PeerControl {
 public:
  // Notifications waiting for earlier transfers: (id of the next transfer
  // posted after it, payload).
  using WaitingNote = std::pair<uint64_t, std::string>;

  // The handshake, then the sealing of the control connection's frames.
  Handshake& handshake() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return handshake_; }
  const Handshake& handshake() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return handshake_;
  }
  void set_handshake(Handshake handshake) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    handshake_ = std::move(handshake);
  }

  // The connection (null before Attach); `tracked` counts it while it is
  // open.
  Connection* conn() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return conn_.get(); }
  void Attach(std::unique_ptr<Connection> conn, Tracked tracked)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    conn_ = std::move(conn);
    conn_tracked_ = std::move(tracked);
  }
  // Closes the connection (queued bytes are sent first if the socket takes
  // them at once).
  void Close() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    if (conn_ != nullptr && conn_->open()) {
      (void)conn_->Flush();  // a goodbye or refusal, if the socket takes it now
      conn_->Close();
    }
    conn_tracked_.Reset();
  }

  // This agent's descriptor was sent (PROOF or WELCOME): pools made later
  // are announced to it (POOL_ADDED).
  bool described() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return described_; }
  void MarkDescribed() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { described_ = true; }

  // The read that brought the frames being handled also found the control
  // connection ended: a BYE among them closes without a drain (the peer is
  // gone; see ServiceConnectionLocked).
  bool control_ended() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return control_ended_; }
  void set_control_ended(bool ended) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    control_ended_ = ended;
  }

  // Liveness: when the peer was last heard from, and last pinged.
  absl::Time last_heard() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return last_heard_; }
  void MarkHeard(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { last_heard_ = now; }
  absl::Time last_ping() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return last_ping_; }
  void MarkPinged(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { last_ping_ = now; }

  // This agent stopped reading the control connection: the peer's
  // notifications here reached AgentOptions::max_notification_bytes_per_peer
  // (or max_notifications_per_peer). Reading resumes once the application
  // polled; meanwhile the peer is not timed out for silence.
  bool reading_paused() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return reading_paused_;
  }
  // Pauses reading; true if it was not paused.
  bool PauseReading() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    if (reading_paused_) return false;
    reading_paused_ = true;
    return true;
  }
  // Resumes reading and forgets a hang-up seen while paused; true if it was
  // paused.
  bool ResumeReading() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    if (!reading_paused_) return false;
    reading_paused_ = false;
    paused_hangup_deadline_ = absl::InfiniteFuture();
    return true;
  }
  // True the first time only: the first pause of this peer is logged.
  bool FirstPause() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    if (pause_logged_) return false;
    pause_logged_ = true;
    return true;
  }
  // While paused, the peer closed (or reset) its connection: it is failed at
  // this time unless the application polls first (InfiniteFuture if not).
  absl::Time paused_hangup_deadline() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return paused_hangup_deadline_;
  }
  void HungUpWhilePaused(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    paused_hangup_deadline_ = deadline;
  }

  // Agent::SendNotification payloads not sent yet, oldest first, each with
  // the id the next transfer posted after it got: it waits until every
  // transfer to the peer with a smaller id ended (and for room in the
  // control connection). Dropped when the peer ends.
  std::deque<WaitingNote>& notes_waiting() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return notes_waiting_;
  }
  const std::deque<WaitingNote>& notes_waiting() const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return notes_waiting_;
  }

 private:
  Handshake handshake_ ABSL_GUARDED_BY(kAgentControl);
  std::unique_ptr<Connection> conn_ ABSL_GUARDED_BY(kAgentControl);
  Tracked conn_tracked_ ABSL_GUARDED_BY(kAgentControl);
  bool described_ ABSL_GUARDED_BY(kAgentControl) = false;
  bool control_ended_ ABSL_GUARDED_BY(kAgentControl) = false;
  absl::Time last_heard_ ABSL_GUARDED_BY(kAgentControl);
  absl::Time last_ping_ ABSL_GUARDED_BY(kAgentControl);
  bool reading_paused_ ABSL_GUARDED_BY(kAgentControl) = false;
  bool pause_logged_ ABSL_GUARDED_BY(kAgentControl) = false;
  absl::Time paused_hangup_deadline_ ABSL_GUARDED_BY(kAgentControl) = absl::InfiniteFuture();
  std::deque<WaitingNote> notes_waiting_ ABSL_GUARDED_BY(kAgentControl);
};

// The data link to a Peer: the UCX endpoint to its worker, the wireup
// flush posted when it was created, the remote keys of its exported pools,
// the path its copies take, and the count of transfers not yet ended.
//
// Thread safety: guarded by kAgentControl (src/agent_role.h), like the
// Peer that holds it; every member requires the role. The endpoint, the
// wireup and the keys in pools() are changed or dropped only with ucx_mu_
// (kAgentData) held as well.
class PeerLink {
 public:
  // The data endpoint (null until AdoptDescriptorLocked).
  const EndpointPtr& data() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return data_; }
  // Takes the endpoint created for the peer's descriptor; its pools are
  // then announced afresh.
  void Adopt(EndpointPtr data, bool same_host, bool peer_mode)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    same_host_ = same_host;
    peer_mode_ = peer_mode;
    data_ = std::move(data);
    pools_.clear();
  }
  // The peer runs on this host (its descriptor's host id is this one's).
  bool same_host() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return same_host_; }
  // The endpoint was created with UCX's peer error handling.
  bool peer_mode() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return peer_mode_; }

  // Flush of the data endpoint posted when it was created. Client side:
  // Connect returns once it completes, i.e. once UCX's wireup of the data
  // path is done (UCX 1.13 has aborted the process when a peer died while a
  // wireup message was still queued; this keeps that window inside the
  // handshake). Both sides: a close of the endpoint waits for it (until
  // wireup_deadline(), from handshake_timeout), since a force close with a
  // wireup message still queued can abort the process in UCX 1.13 too.
  Request& wireup() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return wireup_; }
  const Request& wireup() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return wireup_; }
  absl::Time wireup_deadline() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return wireup_deadline_;
  }
  void StartWireup(Request flush, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    wireup_ = std::move(flush);
    wireup_deadline_ = deadline;
  }

  // The data endpoint's close ended (ClosingEndpoints): `fenced` when no
  // operation posted on it can still move (drained, or force-closed).
  void MarkClosed(bool fenced) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    closed_ = true;
    fenced_ = fenced;
  }
  bool closed() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return closed_; }
  bool fenced() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return fenced_; }

  // The peer's exported pools. Dropped when the peer is closed; a transfer
  // in flight keeps what it uses through its own references.
  std::vector<RemotePool>& pools() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return pools_; }
  const std::vector<RemotePool>& pools() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return pools_;
  }

  // PeerInfo::data_path, from AdoptDescriptorLocked, and whether UCX
  // emulates put/get on it; for the log line when it is emulated, the
  // transports and the pools not mapped here.
  const std::string& path() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return path_; }
  bool path_emulated() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return path_emulated_; }
  const std::string& path_detail() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return path_detail_;
  }
  void SetPath(std::string path, bool emulated) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    path_ = std::move(path);
    path_emulated_ = emulated;
  }
  void set_path_detail(std::string detail) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    path_detail_ = std::move(detail);
  }
  // UCX's own path is emulated over shared memory (am-emulated), whether or
  // not a kernel copy replaces it for this agent's transfers: the peer may
  // still use it into this agent, and it moves only as this agent progresses.
  bool serves_emulated() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return serves_emulated_;
  }
  void set_serves_emulated(bool emulated) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    serves_emulated_ = emulated;
  }

  // Transfers to this peer not yet ended (posted or queued): Disconnect
  // waits for them to drain before its goodbye. Counts only; the remote keys
  // they use are held by the transfers themselves (RemotePoolPath).
  int transfers_in_flight() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return transfers_in_flight_;
  }
  void BeginTransfer() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { ++transfers_in_flight_; }
  void EndTransfer() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { --transfers_in_flight_; }

 private:
  EndpointPtr data_ ABSL_GUARDED_BY(kAgentControl);
  bool same_host_ ABSL_GUARDED_BY(kAgentControl) = false;
  bool peer_mode_ ABSL_GUARDED_BY(kAgentControl) = false;
  Request wireup_ ABSL_GUARDED_BY(kAgentControl);
  absl::Time wireup_deadline_ ABSL_GUARDED_BY(kAgentControl);
  bool closed_ ABSL_GUARDED_BY(kAgentControl) = false;
  bool fenced_ ABSL_GUARDED_BY(kAgentControl) = false;
  std::vector<RemotePool> pools_ ABSL_GUARDED_BY(kAgentControl);
  std::string path_ ABSL_GUARDED_BY(kAgentControl);
  bool path_emulated_ ABSL_GUARDED_BY(kAgentControl) = false;
  std::string path_detail_ ABSL_GUARDED_BY(kAgentControl);
  bool serves_emulated_ ABSL_GUARDED_BY(kAgentControl) = false;
  int transfers_in_flight_ ABSL_GUARDED_BY(kAgentControl) = 0;
};

// Kernel copy with a Peer on this host (src/kernel_copy.h): where the
// peer's probe is read, the copy target once its process answered it, and
// the probe this agent exposes for the peer to verify it.
//
// Thread safety: guarded by kAgentControl (src/agent_role.h), like the
// Peer that holds it; every member requires the role.
class PeerKernelCopy {
 public:
  // From the peer's descriptor: where to read its probe.
  void SetRemoteProbe(uint64_t pid, uint64_t address) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    remote_pid_ = pid;
    remote_probe_address_ = address;
  }
  uint64_t remote_pid() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return remote_pid_; }
  uint64_t remote_probe_address() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return remote_probe_address_;
  }

  // Set when transfers to the peer's unmapped pools move by kernel copy.
  const KernelCopyPtr& target() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return target_;
  }
  void set_target(KernelCopyPtr target) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    target_ = std::move(target);
  }
  // Its process did not answer the probe: not tried again.
  bool refused() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return refused_; }
  void Refuse() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { refused_ = true; }

  // Exposes `bytes` (at most wire::kTagBytes) for the peer to verify this
  // agent (DescribeSelfLocked); returns their address in this process,
  // fixed since Peer objects never move.
  uintptr_t ExposeProbe(const std::string& bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    std::copy(bytes.begin(), bytes.end(), probe_.begin());
    return reinterpret_cast<uintptr_t>(probe_.data());
  }

 private:
  uint64_t remote_pid_ ABSL_GUARDED_BY(kAgentControl) = 0;
  uint64_t remote_probe_address_ ABSL_GUARDED_BY(kAgentControl) = 0;
  KernelCopyPtr target_ ABSL_GUARDED_BY(kAgentControl);
  bool refused_ ABSL_GUARDED_BY(kAgentControl) = false;
  std::array<char, wire::kTagBytes> probe_ ABSL_GUARDED_BY(kAgentControl){};
};

// A remote agent (see the top of this file). Thread safety: as stated
// there; every member but `address`, `is_client` and the reference count
// requires kAgentControl.
class Peer : public boost::intrusive_ref_counter<Peer> {
 public:
  // `remote_address`: the remote control address, "ip:port";
  // `we_connected`: this agent connected to it (is_client).
  Peer(Tracked tracked, std::string remote_address, bool we_connected)
      : address(std::move(remote_address)), is_client(we_connected), tracked_(std::move(tracked)) {}
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;

  const RemotePool* FindPool(absl::string_view pool_name) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    for (const RemotePool& p : link_.pools()) {
      if (p.desc().name == pool_name) return &p;
    }
    return nullptr;
  }
  PeerInfo Info() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);
  // For log lines: "'name' at 1.2.3.4:5", or "1.2.3.4:5 (unauthenticated)".
  std::string Describe() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);
  // Closes the control connection (queued bytes are sent first if the
  // socket takes them at once).
  void CloseConnection() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);

  // Identity and lifecycle.
  // This agent's key for the connection (PeerTable::Add sets it).
  uint64_t id() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return id_; }
  void set_id(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { id_ = id; }
  // Empty until authenticated (server side).
  const std::string& name() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return name_; }
  void set_name(std::string name) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    name_ = std::move(name);
  }
  // The peer's, once known.
  uint64_t incarnation() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return incarnation_; }
  void set_incarnation(uint64_t incarnation) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    incarnation_ = incarnation;
  }
  PeerState state() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return state_; }
  void set_state(PeerState state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { state_ = state; }
  // Why it ended (OK while it lasts).
  const absl::Status& status() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return status_;
  }
  // It ended: `state` is kClosed or kFailed, `status` says why.
  void End(PeerState state, absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    state_ = state;
    status_ = std::move(status);
  }
  // Disconnect is letting its transfers drain: no new posts.
  bool closing() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return closing_; }
  void BeginClosing() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { closing_ = true; }

  PeerControl& control() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return control_; }
  const PeerControl& control() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return control_;
  }
  PeerLink& link() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return link_; }
  const PeerLink& link() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return link_; }
  PeerKernelCopy& kernel_copy() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return kernel_copy_;
  }
  const PeerKernelCopy& kernel_copy() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return kernel_copy_;
  }
  // The taking side of this peer's offers: its tickets this agent checked
  // and posted on, and the offers it ended.
  TicketBook& tickets() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return tickets_; }
  const TicketBook& tickets() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return tickets_;
  }
  PeerAdmission& admission() ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) { return admission_; }
  const PeerAdmission& admission() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return admission_;
  }

  const std::string address;  // remote control address, "ip:port"
  const bool is_client;       // we connected to it
  const std::string& send_key() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return control_.handshake().send_key();
  }
  const std::string& receive_key() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return control_.handshake().receive_key();
  }

 private:
  uint64_t id_ ABSL_GUARDED_BY(kAgentControl) = 0;
  std::string name_ ABSL_GUARDED_BY(kAgentControl);
  uint64_t incarnation_ ABSL_GUARDED_BY(kAgentControl) = 0;
  PeerState state_ ABSL_GUARDED_BY(kAgentControl) = PeerState::kHandshaking;
  absl::Status status_ ABSL_GUARDED_BY(kAgentControl);
  bool closing_ ABSL_GUARDED_BY(kAgentControl) = false;
  PeerAdmission admission_ ABSL_GUARDED_BY(kAgentControl);
  PeerControl control_ ABSL_GUARDED_BY(kAgentControl);
  PeerLink link_ ABSL_GUARDED_BY(kAgentControl);
  PeerKernelCopy kernel_copy_ ABSL_GUARDED_BY(kAgentControl);
  TicketBook tickets_ ABSL_GUARDED_BY(kAgentControl);
  Tracked tracked_;
};

using PeerPtr = boost::intrusive_ptr<Peer>;

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_PEER_H_
