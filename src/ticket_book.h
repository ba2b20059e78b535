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
//    peer's current incarnation, carries a tag made with `expect.key`, covers
//    the layers asked for, none of them was posted on before, the peer has
//    not ended the offer, and its deadline is after `now`; else the error
//    names the offer and the reason (the codes are listed at Check).
//  - The peer hears kOfferRevoked for an ended offer exactly when nothing
//    posted on it is still in flight, and kOfferDone for each transfer on an
//    offer it has not ended.
//  - At most wire::kMaxUnpostedRevokes offers that were never posted on are
//    remembered as ended; the next one is reported as a broken bound.
//  - An offer is forgotten (Forget) only with nothing in flight on it and
//    once its ticket would be refused anyway: a second after its deadline,
//    and never later than a second past the longest ttl from when it was
//    last noted.
//
// Thread-compatible: const methods may run concurrently; anything else needs
// external synchronization (the agent holds each peer's book under its mu_).
#ifndef KVFERRY_SRC_TICKET_BOOK_H_
#define KVFERRY_SRC_TICKET_BOOK_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kvferry/end_reason.h"
#include "kvferry/transfer.h"
#include "src/wire/message.h"

namespace kvferry::internal {

// The longest offer ttl an agent grants (Agent::Offer refuses more).
inline constexpr absl::Duration kMaxOfferTtl = absl::Hours(24);

class TicketBook {
 public:
  // What a transfer on a checked ticket needs for Posted.
  struct Use {
    uint64_t offer_id;
    absl::Time deadline;
  };
  // What a ticket must show to be this peer's, for this agent.
  struct Expect {
    absl::string_view taker;        // this agent's name
    uint64_t offerer_incarnation;   // the peer's incarnation on this connection
    absl::string_view key;          // the key its tags are made with
  };

  TicketBook() = default;
  TicketBook(const TicketBook&) = delete;
  TicketBook& operator=(const TicketBook&) = delete;

  // Checks `ticket` (decoded from `body`, tagged `tag`) for a transfer of
  // layers [layer_begin, layer_end). In this order: kPermissionDenied (made
  // for another agent), kFailedPrecondition (an earlier incarnation),
  // kPermissionDenied (the tag does not match), kInvalidArgument (layers past
  // the ticket's), kFailedPrecondition (the peer ended the offer: its words),
  // kAlreadyExists (a layer already posted on), kDeadlineExceeded (expired).
  absl::StatusOr<Use> Check(const wire::Ticket& ticket, absl::string_view body,
                            absl::string_view tag, const Expect& expect, uint32_t layer_begin,
                            uint32_t layer_end, absl::Time now) const;

  // A transfer of [layer_begin, layer_end) on a checked ticket was posted.
  // REQUIRES: layer_end <= num_layers, the ticket's layer count.
  void Posted(const Use& use, uint32_t num_layers, uint32_t layer_begin, uint32_t layer_end,
              absl::Time now);

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
                                                       absl::string_view offerer, absl::Time now);

  // Forgets the offers whose tickets are refused by now anyway and have
  // nothing in flight (see the guarantees).
  void Forget(absl::Time now);

  bool empty() const { return offers_.empty(); }
  // Offers remembered as ended before they were posted on.
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
    absl::Time forget_after;
    // Made by a revoke before any post (counted in unposted_revokes_).
    bool unposted = false;
  };

  absl::flat_hash_map<uint64_t, Taken> offers_;  // by offer id
  size_t unposted_revokes_ = 0;  // entries of offers_ with `unposted`
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_TICKET_BOOK_H_
