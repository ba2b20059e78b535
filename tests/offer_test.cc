// Offers (include/kvferry/offer.h) between two agents in one process, over
// shared memory and TCP: consumed by a READ (decode pulls) and by a WRITE
// (prefill pushes into decode's offered blocks), layer by layer, expired
// (the late peer is refused and a canary written after the return stays),
// revoked, ended with the peer, and every misuse of a ticket. The killed
// and stalled peers are in process_test.
#include "kvferry/offer.h"

#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

class OfferTest : public AgentPairTest {
 protected:
  void MakePools() override {
    decode_pool_ = *decode_->CreatePool("kv", Layout(16));
    prefill_pool_ = *prefill_->CreatePool("kv", Layout(16));
  }

  // Prefill fills `ids` for `seed` and offers them to decode; the offer
  // holds the only lease.
  Offer OfferFilled(std::vector<uint32_t> ids, uint64_t seed, absl::Duration ttl) {
    BlockSet blocks = *prefill_pool_->LeaseIds(ids);
    for (size_t i = 0; i < ids.size(); ++i) FillBlock(blocks, i, seed, ids[i]);
    auto offer = prefill_->Offer(blocks, "decode", ttl);
    EXPECT_THAT(offer, IsOk());
    return offer.ok() ? *std::move(offer) : Offer();
  }

  bool AllFree(KvPool* pool) { return pool->free_blocks() == pool->layout().num_blocks; }
};

TEST_P(OfferTest, ReadConsumesTheOffer) {
  Offer offer = OfferFilled({3, 4, 9}, 11, absl::Seconds(60));
  EXPECT_EQ(offer.state(), OfferState::kOpen);
  EXPECT_EQ(offer.peer(), "decode");
  EXPECT_EQ(prefill_->GetStats().Live(ResourceKind::kOffer), 1);
  EXPECT_EQ(prefill_pool_->free_blocks(), 13u);  // lent

  BlockSet into = *decode_pool_->Lease(3);
  auto t = decode_->PostTransfer(
      {.op = TransferOp::kRead, .local = &into, .offer_ticket = offer.ticket()});
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
  EXPECT_EQ(BlockChecksum(into, 0), ExpectedChecksum(Layout(16), 11, 3));
  EXPECT_EQ(BlockChecksum(into, 2), ExpectedChecksum(Layout(16), 11, 9));

  // No call on either side: the offering agent hears that the peer fenced it.
  EXPECT_THAT(offer.Wait(absl::Seconds(30)), IsOk());
  EXPECT_EQ(offer.state(), OfferState::kConsumed);
  EXPECT_TRUE(AllFree(prefill_pool_));
  EXPECT_EQ(prefill_->GetStats().Live(ResourceKind::kOffer), 0);
  // Used once: a second pull on the same ticket is refused.
  EXPECT_THAT(decode_->PostTransfer(
                  {.op = TransferOp::kRead, .local = &into, .offer_ticket = offer.ticket()}),
              StatusIs(absl::StatusCode::kAlreadyExists, "already moved"));
}

TEST_P(OfferTest, WriteIntoDecodesOfferedBlocks) {
  // Decode reserves its destination blocks and offers them; prefill pushes.
  BlockSet dst = *decode_pool_->LeaseIds(std::vector<uint32_t>{7, 8});
  auto offer = decode_->Offer(dst, "prefill", absl::Seconds(60));
  ASSERT_THAT(offer, IsOk());
  BlockSet src = *prefill_pool_->Lease(2);
  FillBlock(src, 0, 21, 7);
  FillBlock(src, 1, 21, 8);
  auto t = prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &src,
                                   .notification = "pushed", .offer_ticket = offer->ticket()});
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
  EXPECT_THAT(offer->Wait(absl::Seconds(30)), IsOk());
  EXPECT_EQ(offer->state(), OfferState::kConsumed);
  EXPECT_EQ(decode_->WaitForNotifications(absl::Seconds(30)).size(), 1u);
  EXPECT_EQ(BlockChecksum(dst, 0), ExpectedChecksum(Layout(16), 21, 7));
  EXPECT_EQ(BlockChecksum(dst, 1), ExpectedChecksum(Layout(16), 21, 8));
}

TEST_P(OfferTest, LayerByLayerConsumesAfterTheLast) {
  Offer offer = OfferFilled({0, 1}, 31, absl::Seconds(60));
  BlockSet into = *decode_pool_->Lease(2);
  for (uint32_t layer = 0; layer < 4; ++layer) {
    auto t = decode_->PostTransfer({.op = TransferOp::kRead, .local = &into,
                                    .layer_begin = layer, .layer_end = layer + 1,
                                    .offer_ticket = offer.ticket()});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
    if (layer == 1) {
      EXPECT_THAT(decode_->PostTransfer({.op = TransferOp::kRead, .local = &into,
                                         .layer_begin = 1, .layer_end = 3,
                                         .offer_ticket = offer.ticket()}),
                  StatusIs(absl::StatusCode::kAlreadyExists, "layer 1 was already moved"));
    }
    if (layer < 3) {
      // Still lent: layers remain.
      EXPECT_THAT(offer.Wait(absl::Milliseconds(50)),
                  StatusIs(absl::StatusCode::kDeadlineExceeded, "still open"));
    }
  }
  EXPECT_THAT(offer.Wait(absl::Seconds(30)), IsOk());
  EXPECT_EQ(BlockChecksum(into, 1), ExpectedChecksum(Layout(16), 31, 1));
}

TEST_P(OfferTest, ExpiredOfferRefusesTheLatePeerAndKeepsTheCanary) {
  // Decode offers destination blocks that prefill is too late to fill.
  BlockSet dst = *decode_pool_->LeaseIds(std::vector<uint32_t>{2, 3});
  auto offer = decode_->Offer(dst, "prefill", absl::Milliseconds(200));
  ASSERT_THAT(offer, IsOk());
  const std::string ticket = offer->ticket();
  dst.Reset();
  EXPECT_THAT(offer->Wait(absl::Seconds(30)),
              StatusIs(absl::StatusCode::kDeadlineExceeded, "expired"));
  EXPECT_EQ(offer->state(), OfferState::kExpired);
  ASSERT_TRUE(AllFree(decode_pool_));
  // The blocks are reused: a canary goes in.
  BlockSet reused = *decode_pool_->LeaseIds(std::vector<uint32_t>{2, 3});
  FillBlock(reused, 0, 999, 2);
  FillBlock(reused, 1, 999, 3);
  BlockSet src = *prefill_pool_->Lease(2);
  FillBlock(src, 0, 1, 2);
  FillBlock(src, 1, 1, 3);
  auto late = prefill_->PostTransfer(
      {.op = TransferOp::kWrite, .local = &src, .offer_ticket = ticket});
  EXPECT_FALSE(late.ok());
  EXPECT_THAT(late.status().message(), ::testing::HasSubstr(absl::StrCat("offer ", offer->id(),
                                                                         " from 'decode'")));
  EXPECT_TRUE(late.status().code() == absl::StatusCode::kDeadlineExceeded ||
              late.status().code() == absl::StatusCode::kFailedPrecondition)
      << late.status();
  EXPECT_EQ(BlockChecksum(reused, 0), ExpectedChecksum(Layout(16), 999, 2));
  EXPECT_EQ(BlockChecksum(reused, 1), ExpectedChecksum(Layout(16), 999, 3));
  // The peer stays connected: an expiry costs nothing else.
  EXPECT_EQ(prefill_->GetPeer("decode")->state, PeerState::kConnected);
}

TEST_P(OfferTest, RevokedOfferIsFencedThenRefused) {
  Offer offer = OfferFilled({5}, 41, absl::Seconds(60));
  EXPECT_THAT(offer.Revoke(), StatusIs(absl::StatusCode::kCancelled, "revoked by its owner"));
  EXPECT_EQ(offer.state(), OfferState::kRevoked);
  EXPECT_TRUE(AllFree(prefill_pool_));
  BlockSet into = *decode_pool_->Lease(1);
  EXPECT_THAT(decode_->PostTransfer(
                  {.op = TransferOp::kRead, .local = &into, .offer_ticket = offer.ticket()}),
              StatusIs(absl::StatusCode::kFailedPrecondition, "revoked"));
  // Revoking an ended offer changes nothing.
  EXPECT_THAT(offer.Revoke(), StatusIs(absl::StatusCode::kCancelled, "revoked"));
}

TEST_P(OfferTest, EndsWithThePeer) {
  Offer offer = OfferFilled({1, 2}, 51, absl::Seconds(60));
  decode_.reset();
  EXPECT_THAT(offer.Wait(absl::Seconds(30)),
              StatusIs(absl::StatusCode::kUnavailable, "ended with the peer"));
  EXPECT_EQ(offer.state(), OfferState::kPeerFailed);
  EXPECT_TRUE(AllFree(prefill_pool_));
  EXPECT_EQ(prefill_->GetStats().Live(ResourceKind::kOffer), 0);
}

TEST_P(OfferTest, DroppedHandleStillEndsAndAgentShutdownEndsOffers) {
  { Offer dropped = OfferFilled({0}, 61, absl::Milliseconds(100)); }
  EXPECT_TRUE(WaitFor([&] { return AllFree(prefill_pool_); }));
  EXPECT_TRUE(WaitFor([&] { return prefill_->GetStats().Live(ResourceKind::kOffer) == 0; }));
  Offer open = OfferFilled({1}, 62, absl::Seconds(60));
  prefill_.reset();  // no survivor: the agent ended the offer
  EXPECT_EQ(open.state(), OfferState::kPeerFailed);
  EXPECT_THAT(open.status(), StatusIs(absl::StatusCode::kCancelled, "shut down"));
}

TEST_P(OfferTest, TicketMisuseIsRefusedBeforeAnythingMoves) {
  Offer offer = OfferFilled({6, 7}, 71, absl::Seconds(60));
  BlockSet into = *decode_pool_->Lease(2);
  BlockSet one = *decode_pool_->Lease(1);
  auto post = [&](TransferSpec spec) { return decode_->PostTransfer(spec); };
  EXPECT_THAT(post({.op = TransferOp::kRead, .local = &into, .offer_ticket = "garbage"}),
              StatusIs(absl::StatusCode::kInvalidArgument, "offer_ticket"));
  // A longer ttl (the ticket's u64 after the pool name and flags): refused.
  std::string altered = offer.ticket();
  altered[altered.size() - 32 - 8 - 4 - 4 - 3] ^= 1;
  EXPECT_THAT(post({.op = TransferOp::kRead, .local = &into, .offer_ticket = altered}),
              StatusIs(absl::StatusCode::kPermissionDenied, "integrity"));
  EXPECT_THAT(post({.op = TransferOp::kRead, .local = &into, .remote_blocks = {6, 7},
                    .offer_ticket = offer.ticket()}),
              StatusIs(absl::StatusCode::kInvalidArgument, "from the ticket"));
  EXPECT_THAT(post({.op = TransferOp::kRead, .peer = "someone", .local = &into,
                    .offer_ticket = offer.ticket()}),
              StatusIs(absl::StatusCode::kInvalidArgument, "not of peer 'someone'"));
  EXPECT_THAT(post({.op = TransferOp::kRead, .local = &one, .offer_ticket = offer.ticket()}),
              StatusIs(absl::StatusCode::kInvalidArgument, "pairs 1 local blocks with 2"));
  // Made for decode: a third agent connected to prefill cannot use it.
  AgentOptions o = Options("other");
  auto other = *Agent::Create(o);
  KvPool* other_pool = *other->CreatePool("kv", Layout(16));
  uint16_t port = *prefill_->Listen("127.0.0.1", 0);
  ASSERT_THAT(other->Connect("127.0.0.1", port), IsOk());
  BlockSet theirs = *other_pool->Lease(2);
  EXPECT_THAT(other->PostTransfer(
                  {.op = TransferOp::kRead, .local = &theirs, .offer_ticket = offer.ticket()}),
              StatusIs(absl::StatusCode::kPermissionDenied, "made for agent 'decode'"));
  // None of that touched the offer.
  EXPECT_EQ(offer.state(), OfferState::kOpen);
  auto t = post({.op = TransferOp::kRead, .local = &into, .offer_ticket = offer.ticket()});
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
  EXPECT_THAT(offer.Wait(absl::Seconds(30)), IsOk());
  theirs.Reset();
  other.reset();
}

TEST_P(OfferTest, BadOffersAreRefused) {
  BlockSet blocks = *prefill_pool_->Lease(1);
  EXPECT_THAT(prefill_->Offer(BlockSet(), "decode", absl::Seconds(1)),
              StatusIs(absl::StatusCode::kInvalidArgument, "empty BlockSet"));
  EXPECT_THAT(prefill_->Offer(blocks, "decode", absl::ZeroDuration()),
              StatusIs(absl::StatusCode::kInvalidArgument, "ttl 0"));
  EXPECT_THAT(prefill_->Offer(blocks, "decode", absl::Hours(25)),
              StatusIs(absl::StatusCode::kInvalidArgument, "ttl 25h"));
  // A name never seen waits for that agent to connect (offer_engine_test);
  // a name that is no agent name, or this agent's own, is refused.
  auto waiting = prefill_->Offer(blocks, "nobody", absl::Seconds(1));
  ASSERT_THAT(waiting, IsOk());
  EXPECT_EQ(waiting->state(), OfferState::kOpen);
  EXPECT_THAT(waiting->Revoke(), StatusIs(absl::StatusCode::kCancelled, "revoked"));
  EXPECT_THAT(prefill_->Offer(blocks, "no body", absl::Seconds(1)),
              StatusIs(absl::StatusCode::kInvalidArgument, "peer name"));
  EXPECT_THAT(prefill_->Offer(blocks, "prefill", absl::Seconds(1)),
              StatusIs(absl::StatusCode::kInvalidArgument, "own name"));
  BlockSet foreign = *decode_pool_->Lease(1);
  EXPECT_THAT(prefill_->Offer(foreign, "decode", absl::Seconds(1)),
              StatusIs(absl::StatusCode::kInvalidArgument, "belongs to another agent"));
  KvPool* local_only = *prefill_->CreatePool("scratch", Layout(16), /*exported=*/false);
  BlockSet hidden = *local_only->Lease(1);
  EXPECT_THAT(prefill_->Offer(hidden, "decode", absl::Seconds(1)),
              StatusIs(absl::StatusCode::kInvalidArgument, "not exported"));
  EXPECT_EQ(prefill_->GetStats().Live(ResourceKind::kOffer), 0);
  Offer empty;
  EXPECT_EQ(empty.state(), OfferState::kEmpty);
  EXPECT_THAT(empty.Wait(), StatusIs(absl::StatusCode::kFailedPrecondition, "empty"));
}

INSTANTIATE_TEST_SUITE_P(Transports, OfferTest, ::testing::Values(kShm, kTcp), TransportName);

}  // namespace
}  // namespace kvferry::test
