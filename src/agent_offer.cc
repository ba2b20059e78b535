// AgentImpl: offers (include/kvferry/offer.h). The offering side's OfferBook
// (offers_) and each peer's TicketBook (Peer::tickets) decide; the functions
// here act on their decisions: send the messages, record the outcomes, fail
// a peer that broke a bound.
#include <optional>

#include "absl/strings/str_cat.h"
#include "src/agent_impl.h"
#include "src/end_reason_internal.h"
#include "src/offer_core.h"
#include "src/status_macros.h"
#include "src/wire/auth.h"

namespace kvferry::internal {

// --- The offering side ---------------------------------------------------

absl::StatusOr<OfferCorePtr> AgentImpl::MakeOffer(const BlockSet& blocks,
                                                  const std::string& peer_name,
                                                  absl::Duration ttl, SourceLocation site) {
  if (blocks.empty()) return absl::InvalidArgumentError("offer of an empty BlockSet");
  KVFERRY_RETURN_IF_ERROR(wire::ValidateName("Offer: peer name", peer_name));
  if (peer_name == options_.name) {
    return absl::InvalidArgumentError(
        absl::StrCat("offer to '", peer_name, "', which is this agent's own name"));
  }
  if (ttl <= absl::ZeroDuration() || ttl > kMaxOfferTtl) {
    return absl::InvalidArgumentError(absl::StrCat("offer ttl ", absl::FormatDuration(ttl),
                                                   " is not in (0, ",
                                                   absl::FormatDuration(kMaxOfferTtl), "]"));
  }
  const LeaseCore* lease = Access::Lease(blocks);
  const PoolCore& pool = lease->pool();
  ControlLock l(this);
  if (!OwnsPoolLocked(&pool)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the BlockSet's pool '", pool.name(), "' belongs to another agent"));
  }
  if (!pool.exported()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pool '", pool.name(), "' is not exported: peers cannot reach its blocks"));
  }
  if (pool.removing()) return pool.RemovingError();
  // A connected peer gets a ticket for this connection; any other name (not
  // connected yet, in its handshake, or gone) one for its next connection.
  PeerPtr peer = peers_.Find(peer_name);
  const bool connected = peer != nullptr && peer->state() == PeerState::kConnected;
  if (connected && peer->closing()) {
    return absl::FailedPreconditionError(
        absl::StrCat("peer '", peer_name, "' is being disconnected by this agent"));
  }
  const uint64_t id = offers_.NextId();
  const absl::Time deadline = absl::Now() + ttl;
  wire::Ticket ticket{.offer_id = id,
                      .offerer = options_.name,
                      .offerer_incarnation = incarnation_,
                      .taker = peer_name,
                      .pool = pool.name(),
                      .flags = connected ? 0u : wire::kTicketForName,
                      .ttl_ns = absl::ToInt64Nanoseconds(ttl),
                      .num_layers = pool.layout().num_layers,
                      .blocks = {lease->ids().begin(), lease->ids().end()}};
  std::string bytes = wire::EncodeTicketBody(ticket);
  bytes += wire::TicketTag(
      connected ? peer->send_key()
                : wire::TicketNameKey(options_.shared_secret, options_.name, incarnation_,
                                      peer_name),
      bytes);

  OfferCorePtr core(new OfferCore(link_, id, peer_name,
                                  Tracked(ledger_, ResourceKind::kOffer, site)));
  core->set_ticket(std::move(bytes));
  core->lease = LeaseCorePtr(const_cast<LeaseCore*>(lease));
  if (connected) {
    offers_.Open(core, peer, deadline, pool.layout().num_layers, ttl);
  } else {
    offers_.OpenForName(core, deadline, pool.layout().num_layers, ttl);
  }
  worker_->Signal();  // the progress thread's wait now ends at the deadline
  return core;
}

void AgentImpl::ApplyOfferDecisionsLocked(OfferBook::Decisions decisions) {
  for (OfferBook::Send& send : decisions.sends) SendLocked(*send.peer, send.message);
  for (OfferBook::Ended& ended : decisions.ended) {
    work_metrics_.OfferEnded(ended.state);
    OfferCore& offer = *ended.offer;
    offer.End(ended.state, std::move(ended.status), [&] {
      completions_->OfferEnded(offer.id(), offer.state(), offer.status());
    });
  }
}

void AgentImpl::CheckOffersLocked() {
  if (offers_.empty()) return;
  ApplyOfferDecisionsLocked(offers_.Tick(absl::Now()));
}

absl::Time AgentImpl::NextOfferDeadlineLocked() const { return offers_.NextDeadline(); }

void AgentImpl::EndPeerOffersLocked(const Peer& peer) {
  ApplyOfferDecisionsLocked(offers_.PeerClosed(peer));
}

void AgentImpl::BindOffersLocked(const PeerPtr& peer) {
  ApplyOfferDecisionsLocked(offers_.Bind(peer));
}

void AgentImpl::RevokeOffer(OfferCore* offer) {
  ControlLock l(this);
  if (offer->released()) return;
  ApplyOfferDecisionsLocked(offers_.Revoke(
      offer->id(), OfferState::kRevoked,
      WithReason(absl::CancelledError(absl::StrCat("offer ", offer->id(), " to peer '",
                                                   offer->peer_name(),
                                                   "' was revoked by its owner")),
                 EndReason::kTicketRevoked)));
  auto ended = [offer] { return offer->released(); };
  if (options_.progress_thread) {
    worker_->Signal();
    mu_.Await(ended);
  } else {
    while (!ended()) {
      DataLock u(this);
      ProgressLocked();
    }
  }
}

void AgentImpl::HandleOfferMessageLocked(const PeerPtr& peer, const wire::Message& m) {
  switch (m.type) {
    case wire::MessageType::kOfferDone:
    case wire::MessageType::kOfferRevoked:
    case wire::MessageType::kOfferRelease:
      // The offering side.
      ApplyOfferDecisionsLocked(offers_.MessageReceived(peer, m));
      return;
    case wire::MessageType::kOfferEnded:
      // The taking side: one of the peer's offers was consumed.
      peer->tickets().RaiseFloor(m.offer_floor);
      peer->tickets().Forget(absl::Now());
      return;
    case wire::MessageType::kOfferBound:
      if (absl::Status bound = peer->tickets().Bound(m, peer->name()); !bound.ok()) {
        Log(LogSeverity::kWarning,
            absl::StrCat("dropped peer ", peer->Describe(), ": ", bound.message()));
        ClosePeerLocked(peer, PeerState::kFailed, bound, /*graceful=*/false);
      }
      return;
    default:
      break;
  }
  // The taking side: the peer ended one of its offers (kOfferRevoke).
  absl::StatusOr<std::optional<wire::Message>> reply = peer->tickets().Revoked(m, peer->name());
  if (!reply.ok()) {
    Log(LogSeverity::kWarning,
        absl::StrCat("dropped peer ", peer->Describe(), ": it revoked more than ",
                     wire::kMaxUnpostedRevokes, " offers never posted on"));
    ClosePeerLocked(peer, PeerState::kFailed, reply.status(), /*graceful=*/false);
    return;
  }
  if (*reply) SendLocked(*peer, **reply);
}

// --- The taking side -----------------------------------------------------

std::string AgentImpl::TicketNameKeyFor(const wire::Ticket& ticket) const {
  if ((ticket.flags & wire::kTicketForName) == 0) return std::string();
  return wire::TicketNameKey(options_.shared_secret, ticket.offerer,
                             ticket.offerer_incarnation, options_.name);
}

absl::StatusOr<AgentImpl::TicketUse> AgentImpl::CheckTicketLocked(const wire::Ticket& ticket,
                                                                 absl::string_view body,
                                                                 absl::string_view tag,
                                                                 const Peer& peer,
                                                                 uint32_t layer_begin,
                                                                 uint32_t layer_end) {
  const std::string name_key = TicketNameKeyFor(ticket);
  return peer.tickets().Check(ticket, body, tag,
                              {.taker = options_.name,
                               .offerer_incarnation = peer.incarnation(),
                               .key = peer.receive_key(),
                               .name_key = name_key},
                              layer_begin, layer_end, absl::Now());
}

void AgentImpl::AwaitTicketBindingLocked(const wire::Ticket& ticket) {
  if ((ticket.flags & wire::kTicketForName) == 0) return;
  PeerPtr offerer = peers_.Find(ticket.offerer);
  if (offerer == nullptr || offerer->state() != PeerState::kConnected) return;
  // The offerer binds such an offer as the connection comes up and says so
  // at once (kOfferBound); a post right after Connect may be ahead of it. A
  // ticket bound to another connection is refused when this wait ends.
  AwaitLocked(
      [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl) {
        return offerer->state() != PeerState::kConnected ||
               offerer->tickets().IsBound(ticket.offer_id) ||
               ticket.offer_id < offerer->tickets().floor();
      },
      kOfferBindingWait);
}

absl::Status AgentImpl::ReleaseOffer(const std::string& bytes) {
  absl::string_view body, tag;
  absl::StatusOr<wire::Ticket> ticket = wire::DecodeTicket(bytes, &body, &tag);
  if (!ticket.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ReleaseOffer: ", ticket.status().message()));
  }
  ControlLock l(this);
  PeerPtr peer = peers_.Find(ticket->offerer);
  if (peer == nullptr || peer->state() != PeerState::kConnected) {
    if (peer == nullptr && peers_.FindEnded(ticket->offerer) == nullptr) {
      return absl::NotFoundError(absl::StrCat("ReleaseOffer: unknown peer '", ticket->offerer,
                                              "' (the offer ends by its ttl)"));
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "ReleaseOffer: peer '", ticket->offerer,
        "' is not connected; the offer ended with the connection or ends by its ttl"));
  }
  AwaitTicketBindingLocked(*ticket);
  if (peer->state() != PeerState::kConnected) {
    return absl::FailedPreconditionError(absl::StrCat(
        "ReleaseOffer: peer '", ticket->offerer, "' disconnected; the offer ended with it"));
  }
  const std::string name_key = TicketNameKeyFor(*ticket);
  KVFERRY_ASSIGN_OR_RETURN(std::optional<wire::Message> release,
                           peer->tickets().Release(*ticket, body, tag,
                                                   {.taker = options_.name,
                                                    .offerer_incarnation = peer->incarnation(),
                                                    .key = peer->receive_key(),
                                                    .name_key = name_key},
                                                   absl::Now()));
  if (release) SendLocked(*peer, *release);
  return absl::OkStatus();
}

void AgentImpl::NoteTicketPostedLocked(Peer& peer, const TicketUse& use, uint32_t num_layers,
                                       uint32_t layer_begin, uint32_t layer_end) {
  peer.tickets().Posted(use, num_layers, layer_begin, layer_end, absl::Now());
}

const std::string* AgentImpl::OfferRevokedLocked(const Peer& peer, uint64_t offer_id) const {
  return peer.tickets().RevokedWhy(offer_id);
}

EndReason AgentImpl::OfferRevokedReasonLocked(const Peer& peer, uint64_t offer_id) const {
  return peer.tickets().RevokedReason(offer_id);
}

void AgentImpl::OfferTransferEndedLocked(Peer& peer, const TransferCore& transfer,
                                         TransferState state, const absl::Status& status) {
  std::optional<wire::Message> message = peer.tickets().TransferEnded(
      transfer.offer_id, transfer.layer_begin, transfer.layer_end, state, status);
  if (message) SendLocked(peer, *message);
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
    case OfferState::kReleased: return "released";
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

EndReason Offer::reason() const { return core_ ? ReasonOf(core_->status()) : EndReason::kNone; }

absl::Status Offer::Wait(absl::Duration timeout) {
  if (!core_) return absl::FailedPreconditionError("empty Offer handle");
  return internal::WaitForRelease(*core_->link(), core_->outcome(), timeout, [this] {
    return absl::StrCat("offer ", core_->id(), " still open");
  });
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
