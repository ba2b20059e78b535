#include "src/ticket_book.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "src/end_reason_internal.h"
#include "src/wire/auth.h"

namespace kvferry::internal {
namespace {

std::string OfferName(uint64_t id, absl::string_view offerer) {
  return absl::StrCat("offer ", id, " from '", offerer, "'");
}

}  // namespace

absl::StatusOr<std::vector<uint32_t>> SelectOfferBlocks(const wire::Ticket& ticket,
                                                        absl::Span<const uint32_t> indices) {
  if (indices.empty()) return ticket.blocks;
  std::vector<bool> seen(ticket.blocks.size(), false);
  std::vector<uint32_t> ids;
  ids.reserve(indices.size());
  for (size_t i = 0; i < indices.size(); ++i) {
    const uint32_t index = indices[i];
    if (index >= ticket.blocks.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TransferSpec.offer_blocks[", i, "] = ", index, " is past the ",
          ticket.blocks.size(), " blocks of ", OfferName(ticket.offer_id, ticket.offerer)));
    }
    if (seen[index]) {
      return absl::InvalidArgumentError(absl::StrCat("TransferSpec.offer_blocks[", i, "] = ",
                                                     index, " names an offered block twice"));
    }
    seen[index] = true;
    ids.push_back(ticket.blocks[index]);
  }
  return ids;
}

absl::Status TicketBook::Verify(const wire::Ticket& ticket, absl::string_view body,
                                absl::string_view tag, const Expect& expect) const {
  const std::string name = OfferName(ticket.offer_id, ticket.offerer);
  if (ticket.taker != expect.taker) {
    return absl::PermissionDeniedError(absl::StrCat(name, " was made for agent '", ticket.taker,
                                                    "', not '", expect.taker, "'"));
  }
  if (ticket.offerer_incarnation != expect.offerer_incarnation) {
    return absl::FailedPreconditionError(absl::StrCat(
        name, " belongs to an earlier connection of that agent (it restarted or reconnected)"));
  }
  const bool for_name = (ticket.flags & wire::kTicketForName) != 0;
  if (!wire::TicketTagMatches(for_name ? expect.name_key : expect.key, body, tag)) {
    return absl::PermissionDeniedError(absl::StrCat(
        name, ": the ticket fails its integrity check (altered, or made for another "
              "connection)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<TicketBook::Use> TicketBook::Check(const wire::Ticket& ticket,
                                                  absl::string_view body, absl::string_view tag,
                                                  const Expect& expect, uint32_t layer_begin,
                                                  uint32_t layer_end, absl::Time now) const {
  const std::string name = OfferName(ticket.offer_id, ticket.offerer);
  if (absl::Status s = Verify(ticket, body, tag, expect); !s.ok()) return s;
  if (layer_end > ticket.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(name, " covers ", ticket.num_layers,
                                                   " layers, not [", layer_begin, ", ",
                                                   layer_end, ")"));
  }
  auto taken = offers_.find(ticket.offer_id);
  absl::Time deadline = now + absl::Nanoseconds(ticket.ttl_ns);
  if (taken != offers_.end()) {
    if (taken->second.revoked) {
      return WithReason(absl::FailedPreconditionError(taken->second.why), taken->second.reason);
    }
    if (taken->second.released) {
      return absl::FailedPreconditionError(
          absl::StrCat(name, " was released by this agent (Agent::ReleaseOffer)"));
    }
    const std::vector<bool>& posted = taken->second.layers_posted;
    for (uint32_t layer = layer_begin; layer < layer_end && layer < posted.size(); ++layer) {
      if (posted[layer]) {
        return absl::AlreadyExistsError(absl::StrCat(name, ": layer ", layer,
                                                     " was already moved on this ticket"));
      }
    }
    if (taken->second.used) deadline = taken->second.deadline;
  }
  if (ticket.offer_id < floor_) {
    return absl::FailedPreconditionError(
        absl::StrCat(name, " has ended (the offering agent said so)"));
  }
  if ((ticket.flags & wire::kTicketForName) != 0 &&
      (taken == offers_.end() || !taken->second.bound)) {
    return absl::FailedPreconditionError(absl::StrCat(
        name, " was made for this agent's name and is not bound to this connection (the "
              "offering agent binds it to the first connection after the offer was made)"));
  }
  if (now >= deadline) {
    return WithReason(
        absl::DeadlineExceededError(absl::StrCat(
            name, " expired: its ttl of ", absl::FormatDuration(absl::Nanoseconds(ticket.ttl_ns)),
            " ran out on this agent's clock since its first use here")),
        EndReason::kTicketExpired);
  }
  return Use{ticket.offer_id, deadline};
}

void TicketBook::MarkUsed(Taken& taken, absl::Time deadline) {
  if (taken.unposted) {
    taken.unposted = false;
    --unposted_revokes_;
  }
  if (!taken.used) {
    taken.used = true;
    taken.deadline = deadline;
  }
}

void TicketBook::Posted(const Use& use, uint32_t num_layers, uint32_t layer_begin,
                        uint32_t layer_end, absl::Time /*now*/) {
  Taken& taken = offers_[use.offer_id];
  // Sized by the ticket; a later ticket of the same offer claiming more
  // layers (only a lying peer makes one) grows it rather than overrunning.
  if (taken.layers_posted.size() < num_layers) taken.layers_posted.resize(num_layers, false);
  for (uint32_t layer = layer_begin; layer < layer_end; ++layer) taken.layers_posted[layer] = true;
  ++taken.in_flight;
  MarkUsed(taken, use.deadline);
}

absl::StatusOr<std::optional<wire::Message>> TicketBook::Release(const wire::Ticket& ticket,
                                                                 absl::string_view body,
                                                                 absl::string_view tag,
                                                                 const Expect& expect,
                                                                 absl::Time now) {
  if (absl::Status s = Verify(ticket, body, tag, expect); !s.ok()) return s;
  auto it = offers_.find(ticket.offer_id);
  if (it == offers_.end()) {
    if (ticket.offer_id < floor_) return std::optional<wire::Message>();  // ended
    if ((ticket.flags & wire::kTicketForName) != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          OfferName(ticket.offer_id, ticket.offerer),
          " was made for this agent's name and is not bound to this connection"));
    }
    it = offers_.try_emplace(ticket.offer_id).first;
  }
  Taken& taken = it->second;
  if (taken.revoked || taken.released) return std::optional<wire::Message>();
  taken.released = true;
  MarkUsed(taken, now + absl::Nanoseconds(ticket.ttl_ns));
  return std::optional<wire::Message>(
      wire::Message{.type = wire::MessageType::kOfferRelease, .offer_id = ticket.offer_id});
}

absl::StatusOr<TicketBook::Taken*> TicketBook::AddUnposted(uint64_t offer_id,
                                                           absl::string_view offerer,
                                                           absl::string_view verb) {
  if (unposted_revokes_ >= wire::kMaxUnpostedRevokes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "peer '", offerer, "' ", verb, " more than ", wire::kMaxUnpostedRevokes,
        " offers that were never posted on and have not ended"));
  }
  Taken& taken = offers_[offer_id];
  taken.unposted = true;
  ++unposted_revokes_;
  return &taken;
}

absl::Status TicketBook::Bound(const wire::Message& bound, absl::string_view offerer) {
  RaiseFloor(bound.offer_floor);
  auto it = offers_.find(bound.offer_id);
  if (it != offers_.end()) {
    it->second.bound = true;
    return absl::OkStatus();
  }
  if (bound.offer_id < floor_) return absl::OkStatus();  // ended already
  absl::StatusOr<Taken*> taken = AddUnposted(bound.offer_id, offerer, "bound");
  if (!taken.ok()) return taken.status();
  (*taken)->bound = true;
  return absl::OkStatus();
}

bool TicketBook::IsBound(uint64_t offer_id) const {
  auto it = offers_.find(offer_id);
  return it != offers_.end() && it->second.bound;
}

const std::string* TicketBook::RevokedWhy(uint64_t offer_id) const {
  auto it = offers_.find(offer_id);
  if (it == offers_.end() || !it->second.revoked) return nullptr;
  return &it->second.why;
}

EndReason TicketBook::RevokedReason(uint64_t offer_id) const {
  auto it = offers_.find(offer_id);
  if (it == offers_.end() || !it->second.revoked) return EndReason::kNone;
  return it->second.reason;
}

std::optional<wire::Message> TicketBook::TransferEnded(uint64_t offer_id, uint32_t layer_begin,
                                                       uint32_t layer_end, TransferState state,
                                                       const absl::Status& status) {
  auto it = offers_.find(offer_id);
  if (it == offers_.end()) return std::nullopt;
  Taken& taken = it->second;
  --taken.in_flight;
  if (taken.revoked) {
    if (taken.in_flight != 0) return std::nullopt;
    return wire::Message{.type = wire::MessageType::kOfferRevoked, .offer_id = offer_id};
  }
  wire::Message done{.type = wire::MessageType::kOfferDone,
                     .offer_id = offer_id,
                     .layer_begin = layer_begin,
                     .layer_end = layer_end};
  if (state != TransferState::kDone) {
    done.code = static_cast<uint32_t>(status.ok() ? absl::StatusCode::kUnknown : status.code());
    done.text = std::string(status.message().substr(0, 512));
  }
  return done;
}

absl::StatusOr<std::optional<wire::Message>> TicketBook::Revoked(const wire::Message& revoke,
                                                                 absl::string_view offerer) {
  RaiseFloor(revoke.offer_floor);
  auto it = offers_.find(revoke.offer_id);
  Taken* taken = nullptr;
  if (it != offers_.end()) {
    taken = &it->second;
  } else if (revoke.offer_id < floor_) {
    // Ended, and refused by the floor: nothing to remember.
    return std::optional<wire::Message>(
        wire::Message{.type = wire::MessageType::kOfferRevoked, .offer_id = revoke.offer_id});
  } else {
    // Not posted on yet: remembered so that a later post is refused (until
    // the floor passes it).
    absl::StatusOr<Taken*> added = AddUnposted(revoke.offer_id, offerer, "revoked");
    if (!added.ok()) return added.status();
    taken = *added;
  }
  if (!taken->revoked) {
    taken->revoked = true;
    absl::string_view text = revoke.text;
    taken->reason = TakeTextTag(&text);
    taken->why = absl::StrCat(OfferName(revoke.offer_id, offerer), " ended: ", text.substr(0, 512));
  }
  if (taken->in_flight != 0) return std::optional<wire::Message>();
  return std::optional<wire::Message>(
      wire::Message{.type = wire::MessageType::kOfferRevoked, .offer_id = revoke.offer_id});
}

void TicketBook::Forget(absl::Time now) {
  for (auto it = offers_.begin(); it != offers_.end();) {
    auto here = it++;
    Taken& taken = here->second;
    if (taken.in_flight != 0 || here->first >= floor_) continue;
    if (taken.below_floor_since == absl::InfiniteFuture()) taken.below_floor_since = now;
    if (now - taken.below_floor_since < kForgetGrace) continue;
    if (taken.unposted) --unposted_revokes_;
    offers_.erase(here);
  }
}

}  // namespace kvferry::internal
