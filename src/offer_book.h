// OfferBook: the offering side of offers (include/kvferry/offer.h). It holds
// every open offer an agent made (a reference to its OfferCore, the peer the
// ticket was made for or, until it connects, its name; the deadline on this
// agent's clock; the layers the peer acknowledged) and decides when each
// ends. It decides; its owner acts: every call returns
// Decisions, the kOfferRevoke messages the agent must send and the offers
// that left the book, whose outcomes the agent records (OfferCore::End).
//
// Guarantees:
//  - An offer ends once, and leaves the book as it ends.
//  - It ends kConsumed once the peer acknowledged (kOfferDone) each of its
//    layers, in any order and however often.
//  - A revoke (the owner's, the deadline's, a failed transfer's, a
//    disconnect's) tells the peer to fence (kOfferRevoke) and ends the offer
//    with that revoke's outcome only when the peer confirms (kOfferRevoked)
//    or closes; the first revoke's outcome holds. An offer to a peer no
//    longer connected ends at once.
//  - Messages count only from the peer the offer was made for (or bound to).
//  - A release by the peer (kOfferRelease) is a revoke whose outcome is
//    kReleased with OkStatus.
//  - An offer opened for a name waits until Bind gets a peer of that name
//    (then kOfferBound tells it), and ends at once (no peer to fence) if
//    revoked or past its deadline before.
//  - Messages carry the offer's ttl, never the deadline: no other host reads
//    this agent's clock. Each message to a peer carries its floor (the
//    lowest id of its offers still open here), and a consumed offer is
//    announced (kOfferEnded), so the peer can forget what ended.
//
// Thread-compatible: const methods may run concurrently; anything else needs
// external synchronization (the agent holds its book under its mu_). The
// methods that read Peer or OfferCore fields (name, state, status, lease)
// require kAgentControl, the role that guards them (src/agent_role.h).
#ifndef KVFERRY_SRC_OFFER_BOOK_H_
#define KVFERRY_SRC_OFFER_BOOK_H_

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kvferry/offer.h"
#include "src/agent_role.h"
#include "src/offer_core.h"
#include "src/peer.h"
#include "src/ticket_book.h"
#include "src/wire/message.h"

namespace kvferry::internal {

class OfferBook {
 public:
  // An offer that left the book: the agent records `state` and `status`.
  struct Ended {
    OfferCorePtr offer;
    OfferState state;
    absl::Status status;
  };
  // A message the agent must send to `peer` (a kOfferRevoke or kOfferBound).
  struct Send {
    PeerPtr peer;
    wire::Message message;
  };
  // To be acted on in this order: the sends, then the ends.
  struct Decisions {
    std::vector<Send> sends;
    std::vector<Ended> ended;
  };

  OfferBook() = default;
  OfferBook(const OfferBook&) = delete;
  OfferBook& operator=(const OfferBook&) = delete;

  // The id for the next offer (1, 2, ...; never reused).
  uint64_t NextId() { return next_id_++; }
  // Opens `offer` (id from NextId) for `peer` until `deadline`; the peer
  // consumes it by moving each of `num_layers` layers. `ttl` is what the
  // ticket granted (the peer hears it with a revoke).
  void Open(OfferCorePtr offer, PeerPtr peer, absl::Time deadline, uint32_t num_layers,
            absl::Duration ttl = kMaxOfferTtl);
  // Opens `offer` for the agent named offer->peer_name(), not connected yet:
  // it waits for Bind.
  void OpenForName(OfferCorePtr offer, absl::Time deadline, uint32_t num_layers,
                   absl::Duration ttl);
  // `peer` connected (authenticated, data path up): each offer waiting for
  // its name binds to it, and the decisions tell it so (kOfferBound).
  Decisions Bind(const PeerPtr& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);
  // Offers waiting for a peer to connect.
  size_t waiting() const;

  // Revokes the offer with this id (a no-op once it ended): see the
  // guarantees. `why` becomes the outcome's status and the peer's reason.
  Decisions Revoke(uint64_t id, OfferState state, absl::Status why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);
  // The offers open to `peer`, by id.
  std::vector<uint64_t> OffersTo(const Peer& peer) const;
  bool HasOffersTo(const Peer& peer) const;
  // The offers open on blocks of `pool`, by id.
  std::vector<uint64_t> OffersOn(const PoolCore& pool) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);

  // The deadline check: revokes each offer past its deadline (kExpired).
  Decisions Tick(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);
  // When Tick next has work: the earliest deadline not yet revoked.
  absl::Time NextDeadline() const;

  // From `peer`: kOfferDone, kOfferRevoked or kOfferRelease (anything else
  // is ignored).
  Decisions MessageReceived(const PeerPtr& peer, const wire::Message& message) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);

  // `peer` closed (its data endpoint is closed, so nothing on its tickets
  // moves any more): its offers end, with their revoke's outcome if one
  // began, else kPeerFailed with `peer.status`'s code.
  Decisions PeerClosed(const Peer& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);
  // Ends every offer, kPeerFailed with `why` (the agent shuts down).
  Decisions EndAll(const absl::Status& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);

  bool empty() const { return offers_.empty(); }
  size_t size() const { return offers_.size(); }

 private:
  struct Entry {
    OfferCorePtr offer;
    PeerPtr peer;  // the connection the ticket was made for; null while waiting
    absl::Time deadline;
    absl::Duration ttl;
    std::vector<bool> layers_done;  // acknowledged by the peer (kOfferDone)
    uint32_t layers_left = 0;
    // Set once the peer was told to fence: the outcome to record when it
    // confirms or closes.
    bool revoking = false;
    OfferState pending_state = OfferState::kOpen;
    absl::Status pending_status;
  };

  void RevokeEntry(Entry& entry, OfferState state, absl::Status why, Decisions& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);
  // The lowest id among the open offers to `peer` (or waiting for its
  // name); next_id_ if none. Every lower offer to it has ended.
  uint64_t FloorFor(const Peer& peer) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);
  void EndEntry(uint64_t id, OfferState state, absl::Status status, Decisions& out);

  absl::flat_hash_map<uint64_t, Entry> offers_;  // by offer id
  uint64_t next_id_ = 1;
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_OFFER_BOOK_H_
