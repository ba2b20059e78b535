// A peer process that vanishes (SIGKILL, or SIGSTOP then SIGKILL) is ended
// by the agent that survives it: the peer's state becomes failed, its
// transfers end with an error, this agent's offers to it end peer-failed and
// their blocks come back, and the agent's live counts return to what they
// were before the peer came. Over shared memory and TCP, with the peer
// connecting to this agent's listener (as a decode worker connects to a
// prefill worker) and with this agent connecting to the peer's.
//
// The peer is kvferry_test_peer --role=taker, driven by stdin commands. In
// the kill cases this agent's peer_timeout is longer than any deadline here,
// so only the end of the control connection can end the peer in time
// (AgentOptions::peer_timeout: "A killed process is detected at once");
// the liveness cases use the short kLivenessPeerTimeout and assert the
// missed-ping path within a few peer_timeouts.
#include <signal.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "kvferry/agent.h"
#include "tests/child_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

using ::testing::Not;

constexpr const char* kPeerBinary = KVFERRY_TEST_PEER;
constexpr char kPeerName[] = "vanisher";
// How long a test waits for what it asserts (not how fast it must happen).
constexpr absl::Duration kGenerous = absl::Seconds(60);
// The survivor's peer_timeout in the kill cases: longer than kGenerous, so
// that neither missed pings nor UCX's keepalive (peer_timeout / 4) can end
// the peer within the deadline; only the control connection's end can.
constexpr absl::Duration kLongPeerTimeout = absl::Seconds(300);

// Who connects: the peer to this agent's listener, or this agent to the
// peer's.
enum class Direction { kPeerConnects, kWeConnect };

struct Param {
  Transport transport;
  Direction direction;
};
void PrintTo(const Param& p, std::ostream* os) {
  *os << p.transport.name << (p.direction == Direction::kPeerConnects ? "_PeerConnects"
                                                                      : "_WeConnect");
}
std::string Name(const Param& p) {
  return absl::StrCat(p.transport.name,
                      p.direction == Direction::kPeerConnects ? "_PeerConnects" : "_WeConnect");
}
std::string ParamName(const ::testing::TestParamInfo<Param>& info) { return Name(info.param); }

// How the peer's pool is reached from here.
enum class PeerPool {
  kDefault,  // UCX-allocated: shm-direct on shared memory, tcp on tcp
  kAmEmulated,  // anonymous memory, no kernel copy: a READ needs the peer to answer
};

class PeerVanishTest : public ::testing::TestWithParam<Param> {
 protected:
  // Starts the survivor (`peer_timeout`) with a 32-block pool and the peer
  // process, and connects them as the parameter says.
  void Start(absl::Duration peer_timeout = kLongPeerTimeout,
             PeerPool peer_pool = PeerPool::kDefault,
             const std::function<void(AgentOptions&)>& adjust = nullptr) {
    AgentOptions o = TestAgentOptions("survivor", GetParam().transport);
    o.peer_timeout = peer_timeout;
    if (adjust) adjust(o);
    auto agent = Agent::Create(o);
    ASSERT_THAT(agent, IsOk());
    agent_ = *std::move(agent);
    auto pool = agent_->CreatePool("kv", Layout(32));
    ASSERT_THAT(pool, IsOk());
    pool_ = *pool;

    std::vector<std::string> args = {
        kPeerBinary, "--role=taker", absl::StrCat("--name=", kPeerName),
        absl::StrCat("--tls=", GetParam().transport.tls),
        // The peer never has to detect anything here.
        absl::StrCat("--peer_timeout=", absl::ToInt64Seconds(kPeerTimeout))};
    if (peer_pool == PeerPool::kAmEmulated) {
      args.push_back("--pool_memory=anon");
      args.push_back("--kernel_copy=0");
    }
    child_ = std::make_unique<ChildProcess>(args);
    ASSERT_TRUE(child_->started());
    if (GetParam().direction == Direction::kPeerConnects) {
      auto port = agent_->Listen("127.0.0.1", 0);
      ASSERT_THAT(port, IsOk());
      baseline_ = agent_->GetStats();
      ASSERT_TRUE(child_->WriteLine(absl::StrCat("CONNECT ", *port)));
      ASSERT_EQ(child_->ReadUntil("CONNECT").value_or("timeout"),
                absl::StrCat("CONNECTED survivor"));
      auto peer = agent_->WaitForPeer(kPeerName, kGenerous);
      ASSERT_THAT(peer, IsOk());
      peer_ = *std::move(peer);
    } else {
      ASSERT_TRUE(child_->WriteLine("LISTEN"));
      std::optional<std::string> line = child_->ReadUntil("LISTENING");
      ASSERT_TRUE(line.has_value() && line->rfind("LISTENING ", 0) == 0)
          << line.value_or("timeout");
      uint32_t port = 0;
      ASSERT_TRUE(absl::SimpleAtoi(line->substr(10), &port)) << *line;
      baseline_ = agent_->GetStats();
      auto peer = agent_->Connect("127.0.0.1", static_cast<uint16_t>(port), kGenerous);
      ASSERT_THAT(peer, IsOk());
      peer_ = *std::move(peer);
    }
    ASSERT_EQ(peer_.state, PeerState::kConnected);
  }

  void Stop() {
    ASSERT_EQ(::kill(child_->pid(), SIGSTOP), 0);
    ASSERT_TRUE(WaitFor([&] { return IsStopped(child_->pid()); }, kGenerous));
  }
  // SIGKILL, reaped; the time of the kill.
  absl::Time KillPeer() {
    const absl::Time at = absl::Now();
    child_->Kill(SIGKILL);
    child_->Wait();
    return at;
  }

  // Waits for the survivor to end the peer and checks how: failed, with
  // kUnavailable; posts and notifications to it refused. Returns how long
  // after `since` the end was seen.
  absl::Duration ExpectPeerEnded(absl::Time since, absl::Duration within = kGenerous) {
    absl::StatusOr<PeerInfo> info;
    absl::Time seen = absl::InfiniteFuture();
    const bool ended = WaitFor(
        [&] {
          info = agent_->GetPeer(kPeerName);
          if (!info.ok() || info->state == PeerState::kConnected ||
              info->state == PeerState::kHandshaking) {
            return false;
          }
          seen = absl::Now();
          return true;
        },
        within);
    EXPECT_TRUE(ended) << "peer still "
                       << (info.ok() ? static_cast<int>(info->state) : -1) << " after "
                       << within << "; " << info.status();
    if (!ended) return absl::InfiniteDuration();
    EXPECT_EQ(info->state, PeerState::kFailed) << info->status;
    EXPECT_TRUE(absl::IsUnavailable(info->status)) << info->status;
    EXPECT_THAT(agent_->SendNotification(kPeerName, "late"), Not(IsOk()));
    BlockSet into = *pool_->Lease(1);
    EXPECT_THAT(agent_->PostTransfer({.op = TransferOp::kRead, .peer = kPeerName, .local = &into,
                                      .remote_blocks = {0}}),
                Not(IsOk()));
    const absl::Duration took = seen - since;
    std::printf("%s: peer ended %s after the kill or stop (%s)\n", Name(GetParam()).c_str(),
                absl::FormatDuration(took).c_str(), info->status.ToString().c_str());
    return took;
  }

  // Everything the peer held here came back.
  void ExpectBaseline() {
    EXPECT_TRUE(WaitFor([&] { return pool_->free_blocks() == 32u; }, kGenerous))
        << pool_->free_blocks();
    EXPECT_TRUE(WaitFor([&] { return agent_->GetStats() == baseline_; }, kGenerous))
        << agent_->GetStats().ToString() << "\nbaseline " << baseline_.ToString() << "\n"
        << agent_->ledger().Report();
  }

  // Members in reverse: the agent goes before the process.
  std::unique_ptr<ChildProcess> child_;
  std::unique_ptr<Agent> agent_;
  KvPool* pool_ = nullptr;
  Stats baseline_;
  PeerInfo peer_;
};

// (a) Killed while nothing is going on between the two.
TEST_P(PeerVanishTest, KilledWhileIdle) {
  ASSERT_NO_FATAL_FAILURE(Start());
  ExpectPeerEnded(KillPeer());
  ExpectBaseline();
}

// (b) Killed while this agent has a READ from its pool in flight: the peer
// is stopped first so that the READ cannot complete (over tcp and the
// emulated shared-memory path the target answers reads), then killed.
TEST_P(PeerVanishTest, KilledWithAReadInFlight) {
  ASSERT_NO_FATAL_FAILURE(Start(kLongPeerTimeout, PeerPool::kAmEmulated));
  EXPECT_EQ(peer_.data_path, std::string(GetParam().transport.tls) == "tcp"
                                 ? kDataPathTcp
                                 : kDataPathAmEmulated);
  ASSERT_NO_FATAL_FAILURE(Stop());
  BlockSet into = *pool_->Lease(16);
  std::vector<uint32_t> remote;
  for (uint32_t i = 0; i < 16; ++i) remote.push_back(31 - i);
  auto read = agent_->PostTransfer(
      {.op = TransferOp::kRead, .peer = kPeerName, .local = &into, .remote_blocks = remote});
  ASSERT_THAT(read, IsOk());
  into.Reset();  // the transfer holds its own reference to the blocks
  EXPECT_THAT(read->Wait(absl::Milliseconds(50)),
              StatusIs(absl::StatusCode::kDeadlineExceeded, ""));
  ASSERT_EQ(read->state(), TransferState::kInFlight);
  const absl::Time killed = KillPeer();
  EXPECT_THAT(read->Wait(kGenerous), StatusIs(absl::StatusCode::kUnavailable, ""));
  EXPECT_EQ(read->state(), TransferState::kFailed);
  EXPECT_EQ(read->reason(), EndReason::kPeerFailed) << read->status();
  ExpectPeerEnded(killed);
  *read = Transfer();
  ExpectBaseline();
}

// (c) Killed while it holds an offer of this agent's blocks: the offer was
// made to it once it connected (bound to its connection), its ticket sent to
// it, and nothing was posted on it.
TEST_P(PeerVanishTest, KilledHoldingAnOffer) {
  ASSERT_NO_FATAL_FAILURE(Start());
  BlockSet lent = *pool_->Lease(8);
  auto offer = agent_->Offer(lent, kPeerName, absl::Seconds(600));
  ASSERT_THAT(offer, IsOk());
  lent.Reset();
  EXPECT_EQ(pool_->free_blocks(), 24u);
  // The ticket goes to the peer as an engine would send it (a notification),
  // and the peer answers a command while connected.
  ASSERT_THAT(agent_->SendNotification(kPeerName, offer->ticket()), IsOk());
  ASSERT_TRUE(child_->WriteLine("CONNECTED? survivor"));
  ASSERT_EQ(child_->ReadUntil("CONNECTED?").value_or("timeout"), "CONNECTED? yes");
  const absl::Time killed = KillPeer();
  EXPECT_THAT(offer->Wait(kGenerous), StatusIs(absl::StatusCode::kUnavailable, ""));
  EXPECT_EQ(offer->state(), OfferState::kPeerFailed);
  EXPECT_EQ(offer->reason(), EndReason::kPeerFailed) << offer->status();
  ExpectPeerEnded(killed);
  EXPECT_EQ(pool_->free_blocks(), 32u);
  *offer = kvferry::Offer();
  ExpectBaseline();
}

// (d) Killed while this agent's notifications to it wait here: the peer
// never polls its notifications, so it stops reading this agent at its
// bound, the sockets fill, and SendNotification queues here until its own
// bound (kResourceExhausted).
TEST_P(PeerVanishTest, KilledWithNotificationsQueuedToIt) {
  ASSERT_NO_FATAL_FAILURE(Start());
  const std::string payload(4096, 'n');
  int sent = 0;
  absl::Status last;
  // Never blocks: each call queues here or refuses at once.
  const absl::Time deadline = absl::Now() + kGenerous;
  while ((last = agent_->SendNotification(kPeerName, payload)).ok() && absl::Now() < deadline) {
    ++sent;
  }
  ASSERT_TRUE(absl::IsResourceExhausted(last)) << last << " after " << sent << " sent";
  ASSERT_EQ(agent_->GetPeer(kPeerName)->state, PeerState::kConnected);
  const absl::Time killed = KillPeer();
  ExpectPeerEnded(killed);
  std::printf("%d notifications of %zu bytes were accepted before the queue to the peer was full\n",
              sent, payload.size());
  ExpectBaseline();
}

// (e) Stopped (SIGSTOP), then killed while stopped; an offer and a READ
// outstanding.
TEST_P(PeerVanishTest, StoppedThenKilled) {
  ASSERT_NO_FATAL_FAILURE(Start());
  BlockSet lent = *pool_->Lease(4);
  auto offer = agent_->Offer(lent, kPeerName, absl::Seconds(600));
  ASSERT_THAT(offer, IsOk());
  lent.Reset();
  ASSERT_NO_FATAL_FAILURE(Stop());
  // Pings to the stopped peer pile up unread meanwhile.
  ASSERT_THAT(agent_->SendNotification(kPeerName, "to a stopped peer"), IsOk());
  const absl::Time killed = KillPeer();
  ExpectPeerEnded(killed);
  EXPECT_THAT(offer->Wait(kGenerous), StatusIs(absl::StatusCode::kUnavailable, ""));
  EXPECT_EQ(offer->state(), OfferState::kPeerFailed);
  *offer = kvferry::Offer();
  ExpectBaseline();
}

// (f) Killed while this agent had stopped reading it: the application has
// not polled the peer's notifications, which reached this agent's bound
// (AgentOptions::max_notifications_per_peer), so the peer's later frames
// wait unread in the socket. Liveness: the peer is still ended within a few
// peer_timeouts (by its data endpoint's failure: the close of a connection
// this agent does not read is acted on only after
// ended_peer_notification_retention, here longer than the test), its offer
// with it, and the notifications this agent had taken in stay pollable, in
// order.
TEST_P(PeerVanishTest, KilledWhileThisAgentDoesNotReadIt) {
  constexpr int kBound = 4;
  ASSERT_NO_FATAL_FAILURE(Start(kLivenessPeerTimeout, PeerPool::kDefault, [](AgentOptions& o) {
    o.max_notifications_per_peer = kBound;
    o.ended_peer_notification_retention = absl::Seconds(600);
  }));
  BlockSet lent = *pool_->Lease(8);
  auto offer = agent_->Offer(lent, kPeerName, absl::Seconds(600));
  ASSERT_THAT(offer, IsOk());
  lent.Reset();
  ASSERT_TRUE(child_->WriteLine("NOTE survivor 64"));
  ASSERT_EQ(child_->ReadUntil("NOTED").value_or("timeout"), "NOTED 64 OK");
  ASSERT_TRUE(WaitFor([&] { return agent_->GetStats().queues.peers_paused == 1; }, kGenerous))
      << agent_->GetStats().ToString();
  EXPECT_EQ(agent_->GetStats().queues.notifications_queued, kBound);
  const absl::Time killed = KillPeer();
  ExpectPeerEnded(killed, 4 * kLivenessPeerTimeout);
  EXPECT_THAT(offer->Wait(kGenerous), StatusIs(absl::StatusCode::kUnavailable, ""));
  EXPECT_EQ(offer->state(), OfferState::kPeerFailed);
  EXPECT_EQ(offer->reason(), EndReason::kPeerFailed) << offer->status();
  EXPECT_EQ(pool_->free_blocks(), 32u);
  *offer = kvferry::Offer();
  EXPECT_EQ(agent_->GetStats().queues.peers_paused, 0);
  std::vector<Notification> got = agent_->PollNotifications();
  ASSERT_GE(got.size(), static_cast<size_t>(kBound));
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].payload, absl::StrCat("note ", i));
    EXPECT_EQ(got[i].peer, kPeerName);
  }
  std::printf("%s: %zu of the 64 notifications it sent were pollable after its end\n",
              Name(GetParam()).c_str(), got.size());
  EXPECT_EQ(agent_->GetStats().queues.notifications_queued, 0);
  ExpectBaseline();
}

// Liveness: with a short peer_timeout, a peer that is stopped (no close,
// no reset: only its silence) is failed within a few peer_timeouts, and
// its offer and READ end.
TEST_P(PeerVanishTest, StoppedPeerFailsWithinAFewPeerTimeouts) {
  ASSERT_NO_FATAL_FAILURE(Start(kLivenessPeerTimeout, PeerPool::kAmEmulated));
  BlockSet lent = *pool_->Lease(4);
  auto offer = agent_->Offer(lent, kPeerName, absl::Seconds(600));
  ASSERT_THAT(offer, IsOk());
  lent.Reset();
  ASSERT_NO_FATAL_FAILURE(Stop());
  const absl::Time stopped = absl::Now();
  BlockSet into = *pool_->Lease(4);
  auto read = agent_->PostTransfer({.op = TransferOp::kRead, .peer = kPeerName, .local = &into,
                                    .remote_blocks = {0, 1, 2, 3}});
  ASSERT_THAT(read, IsOk());
  into.Reset();
  const absl::Duration took = ExpectPeerEnded(stopped, 4 * kLivenessPeerTimeout);
  EXPECT_GE(took, kLivenessPeerTimeout / 2);  // not ended by anything but silence
  EXPECT_THAT(read->Wait(kGenerous), StatusIs(absl::StatusCode::kUnavailable, ""));
  EXPECT_EQ(read->reason(), EndReason::kPeerFailed) << read->status();
  EXPECT_THAT(offer->Wait(kGenerous), StatusIs(absl::StatusCode::kUnavailable, ""));
  EXPECT_EQ(offer->state(), OfferState::kPeerFailed);
  *read = Transfer();
  *offer = kvferry::Offer();
  ExpectBaseline();
  KillPeer();
}

// Liveness: with a short peer_timeout too, a killed peer is ended within a
// few of them.
TEST_P(PeerVanishTest, KilledPeerEndsWithinAFewPeerTimeouts) {
  ASSERT_NO_FATAL_FAILURE(Start(kLivenessPeerTimeout));
  ExpectPeerEnded(KillPeer(), 3 * kLivenessPeerTimeout);
  ExpectBaseline();
}

INSTANTIATE_TEST_SUITE_P(
    Transports, PeerVanishTest,
    ::testing::Values(Param{kShm, Direction::kPeerConnects}, Param{kShm, Direction::kWeConnect},
                      Param{kTcp, Direction::kPeerConnects}, Param{kTcp, Direction::kWeConnect}),
    ParamName);

}  // namespace
}  // namespace kvferry::test
