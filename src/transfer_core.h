// TransferCore: the state behind a Transfer handle. AgentLink: how a handle
// reaches its agent, or learns that the agent is gone.
//
// A TransferCore sits on its agent's in-flight list (which holds a
// reference) from PostTransfer until it is fenced: its flush (and
// notification) requests have completed, or its endpoint has been closed.
// Only then does the agent drop the lease and the peer it pins.
//
// Locking: the "agent-owned" fields are guarded by AgentImpl::mu_; the
// outcome (state_, status_) by mu_ here, so a waiter can block on it. Lock
// order: AgentLink::mu_ -> AgentImpl::mu_ -> TransferCore::mu_.
#ifndef KVFERRY_SRC_TRANSFER_CORE_H_
#define KVFERRY_SRC_TRANSFER_CORE_H_

#include <atomic>

#include <boost/intrusive/list.hpp>

#include "absl/base/thread_annotations.h"
#include "kvferry/internal/mutex.h"
#include "kvferry/transfer.h"
#include "src/peer.h"
#include "src/pool_core.h"

namespace kvferry::internal {

class AgentImpl;

class AgentLink : public boost::intrusive_ref_counter<AgentLink> {
 public:
  explicit AgentLink(AgentImpl* agent) : agent_(agent) {}
  // The agent is detached (set to null) before it starts tearing down; a
  // reader that holds mu_ may use it.
  internal::Mutex mu_;
  AgentImpl* agent_ ABSL_GUARDED_BY(mu_);
};

class TransferCore
    : public boost::intrusive::list_base_hook<
          boost::intrusive::link_mode<boost::intrusive::safe_link>> {
 public:
  TransferCore(boost::intrusive_ptr<AgentLink> link, Tracked tracked)
      : link_(std::move(link)), tracked_(std::move(tracked)) {}
  TransferCore(const TransferCore&) = delete;
  TransferCore& operator=(const TransferCore&) = delete;

  TransferState state() const ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    return state_;
  }
  absl::Status status() const ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    return status_;
  }
  // Records the outcome once; later calls are ignored.
  void End(TransferState state, absl::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    if (state_ != TransferState::kInFlight) return;
    state_ = state;
    status_ = std::move(status);
  }
  // Called after the agent has let go of the lease and the peer: the
  // transfer's memory is free for reuse. From here on the ledger no longer
  // counts it; a handle still held is an empty shell with an outcome.
  void MarkReleased() ABSL_LOCKS_EXCLUDED(mu_) {
    tracked_.Reset();
    internal::MutexLock l(&mu_);
    released_ = true;
  }
  bool released() const ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    return released_;
  }
  // True once released; waits up to `timeout`.
  bool AwaitReleased(absl::Duration timeout) ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    return mu_.AwaitWithTimeout([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return released_; },
                                timeout);
  }
  const boost::intrusive_ptr<AgentLink>& link() const { return link_; }

  // Agent-owned: guarded by AgentImpl::mu_.
  PeerPtr peer;
  LeaseCorePtr lease;
  Request flush;  // ucp_ep_flush_nbx on the data endpoint after the copies
  std::string notification;
  bool cancel = false;
  absl::Time cancel_deadline = absl::InfiniteFuture();

 private:
  friend void intrusive_ptr_add_ref(TransferCore* p);
  friend void intrusive_ptr_release(TransferCore* p);

  const boost::intrusive_ptr<AgentLink> link_;
  Tracked tracked_;
  std::atomic<int> refs_{0};
  mutable internal::Mutex mu_;
  TransferState state_ ABSL_GUARDED_BY(mu_) = TransferState::kInFlight;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  // Ordering: state_ leaves kInFlight (the copies are fenced), then the lease
  // is dropped, then released_ becomes true.
  bool released_ ABSL_GUARDED_BY(mu_) = false;
};

using TransferCorePtr = boost::intrusive_ptr<TransferCore>;

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_TRANSFER_CORE_H_
