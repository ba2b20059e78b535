// WorkMetrics: an agent's counters of its work (kvferry/work_stats.h). The
// agent calls it at the few points where work ends: a transfer ended, an
// offer ended, a peer connected or ended, a notification arrived.
// Snapshot() copies the counters; the agent adds what is in flight.
// Thread-safe: its own lock, a leaf (taken under any agent lock; nothing
// else is taken while it is held).
#ifndef KVFERRY_SRC_WORK_METRICS_H_
#define KVFERRY_SRC_WORK_METRICS_H_

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <tuple>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kvferry/internal/mutex.h"
#include "kvferry/offer.h"
#include "kvferry/transfer.h"
#include "kvferry/work_stats.h"
#include "src/transfer_plan.h"

namespace kvferry::internal {

class WorkMetrics {
 public:
  // What a transfer's end needs from its start (kept on its TransferCore).
  struct Tag {
    TransferOp op = TransferOp::kRead;
    uint64_t bytes = 0;  // the sum of the copies' bytes
    absl::Time started;
  };
  // A transfer of `copies` posted now.
  static Tag Begin(TransferOp op, std::span<const CopyOp> copies);

  // A transfer to `peer` (over `data_path`) ended with `state` (not
  // kInFlight) and `status`. Its bytes count only when `state` is kDone.
  void TransferEnded(const std::string& peer, const std::string& data_path, const Tag& tag,
                     TransferState state, const absl::Status& status) ABSL_LOCKS_EXCLUDED(mu_);
  // An offer this agent made ended with `state` (not kOpen or kEmpty).
  void OfferEnded(OfferState state) ABSL_LOCKS_EXCLUDED(mu_);
  void PeerConnected() ABSL_LOCKS_EXCLUDED(mu_);
  // A peer in state `was` ended with `now` (kFailed or kClosed).
  void PeerEnded(PeerState was, PeerState now) ABSL_LOCKS_EXCLUDED(mu_);
  void NotificationReceived(uint64_t payload_bytes) ABSL_LOCKS_EXCLUDED(mu_);

  // The counters; the instantaneous fields of WorkStats are left zero.
  WorkStats Snapshot() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  using TransferKey = std::tuple<std::string, std::string, std::string, std::string>;
  using FailureKey = std::tuple<std::string, std::string, std::string>;
  using DurationKey = std::pair<std::string, std::string>;

  mutable internal::Mutex mu_;
  std::map<TransferKey, WorkStats::Transfers> transfers_ ABSL_GUARDED_BY(mu_);
  std::map<FailureKey, uint64_t> failures_ ABSL_GUARDED_BY(mu_);
  std::map<DurationKey, WorkStats::Durations> durations_ ABSL_GUARDED_BY(mu_);
  WorkStats totals_ ABSL_GUARDED_BY(mu_);  // the scalar counters only
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_WORK_METRICS_H_
