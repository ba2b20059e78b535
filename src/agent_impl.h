// AgentImpl: the state behind kvferry::Agent.
//
// Locking: mu_ serializes every use of the UCX worker and guards the pools,
// peers, listener and in-flight transfers (and the fields of Peer and
// TransferCore documented as agent-owned). UCX callbacks run inside
// ucp_worker_progress with mu_ held by the progressing thread; they only
// append to the event queues, which are handled after progress returns, so
// nothing is destroyed inside UCX. notify_mu_ guards received notifications
// only. Lock order: link_->mu_ -> mu_ -> TransferCore::mu_; notify_mu_ is
// never held while taking another lock.
//
// Files: agent.cc (life cycle, pools, progress), agent_connect.cc (listener,
// handshake, peers), agent_transfer.cc (posting and fencing transfers).
#ifndef KVFERRY_SRC_AGENT_IMPL_H_
#define KVFERRY_SRC_AGENT_IMPL_H_

#include <atomic>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <boost/intrusive/list.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "kvferry/internal/mutex.h"
#include "kvferry/agent.h"
#include "src/peer.h"
#include "src/transfer_core.h"
#include "src/ucx/listener.h"
#include "src/ucx/worker.h"
#include "src/wire/message.h"

namespace kvferry::internal {

// Active-message id of kvferry's control messages.
inline constexpr unsigned kControlAmId = 0x4b;

class AgentImpl {
 public:
  static absl::StatusOr<std::unique_ptr<AgentImpl>> Create(AgentOptions options,
                                                           SourceLocation site);
  ~AgentImpl();

  const AgentOptions& options() const { return options_; }
  const LedgerPtr& ledger() const { return ledger_; }
  const ContextPtr& context() const { return context_; }

  absl::StatusOr<KvPool*> CreatePool(std::string name, const KvLayout& layout, bool exported,
                                     SourceLocation site) ABSL_LOCKS_EXCLUDED(mu_);
  KvPool* FindPool(absl::string_view name) const ABSL_LOCKS_EXCLUDED(mu_);
  int Progress() ABSL_LOCKS_EXCLUDED(mu_);
  // agent_memory.cc
  absl::StatusOr<MemoryReport> GetMemoryReport() const ABSL_LOCKS_EXCLUDED(mu_);

  // agent_connect.cc
  absl::StatusOr<uint16_t> Listen(const std::string& address, uint16_t port)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<PeerInfo> Connect(const std::string& address, uint16_t port,
                                   absl::Duration timeout) ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<PeerInfo> GetPeer(const std::string& name) const ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<PeerInfo> ListPeers() const ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<PeerInfo> WaitForPeer(const std::string& name, absl::Duration timeout)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Disconnect(const std::string& name) ABSL_LOCKS_EXCLUDED(mu_);

  // agent_transfer.cc
  absl::StatusOr<TransferCorePtr> PostTransfer(const TransferSpec& spec,
                                               SourceLocation site)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Cancels, then waits (driving progress when there is no thread) until the
  // transfer has ended. Called through the AgentLink.
  void Cancel(TransferCore* core, absl::Duration grace) ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<Notification> PollNotifications(absl::Duration timeout)
      ABSL_LOCKS_EXCLUDED(notify_mu_);

 private:
  struct ControlEvent {
    ucp_ep_h ep;
    std::string bytes;
  };
  using TransferList = boost::intrusive::list<TransferCore>;

  AgentImpl(AgentOptions options, LedgerPtr ledger, ContextPtr context, WorkerPtr worker,
            std::string host_id);

  // agent.cc
  int ProgressLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ProgressThreadMain() ABSL_LOCKS_EXCLUDED(mu_);
  void ShutdownLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CheckSurvivors() const;
  static ucs_status_t OnControlMessage(void* arg, const void* header, size_t header_length,
                                       void* data, size_t length,
                                       const ucp_am_recv_param_t* param) noexcept;

  // agent_connect.cc
  wire::AgentDescriptor DescribeSelfLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void HandleConnRequestsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void HandleControlEventsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void HandleMessageLocked(const PeerPtr& peer, wire::Message message)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Validates a descriptor and, on success, creates the data endpoint and
  // unpacks the remote keys. The returned status code goes to the peer.
  absl::Status AdoptDescriptorLocked(Peer& peer, const wire::AgentDescriptor& remote)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SendLocked(Peer& peer, const wire::Message& message) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CheckPeersLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends a peer: state and status set, endpoints closed (force where UCX
  // allows), forgotten by name unless replaced. Its transfers then drain.
  void ClosePeerLocked(const PeerPtr& peer, PeerState state, absl::Status status, bool graceful)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ForgetPeerLocked(const PeerPtr& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  PeerPtr FindPeerLocked(const std::string& name) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // agent_transfer.cc
  void AdvanceTransfersLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EndTransferLocked(TransferCore& core, TransferState state, absl::Status status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool OwnsPoolLocked(const PoolCore* pool) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  const AgentOptions options_;
  const LedgerPtr ledger_;
  const std::string host_id_;
  const boost::intrusive_ptr<AgentLink> link_;
  ContextPtr context_;  // released last, in the destructor
  WorkerPtr worker_;    // released before context_

  // Self-synchronized.
  std::atomic<bool> stop_{false};
  std::thread progress_thread_;

  mutable internal::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<KvPool>> pools_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<Listener> listener_ ABSL_GUARDED_BY(mu_);
  // Filled by UCX callbacks during progress; drained after it.
  std::vector<ucp_conn_request_h> conn_requests_ ABSL_GUARDED_BY(mu_);
  std::vector<ControlEvent> control_events_ ABSL_GUARDED_BY(mu_);
  // Every live peer by its control endpoint; named ones also by name.
  absl::flat_hash_map<ucp_ep_h, PeerPtr> peers_by_ep_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, PeerPtr> peers_by_name_ ABSL_GUARDED_BY(mu_);
  // Ended peers, kept (by name) so GetPeer can say why. Bounded.
  absl::flat_hash_map<std::string, PeerInfo> ended_peers_ ABSL_GUARDED_BY(mu_);
  // Each element holds one reference (added on link, dropped on unlink).
  TransferList in_flight_ ABSL_GUARDED_BY(mu_);

  internal::Mutex notify_mu_;
  std::deque<Notification> notifications_ ABSL_GUARDED_BY(notify_mu_);
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_AGENT_IMPL_H_
