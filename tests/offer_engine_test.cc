// Offers the way a serving engine uses them (issue 18 §4), with the taker in
// another process (kvferry_test_peer --role=taker) over shared memory and
// TCP: the taker releases an offer it does not need (a full prefix-cache
// hit) and the blocks come back at once, after its transfer on the offer was
// fenced; it takes a subset of the offered blocks (a partial hit), which
// move byte for byte while the rest come back untouched; an offer is made to
// a peer by name before that peer connected, and is consumed once it
// connects, or expires when it never does. Bad indices and the ticket's ttl
// (no absolute deadline in it) are checked in this process; OfferBook and
// TicketBook alone are in offer_book_test.
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvferry/agent.h"
#include "kvferry/offer.h"
#include "src/wire/message.h"
#include "tests/child_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

constexpr char kPeerBinary[] = KVFERRY_TEST_PEER;
constexpr uint32_t kBlocks = 32;

// The lender "prefill" here (pool "kv", listening on 127.0.0.1), the taker
// "decode" in a child process, not connected until Connect().
class OfferEngineTest : public ::testing::TestWithParam<Transport> {
 protected:
  void StartLender(bool progress_thread = true) {
    AgentOptions o = TestAgentOptions("prefill", GetParam());
    o.progress_thread = progress_thread;
    auto agent = Agent::Create(o);
    ASSERT_THAT(agent, IsOk());
    lender_ = *std::move(agent);
    pool_ = *lender_->CreatePool("kv", Layout(kBlocks));
    auto port = lender_->Listen("127.0.0.1", 0);
    ASSERT_THAT(port, IsOk());
    port_ = *port;
  }
  void StartTaker() {
    taker_ = std::make_unique<ChildProcess>(std::vector<std::string>{
        kPeerBinary, "--role=taker", "--name=decode", absl::StrCat("--tls=", GetParam().tls),
        absl::StrCat("--peer_timeout=", absl::ToInt64Seconds(kPeerTimeout))});
    ASSERT_TRUE(taker_->started());
  }
  // The taker connects to the lender; the lender sees it connected.
  void Connect() {
    ASSERT_EQ(Ask(absl::StrCat("CONNECT ", port_), "CONNECT"), "CONNECTED prefill");
    ASSERT_THAT(lender_->WaitForPeer("decode", absl::Seconds(60)), IsOk());
  }
  void TearDown() override {
    if (taker_ != nullptr) {
      taker_->CloseStdin();
      taker_->Wait();
    }
    lender_.reset();
  }

  // Sends one command to the taker and returns its answer (the first line
  // starting with `prefix`, or with ERROR).
  std::string Ask(const std::string& command, const std::string& prefix) {
    if (!taker_->WriteLine(command)) return "(the taker's stdin is closed)";
    std::optional<std::string> line = taker_->ReadUntil(prefix, absl::Seconds(90));
    return line.value_or("(no answer from the taker)");
  }

  // `n` blocks of the lender filled for `seed`, and an offer of them to
  // "decode" that holds the only lease; `ids` receives the block ids.
  Offer OfferFilled(uint32_t n, uint64_t seed, absl::Duration ttl,
                    std::vector<uint32_t>* ids) {
    BlockSet blocks = *pool_->Lease(n);
    ids->assign(blocks.ids().begin(), blocks.ids().end());
    for (size_t i = 0; i < ids->size(); ++i) FillBlock(blocks, i, seed, (*ids)[i]);
    auto offer = lender_->Offer(blocks, "decode", ttl);
    EXPECT_THAT(offer, IsOk());
    return offer.ok() ? *std::move(offer) : Offer();
  }

  static std::string Hex(const Offer& offer) { return absl::BytesToHexString(offer.ticket()); }
  bool AllFree() const { return pool_->free_blocks() == kBlocks; }

  std::unique_ptr<Agent> lender_;
  KvPool* pool_ = nullptr;
  uint16_t port_ = 0;
  std::unique_ptr<ChildProcess> taker_;
};

// A full prefix-cache hit: the taker needs nothing, and says so. The lender
// gets its blocks back long before the ttl, and the ticket is dead.
TEST_P(OfferEngineTest, ReleaseByTheTakerReturnsTheBlocksAtOnce) {
  ASSERT_NO_FATAL_FAILURE(StartLender());
  ASSERT_NO_FATAL_FAILURE(StartTaker());
  ASSERT_NO_FATAL_FAILURE(Connect());
  std::vector<uint32_t> ids;
  constexpr absl::Duration kTtl = absl::Minutes(10);
  Offer offer = OfferFilled(4, 5, kTtl, &ids);
  EXPECT_EQ(pool_->free_blocks(), kBlocks - 4);

  const absl::Time released_at = absl::Now();
  EXPECT_EQ(Ask("RELEASE " + Hex(offer), "RELEASE"), "RELEASE OK");
  EXPECT_THAT(offer.Wait(absl::Seconds(60)), IsOk());
  EXPECT_LT(absl::Now() - released_at, kTtl / 2) << "back at the ttl, not at once";
  EXPECT_EQ(offer.state(), OfferState::kReleased);
  EXPECT_STREQ(OfferStateName(offer.state()), "released");
  EXPECT_TRUE(AllFree());
  EXPECT_EQ(lender_->GetStats().Live(ResourceKind::kOffer), 0);

  // Released: a later post on the ticket is refused before anything moves,
  // and a second release is a no-op.
  const std::string read = Ask(absl::StrCat("READ ", Hex(offer), " - 5 ", absl::StrJoin(ids, ",")),
                               "READ");
  EXPECT_THAT(read, ::testing::HasSubstr("FAILED_PRECONDITION"));
  EXPECT_THAT(read, ::testing::HasSubstr(absl::StrCat("offer ", offer.id(), " from 'prefill'")));
  EXPECT_EQ(Ask("RELEASE " + Hex(offer), "RELEASE"), "RELEASE OK");
  EXPECT_EQ(lender_->GetPeer("decode")->state, PeerState::kConnected);
}

// The taker releases an offer it has a transfer in flight on. The lender
// has no progress thread here, so nothing it serves (over TCP, every byte of
// a READ) moves while this thread does not drive it: the offer can only end
// through the taker's fence, and once it did, nothing of the taker's is
// still in flight on it.
TEST_P(OfferEngineTest, ReleaseFencesATransferInFlightFirst) {
  ASSERT_NO_FATAL_FAILURE(StartLender(/*progress_thread=*/false));
  ASSERT_NO_FATAL_FAILURE(StartTaker());
  // Connect, driving the lender until the taker's Connect returned (over
  // TCP its data path comes up only as the lender progresses).
  ASSERT_TRUE(taker_->WriteLine(absl::StrCat("CONNECT ", port_)));
  std::optional<std::string> connected;
  for (const absl::Time give_up = absl::Now() + absl::Seconds(90);
       !connected && absl::Now() < give_up;) {
    lender_->Progress();
    connected = taker_->ReadLine(absl::Milliseconds(5));
  }
  ASSERT_EQ(connected.value_or("(no answer from the taker)"), "CONNECTED prefill");
  std::vector<uint32_t> ids;
  Offer offer = OfferFilled(4, 9, absl::Minutes(10), &ids);
  lender_->Progress();

  EXPECT_EQ(Ask("POST " + Hex(offer) + " 4", "POST"), "POSTED");
  if (std::string(GetParam().tls) == "tcp") {
    // UCX's TCP emulates the READ with messages the lender answers only as
    // it progresses: it cannot have completed.
    EXPECT_THAT(Ask("STATE", "STATE"), ::testing::StartsWith("STATE inflight"));
  }
  EXPECT_EQ(Ask("RELEASE " + Hex(offer), "RELEASE"), "RELEASE OK");
  // Drive the lender until the offer ended (Wait progresses it), then no more.
  EXPECT_THAT(offer.Wait(absl::Seconds(60)), IsOk());
  EXPECT_TRUE(offer.state() == OfferState::kReleased || offer.state() == OfferState::kConsumed)
      << OfferStateName(offer.state());
  EXPECT_TRUE(AllFree());
  const std::string state = Ask("STATE", "STATE");
  EXPECT_THAT(state, ::testing::Not(::testing::StartsWith("STATE inflight")))
      << "the offer ended while the taker's transfer on it was still in flight";
  if (offer.state() == OfferState::kReleased && !absl::StartsWith(state, "STATE done")) {
    // Fenced by the release: failed naming the offer.
    EXPECT_THAT(state, ::testing::HasSubstr("ABORTED"));
    EXPECT_THAT(state, ::testing::HasSubstr(absl::StrCat("offer ", offer.id())));
  }
}

// A partial prefix hit: the taker moves two of the four offered blocks, by
// index; they arrive byte for byte, and the offer ends consumed with all
// four back.
TEST_P(OfferEngineTest, PartialTakeMovesExactlyTheChosenBlocks) {
  ASSERT_NO_FATAL_FAILURE(StartLender());
  ASSERT_NO_FATAL_FAILURE(StartTaker());
  ASSERT_NO_FATAL_FAILURE(Connect());
  std::vector<uint32_t> ids;
  Offer offer = OfferFilled(4, 13, absl::Minutes(10), &ids);
  // Indices 3 then 1: the taker's two blocks get ids[3] and ids[1], in
  // that order (READ checks each against the pattern of the id given).
  EXPECT_EQ(Ask(absl::StrCat("READ ", Hex(offer), " 3,1 13 ", ids[3], ",", ids[1]), "READ"),
            "READ OK");
  EXPECT_THAT(offer.Wait(absl::Seconds(60)), IsOk());
  EXPECT_EQ(offer.state(), OfferState::kConsumed);
  EXPECT_TRUE(AllFree());
  // The blocks it did not take went back as the lender left them.
  BlockSet untouched = *pool_->LeaseIds(std::vector<uint32_t>{ids[0], ids[2]});
  EXPECT_EQ(BlockChecksum(untouched, 0), ExpectedChecksum(Layout(kBlocks), 13, ids[0]));
  EXPECT_EQ(BlockChecksum(untouched, 1), ExpectedChecksum(Layout(kBlocks), 13, ids[2]));
  // Every layer moved: the ticket is used up, whichever blocks were taken.
  const std::string again = Ask(absl::StrCat("READ ", Hex(offer), " 0 13 ", ids[0]), "READ");
  EXPECT_THAT(again, ::testing::HasSubstr("ALREADY_EXISTS"));
  EXPECT_THAT(again, ::testing::HasSubstr("was already moved on this ticket"));
}

// vLLM's prefill returns its transfer parameters before decode has a
// connection: the offer waits for the name, binds when "decode"
// authenticates, and is consumed by its READ.
TEST_P(OfferEngineTest, OfferToAPeerThatConnectsLaterIsConsumed) {
  ASSERT_NO_FATAL_FAILURE(StartLender());
  ASSERT_NO_FATAL_FAILURE(StartTaker());
  ASSERT_FALSE(lender_->GetPeer("decode").ok()) << "decode connected before the offer";
  std::vector<uint32_t> ids;
  Offer offer = OfferFilled(3, 17, absl::Minutes(10), &ids);
  EXPECT_EQ(offer.state(), OfferState::kOpen);
  EXPECT_EQ(offer.peer(), "decode");
  EXPECT_EQ(pool_->free_blocks(), kBlocks - 3);

  ASSERT_NO_FATAL_FAILURE(Connect());
  // Posted right after connecting: the binding is waited for.
  EXPECT_EQ(Ask(absl::StrCat("READ ", Hex(offer), " - 17 ", absl::StrJoin(ids, ",")), "READ"),
            "READ OK");
  EXPECT_THAT(offer.Wait(absl::Seconds(60)), IsOk());
  EXPECT_EQ(offer.state(), OfferState::kConsumed);
  EXPECT_TRUE(AllFree());
}

// The same when the lender is the one that connects (it binds as the
// client, once its side of the connection is up).
TEST_P(OfferEngineTest, OfferToAPeerTheLenderConnectsToLaterIsConsumed) {
  ASSERT_NO_FATAL_FAILURE(StartLender());
  ASSERT_NO_FATAL_FAILURE(StartTaker());
  std::vector<uint32_t> ids;
  Offer offer = OfferFilled(2, 29, absl::Minutes(10), &ids);
  const std::string listening = Ask("LISTEN", "LISTEN");
  uint32_t port = 0;
  ASSERT_TRUE(absl::StartsWith(listening, "LISTENING ") &&
              absl::SimpleAtoi(listening.substr(10), &port))
      << listening;
  ASSERT_THAT(lender_->Connect("127.0.0.1", static_cast<uint16_t>(port)), IsOk());
  EXPECT_EQ(Ask(absl::StrCat("READ ", Hex(offer), " - 29 ", absl::StrJoin(ids, ",")), "READ"),
            "READ OK");
  EXPECT_THAT(offer.Wait(absl::Seconds(60)), IsOk());
  EXPECT_EQ(offer.state(), OfferState::kConsumed);
  EXPECT_TRUE(AllFree());
}

// The binding is to one connection: once it ended, the ticket is refused
// on the next one, though it names the same agent and is within its ttl.
TEST_P(OfferEngineTest, AnOfferBoundToAConnectionDiesWithIt) {
  ASSERT_NO_FATAL_FAILURE(StartLender());
  ASSERT_NO_FATAL_FAILURE(StartTaker());
  std::vector<uint32_t> ids;
  Offer offer = OfferFilled(2, 19, absl::Minutes(10), &ids);
  ASSERT_NO_FATAL_FAILURE(Connect());
  ASSERT_THAT(lender_->Disconnect("decode"), IsOk());
  EXPECT_THAT(offer.Wait(absl::Seconds(60)),
              StatusIs(absl::StatusCode::kFailedPrecondition, "disconnected by this agent"));
  EXPECT_EQ(offer.state(), OfferState::kPeerFailed);
  EXPECT_TRUE(AllFree());
  // Blocks reused: a canary in them.
  BlockSet reused = *pool_->LeaseIds(ids);
  FillBlock(reused, 0, 999, ids[0]);
  FillBlock(reused, 1, 999, ids[1]);
  ASSERT_TRUE(WaitFor([&] { return !lender_->GetPeer("decode").ok() ||
                                   lender_->GetPeer("decode")->state != PeerState::kConnected; }));
  // The taker heard the goodbye too (until then it is still connected, and
  // refuses a second connection to the same agent).
  ASSERT_TRUE(WaitFor([&] { return Ask("CONNECTED? prefill", "CONNECTED?") == "CONNECTED? no"; }));
  ASSERT_NO_FATAL_FAILURE(Connect());
  const std::string read =
      Ask(absl::StrCat("READ ", Hex(offer), " - 19 ", absl::StrJoin(ids, ",")), "READ");
  EXPECT_THAT(read, ::testing::HasSubstr("FAILED_PRECONDITION"));
  EXPECT_THAT(read, ::testing::HasSubstr("not bound to this connection"));
  EXPECT_EQ(BlockChecksum(reused, 0), ExpectedChecksum(Layout(kBlocks), 999, ids[0]));
  EXPECT_EQ(BlockChecksum(reused, 1), ExpectedChecksum(Layout(kBlocks), 999, ids[1]));
}

// Nobody of that name connects: the offer expires at its ttl, with nobody to
// fence, and the blocks come back.
TEST_P(OfferEngineTest, OfferToAPeerThatNeverConnectsExpires) {
  ASSERT_NO_FATAL_FAILURE(StartLender());
  BlockSet blocks = *pool_->Lease(2);
  auto offer = lender_->Offer(blocks, "ghost", absl::Milliseconds(300));
  ASSERT_THAT(offer, IsOk());
  blocks.Reset();
  EXPECT_EQ(offer->state(), OfferState::kOpen);
  EXPECT_THAT(offer->Wait(absl::Seconds(60)),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       "expired before a peer of that name connected"));
  EXPECT_EQ(offer->state(), OfferState::kExpired);
  EXPECT_TRUE(AllFree());
  EXPECT_EQ(lender_->GetStats().Live(ResourceKind::kOffer), 0);
}

// The ticket carries the ttl, never a point on the lender's clock: what the
// taker reads in it is the same whenever, and wherever, it is read. (That
// the taker counts it on its own clock from its first use, whatever that
// clock says, is TicketBookTest.TheTtlCountsFromTheFirstUseOnThisClock.)
TEST_P(OfferEngineTest, TheTicketCarriesATtlAndNoDeadline) {
  ASSERT_NO_FATAL_FAILURE(StartLender());
  BlockSet blocks = *pool_->Lease(1);
  auto first = lender_->Offer(blocks, "decode", absl::Seconds(42));
  ASSERT_THAT(first, IsOk());
  absl::SleepFor(absl::Milliseconds(20));  // a later offer with the same ttl
  BlockSet more = *pool_->Lease(1);
  auto second = lender_->Offer(more, "decode", absl::Seconds(42));
  ASSERT_THAT(second, IsOk());
  auto a = internal::wire::DecodeTicket(first->ticket());
  auto b = internal::wire::DecodeTicket(second->ticket());
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(a->ttl_ns, absl::ToInt64Nanoseconds(absl::Seconds(42)));
  // Made at different times, they differ only in the offer id and block:
  // no time in them.
  internal::wire::Ticket a_renumbered = *a;
  a_renumbered.offer_id = b->offer_id;
  a_renumbered.blocks = b->blocks;
  EXPECT_EQ(a_renumbered, *b);
  EXPECT_EQ(a->flags, internal::wire::kTicketForName) << "decode is not connected";
  EXPECT_THAT(first->Revoke(), StatusIs(absl::StatusCode::kCancelled, "revoked"));
  EXPECT_THAT(second->Revoke(), StatusIs(absl::StatusCode::kCancelled, "revoked"));
}

INSTANTIATE_TEST_SUITE_P(Transports, OfferEngineTest, ::testing::Values(kShm, kTcp),
                         TransportName);

// Partial takes with bad indices, between two agents in this process: each
// refused before anything moves, naming the index, the offer untouched.
class PartialTakeTest : public AgentPairTest {
 protected:
  void MakePools() override {
    decode_pool_ = *decode_->CreatePool("kv", Layout(16));
    prefill_pool_ = *prefill_->CreatePool("kv", Layout(16));
  }
};

TEST_P(PartialTakeTest, BadIndicesAreRefusedNamingTheIndex) {
  BlockSet lent = *prefill_pool_->LeaseIds(std::vector<uint32_t>{2, 5, 11});
  for (size_t i = 0; i < 3; ++i) FillBlock(lent, i, 23, lent.ids()[i]);
  auto offer = prefill_->Offer(lent, "decode", absl::Minutes(10));
  ASSERT_THAT(offer, IsOk());
  lent.Reset();
  BlockSet two = *decode_pool_->Lease(2);
  auto post = [&](std::vector<uint32_t> indices, const std::string& ticket) {
    return decode_->PostTransfer({.op = TransferOp::kRead, .local = &two,
                                  .offer_ticket = ticket, .offer_blocks = indices});
  };
  EXPECT_THAT(post({0, 3}, offer->ticket()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       absl::StrCat("offer_blocks[1] = 3 is past the 3 blocks of offer ",
                                    offer->id())));
  EXPECT_THAT(post({1, 1}, offer->ticket()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "offer_blocks[1] = 1 names an offered block twice"));
  EXPECT_THAT(post({0, 1, 2}, offer->ticket()),
              StatusIs(absl::StatusCode::kInvalidArgument, "pairs 2 local blocks with 3"));
  const std::vector<uint32_t> some = {0};
  EXPECT_THAT(decode_->PostTransfer({.op = TransferOp::kRead, .peer = "prefill", .local = &two,
                                     .remote_blocks = {1, 2}, .offer_blocks = some}),
              StatusIs(absl::StatusCode::kInvalidArgument, "needs offer_ticket"));
  EXPECT_EQ(decode_->GetStats().Live(ResourceKind::kTransfer), 0);
  // None of that touched the offer: a good partial take consumes it.
  EXPECT_EQ(offer->state(), OfferState::kOpen);
  auto t = post({2, 0}, offer->ticket());
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
  EXPECT_EQ(BlockChecksum(two, 0), ExpectedChecksum(Layout(16), 23, 11));
  EXPECT_EQ(BlockChecksum(two, 1), ExpectedChecksum(Layout(16), 23, 2));
  EXPECT_THAT(offer->Wait(absl::Seconds(30)), IsOk());
  EXPECT_EQ(offer->state(), OfferState::kConsumed);
  EXPECT_EQ(prefill_pool_->free_blocks(), 16u);
}

TEST_P(PartialTakeTest, ReleaseOfBadTicketsIsRefused) {
  EXPECT_THAT(decode_->ReleaseOffer("garbage"),
              StatusIs(absl::StatusCode::kInvalidArgument, "ReleaseOffer"));
  BlockSet lent = *prefill_pool_->Lease(1);
  auto offer = prefill_->Offer(lent, "decode", absl::Minutes(10));
  ASSERT_THAT(offer, IsOk());
  // Made for decode: prefill itself cannot release it.
  EXPECT_THAT(prefill_->ReleaseOffer(offer->ticket()),
              StatusIs(absl::StatusCode::kNotFound, "unknown peer 'prefill'"));
  std::string altered = offer->ticket();
  altered[altered.size() - 1] ^= 1;  // the tag
  EXPECT_THAT(decode_->ReleaseOffer(altered),
              StatusIs(absl::StatusCode::kPermissionDenied, "integrity"));
  EXPECT_EQ(offer->state(), OfferState::kOpen);
  ASSERT_THAT(decode_->ReleaseOffer(offer->ticket()), IsOk());
  EXPECT_THAT(offer->Wait(absl::Seconds(30)), IsOk());
  EXPECT_EQ(offer->state(), OfferState::kReleased);
}

INSTANTIATE_TEST_SUITE_P(Transports, PartialTakeTest, ::testing::Values(kShm, kTcp),
                         TransportName);

}  // namespace
}  // namespace kvferry::test
