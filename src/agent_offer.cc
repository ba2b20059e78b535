// AgentImpl: offers (include/kvferry/offer.h). The offering side keeps an
// OfferCore per offer until it ends; the taking side checks tickets, keeps a
// TakenOffer per offer it posted on, and reports each fenced transfer
// (kOfferDone) or confirms a fence (kOfferRevoked).
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "src/agent_impl.h"
#include "src/offer_core.h"
#include "src/wire/auth.h"

namespace kvferry::internal {

void intrusive_ptr_add_ref(OfferCore* p) { p->refs_.fetch_add(1, std::memory_order_relaxed); }
void intrusive_ptr_release(OfferCore* p) {
  if (p->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete p;
}

namespace {

constexpr absl::Duration kMaxOfferTtl = absl::Hours(24);

// When a taken offer with this ticket deadline can be forgotten: a second
// after the deadline, and no later than the longest ttl from `now`.
absl::Time ForgetAfter(absl::Time deadline, absl::Time now) {
  return std::min(deadline, now + kMaxOfferTtl) + absl::Seconds(1);
}

std::string OfferName(uint64_t id, absl::string_view offerer) {
  return absl::StrCat("offer ", id, " from '", offerer, "'");
}

}  // namespace

// --- The offering side ---------------------------------------------------

absl::StatusOr<OfferCorePtr> AgentImpl::MakeOffer(const BlockSet& blocks,
                                                  const std::string& peer_name,
                                                  absl::Duration ttl, SourceLocation site) {
  if (blocks.empty()) return absl::InvalidArgumentError("offer of an empty BlockSet");
  if (ttl <= absl::ZeroDuration() || ttl > kMaxOfferTtl) {
    return absl::InvalidArgumentError(absl::StrCat("offer ttl ", absl::FormatDuration(ttl),
                                                   " is not in (0, ",
                                                   absl::FormatDuration(kMaxOfferTtl), "]"));
  }
  const LeaseCore* lease = Access::Lease(blocks);
  const PoolCore& pool = lease->pool();
  internal::MutexLock l(&mu_);
  if (!OwnsPoolLocked(&pool)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the BlockSet's pool '", pool.name(), "' belongs to another agent"));
  }
  if (!pool.exported()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pool '", pool.name(), "' is not exported: peers cannot reach its blocks"));
  }
  PeerPtr peer = FindPeerLocked(peer_name);
  if (peer == nullptr || peer->state != PeerState::kConnected) {
    auto ended = ended_peers_.find(peer_name);
    if (peer == nullptr && ended == ended_peers_.end()) {
      return absl::NotFoundError(absl::StrCat("unknown peer '", peer_name, "'"));
    }
    return absl::FailedPreconditionError(
        absl::StrCat("peer '", peer_name, "' is not connected: no offer can reach it"));
  }
  if (peer->closing) {
    return absl::FailedPreconditionError(
        absl::StrCat("peer '", peer_name, "' is being disconnected by this agent"));
  }
  const uint64_t id = next_offer_id_++;
  const absl::Time deadline = absl::Now() + ttl;
  wire::Ticket ticket{.offer_id = id,
                      .offerer = options_.name,
                      .offerer_incarnation = incarnation_,
                      .taker = peer->name,
                      .pool = pool.name(),
                      .deadline_unix_ns = absl::ToUnixNanos(deadline),
                      .num_layers = pool.layout().num_layers,
                      .blocks = {lease->ids().begin(), lease->ids().end()}};
  std::string bytes = wire::EncodeTicketBody(ticket);
  bytes += wire::TicketTag(peer->send_key(), bytes);

  OfferCorePtr core(new OfferCore(link_, id, peer->name,
                                  Tracked(ledger_, ResourceKind::kOffer, site)));
  core->set_ticket(std::move(bytes));
  core->peer = peer;
  core->lease = LeaseCorePtr(const_cast<LeaseCore*>(lease));
  core->deadline = deadline;
  core->num_layers = pool.layout().num_layers;
  core->layers_done.assign(core->num_layers, false);
  core->layers_left = core->num_layers;
  offers_.emplace(id, core);
  worker_->Signal();  // the progress thread's wait now ends at the deadline
  return core;
}

void AgentImpl::CheckOffersLocked() {
  if (offers_.empty()) return;
  const absl::Time now = absl::Now();
  std::vector<OfferCorePtr> expired;
  for (const auto& [id, offer] : offers_) {
    if (!offer->revoking && now >= offer->deadline) expired.push_back(offer);
  }
  for (const OfferCorePtr& offer : expired) {
    BeginRevokeLocked(*offer, OfferState::kExpired,
                      absl::DeadlineExceededError(absl::StrCat(
                          "offer ", offer->id(), " to peer '", offer->peer_name(),
                          "' expired before the peer moved every layer")));
  }
}

absl::Time AgentImpl::NextOfferDeadlineLocked() const {
  absl::Time next = absl::InfiniteFuture();
  for (const auto& [id, offer] : offers_) {
    if (!offer->revoking) next = std::min(next, offer->deadline);
  }
  return next;
}

void AgentImpl::BeginRevokeLocked(OfferCore& offer, OfferState state, absl::Status why) {
  if (offer.revoking) return;
  offer.revoking = true;
  offer.pending_state = state;
  offer.pending_status = std::move(why);
  Peer& peer = *offer.peer;
  if (peer.state != PeerState::kConnected) {
    // Its data endpoint here is closed already (ClosePeerLocked).
    EndOfferLocked(offer, state, offer.pending_status);
    return;
  }
  // The peer fences whatever it posted on the ticket and confirms; until
  // then the blocks stay lent. A peer that never answers is failed by its
  // liveness timeout, and ClosePeerLocked ends the offer.
  SendLocked(peer, {.type = wire::MessageType::kOfferRevoke,
                    .text = std::string(offer.pending_status.message()),
                    .offer_id = offer.id(),
                    .deadline_unix_ns = absl::ToUnixNanos(offer.deadline)});
}

void AgentImpl::EndOfferLocked(OfferCore& offer, OfferState state, absl::Status status) {
  OfferCorePtr keep(&offer);  // the map's reference goes below
  offers_.erase(offer.id());
  keep->peer.reset();
  work_metrics_.OfferEnded(state);
  keep->End(state, std::move(status));
}

void AgentImpl::EndPeerOffersLocked(const Peer& peer) {
  std::vector<OfferCorePtr> ending;
  for (const auto& [id, offer] : offers_) {
    if (offer->peer.get() == &peer) ending.push_back(offer);
  }
  for (const OfferCorePtr& offer : ending) {
    if (offer->revoking) {
      EndOfferLocked(*offer, offer->pending_state, offer->pending_status);
    } else {
      EndOfferLocked(*offer, OfferState::kPeerFailed,
                     absl::Status(peer.status.code(),
                                  absl::StrCat("offer ", offer->id(), " to peer '",
                                               offer->peer_name(),
                                               "' ended with the peer: ", peer.status.message())));
    }
  }
}

void AgentImpl::RevokeOffer(OfferCore* offer) {
  internal::MutexLock l(&mu_);
  if (offer->released()) return;
  BeginRevokeLocked(*offer, OfferState::kRevoked,
                    absl::CancelledError(absl::StrCat("offer ", offer->id(), " to peer '",
                                                      offer->peer_name(),
                                                      "' was revoked by its owner")));
  auto ended = [offer] { return offer->released(); };
  if (options_.progress_thread) {
    worker_->Signal();
    mu_.Await(ended);
  } else {
    while (!ended()) {
      internal::MutexLock u(&ucx_mu_);
      ProgressLocked();
    }
  }
}

void AgentImpl::HandleOfferMessageLocked(const PeerPtr& peer, const wire::Message& m) {
  using wire::MessageType;
  if (m.type == MessageType::kOfferRevoke) {
    // The taking side: the peer ended one of its offers.
    auto [it, inserted] = peer->taken_offers.try_emplace(m.offer_id);
    TakenOffer& taken = it->second;
    if (inserted) {
      // Not posted on yet: remembered so that a later post is refused.
      if (peer->unposted_revokes >= wire::kMaxUnpostedRevokes) {
        peer->taken_offers.erase(it);
        Log(LogSeverity::kWarning,
            absl::StrCat("dropped peer ", peer->Describe(), ": it revoked more than ",
                         wire::kMaxUnpostedRevokes, " offers never posted on"));
        ClosePeerLocked(peer, PeerState::kFailed,
                        absl::ResourceExhaustedError(absl::StrCat(
                            "peer '", peer->name, "' revoked more than ", wire::kMaxUnpostedRevokes,
                            " offers that were never posted on and have not expired")),
                        /*graceful=*/false);
        return;
      }
      taken.unposted = true;
      ++peer->unposted_revokes;
    }
    if (!taken.revoked) {
      taken.revoked = true;
      taken.why = absl::StrCat(OfferName(m.offer_id, peer->name), " ended: ",
                               m.text.substr(0, 512));
      // Refused until the ticket would have expired anyway (which is never
      // later than the longest ttl from now, whatever deadline the peer sent).
      taken.forget_after = std::max(
          taken.forget_after,
          ForgetAfter(absl::FromUnixNanos(m.deadline_unix_ns), absl::Now()));
    }
    if (taken.in_flight == 0) {
      SendLocked(*peer, {.type = MessageType::kOfferRevoked, .offer_id = m.offer_id});
    }
    return;
  }
  // The offering side: only offers made for this very connection count.
  auto it = offers_.find(m.offer_id);
  if (it == offers_.end() || it->second->peer != peer) return;  // ended, or not its own
  OfferCorePtr offer = it->second;
  if (m.type == MessageType::kOfferRevoked) {
    if (offer->revoking) EndOfferLocked(*offer, offer->pending_state, offer->pending_status);
    return;
  }
  // kOfferDone
  if (m.code != 0) {
    BeginRevokeLocked(*offer, OfferState::kPeerFailed,
                      absl::AbortedError(absl::StrCat(
                          "offer ", offer->id(), ": the transfer of peer '", peer->name,
                          "' on it ended: ", m.text.substr(0, 512))));
    return;
  }
  const uint32_t end = std::min(m.layer_end, offer->num_layers);
  for (uint32_t layer = m.layer_begin; layer < end; ++layer) {
    if (!offer->layers_done[layer]) {
      offer->layers_done[layer] = true;
      --offer->layers_left;
    }
  }
  // Every layer moved and each transfer was fenced on the peer: nothing on
  // the ticket can move any more, whether or not a revoke crossed this.
  if (offer->layers_left == 0) EndOfferLocked(*offer, OfferState::kConsumed, absl::OkStatus());
}

// --- The taking side -----------------------------------------------------

absl::StatusOr<AgentImpl::TicketUse> AgentImpl::CheckTicketLocked(const wire::Ticket& ticket,
                                                                 absl::string_view body,
                                                                 absl::string_view tag,
                                                                 const Peer& peer,
                                                                 uint32_t layer_begin,
                                                                 uint32_t layer_end) {
  const std::string name = OfferName(ticket.offer_id, ticket.offerer);
  if (ticket.taker != options_.name) {
    return absl::PermissionDeniedError(absl::StrCat(name, " was made for agent '", ticket.taker,
                                                    "', not '", options_.name, "'"));
  }
  if (ticket.offerer_incarnation != peer.incarnation) {
    return absl::FailedPreconditionError(absl::StrCat(
        name, " belongs to an earlier connection of that agent (it restarted or reconnected)"));
  }
  if (!wire::TicketTagMatches(peer.receive_key(), body, tag)) {
    return absl::PermissionDeniedError(absl::StrCat(
        name, ": the ticket fails its integrity check (altered, or made for another "
              "connection)"));
  }
  if (layer_end > ticket.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(name, " covers ", ticket.num_layers,
                                                   " layers, not [", layer_begin, ", ",
                                                   layer_end, ")"));
  }
  auto taken = peer.taken_offers.find(ticket.offer_id);
  if (taken != peer.taken_offers.end()) {
    if (taken->second.revoked) return absl::FailedPreconditionError(taken->second.why);
    for (uint32_t layer = layer_begin; layer < layer_end; ++layer) {
      if (taken->second.layers_posted[layer]) {
        return absl::AlreadyExistsError(absl::StrCat(name, ": layer ", layer,
                                                     " was already moved on this ticket"));
      }
    }
  }
  const absl::Time deadline = absl::FromUnixNanos(ticket.deadline_unix_ns);
  if (absl::Now() >= deadline) {
    return absl::DeadlineExceededError(absl::StrCat(
        name, " expired at ", absl::FormatTime(deadline), " (the offering agent's clock)"));
  }
  return TicketUse{ticket.offer_id, deadline};
}

void AgentImpl::NoteTicketPostedLocked(Peer& peer, const TicketUse& use, uint32_t num_layers,
                                       uint32_t layer_begin, uint32_t layer_end) {
  TakenOffer& taken = peer.taken_offers[use.offer_id];
  if (taken.layers_posted.empty()) taken.layers_posted.assign(num_layers, false);
  for (uint32_t layer = layer_begin; layer < layer_end; ++layer) taken.layers_posted[layer] = true;
  ++taken.in_flight;
  taken.forget_after = ForgetAfter(use.deadline, absl::Now());
}

const std::string* AgentImpl::OfferRevokedLocked(const Peer& peer, uint64_t offer_id) const {
  auto it = peer.taken_offers.find(offer_id);
  if (it == peer.taken_offers.end() || !it->second.revoked) return nullptr;
  return &it->second.why;
}

void AgentImpl::OfferTransferEndedLocked(Peer& peer, const TransferCore& transfer,
                                         TransferState state, const absl::Status& status) {
  auto it = peer.taken_offers.find(transfer.offer_id);
  if (it == peer.taken_offers.end()) return;
  TakenOffer& taken = it->second;
  --taken.in_flight;
  if (taken.revoked) {
    if (taken.in_flight == 0) {
      SendLocked(peer, {.type = wire::MessageType::kOfferRevoked, .offer_id = transfer.offer_id});
    }
    return;
  }
  wire::Message done{.type = wire::MessageType::kOfferDone,
                     .offer_id = transfer.offer_id,
                     .layer_begin = transfer.layer_begin,
                     .layer_end = transfer.layer_end};
  if (state != TransferState::kDone) {
    done.code = static_cast<uint32_t>(status.ok() ? absl::StatusCode::kUnknown : status.code());
    done.text = std::string(status.message().substr(0, 512));
  }
  SendLocked(peer, done);
}

void AgentImpl::ForgetTakenOffersLocked(Peer& peer, absl::Time now) {
  for (auto it = peer.taken_offers.begin(); it != peer.taken_offers.end();) {
    auto here = it++;
    if (here->second.in_flight == 0 && now > here->second.forget_after) {
      if (here->second.unposted) --peer.unposted_revokes;
      peer.taken_offers.erase(here);
    }
  }
}

}  // namespace kvferry::internal

namespace kvferry {

const char* OfferStateName(OfferState state) {
  switch (state) {
    case OfferState::kEmpty: return "empty";
    case OfferState::kOpen: return "open";
    case OfferState::kConsumed: return "consumed";
    case OfferState::kPeerFailed: return "peer-failed";
    case OfferState::kExpired: return "expired";
    case OfferState::kRevoked: return "revoked";
  }
  return "unknown";
}

Offer::Offer() noexcept = default;
Offer::Offer(boost::intrusive_ptr<internal::OfferCore> core) noexcept : core_(std::move(core)) {}
Offer::Offer(Offer&&) noexcept = default;
Offer& Offer::operator=(Offer&&) noexcept = default;
Offer::~Offer() = default;

uint64_t Offer::id() const { return core_ ? core_->id() : 0; }

const std::string& Offer::ticket() const {
  static const std::string* const kNone = new std::string();
  return core_ ? core_->ticket() : *kNone;
}

const std::string& Offer::peer() const {
  static const std::string* const kNone = new std::string();
  return core_ ? core_->peer_name() : *kNone;
}

OfferState Offer::state() const { return core_ ? core_->state() : OfferState::kEmpty; }

absl::Status Offer::status() const {
  return core_ ? core_->status() : absl::FailedPreconditionError("empty Offer handle");
}

absl::Status Offer::Wait(absl::Duration timeout) {
  if (!core_) return absl::FailedPreconditionError("empty Offer handle");
  const absl::Time deadline = absl::Now() + timeout;
  while (!core_->released()) {
    bool threaded = true;
    {
      internal::AgentPin agent(core_->link().get());
      if (agent.get() != nullptr && !agent.get()->options().progress_thread) {
        threaded = false;
        agent.get()->Progress();
      }
    }
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "offer ", core_->id(), " still open after ", absl::FormatDuration(timeout)));
    }
    core_->AwaitReleased(threaded ? deadline - now : absl::ZeroDuration());
  }
  return core_->status();
}

absl::Status Offer::Revoke() {
  if (!core_) return absl::FailedPreconditionError("empty Offer handle");
  {
    internal::AgentPin agent(core_->link().get());
    if (agent.get() != nullptr) agent.get()->RevokeOffer(core_.get());
  }
  return core_->status();
}

}  // namespace kvferry
