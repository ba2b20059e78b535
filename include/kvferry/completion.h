// What Agent::PollCompletions returns: every transfer and offer of the agent
// that ended, and every notification that arrived, since the previous call.
// An engine's event loop waits on Agent::completion_fd() and then takes this
// batch, instead of asking each handle.
//
// Thread safety: plain values.
#ifndef KVFERRY_COMPLETION_H_
#define KVFERRY_COMPLETION_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kvferry/end_reason.h"
#include "kvferry/offer.h"
#include "kvferry/transfer.h"

namespace kvferry {

// A transfer posted on this agent that ended: its blocks went back, and its
// handle's state() and status() say the same. The end is recorded just
// before the handle is released, so once the handle's Wait (or Cancel)
// returned, the end is in this batch or an earlier one; Wait may still take
// an instant after the end is polled.
struct TransferCompletion {
  uint64_t id = 0;  // Transfer::id()
  TransferState state = TransferState::kEmpty;  // kDone, kFailed or kCancelled
  absl::Status status;  // as Transfer::status()
  EndReason reason = EndReason::kNone;  // as Transfer::reason()
  TransferTelemetry telemetry;  // as Transfer::telemetry(), ended set
};

// An offer this agent made that ended: its blocks went back. Recorded just
// before the handle is released, as for transfers.
struct OfferCompletion {
  uint64_t id = 0;  // Offer::id()
  OfferState state = OfferState::kEmpty;  // never kOpen
  absl::Status status;  // as Offer::status()
  EndReason reason = EndReason::kNone;  // as Offer::reason()
};

struct Completions {
  // In the order they ended. Each end appears in exactly one batch.
  std::vector<TransferCompletion> transfers;
  std::vector<OfferCompletion> offers;
  // Taken from the same queue as Agent::PollNotifications: each
  // notification is delivered by exactly one of the two calls.
  std::vector<Notification> notifications;
  // Ends of transfers and offers not recorded since the previous batch
  // because the queue was full (AgentOptions::max_queued_completions). Not
  // zero: some ended handles are in no batch; ask the handles themselves.
  uint64_t dropped = 0;

  bool empty() const {
    return transfers.empty() && offers.empty() && notifications.empty() && dropped == 0;
  }
};

}  // namespace kvferry

#endif  // KVFERRY_COMPLETION_H_
