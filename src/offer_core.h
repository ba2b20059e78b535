// OfferCore: the state behind an Offer handle, on the offering agent. It sits
// in its agent's OfferBook (which holds a reference) from Agent::Offer
// until it ends; ending drops the lease, so the blocks go back only then.
//
// Locking: the "agent-owned" fields are guarded by kAgentControl, the role
// held with AgentImpl::mu_ (src/agent_role.h; clang checks it); the
// outcome has its own mutex (src/outcome.h), so a waiter can block on it.
// Lock order: AgentImpl::mu_ -> the outcome's.
#ifndef KVFERRY_SRC_OFFER_CORE_H_
#define KVFERRY_SRC_OFFER_CORE_H_

#include <atomic>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "kvferry/internal/mutex.h"
#include "kvferry/offer.h"
#include "src/agent_role.h"
#include "src/outcome.h"
#include "src/peer.h"
#include "src/pool_core.h"
#include "src/transfer_core.h"

namespace kvferry::internal {

// Reference-counted (thread-safe): held by the agent's offers_ map and by the
// Offer handle.
class OfferCore : public boost::intrusive_ref_counter<OfferCore, boost::thread_safe_counter> {
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

  const Outcome<OfferState>& outcome() const { return outcome_; }
  Outcome<OfferState>& outcome() { return outcome_; }
  OfferState state() const { return outcome_.state(); }
  absl::Status status() const { return outcome_.status(); }
  // Records the outcome, stops counting and returns the blocks, then marks
  // it released (in that order, so whoever sees the blocks back sees the
  // outcome and the count, and a waiter woken by the release sees all
  // three). Called once, by the agent, under its mu_; the outcome keeps the
  // first End's state and status should it be called again.
  // `recorded` runs once the blocks went back and before the release, only
  // if this call ended it (the agent records the end for PollCompletions
  // there, so a Wait that returned implies the end is recorded).
  void End(OfferState state, absl::Status status,
           absl::FunctionRef<void()> recorded = [] {}) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
    const bool first = outcome_.End(state, std::move(status));
    tracked_.Reset();
    lease.reset();
    if (first) recorded();
    outcome_.MarkReleased();
  }
  bool released() const { return outcome_.released(); }

  // Agent-owned: guarded by kAgentControl, i.e. AgentImpl::mu_. (What the
  // agent knows of the offer while it is open lives in its OfferBook,
  // src/offer_book.h.)
  LeaseCorePtr lease ABSL_GUARDED_BY(kAgentControl);  // dropped by End()

 private:
  const uint64_t id_;
  const std::string peer_name_;
  std::string ticket_;
  const boost::intrusive_ptr<AgentLink> link_;
  Tracked tracked_;
  Outcome<OfferState> outcome_{OfferState::kOpen};
};

using OfferCorePtr = boost::intrusive_ptr<OfferCore>;

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_OFFER_CORE_H_
