// Offer: blocks one agent lends to one peer for a single READ or WRITE,
// with retain and release balanced across the two agents.
//
// The offering agent (Agent::Offer) keeps the blocks leased until exactly
// one of:
//   - the peer moved every layer on the offer's ticket (all of the offered
//     blocks, or the subset it chose with TransferSpec::offer_blocks; the
//     others count as released) and each of its transfers was fenced on the
//     peer and acknowledged (kConsumed; no call needed on either side);
//   - the peer released the offer (Agent::ReleaseOffer, for instance on a
//     full prefix-cache hit): the offering agent fences the peer as for a
//     revoke below, then ends it kReleased;
//   - the peer failed or disconnected, its data endpoint here is closed, or
//     a transfer of the peer on the offer failed and the peer fenced the
//     rest (kPeerFailed);
//   - the ttl passed (kExpired) or the owner called Revoke (kRevoked): the
//     offering agent tells the peer, which ends every transfer it posted on
//     the ticket (they fail with a status naming the offer) and confirms
//     that none can still move; only then do the blocks go back. A peer
//     that never confirms is failed by its liveness timeout, which closes
//     its data endpoint.
// The ticket is bytes for the engine's own channel (router, side channel).
// The peer posts with TransferSpec::offer_ticket instead of a pool and
// block ids; it checks the ticket (made by that peer, for this agent, on
// this connection, not ended, each layer at most once) before anything
// moves.
//
// The ttl is counted by the offering agent's clock alone: the ticket carries
// a duration, never a point in time, and the peer uses it only to refuse a
// ticket early (counting from the first time it posts on or releases it).
// No outcome depends on two hosts' clocks agreeing.
//
// An offer may name a peer that is not connected yet (Agent::Offer): it
// waits, open, and binds to the next connection of an agent of that name
// once that agent authenticated; the ttl covers the wait, and an offer still
// waiting when it runs out ends kExpired at once (no peer to fence). Its
// ticket is good only on the connection it bound to.
//
// Like a Transfer, dropping the handle does not end the offer: the agent
// keeps it until it ends (the ttl bounds that). An offer is a ledger object
// (ResourceKind::kOffer) until its blocks went back.
//
// Thread safety: Offer is thread-compatible; its agent is thread-safe.
#ifndef KVFERRY_OFFER_H_
#define KVFERRY_OFFER_H_

#include <cstdint>
#include <string>

#include <boost/smart_ptr/intrusive_ptr.hpp>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kvferry/end_reason.h"

namespace kvferry {

enum class OfferState {
  kEmpty,       // a default-constructed or moved-from handle
  kOpen,        // the blocks are lent (or being fenced before they go back),
                // or wait for the named peer to connect
  kConsumed,    // the peer moved every layer (of the blocks it took); blocks back
  kPeerFailed,  // the peer failed, disconnected or abandoned it; blocks back
  kExpired,     // the ttl passed first; blocks back after the fence
  kRevoked,     // Revoke() first; blocks back after the fence
  kReleased,    // the peer released it (Agent::ReleaseOffer); blocks back after the fence
};
// "empty", "open", "consumed", "peer-failed", "expired", "revoked" or
// "released".
const char* OfferStateName(OfferState state);

namespace internal {
class OfferCore;
}  // namespace internal

class Offer {
 public:
  // The special members are defined in the library, where the reference
  // count of the offer's state is reachable.
  Offer() noexcept;
  Offer(Offer&&) noexcept;
  Offer& operator=(Offer&&) noexcept;
  Offer(const Offer&) = delete;
  Offer& operator=(const Offer&) = delete;
  ~Offer();  // does not end the offer; see the file comment

  bool empty() const { return core_ == nullptr; }
  // Unique per offering agent; the peer's transfers name it in errors.
  uint64_t id() const;
  // What the peer needs: pass these bytes to it by any channel. Binary.
  const std::string& ticket() const;
  const std::string& peer() const;  // the agent it was made for
  OfferState state() const;
  // OkStatus while open or once consumed or released (the peer's normal
  // ways of finishing with it); else why it ended.
  absl::Status status() const;
  // ReasonOf(status()): kNone while open, once consumed and for an empty
  // handle; else why it ended: kTicketExpired (kExpired), kTicketRevoked
  // (kRevoked by Revoke), kPoolRemoved (kRevoked by Agent::RemovePool),
  // kPeerFailed or kPeerDisconnected (kPeerFailed: the peer ended),
  // kPeerTransferFailed (kPeerFailed: the peer's transfer on it failed),
  // kAgentShutDown (this agent was destroyed).
  EndReason reason() const;
  // Waits until the offer has ended and its blocks went back, or `timeout`.
  // OkStatus when consumed or released, kDeadlineExceeded while still open,
  // else why it ended (kFailedPrecondition for an empty handle).
  absl::Status Wait(absl::Duration timeout = absl::InfiniteDuration());
  // Ends an open offer (kRevoked): fences the peer's transfers on it as the
  // file comment says, then returns the blocks. Waits until they went back.
  // Returns the final status: kCancelled naming the offer when this call
  // ended it, or how it had ended before.
  absl::Status Revoke();

 private:
  friend class Agent;
  explicit Offer(boost::intrusive_ptr<internal::OfferCore> core) noexcept;
  boost::intrusive_ptr<internal::OfferCore> core_;
};

}  // namespace kvferry

#endif  // KVFERRY_OFFER_H_
