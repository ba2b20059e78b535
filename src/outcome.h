// Outcome<State>: how an operation behind a handle (a Transfer, an Offer)
// ended, and whether its resources have been let go.
//
// An outcome starts open (the State given to the constructor), is ended once
// with a State and a Status, and is then marked released when the agent no
// longer holds anything for it. Readers see either the open state or the one
// recorded by the first End(); a waiter blocks until released.
//
// Thread-safe: every member may be called from any thread. Only
// AwaitReleased blocks (up to its timeout); the others take the outcome's own
// mutex briefly and never block on anything else, so they may be called with
// the agent's locks held (lock order: agent locks -> Outcome).
#ifndef KVFERRY_SRC_OUTCOME_H_
#define KVFERRY_SRC_OUTCOME_H_

#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kvferry/internal/mutex.h"

namespace kvferry::internal {

// The State-independent half of an Outcome: its status and release. One
// non-template wait loop (WaitForRelease in transfer_core.h) serves every
// Outcome through it.
class OutcomeBase {
 public:
  OutcomeBase(const OutcomeBase&) = delete;
  OutcomeBase& operator=(const OutcomeBase&) = delete;

  // OK while open; the status recorded by the first End() afterwards.
  absl::Status status() const ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock l(&mu_);
    return status_;
  }
  // Called once the agent has let go of everything the operation held. A
  // caller ends the outcome first; waiters then see the final state.
  void MarkReleased() ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock l(&mu_);
    released_ = true;
  }
  bool released() const ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock l(&mu_);
    return released_;
  }
  // Blocks until released or until `timeout` passes (a zero or negative
  // timeout does not block); returns released().
  bool AwaitReleased(absl::Duration timeout) ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock l(&mu_);
    return mu_.AwaitWithTimeout([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return released_; },
                                timeout);
  }

 protected:
  OutcomeBase() = default;
  ~OutcomeBase() = default;

  mutable Mutex mu_;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  bool released_ ABSL_GUARDED_BY(mu_) = false;
};

template <typename State>
class Outcome : public OutcomeBase {
 public:
  explicit Outcome(State open) : state_(open) {}

  State state() const ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock l(&mu_);
    return state_;
  }
  // Records the outcome; returns false, changing nothing, if it was already
  // ended (the first End wins). Does not release.
  bool End(State state, absl::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock l(&mu_);
    if (ended_) return false;
    ended_ = true;
    state_ = state;
    status_ = std::move(status);
    return true;
  }

 private:
  State state_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_OUTCOME_H_
