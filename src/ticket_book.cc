#include "src/ticket_book.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "src/end_reason_internal.h"
#include "src/wire/auth.h"

namespace kvferry::internal {
namespace {

// When an offer with this ticket deadline can be forgotten: a second after
// the deadline, and no later than the longest ttl from `now`.
absl::Time ForgetAfter(absl::Time deadline, absl::Time now) {
  return std::min(deadline, now + kMaxOfferTtl) + absl::Seconds(1);
}

std::string OfferName(uint64_t id, absl::string_view offerer) {
  return absl::StrCat("offer ", id, " from '", offerer, "'");
}

}  // namespace

absl::StatusOr<TicketBook::Use> TicketBook::Check(const wire::Ticket& ticket,
                                                  absl::string_view body, absl::string_view tag,
                                                  const Expect& expect, uint32_t layer_begin,
                                                  uint32_t layer_end, absl::Time now) const {
  const std::string name = OfferName(ticket.offer_id, ticket.offerer);
  if (ticket.taker != expect.taker) {
    return absl::PermissionDeniedError(absl::StrCat(name, " was made for agent '", ticket.taker,
                                                    "', not '", expect.taker, "'"));
  }
  if (ticket.offerer_incarnation != expect.offerer_incarnation) {
    return absl::FailedPreconditionError(absl::StrCat(
        name, " belongs to an earlier connection of that agent (it restarted or reconnected)"));
  }
  if (!wire::TicketTagMatches(expect.key, body, tag)) {
    return absl::PermissionDeniedError(absl::StrCat(
        name, ": the ticket fails its integrity check (altered, or made for another "
              "connection)"));
  }
  if (layer_end > ticket.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(name, " covers ", ticket.num_layers,
                                                   " layers, not [", layer_begin, ", ",
                                                   layer_end, ")"));
  }
  auto taken = offers_.find(ticket.offer_id);
  if (taken != offers_.end()) {
    if (taken->second.revoked) {
      return WithReason(absl::FailedPreconditionError(taken->second.why), taken->second.reason);
    }
    const std::vector<bool>& posted = taken->second.layers_posted;
    for (uint32_t layer = layer_begin; layer < layer_end && layer < posted.size(); ++layer) {
      if (posted[layer]) {
        return absl::AlreadyExistsError(absl::StrCat(name, ": layer ", layer,
                                                     " was already moved on this ticket"));
      }
    }
  }
  const absl::Time deadline = absl::FromUnixNanos(ticket.deadline_unix_ns);
  if (now >= deadline) {
    return WithReason(absl::DeadlineExceededError(absl::StrCat(name, " expired at ",
                                                               absl::FormatTime(deadline),
                                                               " (the offering agent's clock)")),
                      EndReason::kTicketExpired);
  }
  return Use{ticket.offer_id, deadline};
}

void TicketBook::Posted(const Use& use, uint32_t num_layers, uint32_t layer_begin,
                        uint32_t layer_end, absl::Time now) {
  Taken& taken = offers_[use.offer_id];
  // Sized by the ticket; a later ticket of the same offer claiming more
  // layers (only a lying peer makes one) grows it rather than overrunning.
  if (taken.layers_posted.size() < num_layers) taken.layers_posted.resize(num_layers, false);
  for (uint32_t layer = layer_begin; layer < layer_end; ++layer) taken.layers_posted[layer] = true;
  ++taken.in_flight;
  taken.forget_after = ForgetAfter(use.deadline, now);
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
                                                                 absl::string_view offerer,
                                                                 absl::Time now) {
  auto [it, inserted] = offers_.try_emplace(revoke.offer_id);
  Taken& taken = it->second;
  if (inserted) {
    // Not posted on yet: remembered so that a later post is refused.
    if (unposted_revokes_ >= wire::kMaxUnpostedRevokes) {
      offers_.erase(it);
      return absl::ResourceExhaustedError(absl::StrCat(
          "peer '", offerer, "' revoked more than ", wire::kMaxUnpostedRevokes,
          " offers that were never posted on and have not expired"));
    }
    taken.unposted = true;
    ++unposted_revokes_;
  }
  if (!taken.revoked) {
    taken.revoked = true;
    absl::string_view text = revoke.text;
    taken.reason = TakeTextTag(&text);
    taken.why = absl::StrCat(OfferName(revoke.offer_id, offerer), " ended: ", text.substr(0, 512));
    // Refused until the ticket would have expired anyway (which is never
    // later than the longest ttl from now, whatever deadline the peer sent).
    taken.forget_after = std::max(
        taken.forget_after, ForgetAfter(absl::FromUnixNanos(revoke.deadline_unix_ns), now));
  }
  if (taken.in_flight != 0) return std::optional<wire::Message>();
  return std::optional<wire::Message>(
      wire::Message{.type = wire::MessageType::kOfferRevoked, .offer_id = revoke.offer_id});
}

void TicketBook::Forget(absl::Time now) {
  for (auto it = offers_.begin(); it != offers_.end();) {
    auto here = it++;
    if (here->second.in_flight == 0 && now > here->second.forget_after) {
      if (here->second.unposted) --unposted_revokes_;
      offers_.erase(here);
    }
  }
}

}  // namespace kvferry::internal
