// OfferBook and TicketBook on their own: the decisions each makes, with no
// agent, UCX or socket behind them (the agents' use of them is covered by
// offer_test and process_test).
#include "src/offer_book.h"

#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/time/time.h"
#include "src/offer_core.h"
#include "src/peer.h"
#include "src/ticket_book.h"
#include "src/wire/auth.h"
#include "src/wire/message.h"

namespace kvferry::internal {
namespace {

using ::testing::HasSubstr;
using wire::MessageType;

const absl::Time kStart = absl::FromUnixSeconds(1'800'000'000);

PeerPtr MakePeer(const std::string& name) {
  PeerPtr peer(new Peer(Tracked(), "10.0.0.1:7000", /*is_client=*/false));
  peer->set_name(name);
  peer->set_state(PeerState::kConnected);
  return peer;
}

// An offer in `book` to `peer` of `layers` layers, ending at `deadline`.
OfferCorePtr OpenOffer(OfferBook& book, const PeerPtr& peer, uint32_t layers,
                       absl::Time deadline) {
  OfferCorePtr offer(
      new OfferCore(boost::intrusive_ptr<AgentLink>(), book.NextId(), peer->name(), Tracked()));
  book.Open(offer, peer, deadline, layers, deadline - kStart);
  return offer;
}

wire::Message Done(uint64_t id, uint32_t begin, uint32_t end) {
  return {.type = MessageType::kOfferDone, .offer_id = id, .layer_begin = begin, .layer_end = end};
}

// --- OfferBook -------------------------------------------------------------

TEST(OfferBookTest, LayersAcknowledgedInAnyOrderEndTheOfferOnce) {
  OfferBook book;
  PeerPtr peer = MakePeer("taker");
  OfferCorePtr offer = OpenOffer(book, peer, 4, kStart + absl::Minutes(1));

  // Out of order, overlapping, repeated, and past the last layer: not yet all.
  for (const wire::Message& m : {Done(offer->id(), 2, 4), Done(offer->id(), 3, 9),
                                 Done(offer->id(), 0, 1), Done(offer->id(), 2, 3)}) {
    OfferBook::Decisions d = book.MessageReceived(peer, m);
    EXPECT_TRUE(d.ended.empty()) << "layers [" << m.layer_begin << ", " << m.layer_end << ")";
    EXPECT_TRUE(d.sends.empty());
  }
  ASSERT_EQ(book.size(), 1u);

  OfferBook::Decisions last = book.MessageReceived(peer, Done(offer->id(), 1, 2));
  ASSERT_EQ(last.ended.size(), 1u);
  EXPECT_EQ(last.ended[0].offer, offer);
  EXPECT_EQ(last.ended[0].state, OfferState::kConsumed);
  EXPECT_TRUE(last.ended[0].status.ok()) << last.ended[0].status;
  EXPECT_TRUE(book.empty());

  // Ended once: later messages about it change nothing.
  EXPECT_TRUE(book.MessageReceived(peer, Done(offer->id(), 0, 4)).ended.empty());
  EXPECT_TRUE(
      book.MessageReceived(peer, {.type = MessageType::kOfferRevoked, .offer_id = offer->id()})
          .ended.empty());
  EXPECT_TRUE(book.Revoke(offer->id(), OfferState::kRevoked, absl::CancelledError("x"))
                  .sends.empty());
}

TEST(OfferBookTest, OnlyTheOffersOwnPeerCounts) {
  OfferBook book;
  PeerPtr peer = MakePeer("taker");
  PeerPtr other = MakePeer("taker");  // same name, another connection
  OfferCorePtr offer = OpenOffer(book, peer, 1, kStart + absl::Minutes(1));
  EXPECT_TRUE(book.MessageReceived(other, Done(offer->id(), 0, 1)).ended.empty());
  EXPECT_EQ(book.size(), 1u);
  EXPECT_EQ(book.MessageReceived(peer, Done(offer->id(), 0, 1)).ended.size(), 1u);
}

TEST(OfferBookTest, ExpiresAtTheDeadline) {
  OfferBook book;
  PeerPtr peer = MakePeer("taker");
  const absl::Time deadline = kStart + absl::Seconds(30);
  OfferCorePtr offer = OpenOffer(book, peer, 2, deadline);
  OpenOffer(book, peer, 2, deadline + absl::Hours(1));
  EXPECT_EQ(book.NextDeadline(), deadline);

  OfferBook::Decisions early = book.Tick(deadline - absl::Nanoseconds(1));
  EXPECT_TRUE(early.sends.empty());
  EXPECT_TRUE(early.ended.empty());

  // At the deadline the peer is told to fence; the blocks stay lent until
  // it confirms.
  OfferBook::Decisions due = book.Tick(deadline);
  ASSERT_EQ(due.sends.size(), 1u);
  EXPECT_TRUE(due.ended.empty());
  EXPECT_EQ(due.sends[0].peer, peer);
  const wire::Message& revoke = due.sends[0].message;
  EXPECT_EQ(revoke.type, MessageType::kOfferRevoke);
  EXPECT_EQ(revoke.offer_id, offer->id());
  // The ttl the ticket granted, never a point on this agent's clock.
  EXPECT_EQ(revoke.ttl_ns, absl::ToInt64Nanoseconds(deadline - kStart));
  EXPECT_THAT(revoke.text, HasSubstr("expired before the peer moved every layer"));
  // Once told, it is not told again, and the next wake is the other offer's.
  EXPECT_TRUE(book.Tick(deadline + absl::Seconds(1)).sends.empty());
  EXPECT_EQ(book.NextDeadline(), deadline + absl::Hours(1));

  OfferBook::Decisions confirmed =
      book.MessageReceived(peer, {.type = MessageType::kOfferRevoked, .offer_id = offer->id()});
  ASSERT_EQ(confirmed.ended.size(), 1u);
  EXPECT_EQ(confirmed.ended[0].state, OfferState::kExpired);
  EXPECT_EQ(confirmed.ended[0].status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(confirmed.ended[0].status.message(),
              HasSubstr(absl::StrCat("offer ", offer->id(), " to peer 'taker' expired")));
  EXPECT_EQ(book.size(), 1u);
}

TEST(OfferBookTest, UnaskedRevokedDoesNotEndAnOffer) {
  OfferBook book;
  PeerPtr peer = MakePeer("taker");
  OfferCorePtr offer = OpenOffer(book, peer, 1, kStart + absl::Minutes(1));
  EXPECT_TRUE(
      book.MessageReceived(peer, {.type = MessageType::kOfferRevoked, .offer_id = offer->id()})
          .ended.empty());
  EXPECT_EQ(book.size(), 1u);
}

// The lender revokes while the taker has a transfer on the ticket in
// flight: the taker confirms only when it ended, and only then does the
// offer end, with the first revoke's outcome.
TEST(OfferBookTest, RevokeWaitsForTheTransfersInFlight) {
  OfferBook lender;
  TicketBook taker;
  PeerPtr peer = MakePeer("taker");
  const absl::Time deadline = kStart + absl::Minutes(1);
  OfferCorePtr offer = OpenOffer(lender, peer, 2, deadline);
  taker.Posted({offer->id(), deadline}, 2, 0, 1, kStart);
  taker.Posted({offer->id(), deadline}, 2, 1, 2, kStart);

  OfferBook::Decisions revoke = lender.Revoke(
      offer->id(), OfferState::kRevoked, absl::CancelledError("revoked by its owner"));
  ASSERT_EQ(revoke.sends.size(), 1u);
  EXPECT_TRUE(revoke.ended.empty());
  // A later revoke (the deadline, a failed transfer) does not replace it.
  EXPECT_TRUE(lender.Tick(deadline).sends.empty());
  EXPECT_TRUE(lender
                  .MessageReceived(peer, {.type = MessageType::kOfferDone,
                                          .code = static_cast<uint32_t>(absl::StatusCode::kAborted),
                                          .offer_id = offer->id()})
                  .sends.empty());

  absl::StatusOr<std::optional<wire::Message>> reply =
      taker.Revoked(revoke.sends[0].message, "lender");
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_FALSE(reply->has_value()) << "confirmed with two transfers in flight";

  EXPECT_FALSE(taker.TransferEnded(offer->id(), 0, 1, TransferState::kFailed,
                                   absl::AbortedError("fenced"))
                   .has_value());
  std::optional<wire::Message> confirm = taker.TransferEnded(
      offer->id(), 1, 2, TransferState::kFailed, absl::AbortedError("fenced"));
  ASSERT_TRUE(confirm.has_value());
  EXPECT_EQ(confirm->type, MessageType::kOfferRevoked);
  EXPECT_EQ(confirm->offer_id, offer->id());

  EXPECT_EQ(lender.size(), 1u);
  OfferBook::Decisions ended = lender.MessageReceived(peer, *confirm);
  ASSERT_EQ(ended.ended.size(), 1u);
  EXPECT_EQ(ended.ended[0].state, OfferState::kRevoked);
  EXPECT_EQ(ended.ended[0].status.code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(lender.empty());
}

TEST(OfferBookTest, APeersCloseEndsItsOffers) {
  OfferBook book;
  PeerPtr peer = MakePeer("taker");
  PeerPtr bystander = MakePeer("other");
  const absl::Time deadline = kStart + absl::Minutes(1);
  OfferCorePtr plain = OpenOffer(book, peer, 1, deadline);
  OfferCorePtr revoking = OpenOffer(book, peer, 1, deadline);
  OfferCorePtr elsewhere = OpenOffer(book, bystander, 1, deadline);
  ASSERT_EQ(book.Revoke(revoking->id(), OfferState::kRevoked, absl::CancelledError("owner"))
                .sends.size(),
            1u);
  EXPECT_EQ(book.OffersTo(*peer), (std::vector<uint64_t>{plain->id(), revoking->id()}));

  peer->End(PeerState::kFailed, absl::UnavailableError("sent nothing for 10s"));
  OfferBook::Decisions closed = book.PeerClosed(*peer);
  EXPECT_TRUE(closed.sends.empty());
  ASSERT_EQ(closed.ended.size(), 2u);
  for (const OfferBook::Ended& e : closed.ended) {
    if (e.offer == plain) {
      EXPECT_EQ(e.state, OfferState::kPeerFailed);
      EXPECT_EQ(e.status.code(), absl::StatusCode::kUnavailable);
      EXPECT_THAT(e.status.message(), HasSubstr("ended with the peer: sent nothing for 10s"));
    } else {
      EXPECT_EQ(e.offer, revoking);
      EXPECT_EQ(e.state, OfferState::kRevoked);
      EXPECT_EQ(e.status.code(), absl::StatusCode::kCancelled);
    }
  }
  EXPECT_FALSE(book.HasOffersTo(*peer));
  EXPECT_TRUE(book.HasOffersTo(*bystander));
  EXPECT_EQ(book.size(), 1u);

  // A revoke of an offer whose peer is gone ends it at once, sending nothing.
  OfferCorePtr late = OpenOffer(book, peer, 1, deadline);
  OfferBook::Decisions at_once =
      book.Revoke(late->id(), OfferState::kRevoked, absl::CancelledError("owner"));
  EXPECT_TRUE(at_once.sends.empty());
  ASSERT_EQ(at_once.ended.size(), 1u);
  EXPECT_EQ(at_once.ended[0].state, OfferState::kRevoked);

  OfferBook::Decisions all = book.EndAll(absl::CancelledError("shut down"));
  ASSERT_EQ(all.ended.size(), 1u);
  EXPECT_EQ(all.ended[0].offer, elsewhere);
  EXPECT_TRUE(book.empty());
}

// --- TicketBook ------------------------------------------------------------

constexpr absl::string_view kKey = "0123456789abcdef0123456789abcdef";

struct TestTicket {
  wire::Ticket ticket;
  std::string body;
  std::string tag;
};

TestTicket MakeTicket(uint64_t id, absl::Time deadline, uint32_t layers = 4,
                  absl::string_view key = kKey) {
  TestTicket t;
  t.ticket = {.offer_id = id,
              .offerer = "lender",
              .offerer_incarnation = 7,
              .taker = "taker",
              .pool = "kv",
              .ttl_ns = absl::ToInt64Nanoseconds(deadline - kStart),
              .num_layers = layers,
              .blocks = {1, 2}};
  t.body = wire::EncodeTicketBody(t.ticket);
  t.tag = wire::TicketTag(key, t.body);
  return t;
}

const TicketBook::Expect kExpect{.taker = "taker", .offerer_incarnation = 7, .key = kKey};

absl::Status CheckOf(const TicketBook& book, const TestTicket& t, uint32_t begin, uint32_t end,
                     absl::Time now = kStart) {
  return book.Check(t.ticket, t.body, t.tag, kExpect, begin, end, now).status();
}

wire::Message RevokeOf(uint64_t id, absl::Time deadline, std::string text = "owner") {
  return {.type = MessageType::kOfferRevoke,
          .text = std::move(text),
          .offer_id = id,
          .ttl_ns = absl::ToInt64Nanoseconds(deadline - kStart)};
}

TEST(TicketBookTest, ChecksWhoseTicketItIs) {
  TicketBook book;
  const absl::Time deadline = kStart + absl::Minutes(1);
  TestTicket good = MakeTicket(3, deadline);
  EXPECT_TRUE(CheckOf(book, good, 0, 4).ok());

  TestTicket other_taker = good;
  other_taker.ticket.taker = "someone";
  absl::Status s = CheckOf(book, other_taker, 0, 4);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(s.message(), HasSubstr("offer 3 from 'lender' was made for agent 'someone'"));

  TestTicket old = good;
  old.ticket.offerer_incarnation = 6;
  EXPECT_EQ(CheckOf(book, old, 0, 4).code(), absl::StatusCode::kFailedPrecondition);

  TestTicket forged = MakeTicket(3, deadline, 4, "another connection's key.........");
  s = CheckOf(book, forged, 0, 4);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(s.message(), HasSubstr("integrity check"));

  s = CheckOf(book, good, 2, 5);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("covers 4 layers, not [2, 5)"));

  // The ttl counts from the first use here, on this agent's clock.
  absl::StatusOr<TicketBook::Use> use = book.Check(good.ticket, good.body, good.tag, kExpect,
                                                   0, 1, kStart);
  ASSERT_TRUE(use.ok()) << use.status();
  book.Posted(*use, 4, 0, 1, kStart);
  s = CheckOf(book, good, 1, 4, deadline);
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(s.message(), HasSubstr("expired"));
}

TEST(TicketBookTest, TicketUsedOnALayerTwiceIsRefused) {
  TicketBook book;
  const absl::Time deadline = kStart + absl::Minutes(1);
  TestTicket t = MakeTicket(5, deadline);
  absl::StatusOr<TicketBook::Use> use =
      book.Check(t.ticket, t.body, t.tag, kExpect, 0, 2, kStart);
  ASSERT_TRUE(use.ok()) << use.status();
  EXPECT_EQ(use->offer_id, 5u);
  EXPECT_EQ(use->deadline, deadline);
  book.Posted(*use, 4, 0, 2, kStart);

  absl::Status again = CheckOf(book, t, 1, 3);
  EXPECT_EQ(again.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(again.message(),
              HasSubstr("offer 5 from 'lender': layer 1 was already moved on this ticket"));
  EXPECT_TRUE(CheckOf(book, t, 2, 4).ok());
  // Another offer's layers are its own.
  EXPECT_TRUE(CheckOf(book, MakeTicket(6, deadline), 0, 2).ok());
}

TEST(TicketBookTest, TransfersOnAStandingOfferReportDone) {
  TicketBook book;
  const absl::Time deadline = kStart + absl::Minutes(1);
  book.Posted({9, deadline}, 4, 0, 2, kStart);
  book.Posted({9, deadline}, 4, 2, 4, kStart);
  std::optional<wire::Message> ok = book.TransferEnded(9, 0, 2, TransferState::kDone,
                                                       absl::OkStatus());
  ASSERT_TRUE(ok.has_value());
  EXPECT_EQ(*ok, (wire::Message{.type = MessageType::kOfferDone,
                                .offer_id = 9,
                                .layer_begin = 0,
                                .layer_end = 2}));
  std::optional<wire::Message> failed =
      book.TransferEnded(9, 2, 4, TransferState::kFailed, absl::UnavailableError("link down"));
  ASSERT_TRUE(failed.has_value());
  EXPECT_EQ(failed->code, static_cast<uint32_t>(absl::StatusCode::kUnavailable));
  EXPECT_EQ(failed->text, "link down");
  // Not an offer it posted on: nothing to say.
  EXPECT_FALSE(book.TransferEnded(10, 0, 1, TransferState::kDone, absl::OkStatus()).has_value());
}

TEST(TicketBookTest, UnpostedRevokesAreBounded) {
  TicketBook book;
  const absl::Time deadline = kStart + absl::Minutes(1);
  book.Posted({1, deadline}, 4, 0, 1, kStart);  // posted on: not counted
  for (uint64_t id = 100; id < 100 + wire::kMaxUnpostedRevokes; ++id) {
    absl::StatusOr<std::optional<wire::Message>> reply =
        book.Revoked(RevokeOf(id, deadline), "lender");
    ASSERT_TRUE(reply.ok()) << id << ": " << reply.status();
    ASSERT_TRUE(reply->has_value());
    ASSERT_EQ((*reply)->type, MessageType::kOfferRevoked);
  }
  EXPECT_EQ(book.unposted_revokes(), wire::kMaxUnpostedRevokes);

  absl::StatusOr<std::optional<wire::Message>> over =
      book.Revoked(RevokeOf(99, deadline), "lender");
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(over.status().message(),
              HasSubstr(absl::StrCat("peer 'lender' revoked more than ",
                                     wire::kMaxUnpostedRevokes, " offers")));
  EXPECT_EQ(book.RevokedWhy(99), nullptr) << "the refused revoke was recorded";
  // Revokes of offers it knows stay answered: one posted on, one repeated.
  EXPECT_TRUE(book.Revoked(RevokeOf(1, deadline), "lender").ok());
  EXPECT_TRUE(book.Revoked(RevokeOf(100, deadline), "lender").ok());
  EXPECT_EQ(book.unposted_revokes(), wire::kMaxUnpostedRevokes);

  // Once the lender's floor passes them they are forgotten: room again.
  book.RaiseFloor(100 + wire::kMaxUnpostedRevokes);
  book.Forget(kStart);
  book.Forget(kStart + kForgetGrace);
  EXPECT_EQ(book.unposted_revokes(), 0u);
  EXPECT_TRUE(book.Revoked(RevokeOf(100 + wire::kMaxUnpostedRevokes, deadline), "lender").ok());
  EXPECT_EQ(book.unposted_revokes(), 1u);
}

TEST(TicketBookTest, RevokedTicketsTransfersFailNamingWhy) {
  TicketBook book;
  const absl::Time deadline = kStart + absl::Minutes(1);
  TestTicket t = MakeTicket(4, deadline);
  book.Posted({4, deadline}, 4, 0, 2, kStart);
  EXPECT_EQ(book.RevokedWhy(4), nullptr);

  absl::StatusOr<std::optional<wire::Message>> reply =
      book.Revoked(RevokeOf(4, deadline, "the owner needs the blocks back"), "lender");
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_FALSE(reply->has_value());  // one transfer still in flight

  const std::string* why = book.RevokedWhy(4);
  ASSERT_NE(why, nullptr);
  EXPECT_EQ(*why, "offer 4 from 'lender' ended: the owner needs the blocks back");
  // New posts are refused with the same words, before any layer check.
  absl::Status refused = CheckOf(book, t, 2, 4);
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(refused.message(), *why);
  // The transfer in flight, though it completed, is reported as the fence
  // confirmation, not as a done layer.
  std::optional<wire::Message> m =
      book.TransferEnded(4, 0, 2, TransferState::kDone, absl::OkStatus());
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->type, MessageType::kOfferRevoked);

  // The peer's words are cut at 512 bytes.
  ASSERT_TRUE(book.Revoked(RevokeOf(8, deadline, std::string(2000, 'x')), "lender").ok());
  ASSERT_NE(book.RevokedWhy(8), nullptr);
  EXPECT_EQ(book.RevokedWhy(8)->size(), std::string("offer 8 from 'lender' ended: ").size() + 512);
}

// Forgetting goes by the lender's floor, not by the ticket's ttl: a
// forgotten ticket must stay refused, and a ttl alone cannot tell when that
// is safe. (The grace after the floor passed only keeps the precise words.)
TEST(TicketBookTest, ForgetsOnlyBelowTheFloor) {
  TicketBook book;
  const absl::Time deadline = kStart + absl::Minutes(1);
  ASSERT_TRUE(book.Revoked(RevokeOf(1, deadline), "lender").ok());
  book.Posted({2, deadline}, 4, 0, 1, kStart);  // in flight
  ASSERT_TRUE(book.Revoked(RevokeOf(3, kStart + absl::Hours(24 * 365)), "lender").ok());

  // However late, nothing is forgotten without the floor.
  book.Forget(kStart);
  book.Forget(kStart + kMaxOfferTtl + absl::Hours(1));
  ASSERT_NE(book.RevokedWhy(1), nullptr);
  ASSERT_NE(book.RevokedWhy(3), nullptr);

  book.RaiseFloor(2);
  book.RaiseFloor(1);  // never lowers
  EXPECT_EQ(book.floor(), 2u);
  const absl::Time later = kStart + absl::Hours(2);
  book.Forget(later);  // seen below the floor: kept for the grace
  ASSERT_NE(book.RevokedWhy(1), nullptr);
  book.Forget(later + kForgetGrace - absl::Nanoseconds(1));
  ASSERT_NE(book.RevokedWhy(1), nullptr);
  book.Forget(later + kForgetGrace);
  EXPECT_EQ(book.RevokedWhy(1), nullptr);
  // Forgotten, and still refused: below the floor.
  TestTicket one = MakeTicket(1, deadline);
  absl::Status s = CheckOf(book, one, 0, 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("offer 1 from 'lender' has ended"));

  // In flight: kept even below the floor.
  book.RaiseFloor(10);
  book.Forget(later + kForgetGrace);
  book.Forget(later + 2 * kForgetGrace);
  EXPECT_EQ(book.RevokedWhy(3), nullptr);
  EXPECT_EQ(book.unposted_revokes(), 0u);
  EXPECT_EQ(book.size(), 1u);
  ASSERT_TRUE(book.TransferEnded(2, 0, 1, TransferState::kDone, absl::OkStatus()).has_value());
  book.Forget(later + 2 * kForgetGrace);
  EXPECT_FALSE(book.empty()) << "forgotten without its grace";
  book.Forget(later + 3 * kForgetGrace);
  EXPECT_TRUE(book.empty());
  EXPECT_EQ(CheckOf(book, MakeTicket(2, deadline), 1, 2).code(),
            absl::StatusCode::kFailedPrecondition);
}

// --- Engine-facing offers (issue 18 §4) ----------------------------------

TEST(OfferBookTest, ReleaseByTheTakerFencesThenEndsReleased) {
  OfferBook book;
  PeerPtr peer = MakePeer("taker");
  OfferCorePtr offer = OpenOffer(book, peer, 2, kStart + absl::Minutes(1));
  // From another connection: ignored.
  EXPECT_TRUE(book.MessageReceived(MakePeer("taker"),
                                   {.type = MessageType::kOfferRelease, .offer_id = offer->id()})
                  .sends.empty());
  OfferBook::Decisions d =
      book.MessageReceived(peer, {.type = MessageType::kOfferRelease, .offer_id = offer->id()});
  EXPECT_TRUE(d.ended.empty()) << "ended before the taker's fence";
  ASSERT_EQ(d.sends.size(), 1u);
  EXPECT_EQ(d.sends[0].message.type, MessageType::kOfferRevoke);
  EXPECT_EQ(d.sends[0].message.text, "released by its taker");
  OfferBook::Decisions ended =
      book.MessageReceived(peer, {.type = MessageType::kOfferRevoked, .offer_id = offer->id()});
  ASSERT_EQ(ended.ended.size(), 1u);
  EXPECT_EQ(ended.ended[0].state, OfferState::kReleased);
  EXPECT_TRUE(ended.ended[0].status.ok()) << ended.ended[0].status;
  EXPECT_TRUE(book.empty());
}

TEST(OfferBookTest, AnOfferForANameWaitsBindsAndAnnouncesItsEnd) {
  OfferBook book;
  const absl::Time deadline = kStart + absl::Seconds(30);
  OfferCorePtr offer(
      new OfferCore(boost::intrusive_ptr<AgentLink>(), book.NextId(), "decode", Tracked()));
  book.OpenForName(offer, deadline, 2, absl::Seconds(30));
  EXPECT_EQ(book.waiting(), 1u);
  EXPECT_TRUE(book.Tick(deadline - absl::Nanoseconds(1)).ended.empty());
  // Another name binds nothing.
  PeerPtr other = MakePeer("prefill");
  EXPECT_TRUE(book.Bind(other).sends.empty());
  PeerPtr peer = MakePeer("decode");
  OfferBook::Decisions bound = book.Bind(peer);
  ASSERT_EQ(bound.sends.size(), 1u);
  EXPECT_EQ(bound.sends[0].peer, peer);
  EXPECT_EQ(bound.sends[0].message,
            (wire::Message{.type = MessageType::kOfferBound,
                           .offer_id = offer->id(),
                           .ttl_ns = absl::ToInt64Nanoseconds(absl::Seconds(30)),
                           .offer_floor = offer->id()}));
  EXPECT_EQ(book.waiting(), 0u);
  EXPECT_EQ(book.OffersTo(*peer), std::vector<uint64_t>{offer->id()});
  // A later connection of the same name gets nothing more.
  EXPECT_TRUE(book.Bind(MakePeer("decode")).sends.empty());

  OfferBook::Decisions done = book.MessageReceived(peer, Done(offer->id(), 0, 2));
  ASSERT_EQ(done.ended.size(), 1u);
  EXPECT_EQ(done.ended[0].state, OfferState::kConsumed);
  // The taker hears it ended, with a floor past it.
  ASSERT_EQ(done.sends.size(), 1u);
  EXPECT_EQ(done.sends[0].message.type, MessageType::kOfferEnded);
  EXPECT_EQ(done.sends[0].message.offer_id, offer->id());
  EXPECT_GT(done.sends[0].message.offer_floor, offer->id());
}

TEST(OfferBookTest, AnOfferForANameNobodyTakesExpiresAtOnce) {
  OfferBook book;
  const absl::Time deadline = kStart + absl::Seconds(30);
  OfferCorePtr offer(
      new OfferCore(boost::intrusive_ptr<AgentLink>(), book.NextId(), "ghost", Tracked()));
  book.OpenForName(offer, deadline, 2, absl::Seconds(30));
  EXPECT_EQ(book.NextDeadline(), deadline);
  OfferBook::Decisions due = book.Tick(deadline);
  EXPECT_TRUE(due.sends.empty()) << "nobody to fence";
  ASSERT_EQ(due.ended.size(), 1u);
  EXPECT_EQ(due.ended[0].state, OfferState::kExpired);
  EXPECT_THAT(due.ended[0].status.message(),
              HasSubstr("expired before a peer of that name connected"));
  EXPECT_TRUE(book.empty());
}

TEST(TicketBookTest, TheTtlCountsFromTheFirstUseOnThisClock) {
  // The ticket holds no point in time: however far this agent's clock is
  // from the lender's, an unused ticket is not expired here ...
  TicketBook book;
  TestTicket t = MakeTicket(3, kStart + absl::Seconds(60));
  EXPECT_EQ(t.ticket.ttl_ns, absl::ToInt64Nanoseconds(absl::Seconds(60)));
  for (absl::Time now : {absl::UnixEpoch(), kStart - absl::Hours(24 * 365),
                         kStart + absl::Hours(24 * 365)}) {
    EXPECT_TRUE(CheckOf(book, t, 0, 1, now).ok()) << now;
  }
  // ... and once used, it runs out a ttl later on this agent's clock.
  const absl::Time first = kStart + absl::Hours(24 * 365);
  absl::StatusOr<TicketBook::Use> use = book.Check(t.ticket, t.body, t.tag, kExpect, 0, 1, first);
  ASSERT_TRUE(use.ok()) << use.status();
  EXPECT_EQ(use->deadline, first + absl::Seconds(60));
  book.Posted(*use, 4, 0, 1, first);
  EXPECT_TRUE(CheckOf(book, t, 1, 2, first + absl::Seconds(59)).ok());
  EXPECT_EQ(CheckOf(book, t, 1, 2, first + absl::Seconds(60)).code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST(TicketBookTest, ReleaseRefusesLaterPostsAndIsSaidOnce) {
  TicketBook book;
  TestTicket t = MakeTicket(4, kStart + absl::Minutes(1));
  auto release = book.Release(t.ticket, t.body, t.tag, kExpect, kStart);
  ASSERT_TRUE(release.ok()) << release.status();
  ASSERT_TRUE(release->has_value());
  EXPECT_EQ(**release, (wire::Message{.type = MessageType::kOfferRelease, .offer_id = 4}));
  absl::Status s = CheckOf(book, t, 0, 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("offer 4 from 'lender' was released by this agent"));
  auto again = book.Release(t.ticket, t.body, t.tag, kExpect, kStart);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->has_value());
  // The lender's fence of it is confirmed at once: nothing in flight.
  auto reply = book.Revoked(RevokeOf(4, kStart + absl::Minutes(1), "released by its taker"),
                            "lender");
  ASSERT_TRUE(reply.ok());
  ASSERT_TRUE(reply->has_value());
  EXPECT_EQ((*reply)->type, MessageType::kOfferRevoked);
  // A forged ticket releases nothing.
  TestTicket forged = MakeTicket(5, kStart + absl::Minutes(1), 4, "another connection's key.........");
  EXPECT_EQ(book.Release(forged.ticket, forged.body, forged.tag, kExpect, kStart).status().code(),
            absl::StatusCode::kPermissionDenied);
}

TEST(TicketBookTest, ATicketForTheNameNeedsItsBinding) {
  constexpr absl::string_view kNameKey = "the name key of lender#7->taker..";
  TicketBook book;
  TestTicket t = MakeTicket(6, kStart + absl::Minutes(1), 4, kNameKey);
  t.ticket.flags = wire::kTicketForName;
  t.body = wire::EncodeTicketBody(t.ticket);
  t.tag = wire::TicketTag(kNameKey, t.body);
  TicketBook::Expect expect = kExpect;
  expect.name_key = kNameKey;
  absl::Status s = book.Check(t.ticket, t.body, t.tag, expect, 0, 4, kStart).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("not bound to this connection"));
  // The connection's key does not make a name ticket, nor the reverse.
  EXPECT_EQ(book.Check(t.ticket, t.body, wire::TicketTag(kKey, t.body), expect, 0, 4, kStart)
                .status()
                .code(),
            absl::StatusCode::kPermissionDenied);

  ASSERT_TRUE(book.Bound({.type = MessageType::kOfferBound, .offer_id = 6, .ttl_ns = 60,
                          .offer_floor = 6},
                         "lender")
                  .ok());
  EXPECT_TRUE(book.IsBound(6));
  EXPECT_EQ(book.unposted_revokes(), 1u);
  absl::StatusOr<TicketBook::Use> use = book.Check(t.ticket, t.body, t.tag, expect, 0, 4, kStart);
  ASSERT_TRUE(use.ok()) << use.status();
  book.Posted(*use, 4, 0, 4, kStart);
  EXPECT_EQ(book.unposted_revokes(), 0u);
}

TEST(TicketBookTest, BlocksOfAPartialTakeAreValidated) {
  TestTicket t = MakeTicket(7, kStart + absl::Minutes(1));
  t.ticket.blocks = {10, 11, 12, 13};
  EXPECT_EQ(*SelectOfferBlocks(t.ticket, {}), (std::vector<uint32_t>{10, 11, 12, 13}));
  const uint32_t some[] = {3, 1};
  EXPECT_EQ(*SelectOfferBlocks(t.ticket, some), (std::vector<uint32_t>{13, 11}));
  const uint32_t past[] = {0, 4};
  absl::Status s = SelectOfferBlocks(t.ticket, past).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("offer_blocks[1] = 4 is past the 4 blocks of offer 7"));
  const uint32_t twice[] = {2, 0, 2};
  s = SelectOfferBlocks(t.ticket, twice).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("offer_blocks[2] = 2 names an offered block twice"));
}

}  // namespace
}  // namespace kvferry::internal
