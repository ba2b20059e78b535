#include "src/offer_book.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "src/end_reason_internal.h"

namespace kvferry::internal {

void OfferBook::Open(OfferCorePtr offer, PeerPtr peer, absl::Time deadline,
                     uint32_t num_layers, absl::Duration ttl) {
  const uint64_t id = offer->id();
  Entry& entry = offers_[id];
  entry.offer = std::move(offer);
  entry.peer = std::move(peer);
  entry.deadline = deadline;
  entry.ttl = ttl;
  entry.layers_done.assign(num_layers, false);
  entry.layers_left = num_layers;
}

void OfferBook::OpenForName(OfferCorePtr offer, absl::Time deadline, uint32_t num_layers,
                            absl::Duration ttl) {
  Open(std::move(offer), nullptr, deadline, num_layers, ttl);
}

OfferBook::Decisions OfferBook::Bind(const PeerPtr& peer) {
  Decisions out;
  std::vector<uint64_t> ids;
  for (const auto& [id, entry] : offers_) {
    if (entry.peer == nullptr && !entry.revoking && entry.offer->peer_name() == peer->name()) {
      ids.push_back(id);
    }
  }
  std::sort(ids.begin(), ids.end());
  for (uint64_t id : ids) {
    offers_.find(id)->second.peer = peer;
  }
  const uint64_t floor = FloorFor(*peer);
  for (uint64_t id : ids) {
    out.sends.push_back({peer,
                         {.type = wire::MessageType::kOfferBound,
                          .offer_id = id,
                          .ttl_ns = absl::ToInt64Nanoseconds(offers_.find(id)->second.ttl),
                          .offer_floor = floor}});
  }
  return out;
}

size_t OfferBook::waiting() const {
  size_t n = 0;
  for (const auto& [id, entry] : offers_) n += entry.peer == nullptr;
  return n;
}

void OfferBook::EndEntry(uint64_t id, OfferState state, absl::Status status, Decisions& out) {
  auto it = offers_.find(id);
  if (it == offers_.end()) return;
  out.ended.push_back({std::move(it->second.offer), state, std::move(status)});
  offers_.erase(it);
}

void OfferBook::RevokeEntry(Entry& entry, OfferState state, absl::Status why, Decisions& out) {
  if (entry.revoking) return;
  entry.revoking = true;
  entry.pending_state = state;
  entry.pending_status = std::move(why);
  if (entry.peer == nullptr || entry.peer->state() != PeerState::kConnected) {
    // Never bound (no connection ever had the ticket), or its data endpoint
    // is closed already: nothing on the ticket can move.
    EndEntry(entry.offer->id(), state, entry.pending_status, out);
    return;
  }
  // The peer fences whatever it posted on the ticket and confirms; until
  // then the blocks stay lent. A peer that never answers is failed by its
  // liveness timeout, and PeerClosed ends the offer.
  out.sends.push_back({entry.peer,
                       {.type = wire::MessageType::kOfferRevoke,
                         .text = entry.pending_status.ok()
                                     ? std::string("released by its taker")
                                     : TagText(ReasonOf(entry.pending_status),
                                               entry.pending_status.message()),
                        .offer_id = entry.offer->id(),
                        .ttl_ns = absl::ToInt64Nanoseconds(entry.ttl),
                        .offer_floor = FloorFor(*entry.peer)}});
}

uint64_t OfferBook::FloorFor(const Peer& peer) const {
  uint64_t floor = next_id_;
  for (const auto& [id, entry] : offers_) {
    if (entry.peer.get() == &peer ||
        (entry.peer == nullptr && entry.offer->peer_name() == peer.name())) {
      floor = std::min(floor, id);
    }
  }
  return floor;
}

OfferBook::Decisions OfferBook::Revoke(uint64_t id, OfferState state, absl::Status why) {
  Decisions out;
  auto it = offers_.find(id);
  if (it != offers_.end()) RevokeEntry(it->second, state, std::move(why), out);
  return out;
}

std::vector<uint64_t> OfferBook::OffersTo(const Peer& peer) const {
  std::vector<uint64_t> ids;
  for (const auto& [id, entry] : offers_) {
    if (entry.peer.get() == &peer) ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

std::vector<uint64_t> OfferBook::OffersOn(const PoolCore& pool) const {
  std::vector<uint64_t> ids;
  for (const auto& [id, entry] : offers_) {
    if (entry.offer->lease != nullptr && &entry.offer->lease->pool() == &pool) ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

bool OfferBook::HasOffersTo(const Peer& peer) const {
  for (const auto& [id, entry] : offers_) {
    if (entry.peer.get() == &peer) return true;
  }
  return false;
}

OfferBook::Decisions OfferBook::Tick(absl::Time now) {
  Decisions out;
  std::vector<uint64_t> expired;
  for (const auto& [id, entry] : offers_) {
    if (!entry.revoking && now >= entry.deadline) expired.push_back(id);
  }
  std::sort(expired.begin(), expired.end());
  for (uint64_t id : expired) {
    auto it = offers_.find(id);
    if (it == offers_.end()) continue;
    Entry& entry = it->second;
    RevokeEntry(entry, OfferState::kExpired,
                WithReason(absl::DeadlineExceededError(
                               entry.peer == nullptr
                                   ? absl::StrCat("offer ", id, " to peer '",
                                                  entry.offer->peer_name(),
                                                  "' expired before a peer of that name connected")
                                   : absl::StrCat("offer ", id, " to peer '",
                                                  entry.offer->peer_name(),
                                                  "' expired before the peer moved every layer")),
                           EndReason::kTicketExpired),
                out);
  }
  return out;
}

absl::Time OfferBook::NextDeadline() const {
  absl::Time next = absl::InfiniteFuture();
  for (const auto& [id, entry] : offers_) {
    if (!entry.revoking) next = std::min(next, entry.deadline);
  }
  return next;
}

OfferBook::Decisions OfferBook::MessageReceived(const PeerPtr& peer, const wire::Message& m) {
  Decisions out;
  // Only offers made for this very connection count.
  auto it = offers_.find(m.offer_id);
  if (it == offers_.end() || it->second.peer != peer) return out;  // ended, or not its own
  Entry& entry = it->second;
  if (m.type == wire::MessageType::kOfferRelease) {
    RevokeEntry(entry, OfferState::kReleased, absl::OkStatus(), out);
    return out;
  }
  if (m.type == wire::MessageType::kOfferRevoked) {
    if (entry.revoking) EndEntry(m.offer_id, entry.pending_state, entry.pending_status, out);
    return out;
  }
  if (m.type != wire::MessageType::kOfferDone) return out;
  if (m.code != 0) {
    RevokeEntry(entry, OfferState::kPeerFailed,
                WithReason(absl::AbortedError(absl::StrCat(
                               "offer ", m.offer_id, ": the transfer of peer '", peer->name(),
                               "' on it ended: ", absl::string_view(m.text).substr(0, 512))),
                           EndReason::kPeerTransferFailed),
                out);
    return out;
  }
  const uint32_t end = std::min<uint32_t>(m.layer_end, entry.layers_done.size());
  for (uint32_t layer = m.layer_begin; layer < end; ++layer) {
    if (!entry.layers_done[layer]) {
      entry.layers_done[layer] = true;
      --entry.layers_left;
    }
  }
  // Every layer moved and each transfer was fenced on the peer: nothing on
  // the ticket can move any more, whether or not a revoke crossed this.
  if (entry.layers_left == 0) {
    EndEntry(m.offer_id, OfferState::kConsumed, absl::OkStatus(), out);
    // The peer may forget it (and the offers below the floor).
    out.sends.push_back({peer,
                         {.type = wire::MessageType::kOfferEnded,
                          .offer_id = m.offer_id,
                          .offer_floor = FloorFor(*peer)}});
  }
  return out;
}

OfferBook::Decisions OfferBook::PeerClosed(const Peer& peer) {
  Decisions out;
  for (uint64_t id : OffersTo(peer)) {
    Entry& entry = offers_.find(id)->second;
    if (entry.revoking) {
      EndEntry(id, entry.pending_state, entry.pending_status, out);
    } else {
      EndEntry(
          id, OfferState::kPeerFailed,
          WithReason(absl::Status(peer.status().code(),
                                  absl::StrCat("offer ", id, " to peer '", entry.offer->peer_name(),
                                               "' ended with the peer: ", peer.status().message())),
                     PeerEndReason(peer.state(), peer.status())),
          out);
    }
  }
  return out;
}

OfferBook::Decisions OfferBook::EndAll(const absl::Status& why) {
  Decisions out;
  std::vector<uint64_t> ids;
  for (const auto& [id, entry] : offers_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  for (uint64_t id : ids) EndEntry(id, OfferState::kPeerFailed, why, out);
  return out;
}

}  // namespace kvferry::internal
