// TicketBook: the taking side of offers (include/kvferry/offer.h), for one
// peer. It checks the peer's tickets before a transfer uses them, remembers
// which layers of each offer were posted on and how many of those transfers
// are in flight, and what the peer said when it ended an offer
// (kOfferRevoke). It decides; its owner acts: the agent sends the messages it
// returns to the peer, fails the transfers it names, and fails the peer when
// it reports a bound broken.
//
// Guarantees:
//  - A ticket passes Check only if it was made for `expect.taker` by the
//    peer's current incarnation, carries a tag made with `expect.key` (or,
//    for a ticket made for this agent's name before it connected, with
//    `expect.name_key`, and the peer bound that offer to this connection:
//    Bound), covers the layers asked for, none of them was posted on before,
//    neither side ended the offer, and its ttl has not run out on this
//    agent's clock since its first use here; else the error names the offer
//    and the reason (the codes are listed at Check).
//  - The ttl is a duration: the deadline it gives is this agent's own,
//    counted from the first post on the offer or its release here. Nothing
//    reads the peer's clock; the peer enforces the real end (Revoked).
//  - The peer hears kOfferRevoked for an ended offer exactly when nothing
//    posted on it is still in flight, and kOfferDone for each transfer on an
//    offer it has not ended.
//  - At most wire::kMaxUnpostedRevokes offers that were never posted on are
//    remembered as ended or bound; the next one is reported as a broken
//    bound.
//  - The peer's floor (the lowest id among its offers to this connection
//    still open; every offer message carries it) only rises. A ticket below
//    it is refused as ended; an offer below it with nothing in flight is
//    forgotten (Forget), so memory is bounded by the offers the peer still
//    has open, and a forgotten ticket never passes again.
//
// Thread-compatible: const methods may run concurrently; anything else needs
// external synchronization (the agent holds each peer's book under its mu_).
#ifndef KVFERRY_SRC_TICKET_BOOK_H_
#define KVFERRY_SRC_TICKET_BOOK_H_

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvferry/end_reason.h"
#include "kvferry/transfer.h"
#include "src/wire/message.h"

namespace kvferry::internal {

// The longest offer ttl an agent grants (Agent::Offer refuses more).
inline constexpr absl::Duration kMaxOfferTtl = absl::Hours(24);
// How long a post on (or release of) a ticket made for this agent's name
// waits for its offerer's kOfferBound when the connection has just come up.
inline constexpr absl::Duration kOfferBindingWait = absl::Seconds(5);
// How long an ended offer's entry outlives the floor passing it (Forget).
inline constexpr absl::Duration kForgetGrace = absl::Minutes(1);

// The block ids a transfer on `ticket` moves: the ticket's blocks at
// `indices` (indices into the offer, in the order given), or all of them
// when `indices` is empty. kInvalidArgument naming an index past the offer
// or given twice.
absl::StatusOr<std::vector<uint32_t>> SelectOfferBlocks(const wire::Ticket& ticket,
                                                        absl::Span<const uint32_t> indices);

class TicketBook {
 public:
  // What a transfer on a checked ticket needs for Posted.
  struct Use {
    uint64_t offer_id;
    absl::Time deadline;  // this agent's: the first use plus the ticket's ttl
  };
  // What a ticket must show to be this peer's, for this agent.
  struct Expect {
    absl::string_view taker;        // this agent's name
    uint64_t offerer_incarnation;   // the peer's incarnation on this connection
    absl::string_view key;          // the key its tags are made with
    // The key of tickets made for this agent's name (wire::TicketNameKey).
    absl::string_view name_key = {};
  };

  TicketBook() = default;
  TicketBook(const TicketBook&) = delete;
  TicketBook& operator=(const TicketBook&) = delete;

  // Checks `ticket` (decoded from `body`, tagged `tag`) for a transfer of
  // layers [layer_begin, layer_end). In this order: kPermissionDenied (made
  // for another agent), kFailedPrecondition (an earlier incarnation),
  // kPermissionDenied (the tag does not match), kInvalidArgument (layers past
  // the ticket's), kFailedPrecondition (the peer ended the offer: its words;
  // below the peer's floor; released here; or made for the name and not
  // bound to this connection), kAlreadyExists (a layer already posted on),
  // kDeadlineExceeded (its ttl ran out here since its first use).
  absl::StatusOr<Use> Check(const wire::Ticket& ticket, absl::string_view body,
                            absl::string_view tag, const Expect& expect, uint32_t layer_begin,
                            uint32_t layer_end, absl::Time now) const;

  // A transfer of [layer_begin, layer_end) on a checked ticket was posted.
  // REQUIRES: layer_end <= num_layers, the ticket's layer count.
  void Posted(const Use& use, uint32_t num_layers, uint32_t layer_begin, uint32_t layer_end,
              absl::Time now);

  // This agent releases the offer of the checked `ticket` (Check's identity
  // checks, for no layer): the kOfferRelease for the peer, or nothing when
  // the offer ended or was released already. Later posts on it are refused.
  absl::StatusOr<std::optional<wire::Message>> Release(const wire::Ticket& ticket,
                                                       absl::string_view body,
                                                       absl::string_view tag,
                                                       const Expect& expect, absl::Time now);

  // The peer bound an offer made for this agent's name to this connection
  // (`bound`, a kOfferBound). kResourceExhausted as for Revoked.
  absl::Status Bound(const wire::Message& bound, absl::string_view offerer);
  // Whether the peer bound that offer to this connection (it may have ended
  // since).
  bool IsBound(uint64_t offer_id) const;

  // The peer's floor rose to `floor` (see the guarantees); lower values are
  // ignored.
  void RaiseFloor(uint64_t floor) { floor_ = std::max(floor_, floor); }
  uint64_t floor() const { return floor_; }

  // Why the peer ended that offer, or null while it stands. Valid until the
  // next non-const call.
  const std::string* RevokedWhy(uint64_t offer_id) const;
  // The reason the peer gave when it ended that offer (kNone if it did not).
  EndReason RevokedReason(uint64_t offer_id) const;

  // A transfer posted on the offer ended: the message for the peer, if any
  // (kOfferDone for a standing offer, carrying the failure's code and text;
  // kOfferRevoked once the last transfer on an ended offer is gone).
  std::optional<wire::Message> TransferEnded(uint64_t offer_id, uint32_t layer_begin,
                                             uint32_t layer_end, TransferState state,
                                             const absl::Status& status);

  // The peer (agent `offerer`) ended an offer (`revoke`, a kOfferRevoke).
  // Returns the reply to send now (kOfferRevoked when nothing on the offer is
  // in flight), or kResourceExhausted when this revoke breaks the bound on
  // offers ended before they were posted on; then nothing was recorded and
  // the peer should be failed with that status.
  absl::StatusOr<std::optional<wire::Message>> Revoked(const wire::Message& revoke,
                                                       absl::string_view offerer);

  // Forgets the offers below the floor with nothing in flight (see the
  // guarantees), each kForgetGrace after a call first saw it so: until then
  // a post on it keeps its precise refusal (a layer moved, a revoke's words).
  // The grace is for the messages only; a forgotten ticket stays refused.
  void Forget(absl::Time now);

  bool empty() const { return offers_.empty(); }
  size_t size() const { return offers_.size(); }
  // Offers remembered as ended or bound before they were posted on.
  size_t unposted_revokes() const { return unposted_revokes_; }

 private:
  // An offer of the peer that this agent posted on or heard ended.
  struct Taken {
    std::vector<bool> layers_posted;
    int in_flight = 0;
    // The peer ended the offer: no more posts; transfers on it fail naming
    // `why`, and the peer hears kOfferRevoked once none is left.
    bool revoked = false;
    std::string why;
    EndReason reason = EndReason::kNone;  // the peer's, from its OFFER_REVOKE
    // This agent released it: no more posts.
    bool released = false;
    // The peer bound it (made for this agent's name) to this connection.
    bool bound = false;
    // This agent's deadline: set at the first post or release.
    absl::Time deadline = absl::InfiniteFuture();
    bool used = false;
    // Made by a revoke or a binding before any post or release (counted in
    // unposted_revokes_).
    bool unposted = false;
    // When Forget first saw it below the floor with nothing in flight.
    absl::Time below_floor_since = absl::InfiniteFuture();
  };

  // Check's identity checks: whose ticket, which incarnation, its tag, and
  // for a ticket made for the name, the binding.
  absl::Status Verify(const wire::Ticket& ticket, absl::string_view body, absl::string_view tag,
                      const Expect& expect) const;
  // Remembers a new entry made before any post (counted and bounded).
  absl::StatusOr<Taken*> AddUnposted(uint64_t offer_id, absl::string_view offerer,
                                     absl::string_view verb);
  void MarkUsed(Taken& taken, absl::Time deadline);

  absl::flat_hash_map<uint64_t, Taken> offers_;  // by offer id
  size_t unposted_revokes_ = 0;  // entries of offers_ with `unposted`
  uint64_t floor_ = 0;  // every offer of the peer below it has ended there
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_TICKET_BOOK_H_
