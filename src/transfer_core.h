// TransferCore: the state behind a Transfer handle. AgentLink: how a handle
// reaches its agent, or learns that the agent is gone.
//
// A TransferCore sits on its agent's in-flight list (which holds a
// reference) from PostTransfer until it is fenced: its flush (and
// notification) requests have completed, or its endpoint has been closed.
// Only then does the agent drop the lease and the peer it pins.
//
// Locking: the "agent-owned" fields are guarded by the agent's roles
// (src/agent_role.h): kAgentControl (AgentImpl::mu_), and kAgentData
// (AgentImpl::ucx_mu_) for what a post writes; clang checks both. The
// outcome has its own mutex (src/outcome.h), so a waiter can block on it;
// copy_status_ and the telemetry are guarded by mu_ here. A handle's thread
// and the kernel copier reach only those (and the atomics), never a role.
// Lock order: AgentImpl::mu_ ->
// TransferCore::mu_, and AgentImpl::mu_ -> the outcome's.
#ifndef KVFERRY_SRC_TRANSFER_CORE_H_
#define KVFERRY_SRC_TRANSFER_CORE_H_

#include <atomic>
#include <cstdint>
#include <vector>

#include <boost/intrusive/list.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "kvferry/internal/mutex.h"
#include "kvferry/transfer.h"
#include "src/agent_role.h"
#include "src/outcome.h"
#include "src/peer.h"
#include "src/pool_core.h"
#include "src/work_metrics.h"

namespace kvferry::internal {

class AgentImpl;

// A handle calls into its agent through a short pin: Acquire() returns the
// agent (or null once it is being destroyed) and keeps it alive until
// Release(); the agent's destructor Detach()es first, which waits for every
// pin to go. No lock is held while the handle is inside the agent, so one
// thread's long Cancel never delays another thread's Wait.
class AgentLink : public boost::intrusive_ref_counter<AgentLink> {
 public:
  explicit AgentLink(AgentImpl* agent) : agent_(agent) {}
  AgentImpl* Acquire() ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    if (agent_ != nullptr) ++users_;
    return agent_;
  }
  void Release() ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    --users_;
  }
  void Detach() ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    agent_ = nullptr;
    mu_.Await([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return users_ == 0; });
  }

 private:
  internal::Mutex mu_;
  AgentImpl* agent_ ABSL_GUARDED_BY(mu_);
  int users_ ABSL_GUARDED_BY(mu_) = 0;
};

// RAII pin of an AgentLink.
class AgentPin {
 public:
  explicit AgentPin(AgentLink* link) : link_(link), agent_(link->Acquire()) {}
  ~AgentPin() {
    if (agent_ != nullptr) link_->Release();
  }
  AgentPin(const AgentPin&) = delete;
  AgentPin& operator=(const AgentPin&) = delete;
  AgentImpl* get() const { return agent_; }

 private:
  AgentLink* const link_;
  AgentImpl* const agent_;
};

// The wait of Transfer::Wait and Offer::Wait: blocks until `outcome` is
// released or `timeout` passes. An agent without a progress thread is
// progressed by the waiting thread (while the agent lives); with one, the
// thread sleeps on the outcome. Returns the outcome's status once released,
// else kDeadlineExceeded "<pending()> after <timeout>". Defined in agent.cc.
absl::Status WaitForRelease(AgentLink& link, OutcomeBase& outcome, absl::Duration timeout,
                            absl::FunctionRef<std::string()> pending);

// Reference-counted (thread-safe); the in-flight list's reference is taken
// and dropped by hand (intrusive_ptr_add_ref / intrusive_ptr_release, found
// by argument-dependent lookup).
class TransferCore
    : public boost::intrusive::list_base_hook<
          boost::intrusive::link_mode<boost::intrusive::safe_link>>,
      public boost::intrusive_ref_counter<TransferCore, boost::thread_safe_counter> {
 public:
  // `tracked` counts the transfer until it is fenced (kTransfer);
  // `handle_tracked` until this object is destroyed (kTransferHandle).
  TransferCore(boost::intrusive_ptr<AgentLink> link, Tracked tracked, Tracked handle_tracked)
      : link_(std::move(link)),
        tracked_(std::move(tracked)),
        handle_tracked_(std::move(handle_tracked)) {}
  TransferCore(const TransferCore&) = delete;
  TransferCore& operator=(const TransferCore&) = delete;

  uint64_t id() const { return id_; }
  void set_id(uint64_t id) { id_ = id; }  // before sharing

  const Outcome<TransferState>& outcome() const { return outcome_; }
  Outcome<TransferState>& outcome() { return outcome_; }
  TransferState state() const { return outcome_.state(); }
  absl::Status status() const { return outcome_.status(); }
  // Records the outcome once; later calls are ignored.
  void End(TransferState state, absl::Status status) {
    outcome_.End(state, std::move(status));
  }
  // The ledger stops counting the transfer: called before its blocks go
  // back, so whoever sees the blocks back also sees the count at zero.
  void Untrack() { tracked_.Reset(); }
  // Called after the agent has let go of the lease and the peer: the
  // transfer's memory is free for reuse. A handle still held is an empty
  // shell with an outcome.
  void MarkReleased() { outcome_.MarkReleased(); }
  bool released() const { return outcome_.released(); }
  const boost::intrusive_ptr<AgentLink>& link() const { return link_; }

  // Guarded by kAgentData, i.e. AgentImpl::ucx_mu_ (written by whoever
  // posts the copies, the progress thread's data pass included).
  Request flush ABSL_GUARDED_BY(kAgentData);  // ucp_ep_flush_nbx after the copies
  bool posted ABSL_GUARDED_BY(kAgentData) = false;  // the copies and the flush were posted

  // A transfer that moves by kernel copy (src/kernel_copier.h): the copier
  // marks it once its copy returned, with the copy's outcome; the agent
  // ends the transfer with it on its next pass. Once only.
  void MarkCopied(absl::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    {
      internal::MutexLock l(&mu_);
      copy_status_ = std::move(status);
    }
    copied_.store(true, std::memory_order_release);
  }
  bool copied() const { return copied_.load(std::memory_order_acquire); }
  absl::Status copy_status() const ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    return copy_status_;
  }

  // Transfer::telemetry(): set by PostTransfer, its end time by the agent
  // when it ends the transfer; read by the handle's thread.
  void set_telemetry(TransferTelemetry telemetry) ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    telemetry_ = std::move(telemetry);
  }
  // Records the end time once; returns the telemetry with it.
  TransferTelemetry MarkTelemetryEnded(absl::Time ended) ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    if (telemetry_.ended == absl::InfiniteFuture()) telemetry_.ended = ended;
    return telemetry_;
  }
  TransferTelemetry telemetry() const ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    return telemetry_;
  }

  // Agent-owned: guarded by kAgentControl, i.e. AgentImpl::mu_.
  // The remote pool's path it was posted on (and through it the remote keys
  // its copies use): held until the transfer ends, under both agent locks.
  RemotePoolPathPtr path ABSL_GUARDED_BY(kAgentControl);
  WorkMetrics::Tag work ABSL_GUARDED_BY(kAgentControl);  // operation, bytes and start, for WorkMetrics
  PeerPtr peer ABSL_GUARDED_BY(kAgentControl);
  LeaseCorePtr lease ABSL_GUARDED_BY(kAgentControl);
  // Posted by block ids (TransferSpec::local_pool): the pool, held until
  // fenced, and the ids pinned in it (PoolCore::Pin). Null/empty with a lease.
  PoolCorePtr id_pool ABSL_GUARDED_BY(kAgentControl);
  std::vector<uint32_t> id_blocks ABSL_GUARDED_BY(kAgentControl);
  // The pool of its local blocks (either form); null once fenced.
  const PoolCore* local_pool() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    return lease != nullptr ? &lease->pool() : id_pool.get();
  }
  std::string notification ABSL_GUARDED_BY(kAgentControl);
  // Posted on an offer's ticket (TransferSpec::offer_ticket): its id on the
  // offering peer (0: none) and the layers this transfer moves.
  uint64_t offer_id ABSL_GUARDED_BY(kAgentControl) = 0;
  uint32_t layer_begin ABSL_GUARDED_BY(kAgentControl) = 0;
  uint32_t layer_end ABSL_GUARDED_BY(kAgentControl) = 0;
  bool cancel ABSL_GUARDED_BY(kAgentControl) = false;
  absl::Duration cancel_grace ABSL_GUARDED_BY(kAgentControl);  // as the caller asked
  absl::Time cancel_deadline ABSL_GUARDED_BY(kAgentControl) = absl::InfiniteFuture();  // the grace, at least kMinCancelDrain
  int cancel_passes ABSL_GUARDED_BY(kAgentControl) = 0;  // progress passes that found it still draining
  bool cancel_fenced_peer ABSL_GUARDED_BY(kAgentControl) = false;  // the cancel had to fail the peer
  // Set when the agent cancelled it (Agent::RemovePool): its status then.
  std::string cancel_reason ABSL_GUARDED_BY(kAgentControl);
  // The copies completed, but the notification waits for room in the
  // peer's control connection (counted in AgentImpl::notifications_held_).
  bool notify_held ABSL_GUARDED_BY(kAgentControl) = false;

 private:
  const boost::intrusive_ptr<AgentLink> link_;
  uint64_t id_ = 0;
  Tracked tracked_;
  Tracked handle_tracked_;  // reset only by the destructor
  std::atomic<bool> copied_{false};
  // Ordering: the outcome leaves kInFlight (the copies are fenced), the
  // ledger stops counting it, the lease is dropped, then it is released.
  Outcome<TransferState> outcome_{TransferState::kInFlight};
  mutable internal::Mutex mu_;
  absl::Status copy_status_ ABSL_GUARDED_BY(mu_);
  TransferTelemetry telemetry_ ABSL_GUARDED_BY(mu_);
};

using TransferCorePtr = boost::intrusive_ptr<TransferCore>;

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_TRANSFER_CORE_H_
