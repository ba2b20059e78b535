// AgentImpl: the state behind kvferry::Agent. It orchestrates: the parts it
// calls own their state (Handshake, PeerTable, RemotePoolKeys and
// RemotePoolPath, KernelCopier, OfferBook, TicketBook, Outcome,
// WorkMetrics; the map is docs/internals.md).
//
// Locking: two agent locks, in the order mu_ -> ucx_mu_.
//  - mu_ guards the pools, peers, listener, offers and in-flight transfers
//    (and the fields of Peer, TransferCore and OfferCore documented as
//    agent-owned, through kAgentControl, its role: src/agent_role.h).
//  - ucx_mu_ serializes every use of the UCX worker (endpoints, remote keys,
//    requests, progress) and the TransferCore fields it writes (flush,
//    posted; through kAgentData, its role). Whoever calls into UCX holds it;
//    whoever changes what UCX refers to (closes an endpoint, drops remote
//    keys) holds both.
// Each mutex is taken only together with its role (ControlLock, DataLock,
// TryLockData), and every function that requires a mutex requires its role
// as well, so clang checks the state guarded by a role like the rest.
// PostTransfer validates and plans under mu_ alone and queues the copies
// (submissions_, under submit_mu_); the progress thread posts them to UCX
// under ucx_mu_ alone, and runs the worker's progress rounds under ucx_mu_
// alone, so a caller posting never waits for a data copy, and the progress
// thread's data work never waits for a caller. The control plane (listener
// and peer connections, kvferry's own TCP sockets, timers, fencing) runs in
// a short pass under both; nothing a peer sends reaches UCX before the peer
// authenticated. Without a progress thread, PostTransfer posts its own
// submission (under both). A submission to a peer's pool that moves by
// kernel copy (src/kernel_copy.h) is handed to copier_, whose threads
// copy with no agent lock held (src/kernel_copier.h). The whole model,
// with a picture, is docs/threading.md.
// notify_mu_ guards received notifications only (taken after mu_ by the
// control pass, alone by PollNotifications). TransferCore::mu_ comes
// after both (so does each Outcome's); notify_mu_ and submit_mu_ are never
// held while taking another lock, except the completion queue's, a leaf
// (src/completion_queue.h) that any of them may be held over; AgentLink::mu_ is held only briefly, never across a call into the
// agent.
//
// Files: agent.cc (life cycle, pools, progress), agent_connect.cc (listener,
// handshake, peers), agent_transfer.cc (posting and fencing transfers),
// agent_offer.cc (offers), agent_memory.cc (the memory report).
#ifndef KVFERRY_SRC_AGENT_IMPL_H_
#define KVFERRY_SRC_AGENT_IMPL_H_

#include <poll.h>

#include <atomic>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <boost/intrusive/list.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "kvferry/internal/mutex.h"
#include "kvferry/agent.h"
#include "src/access.h"
#include "src/agent_role.h"
#include "src/closing_endpoints.h"
#include "src/completion_queue.h"
#include "src/kernel_copier.h"
#include "src/offer_book.h"
#include "src/offer_core.h"
#include "src/peer.h"
#include "src/peer_table.h"
#include "src/pool_core.h"
#include "src/prepared_core.h"
#include "src/transfer_core.h"
#include "src/transfer_plan.h"
#include "src/work_metrics.h"
#include "src/net/socket.h"
#include "src/ucx/worker.h"
#include "src/wire/message.h"

namespace kvferry::internal {

// Tests only: when set, each data pass of a progress thread calls it first,
// with ucx_mu_ held and mu_ not (so a test can hold the thread inside UCX's
// lock and see what callers can still do).
extern std::atomic<void (*)()> data_pass_test_hook;
// Tests only: when set, adopting a peer's descriptor calls it after the data
// endpoint to the peer exists and before the peer's remote keys are unpacked
// (a test kills the peer there), with mu_ and ucx_mu_ held.
extern std::atomic<void (*)()> adopt_test_hook;

// The name of every agent's progress thread (/proc/self/task/*/comm).
inline constexpr char kProgressThreadName[] = "kvf-progress";

class AgentImpl {
 public:
  static absl::StatusOr<std::unique_ptr<AgentImpl>> Create(AgentOptions options,
                                                           SourceLocation site);
  ~AgentImpl();

  const AgentOptions& options() const { return options_; }
  const LedgerPtr& ledger() const { return ledger_; }
  const ContextPtr& context() const { return context_; }
  uint64_t incarnation() const { return incarnation_; }
  std::vector<std::pair<std::string, KvLayout>> ExportedPools() const ABSL_LOCKS_EXCLUDED(mu_);

  absl::StatusOr<KvPool*> CreatePool(std::string name, const KvLayout& layout, bool exported,
                                     SourceLocation site) ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<KvPool*> RegisterPool(std::string name, const KvLayout& layout,
                                       std::span<const KvRegion> regions,
                                       MemoryType memory_type, bool exported,
                                       SourceLocation site) ABSL_LOCKS_EXCLUDED(mu_);
  KvPool* FindPool(absl::string_view name) const ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status RemovePool(absl::string_view name, absl::Duration timeout)
      ABSL_LOCKS_EXCLUDED(mu_);
  // agent_blocks.cc: Agent::FenceBlocks.
  absl::Status FenceBlocks(absl::string_view pool, std::span<const uint32_t> ids,
                           absl::Duration timeout) ABSL_LOCKS_EXCLUDED(mu_, ucx_mu_);
  int Progress() ABSL_LOCKS_EXCLUDED(mu_);
  // agent_memory.cc
  absl::StatusOr<MemoryReport> GetMemoryReport() const ABSL_LOCKS_EXCLUDED(mu_);

  // agent_connect.cc
  absl::StatusOr<uint16_t> Listen(const std::string& address, uint16_t port)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<PeerInfo> Connect(const std::string& address, uint16_t port,
                                   absl::Duration timeout) ABSL_LOCKS_EXCLUDED(mu_);
  ListenerStats GetListenerStats() const ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<PeerInfo> GetPeer(const std::string& name) const ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<PeerInfo> ListPeers() const ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<PeerInfo> WaitForPeer(const std::string& name, absl::Duration timeout)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Disconnect(const std::string& name) ABSL_LOCKS_EXCLUDED(mu_);

  // agent_notes.cc
  absl::Status SendNotification(const std::string& peer, std::string payload)
      ABSL_LOCKS_EXCLUDED(mu_);
  // agent_metadata.cc
  absl::StatusOr<std::string> LocalMetadata(const std::string& advertise) const
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<PeerInfo> ConnectFromMetadata(absl::string_view metadata,
                                               absl::Duration timeout) ABSL_LOCKS_EXCLUDED(mu_);

  // agent_transfer.cc
  absl::StatusOr<TransferCorePtr> PostTransfer(const TransferSpec& spec,
                                               SourceLocation site)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Cancels, then waits (driving progress when there is no thread) until the
  // transfer has ended. Called through the AgentLink.
  void Cancel(TransferCore* core, absl::Duration grace) ABSL_LOCKS_EXCLUDED(mu_);
  // Prepared descriptor lists (agent_prepared.cc; kvferry/prepared.h).
  absl::StatusOr<PreparedCorePtr> Prepare(const PrepareSpec& spec, SourceLocation site)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<TransferCorePtr> PostPrepared(const PreparedCore& local,
                                               std::span<const uint32_t> local_indices,
                                               const PreparedCore& remote,
                                               std::span<const uint32_t> remote_indices,
                                               const PreparedPost& post, SourceLocation site)
      ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<Notification> PollNotifications(absl::Duration timeout)
      ABSL_LOCKS_EXCLUDED(notify_mu_);
  int completion_fd() const { return completions_->fd(); }
  Completions PollCompletions() ABSL_LOCKS_EXCLUDED(mu_, notify_mu_);
  // The ledger's counters with the queue figures (Stats::QueueStats).
  Stats GetStats() const ABSL_LOCKS_EXCLUDED(mu_, notify_mu_);

  // agent_offer.cc
  absl::StatusOr<OfferCorePtr> MakeOffer(const BlockSet& blocks, const std::string& peer,
                                         absl::Duration ttl, SourceLocation site)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Revokes, then waits until the offer has ended. Called through the AgentLink.
  void RevokeOffer(OfferCore* offer) ABSL_LOCKS_EXCLUDED(mu_);
  // The taking side: Agent::ReleaseOffer.
  absl::Status ReleaseOffer(const std::string& ticket) ABSL_LOCKS_EXCLUDED(mu_, ucx_mu_);

 private:
  using TransferList = boost::intrusive::list<TransferCore>;

  // The agent's locks with their roles (src/agent_role.h): mu_ is only ever
  // taken as a ControlLock (or released and retaken inside its own Await),
  // ucx_mu_ as a DataLock or by TryLockData/UnlockData.
  class ABSL_SCOPED_LOCKABLE ControlLock {
   public:
    explicit ControlLock(const AgentImpl* agent)
        ABSL_EXCLUSIVE_LOCK_FUNCTION(agent->mu_, kAgentControl)
        : mu_(&agent->mu_) {
      mu_->Lock();
    }
    ~ControlLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
    ControlLock(const ControlLock&) = delete;
    ControlLock& operator=(const ControlLock&) = delete;

   private:
    internal::Mutex* const mu_;
  };
  class ABSL_SCOPED_LOCKABLE DataLock {
   public:
    explicit DataLock(AgentImpl* agent) ABSL_EXCLUSIVE_LOCK_FUNCTION(agent->ucx_mu_, kAgentData)
        : mu_(&agent->ucx_mu_) {
      mu_->Lock();
    }
    ~DataLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
    DataLock(const DataLock&) = delete;
    DataLock& operator=(const DataLock&) = delete;

   private:
    internal::Mutex* const mu_;
  };
  // ucx_mu_ and kAgentData if the mutex is free; never waits.
  bool TryLockData() ABSL_EXCLUSIVE_TRYLOCK_FUNCTION(true, ucx_mu_, kAgentData)
      ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return ucx_mu_.TryLock();
  }
  void UnlockData() ABSL_UNLOCK_FUNCTION(ucx_mu_, kAgentData) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    ucx_mu_.Unlock();
  }

  AgentImpl(AgentOptions options, LedgerPtr ledger, ContextPtr context, WorkerPtr worker,
            std::string host_id);
  // One log line, to options_.log_sink (or the process-wide sink) with this
  // agent's name.
  void Log(LogSeverity severity, absl::string_view line) const;
  // Like Log, for lines a remote host can cause (refused connections): at
  // most a few per second, then a count of those suppressed.
  void LogRefusal(absl::string_view line) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);

  // agent.cc
  // Takes a new pool; an exported one is announced to connected peers.
  KvPool* AddPoolLocked(PoolCorePtr core) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  int ProgressLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  void ProgressThreadMain() ABSL_LOCKS_EXCLUDED(mu_);
  // The descriptors the progress thread polls while idle, and for how long.
  int IdleWaitLocked(std::vector<struct pollfd>* fds) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  void ShutdownLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  void CheckSurvivors() const;
  // Waits until `done` holds or `timeout` passes, driving progress itself
  // when there is no progress thread. Returns done().
  template <typename Condition>
  bool AwaitLocked(Condition done, absl::Duration timeout) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl)
      ABSL_LOCKS_EXCLUDED(ucx_mu_);
  // The progress thread's data pass: posts queued submissions and runs up to
  // `rounds` worker progress calls, fewer if the thread stalled (100 ms
  // without running, counted from `looked`, when the control plane was last
  // looked at). Returns the events progressed.
  int DataPassLocked(int rounds, absl::Time looked = absl::InfiniteFuture())
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(ucx_mu_, kAgentData);
  // Everything else of a progress pass: listener, connections, peers'
  // timers, fencing of transfers, offers. ProgressLocked is both passes.
  int ControlPassLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // Wakes the progress thread if it sleeps (or is about to).
  void WakeProgressThread();

  // agent_connect.cc
  // This agent's descriptor for the PROOF or WELCOME to `to` (fills its
  // kernel-copy probe).
  wire::AgentDescriptor DescribeSelfLocked(Peer& to) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // Sets the peer's data path from its pools and endpoint (see
  // src/ucx/data_path.h). Same host, and UCX would emulate put/get over
  // shared memory: verifies the peer's process once (src/kernel_copy.h) and,
  // if it answers, moves the peer's unmapped pools by kernel copy (logged
  // when refused). Replaces each pool's path (src/remote_pool.h) to match.
  void JudgeDataPathLocked(Peer& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // Sends a pool made after peers connected to each of them (POOL_ADDED).
  void AnnouncePoolLocked(const PoolCore& pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // Tells each peer that has this agent's descriptor that `pool` is gone
  // (POOL_REMOVED).
  void AnnouncePoolRemovedLocked(const PoolCore& pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // A peer's POOL_REMOVED: drops its entry (transfers keep their keys);
  // kInvalidArgument for a pool the peer has not announced.
  absl::Status DropRemotePoolLocked(Peer& peer, const std::string& pool)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // A peer's POOL_ADDED: validated, its keys unpacked on the data endpoint.
  absl::Status AdoptPoolsLocked(Peer& peer, const std::vector<wire::PoolDescriptor>& pools)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // Accepts pending connections (at most max_pending_handshakes a pass),
  // applying the handshake limits; returns how many. While accept() fails
  // it pauses the listener (accept_paused_until_).
  int AcceptLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // The oldest server-side connection a newer one may evict (from `source`
  // only, unless empty), or null: no HELLO yet, or no PROOF hello_timeout
  // after its CHALLENGE, and read at least once since its accept.
  PeerPtr EvictableLocked(absl::string_view source, absl::Time now) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // One attempt of Connect, until `deadline`. Sets *at_door when the
  // listener closed the connection (or refused it with a transient code)
  // after it was established and before its CHALLENGE: worth another try.
  absl::StatusOr<PeerInfo> ConnectOnce(const SocketAddress& target, const std::string& where,
                                       absl::Time deadline, absl::Duration timeout,
                                       bool* at_door) ABSL_LOCKS_EXCLUDED(mu_);
  // Reads, handles and flushes every control connection; returns the number
  // of frames handled.
  int ServiceConnectionsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // The same for one peer's connection.
  int ServiceConnectionLocked(const PeerPtr& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  void HandleFrameLocked(const PeerPtr& peer, absl::string_view frame)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // Does what the peer's Handshake asked for a frame during the handshake.
  void HandleHandshakeLocked(const PeerPtr& peer, Handshake::Step step)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // The peer authenticated with `remote` (either side): identity, descriptor,
  // data endpoint and the flush that waits for its wireup.
  absl::Status CompleteHandshakeLocked(const PeerPtr& peer, const wire::AgentDescriptor& remote)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // Once the data path is up: takes the name (failing an older incarnation)
  // and marks the peer connected.
  void FinishHandshakeLocked(const PeerPtr& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // Refuses a handshake: tells the peer why (REJECT), logs, closes.
  void RefuseLocked(const PeerPtr& peer, const absl::Status& why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // Validates a descriptor and, on success, creates the data endpoint and
  // unpacks the remote keys. The returned status code goes to the peer.
  absl::Status AdoptDescriptorLocked(Peer& peer, const wire::AgentDescriptor& remote)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  void SendLocked(Peer& peer, const wire::Message& message) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // The per-peer notification bound (AgentOptions::max_notification_bytes_
  // per_peer): whether one more notification of the peer may be read, queuing
  // one, and, once the peer ended, when its unpolled ones are freed.
  bool NotificationRoomLocked(const Peer& peer) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl)
      ABSL_LOCKS_EXCLUDED(notify_mu_);
  void QueueNotificationLocked(const Peer& peer, std::string payload)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl) ABSL_LOCKS_EXCLUDED(notify_mu_);
  void OrphanNotificationsLocked(const Peer& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl)
      ABSL_LOCKS_EXCLUDED(notify_mu_);
  // Moves every queued notification into `out`; wakes the progress thread
  // when a paused peer may be read again.
  void TakeNotifications(std::vector<Notification>* out) ABSL_LOCKS_EXCLUDED(notify_mu_);
  void DropExpiredNotificationsLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl)
      ABSL_LOCKS_EXCLUDED(notify_mu_);
  // A paused peer: watches for its connection closing, fails it once its
  // retention passed. False if it was closed.
  bool ServicePausedPeerLocked(const PeerPtr& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // The idle wait's part for notifications: the drop timer, and 0 when a
  // paused peer has room again.
  absl::Time NotificationWakeLocked(absl::Time wake) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  void CheckPeersLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // Ends a peer: state and status set, connection closed, forgotten by name
  // unless replaced, and its data endpoint handed to closing_ (force-closed
  // where UCX allows, once its wireup is done); nothing here waits for UCX.
  // Its transfers drain, and its offers end, when that close ends
  // (DataClosedLocked).
  void ClosePeerLocked(const PeerPtr& peer, PeerState state, absl::Status status, bool graceful)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // Advances the data endpoints being closed; returns how many closes ended.
  int AdvanceClosesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // A closed peer's data endpoint is closed (`status`: OK when nothing
  // posted on it can move any more): its transfers may end, its keys go, its
  // offers end.
  void DataClosedLocked(Peer& peer, const absl::Status& status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);

  // agent_transfer.cc
  // The peer named `name`, if it may take new work (transfers, lists,
  // notifications): kNotFound for a name never connected, the ended peer's
  // status (PeerGoneStatus) for one that ended, and PeerTakesWorkLocked's
  // refusals.
  absl::StatusOr<PeerPtr> PeerForWorkLocked(const std::string& name) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // OK if `peer` (known here as `name`) is connected and not being
  // disconnected by this agent; otherwise why not, with its EndReason.
  absl::Status PeerTakesWorkLocked(const Peer& peer, const std::string& name) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // A transfer's copies, planned and checked by PostTransfer, with what
  // posting them needs copied out of the state mu_ guards. The path (and
  // through it the remote keys and their endpoint) is held by the transfer
  // as well, until it ends.
  struct Submission {
    TransferCorePtr core;
    RemotePoolPathPtr path;
    CopyBatch batch;
  };
  // Posts every queued submission (each on its path: UCX copies and the
  // flush that fences them, or the kernel copier). Returns how many.
  // A checked and planned transfer: made, put on the in-flight list with
  // its local blocks pinned, and queued for posting (the caller then drains
  // the queue or wakes the progress thread). `lease` null: posted by ids of
  // `id_pool`. REQUIRES: every op inside both pools (PlanCopies' proof).
  struct Enqueue {
    TransferOp op;
    const PeerPtr& peer;
    const RemotePoolPathPtr& path;
    PoolCore& local_pool;
    const LeaseCore* lease = nullptr;
    PoolCorePtr id_pool;
    std::span<const uint32_t> local_ids;
    const std::string& notification;
    uint32_t layer_begin = 0;
    uint32_t layer_end = 0;
    uint64_t offer_id = 0;
    SourceLocation site;
  };
  TransferCorePtr EnqueueTransferLocked(const Enqueue& e, std::vector<CopyOp> ops)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl) ABSL_LOCKS_EXCLUDED(submit_mu_);
  // Wakes the progress thread when destroyed, if armed. A post declares it
  // before taking mu_, so the wake comes after mu_ is released (a woken
  // thread that preempts the caller then finds mu_ free).
  struct WakeAfterUnlock {
    AgentImpl* agent;
    bool armed = false;
    ~WakeAfterUnlock() {
      if (armed) agent->WakeProgressThread();
    }
  };
  // Hands on what EnqueueTransferLocked queued: without a progress thread
  // it is posted here (the caller drives progress); otherwise `wake` is
  // armed.
  void SubmitQueuedLocked(WakeAfterUnlock& wake)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl) ABSL_LOCKS_EXCLUDED(submit_mu_);
  int DrainSubmissionsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(ucx_mu_, kAgentData)
      ABSL_LOCKS_EXCLUDED(submit_mu_);
  void AdvanceTransfersLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // agent_notes.cc: sends the peer's waiting SendNotification payloads
  // whose earlier transfers ended, while its connection has room (drops
  // them once the peer ended); the second, for every peer.
  void SendWaitingNotesLocked(Peer& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  void SendAllWaitingNotesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // A notification (a transfer's, or SendNotification's) waits while this
  // many bytes or more to its peer are still queued unsent: the peer is not
  // reading (its application has not polled, say), and queuing more would
  // only grow this agent's memory toward Connection::kMaxQueuedBytes, where
  // the connection fails. A completed transfer with a notification stays in
  // flight meanwhile.
  static constexpr size_t kHoldNotificationsAt = 1u << 20;
  // At most this many SendNotification payloads wait per peer.
  static constexpr size_t kMaxWaitingNotes = 4096;
  void EndTransferLocked(TransferCore& core, TransferState state, absl::Status status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  bool OwnsPoolLocked(const PoolCore* pool) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // RemovePool's fence: the transfers in flight whose local blocks are in
  // `pool`; Cancel... cancels them (status `why`) and returns how many.
  int TransfersOnLocked(const PoolCore& pool) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  int CancelTransfersOnLocked(const PoolCore& pool, const std::string& why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);

  // agent_offer.cc, the offering side: acts on offers_'s decisions.
  // The deadline check (the tick).
  void CheckOffersLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  absl::Time NextOfferDeadlineLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // Sends the kOfferRevoke messages, then records each ended offer's outcome.
  void ApplyOfferDecisionsLocked(OfferBook::Decisions decisions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // From ClosePeerLocked, after the peer's data endpoint was closed.
  void EndPeerOffersLocked(const Peer& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // From FinishHandshakeLocked, once `peer` is connected: the offers made
  // for its name bind to it.
  void BindOffersLocked(const PeerPtr& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // May fail the peer (a bound broken), hence both locks.
  void HandleOfferMessageLocked(const PeerPtr& peer, const wire::Message& message)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, ucx_mu_, kAgentControl, kAgentData);
  // The taking side: each peer's TicketBook (Peer::tickets) decides.
  using TicketUse = TicketBook::Use;
  absl::StatusOr<TicketUse> CheckTicketLocked(const wire::Ticket& ticket, absl::string_view body,
                                              absl::string_view tag, const Peer& peer,
                                              uint32_t layer_begin, uint32_t layer_end)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  void NoteTicketPostedLocked(Peer& peer, const TicketUse& use, uint32_t num_layers,
                              uint32_t layer_begin, uint32_t layer_end)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // The key of a ticket made for this agent's name (empty for others).
  std::string TicketNameKeyFor(const wire::Ticket& ticket) const;
  // For a ticket made for this agent's name, waits (at most
  // kOfferBindingWait) until its offerer, if connected, bound it to this
  // connection, ended it, or disconnected.
  void AwaitTicketBindingLocked(const wire::Ticket& ticket) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl)
      ABSL_LOCKS_EXCLUDED(ucx_mu_);
  // Why the peer ended that offer, or null while it stands.
  const std::string* OfferRevokedLocked(const Peer& peer, uint64_t offer_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  // The reason the offering peer gave for ending it (kNone: none).
  EndReason OfferRevokedReasonLocked(const Peer& peer, uint64_t offer_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);
  void OfferTransferEndedLocked(Peer& peer, const TransferCore& transfer, TransferState state,
                                const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl);

  // Constant after construction.
  const AgentOptions options_;
  const LedgerPtr ledger_;
  const std::string host_id_;
  const uint64_t incarnation_;  // this agent's start, in Unix nanoseconds
  const boost::intrusive_ptr<AgentLink> link_;
  ContextPtr context_;  // released last, in the destructor
  WorkerPtr worker_;    // released before context_

  // Self-synchronized.
  // Counts transfers, offers, peers and notifications as they end.
  WorkMetrics work_metrics_;
  // Runs the kernel copies (src/kernel_copier.h) off every agent lock.
  // Reset by the destructor once every transfer has ended.
  std::unique_ptr<KernelCopier> copier_;
  // When ServiceConnectionsLocked last read every control connection, in
  // Unix nanoseconds. A kernel copy starts only shortly after one
  // (KernelCopyPath::Fresh): a process that was stopped must first see
  // whether its peer gave up on it (and may have reused the blocks).
  std::atomic<int64_t> connections_serviced_ns_{0};
  absl::Time connections_serviced() const {
    return absl::FromUnixNanos(connections_serviced_ns_.load(std::memory_order_acquire));
  }
  // Ended transfers and offers for PollCompletions, and completion_fd().
  // Set by Create before any thread starts; never null afterwards.
  std::unique_ptr<CompletionQueue> completions_;
  // The next Transfer::id().
  std::atomic<uint64_t> next_transfer_id_{1};
  std::atomic<bool> stop_{false};
  std::thread progress_thread_;
  // The progress thread is about to wait, or waits: a submission must wake
  // it (Worker::Signal).
  std::atomic<bool> sleeping_{false};

  mutable internal::Mutex mu_;
  // The UCX worker (see the top of this file). After mu_.
  internal::Mutex ucx_mu_ ABSL_ACQUIRED_AFTER(mu_);
  // Submissions PostTransfer queued; the progress thread (or, without one,
  // PostTransfer itself) posts them. Each one's transfer is already on
  // in_flight_ and counted by its peer.
  internal::Mutex submit_mu_ ABSL_ACQUIRED_AFTER(mu_, ucx_mu_);
  std::vector<Submission> submissions_ ABSL_GUARDED_BY(submit_mu_);
  absl::flat_hash_map<std::string, Access::OwnedPool> pools_ ABSL_GUARDED_BY(mu_);
  Fd listen_fd_ ABSL_GUARDED_BY(mu_);
  std::string listen_address_ ABSL_GUARDED_BY(mu_);
  // What Listen was given (the address) and bound (the port): LocalMetadata.
  std::string listen_host_ ABSL_GUARDED_BY(mu_);
  uint16_t listen_port_ ABSL_GUARDED_BY(mu_) = 0;
  Tracked listen_tracked_ ABSL_GUARDED_BY(mu_);
  // Every peer with a live connection by id; authenticated ones also by
  // name; ended ones' last PeerInfo, so GetPeer can say why (bounded).
  PeerTable peers_ ABSL_GUARDED_BY(mu_);
  // What the listener did (GetListenerStats); accept_paused is derived.
  ListenerStats listener_stats_ ABSL_GUARDED_BY(mu_);
  // After a failed accept() the listener is neither polled nor accepted
  // from until this time; the pause doubles (up to 1 s) while accept keeps
  // failing. accept_failing_ marks the episode (logged at its start and end).
  absl::Time accept_paused_until_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::Duration accept_backoff_ ABSL_GUARDED_BY(mu_);
  bool accept_failing_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time accept_failing_since_ ABSL_GUARDED_BY(mu_);
  uint64_t accept_failures_this_episode_ ABSL_GUARDED_BY(mu_) = 0;
  // LogRefusal's budget: lines this second, and those suppressed.
  absl::Time refusal_window_ ABSL_GUARDED_BY(mu_);
  int refusals_logged_ ABSL_GUARDED_BY(mu_) = 0;
  int refusals_suppressed_ ABSL_GUARDED_BY(mu_) = 0;
  // Set by ShutdownLocked: peers closed from here on were closed by it.
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  // Each element holds one reference (added on link, dropped on unlink).
  TransferList in_flight_ ABSL_GUARDED_BY(mu_);
  // Data endpoints of closed peers, until UCX is done with them; each
  // peer there by its id (PeerLink::closed() is set when it leaves).
  ClosingEndpoints closing_ ABSL_GUARDED_BY(ucx_mu_);
  absl::flat_hash_map<uint64_t, PeerPtr> closing_peers_ ABSL_GUARDED_BY(mu_);
  // Open offers this agent made (each holds a reference), and their ids.
  OfferBook offers_ ABSL_GUARDED_BY(mu_);

  // Received notifications, oldest first, each with its peer's id, and what
  // each peer has queued (bounded per peer; docs/limits.md).
  struct QueuedNotification {
    uint64_t peer_id = 0;
    Notification note;
  };
  struct PeerNotifications {
    size_t count = 0;
    size_t bytes = 0;  // payload bytes
    std::string name;
    // Set when the peer ended: unpolled after this, they are freed.
    absl::Time drop_after = absl::InfiniteFuture();
  };
  mutable internal::Mutex notify_mu_;
  std::deque<QueuedNotification> notifications_ ABSL_GUARDED_BY(notify_mu_);
  absl::flat_hash_map<uint64_t, PeerNotifications> queued_by_peer_ ABSL_GUARDED_BY(notify_mu_);
  size_t queued_notification_bytes_ ABSL_GUARDED_BY(notify_mu_) = 0;
  absl::Time next_notification_drop_ ABSL_GUARDED_BY(notify_mu_) = absl::InfiniteFuture();
  int64_t notifications_dropped_ ABSL_GUARDED_BY(notify_mu_) = 0;
  // A peer is paused: PollNotifications wakes the progress thread.
  bool wake_on_poll_ ABSL_GUARDED_BY(notify_mu_) = false;
  // Stats::QueueStats kept under mu_.
  int64_t peers_paused_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t notification_pauses_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t notifications_held_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t notification_holds_ ABSL_GUARDED_BY(mu_) = 0;
};

template <typename Condition>
bool AgentImpl::AwaitLocked(Condition done, absl::Duration timeout) {
  if (options_.progress_thread) {
    worker_->Signal();
    return mu_.AwaitWithTimeout(done, timeout);
  }
  const absl::Time deadline = absl::Now() + timeout;
  while (!done() && absl::Now() < deadline) {
    DataLock u(this);
    ProgressLocked();
  }
  return done();
}

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_AGENT_IMPL_H_
