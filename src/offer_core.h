// OfferCore: the state behind an Offer handle, on the offering agent. It sits
// in its agent's OfferBook (which holds a reference) from Agent::Offer
// until it ends; ending drops the lease, so the blocks go back only then.
//
// Locking: the "agent-owned" fields are guarded by AgentImpl::mu_; the
// outcome (state_, status_, released_) by mu_ here, so a waiter can block on
// it. Lock order: AgentImpl::mu_ -> OfferCore::mu_.
#ifndef KVFERRY_SRC_OFFER_CORE_H_
#define KVFERRY_SRC_OFFER_CORE_H_

#include <atomic>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "kvferry/internal/mutex.h"
#include "kvferry/offer.h"
#include "src/peer.h"
#include "src/pool_core.h"
#include "src/transfer_core.h"

namespace kvferry::internal {

class OfferCore {
 public:
  OfferCore(boost::intrusive_ptr<AgentLink> link, uint64_t id, std::string peer_name,
            Tracked tracked)
      : id_(id), peer_name_(std::move(peer_name)), link_(std::move(link)),
        tracked_(std::move(tracked)) {}
  OfferCore(const OfferCore&) = delete;
  OfferCore& operator=(const OfferCore&) = delete;

  uint64_t id() const { return id_; }
  const std::string& peer_name() const { return peer_name_; }
  const std::string& ticket() const { return ticket_; }
  void set_ticket(std::string ticket) { ticket_ = std::move(ticket); }  // before sharing
  const boost::intrusive_ptr<AgentLink>& link() const { return link_; }

  OfferState state() const ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    return state_;
  }
  absl::Status status() const ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    return status_;
  }
  // Records the outcome, stops counting and returns the blocks (in that
  // order, so whoever sees the blocks back sees the outcome and the count).
  // Called once, by the agent, under its mu_.
  void End(OfferState state, absl::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    {
      internal::MutexLock l(&mu_);
      state_ = state;
      status_ = std::move(status);
    }
    tracked_.Reset();
    lease.reset();
    internal::MutexLock l(&mu_);
    released_ = true;
  }
  bool released() const ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    return released_;
  }
  bool AwaitReleased(absl::Duration timeout) ABSL_LOCKS_EXCLUDED(mu_) {
    internal::MutexLock l(&mu_);
    return mu_.AwaitWithTimeout(
        [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return released_; }, timeout);
  }

  // Agent-owned: guarded by AgentImpl::mu_. (What the agent knows of the
  // offer while it is open lives in its OfferBook, src/offer_book.h.)
  LeaseCorePtr lease;  // dropped by End()

 private:
  friend void intrusive_ptr_add_ref(OfferCore* p);
  friend void intrusive_ptr_release(OfferCore* p);

  const uint64_t id_;
  const std::string peer_name_;
  std::string ticket_;
  const boost::intrusive_ptr<AgentLink> link_;
  Tracked tracked_;
  std::atomic<int> refs_{0};
  mutable internal::Mutex mu_;
  OfferState state_ ABSL_GUARDED_BY(mu_) = OfferState::kOpen;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  bool released_ ABSL_GUARDED_BY(mu_) = false;
};

using OfferCorePtr = boost::intrusive_ptr<OfferCore>;

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_OFFER_CORE_H_
