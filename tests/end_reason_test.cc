// EndReason (include/kvferry/end_reason.h) on every way a transfer or an
// offer ends, with real agents: two in this process (shared memory and TCP)
// for what one process can cause, and the peer in its own process where the
// end is cross-process (killed, stopped, exited). Also the wrong-secret code
// (kUnauthenticated) and Transfer::telemetry().
#include <signal.h>

#include <fstream>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "kvferry/end_reason.h"
#include "src/end_reason_internal.h"
#include "tests/child_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

using ::testing::Not;

constexpr absl::Duration kGenerous = absl::Seconds(60);

// Takes completion batches until `done(all)` holds or `timeout` passes.
template <typename Done>
Completions Collect(Agent& agent, Done done, absl::Duration timeout = kGenerous) {
  Completions all;
  WaitFor([&] {
    Completions batch = agent.PollCompletions();
    for (auto& t : batch.transfers) all.transfers.push_back(std::move(t));
    for (auto& o : batch.offers) all.offers.push_back(std::move(o));
    return done(all);
  }, timeout);
  return all;
}

// The reason a post on `spec` ends with: the refusal's, or the transfer's
// once it ended.
EndReason PostReason(Agent& agent, const TransferSpec& spec, absl::Status* status = nullptr) {
  absl::StatusOr<Transfer> t = agent.PostTransfer(spec);
  if (!t.ok()) {
    if (status != nullptr) *status = t.status();
    return ReasonOf(t.status());
  }
  const absl::Status s = t->Wait(kGenerous);
  if (status != nullptr) *status = s;
  EXPECT_EQ(t->reason(), ReasonOf(s));
  return t->reason();
}

TEST(EndReasonNames, EveryReasonHasItsOwnNameAndTravelsAsAPayload) {
  const std::vector<EndReason> all = {
      EndReason::kNone,          EndReason::kPeerFailed,      EndReason::kPeerDisconnected,
      EndReason::kTicketRevoked, EndReason::kTicketExpired,   EndReason::kPeerTransferFailed,
      EndReason::kLayoutMismatch, EndReason::kAgentShutDown,  EndReason::kCancelled,
      EndReason::kPoolRemoved,   EndReason::kUnauthenticated, EndReason::kTransportError};
  std::map<std::string, EndReason> names;
  for (EndReason r : all) {
    EXPECT_TRUE(names.emplace(EndReasonName(r), r).second) << EndReasonName(r);
    EXPECT_NE(std::string(EndReasonName(r)), "unknown");
    if (r == EndReason::kNone) continue;
    // Set by the library's helper, read back by the public one, through a
    // copy and a message rewrite that keeps payloads.
    absl::Status s = internal::WithReason(absl::UnavailableError("x"), r);
    absl::Status copy = s;
    EXPECT_EQ(ReasonOf(copy), r);
    // The same payload set by hand (what another language binding sees).
    absl::Status by_hand = absl::AbortedError("y");
    by_hand.SetPayload(kEndReasonTypeUrl, absl::Cord(EndReasonName(r)));
    EXPECT_EQ(ReasonOf(by_hand), r);
  }
  EXPECT_STREQ(EndReasonName(static_cast<EndReason>(200)), "unknown");
  EXPECT_EQ(ReasonOf(absl::OkStatus()), EndReason::kNone);
  EXPECT_EQ(ReasonOf(absl::UnavailableError("no payload")), EndReason::kNone);
  absl::Status odd = absl::UnavailableError("odd");
  odd.SetPayload(kEndReasonTypeUrl, absl::Cord("not-a-reason"));
  EXPECT_EQ(ReasonOf(odd), EndReason::kNone);
  // OK stays OK: no payload on success.
  EXPECT_TRUE(internal::WithReason(absl::OkStatus(), EndReason::kPeerFailed).ok());
  // Wire-text tags round-trip, and text without a tag is left alone.
  std::string tagged = internal::TagText(EndReason::kTicketExpired, "offer 3 expired");
  absl::string_view text = tagged;
  EXPECT_EQ(internal::TakeTextTag(&text), EndReason::kTicketExpired);
  EXPECT_EQ(text, "offer 3 expired");
  for (absl::string_view plain : {"[reason:nonsense] x", "[reason:peer-failed]", "plain"}) {
    absl::string_view t = plain;
    EXPECT_EQ(internal::TakeTextTag(&t), EndReason::kNone) << plain;
    EXPECT_EQ(t, plain);
  }
}

class EndReasonTest : public AgentPairTest {
 protected:
  void MakePools() override {
    decode_pool_ = *decode_->CreatePool("kv", Layout(16));
    prefill_pool_ = *prefill_->CreatePool("kv", Layout(16));
  }
  // Prefill offers its block `id` to decode.
  absl::StatusOr<Offer> OfferBlock(uint32_t id, absl::Duration ttl = kGenerous) {
    BlockSet b = *prefill_pool_->LeaseIds(std::vector<uint32_t>{id});
    return prefill_->Offer(b, "decode", ttl);
  }
  TransferSpec TicketRead(const BlockSet& into, const Offer& offer) {
    return {.op = TransferOp::kRead, .local = &into, .offer_ticket = offer.ticket()};
  }
};

TEST_P(EndReasonTest, ADoneTransferAndAConsumedOfferHaveNoReason) {
  auto offer = OfferBlock(1);
  ASSERT_THAT(offer, IsOk());
  EXPECT_EQ(offer->reason(), EndReason::kNone);  // open
  BlockSet into = *decode_pool_->Lease(1);
  auto t = decode_->PostTransfer(TicketRead(into, *offer));
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(t->Wait(kGenerous), IsOk());
  EXPECT_EQ(t->reason(), EndReason::kNone);
  ASSERT_THAT(offer->Wait(kGenerous), IsOk());
  EXPECT_EQ(offer->reason(), EndReason::kNone);
  EXPECT_EQ(Transfer().reason(), EndReason::kNone);
  EXPECT_EQ(Offer().reason(), EndReason::kNone);
}

TEST_P(EndReasonTest, RevokedOfferIsTicketRevokedOnBothSides) {
  auto offer = OfferBlock(2);
  ASSERT_THAT(offer, IsOk());
  EXPECT_THAT(offer->Revoke(), StatusIs(absl::StatusCode::kCancelled, "revoked"));
  EXPECT_EQ(offer->state(), OfferState::kRevoked);
  EXPECT_EQ(offer->reason(), EndReason::kTicketRevoked);
  Completions c = Collect(*prefill_, [](const Completions& a) { return !a.offers.empty(); });
  ASSERT_EQ(c.offers.size(), 1u);
  EXPECT_EQ(c.offers[0].id, offer->id());
  EXPECT_EQ(c.offers[0].reason, EndReason::kTicketRevoked);
  // Revoke returned once decode confirmed: it refuses the ticket now, with
  // the offerer's reason.
  BlockSet into = *decode_pool_->Lease(1);
  absl::Status why;
  EXPECT_EQ(PostReason(*decode_, TicketRead(into, *offer), &why), EndReason::kTicketRevoked)
      << why;
  EXPECT_THAT(why, StatusIs(absl::StatusCode::kFailedPrecondition, "revoked by its owner"));
}

TEST_P(EndReasonTest, ExpiredOfferIsTicketExpiredOnBothSides) {
  auto offer = OfferBlock(3, absl::Milliseconds(100));
  ASSERT_THAT(offer, IsOk());
  EXPECT_THAT(offer->Wait(kGenerous), StatusIs(absl::StatusCode::kDeadlineExceeded, "expired"));
  EXPECT_EQ(offer->state(), OfferState::kExpired);
  EXPECT_EQ(offer->reason(), EndReason::kTicketExpired);
  Completions c = Collect(*prefill_, [](const Completions& a) { return !a.offers.empty(); });
  ASSERT_EQ(c.offers.size(), 1u);
  EXPECT_EQ(c.offers[0].reason, EndReason::kTicketExpired);
  BlockSet into = *decode_pool_->Lease(1);
  absl::Status why;
  EXPECT_EQ(PostReason(*decode_, TicketRead(into, *offer), &why), EndReason::kTicketExpired)
      << why;
}

TEST_P(EndReasonTest, RemovedPoolRevokesItsOffersAsPoolRemoved) {
  auto offer = OfferBlock(4);
  ASSERT_THAT(offer, IsOk());
  // Only the offer holds the block: the removal revokes it after its wait.
  ASSERT_THAT(prefill_->RemovePool("kv", absl::Milliseconds(100)), IsOk());
  EXPECT_EQ(offer->state(), OfferState::kRevoked);
  EXPECT_EQ(offer->reason(), EndReason::kPoolRemoved) << offer->status();
  Completions c = Collect(*prefill_, [](const Completions& a) { return !a.offers.empty(); });
  ASSERT_EQ(c.offers.size(), 1u);
  EXPECT_EQ(c.offers[0].reason, EndReason::kPoolRemoved);
  BlockSet into = *decode_pool_->Lease(1);
  absl::Status why;
  EXPECT_EQ(PostReason(*decode_, TicketRead(into, *offer), &why), EndReason::kPoolRemoved) << why;
}

TEST_P(EndReasonTest, DisconnectIsPeerDisconnectedForPostsAndOffers) {
  auto offer = OfferBlock(5);
  ASSERT_THAT(offer, IsOk());
  ASSERT_THAT(decode_->Disconnect("prefill"), IsOk());
  // Prefill hears the goodbye: its offer ends with the peer.
  ASSERT_THAT(offer->Wait(kGenerous), Not(IsOk()));
  EXPECT_EQ(offer->state(), OfferState::kPeerFailed);
  EXPECT_EQ(offer->reason(), EndReason::kPeerDisconnected) << offer->status();
  BlockSet into = *decode_pool_->Lease(1);
  absl::Status why;
  EXPECT_EQ(PostReason(*decode_, {.op = TransferOp::kRead, .peer = "prefill", .local = &into,
                                  .remote_blocks = {1}},
                       &why),
            EndReason::kPeerDisconnected)
      << why;
  EXPECT_THAT(why, StatusIs(absl::StatusCode::kFailedPrecondition, "disconnected"));
  BlockSet from = *prefill_pool_->Lease(1);
  EXPECT_EQ(PostReason(*prefill_, {.op = TransferOp::kWrite, .peer = "decode", .local = &from,
                                   .remote_blocks = {1}},
                       &why),
            EndReason::kPeerDisconnected)
      << why;
  EXPECT_EQ(ReasonOf(decode_->SendNotification("prefill", "late")),
            EndReason::kPeerDisconnected);
}

TEST_P(EndReasonTest, DestroyedAgentEndsItsOffersAsAgentShutDown) {
  auto offer = OfferBlock(6);
  ASSERT_THAT(offer, IsOk());
  prefill_.reset();  // the handle outlives its agent
  EXPECT_EQ(offer->state(), OfferState::kPeerFailed);
  EXPECT_EQ(offer->reason(), EndReason::kAgentShutDown) << offer->status();
  // Decode heard the goodbye: an orderly end.
  ASSERT_TRUE(WaitFor([&] {
    auto p = decode_->GetPeer("prefill");
    return p.ok() && p->state != PeerState::kConnected;
  }));
  BlockSet into = *decode_pool_->Lease(1);
  absl::Status why;
  EXPECT_EQ(PostReason(*decode_, {.op = TransferOp::kRead, .peer = "prefill", .local = &into,
                                  .remote_blocks = {1}},
                       &why),
            EndReason::kPeerDisconnected)
      << why;
}

TEST_P(EndReasonTest, LayoutMismatchRefusesTheConnection) {
  auto odd = Agent::Create(Options("odd"));
  ASSERT_THAT(odd, IsOk());
  ASSERT_THAT((*odd)->CreatePool("kv", Layout(16, /*layers=*/2)), IsOk());
  auto got = (*odd)->Connect("127.0.0.1", port_);
  EXPECT_THAT(got, StatusIs(absl::StatusCode::kFailedPrecondition, "pool 'kv'"));
  EXPECT_EQ(ReasonOf(got.status()), EndReason::kLayoutMismatch) << got.status();
  EXPECT_FALSE(decode_->GetPeer("odd").ok() &&
               decode_->GetPeer("odd")->state == PeerState::kConnected);
}

TEST_P(EndReasonTest, TransferTelemetrySaysBytesTimesAndPath) {
  BlockSet from = *prefill_pool_->LeaseIds(std::vector<uint32_t>{7, 8, 9});
  BlockSet into = *decode_pool_->Lease(3);
  const absl::Time before = absl::Now();
  auto t = decode_->PostTransfer(
      {.op = TransferOp::kRead, .peer = "prefill", .local = &into, .remote_blocks = {7, 8, 9}});
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(t->Wait(kGenerous), IsOk());
  const absl::Time after = absl::Now();
  const TransferTelemetry tm = t->telemetry();
  EXPECT_EQ(tm.bytes, 3 * Layout(16).block_bytes());
  EXPECT_GE(tm.posted, before);
  EXPECT_LE(tm.posted, tm.ended);
  EXPECT_LE(tm.ended, after);
  EXPECT_EQ(tm.duration(), tm.ended - tm.posted);
  auto peer = decode_->GetPeer("prefill");
  ASSERT_THAT(peer, IsOk());
  EXPECT_EQ(tm.data_path, peer->data_path);
  EXPECT_FALSE(tm.data_path.empty());
  // One layer moves a quarter of the bytes.
  auto one = decode_->PostTransfer({.op = TransferOp::kRead, .peer = "prefill", .local = &into,
                                    .remote_blocks = {7, 8, 9}, .layer_begin = 1,
                                    .layer_end = 2});
  ASSERT_THAT(one, IsOk());
  ASSERT_THAT(one->Wait(kGenerous), IsOk());
  EXPECT_EQ(one->telemetry().bytes, 3 * Layout(16).block_bytes() / 4);
  // The completion carries the same.
  Completions c = Collect(*decode_, [](const Completions& a) { return a.transfers.size() >= 2; });
  ASSERT_EQ(c.transfers.size(), 2u);
  EXPECT_EQ(c.transfers[0].id, t->id());
  EXPECT_EQ(c.transfers[0].telemetry.bytes, tm.bytes);
  EXPECT_EQ(c.transfers[0].telemetry.posted, tm.posted);
  EXPECT_EQ(c.transfers[0].telemetry.ended, tm.ended);
  EXPECT_EQ(c.transfers[0].telemetry.data_path, tm.data_path);
  EXPECT_EQ(c.transfers[0].reason, EndReason::kNone);
  EXPECT_EQ(Transfer().telemetry().bytes, 0u);
}

INSTANTIATE_TEST_SUITE_P(Transports, EndReasonTest, ::testing::Values(kShm, kTcp),
                         TransportName);

TEST(EndReasonSecretTest, WrongSecretIsUnauthenticated) {
  AgentOptions s = TestAgentOptions("server", kTcp);
  s.shared_secret = "right";
  AgentOptions c = TestAgentOptions("client", kTcp);
  c.shared_secret = "wrong";
  auto server = Agent::Create(s);
  auto client = Agent::Create(c);
  ASSERT_THAT(server, IsOk());
  ASSERT_THAT(client, IsOk());
  auto port = (*server)->Listen("127.0.0.1", 0);
  ASSERT_THAT(port, IsOk());
  auto got = (*client)->Connect("127.0.0.1", *port);
  EXPECT_THAT(got, StatusIs(absl::StatusCode::kUnauthenticated, "shared secret mismatch"));
  EXPECT_EQ(ReasonOf(got.status()), EndReason::kUnauthenticated);
  EXPECT_TRUE((*server)->ListPeers().empty());
}

// --- The peer in another process (over TCP, where a READ needs it to run) ---

class ProcessPeer {
 public:
  ProcessPeer()
      : child_({KVFERRY_TEST_PEER, "--role=prefill-serve", "--tls=tcp", "--pool_memory=ucx",
                "--seed=5", absl::StrCat("--peer_timeout=", absl::ToInt64Seconds(kPeerTimeout))}) {}
  // Starts the child, this side's agent and pool, and connects.
  void Start() {
    ASSERT_TRUE(child_.started());
    const uint16_t port = ParsePort(child_.ReadUntil("PORT"));
    ASSERT_NE(port, 0);
    AgentOptions o = TestAgentOptions("decode", kTcp);
    o.peer_timeout = kPeerTimeout;
    auto agent = Agent::Create(o);
    ASSERT_THAT(agent, IsOk());
    agent_ = *std::move(agent);
    pool_ = *agent_->CreatePool("kv", Layout(64));
    auto peer = agent_->Connect("127.0.0.1", port);
    ASSERT_THAT(peer, IsOk());
    name_ = peer->name;
  }
  void Stop() {
    ASSERT_EQ(::kill(child_.pid(), SIGSTOP), 0);
    ASSERT_TRUE(WaitFor([&] { return IsStopped(child_.pid()); }));
  }
  ChildProcess& child() { return child_; }
  Agent& agent() { return *agent_; }
  KvPool& pool() { return *pool_; }
  const std::string& name() const { return name_; }
  TransferSpec Read(const BlockSet& into, std::vector<uint32_t> remote) {
    return {.op = TransferOp::kRead, .peer = name_, .local = &into,
            .remote_blocks = std::move(remote)};
  }

 private:
  ChildProcess child_;  // killed (if alive) after the agent is gone
  std::unique_ptr<Agent> agent_;
  KvPool* pool_ = nullptr;
  std::string name_;
};

TEST(EndReasonProcessTest, KilledPeerIsPeerFailedForTransfersOffersAndPosts) {
  ProcessPeer p;
  ASSERT_NO_FATAL_FAILURE(p.Start());
  BlockSet lent = *p.pool().Lease(2);
  auto offer = p.agent().Offer(lent, p.name(), kGenerous);
  ASSERT_THAT(offer, IsOk());
  lent = BlockSet();
  BlockSet into = *p.pool().Lease(4);
  ASSERT_NO_FATAL_FAILURE(p.Stop());
  auto stuck = p.agent().PostTransfer(p.Read(into, {0, 1, 2, 3}));
  ASSERT_THAT(stuck, IsOk());
  // In flight: no end, no reason, no end time.
  EXPECT_EQ(stuck->state(), TransferState::kInFlight);
  EXPECT_EQ(stuck->reason(), EndReason::kNone);
  EXPECT_EQ(stuck->telemetry().ended, absl::InfiniteFuture());
  EXPECT_EQ(stuck->telemetry().duration(), absl::InfiniteDuration());
  EXPECT_EQ(stuck->telemetry().bytes, 4 * Layout(64).block_bytes());
  p.child().Kill(SIGKILL);
  p.child().Wait();
  EXPECT_THAT(stuck->Wait(kGenerous), StatusIs(absl::StatusCode::kUnavailable, ""));
  EXPECT_EQ(stuck->reason(), EndReason::kPeerFailed) << stuck->status();
  EXPECT_NE(stuck->telemetry().ended, absl::InfiniteFuture());
  ASSERT_THAT(offer->Wait(kGenerous), Not(IsOk()));
  EXPECT_EQ(offer->state(), OfferState::kPeerFailed);
  EXPECT_EQ(offer->reason(), EndReason::kPeerFailed) << offer->status();
  Completions c = Collect(p.agent(), [](const Completions& a) {
    return !a.transfers.empty() && !a.offers.empty();
  });
  ASSERT_EQ(c.transfers.size(), 1u);
  EXPECT_EQ(c.transfers[0].reason, EndReason::kPeerFailed);
  ASSERT_EQ(c.offers.size(), 1u);
  EXPECT_EQ(c.offers[0].reason, EndReason::kPeerFailed);
  // Later posts and notifications are refused with the same reason.
  absl::Status why;
  EXPECT_EQ(PostReason(p.agent(), p.Read(into, {4, 5, 6, 7}), &why), EndReason::kPeerFailed) << why;
  EXPECT_EQ(ReasonOf(p.agent().SendNotification(p.name(), "late")), EndReason::kPeerFailed);
  auto info = p.agent().GetPeer(p.name());
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->state, PeerState::kFailed);
}

TEST(EndReasonProcessTest, ExitedPeerIsPeerDisconnected) {
  ProcessPeer p;
  ASSERT_NO_FATAL_FAILURE(p.Start());
  BlockSet lent = *p.pool().Lease(2);
  auto offer = p.agent().Offer(lent, p.name(), kGenerous);
  ASSERT_THAT(offer, IsOk());
  lent = BlockSet();
  p.child().CloseStdin();  // the child destroys its agent (goodbye) and exits
  EXPECT_EQ(p.child().Wait(), 0);
  ASSERT_THAT(offer->Wait(kGenerous), Not(IsOk()));
  EXPECT_EQ(offer->reason(), EndReason::kPeerDisconnected) << offer->status();
  BlockSet into = *p.pool().Lease(1);
  absl::Status why;
  EXPECT_EQ(PostReason(p.agent(), p.Read(into, {0}), &why), EndReason::kPeerDisconnected) << why;
}

TEST(EndReasonProcessTest, CancelledTransferIsCancelledAndItsPeerFailed) {
  ProcessPeer p;
  ASSERT_NO_FATAL_FAILURE(p.Start());
  BlockSet a = *p.pool().Lease(2);
  BlockSet b = *p.pool().Lease(2);
  ASSERT_NO_FATAL_FAILURE(p.Stop());
  auto cancelled = p.agent().PostTransfer(p.Read(a, {0, 1}));
  auto other = p.agent().PostTransfer(p.Read(b, {2, 3}));
  ASSERT_THAT(cancelled, IsOk());
  ASSERT_THAT(other, IsOk());
  // A stopped peer cannot drain it: the Cancel fails the peer to fence it.
  EXPECT_THAT(cancelled->Cancel(absl::Milliseconds(10)),
              StatusIs(absl::StatusCode::kCancelled, ""));
  EXPECT_EQ(cancelled->state(), TransferState::kCancelled);
  EXPECT_EQ(cancelled->reason(), EndReason::kCancelled);
  EXPECT_THAT(other->Wait(kGenerous), Not(IsOk()));
  EXPECT_EQ(other->reason(), EndReason::kPeerFailed) << other->status();
  ::kill(p.child().pid(), SIGCONT);
}

}  // namespace
}  // namespace kvferry::test
