// Agent::SendNotification: notifications on their own. Bounds and errors
// with two agents in this process (shared memory and TCP); the order with
// the sender's transfers to the peer with the peer in another process, held
// stopped so that a transfer is surely in flight when the notification is
// sent.
#include <signal.h>

#include <fstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "kvferry/end_reason.h"
#include "tests/child_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

constexpr absl::Duration kGenerous = absl::Seconds(60);

// Notifications `agent` received until `count` arrived or the time passed.
std::vector<Notification> Receive(Agent& agent, size_t count) {
  std::vector<Notification> all;
  WaitFor([&] {
    for (Notification& n : agent.WaitForNotifications(absl::Milliseconds(50))) {
      all.push_back(std::move(n));
    }
    return all.size() >= count;
  }, kGenerous);
  return all;
}

class SendNotificationTest : public AgentPairTest {
 protected:
  void MakePools() override {
    decode_pool_ = *decode_->CreatePool("kv", Layout(16));
    prefill_pool_ = *prefill_->CreatePool("kv", Layout(16));
  }
};

TEST_P(SendNotificationTest, DeliveredInOrderWithTheSendersName) {
  constexpr int kCount = 200;
  for (int i = 0; i < kCount; ++i) {
    ASSERT_THAT(prefill_->SendNotification("decode", absl::StrCat("note ", i)), IsOk());
  }
  std::vector<Notification> got = Receive(*decode_, kCount);
  ASSERT_EQ(got.size(), static_cast<size_t>(kCount));
  for (int i = 0; i < kCount; ++i) {
    EXPECT_EQ(got[i].peer, "prefill");
    EXPECT_EQ(got[i].payload, absl::StrCat("note ", i));
  }
  // Either way, and through the completion batch as well.
  ASSERT_THAT(decode_->SendNotification("prefill", "back"), IsOk());
  ASSERT_TRUE(WaitFor([&] {
    Completions c = prefill_->PollCompletions();
    return c.notifications.size() == 1 && c.notifications[0].payload == "back" &&
           c.notifications[0].peer == "decode";
  }));
}

TEST_P(SendNotificationTest, BoundsAndUnknownPeersAreRefused) {
  const std::string biggest(64 << 10, 'b');
  ASSERT_THAT(prefill_->SendNotification("decode", biggest), IsOk());
  EXPECT_THAT(prefill_->SendNotification("decode", biggest + "x"),
              StatusIs(absl::StatusCode::kInvalidArgument, "65537 bytes exceeds 65536"));
  EXPECT_THAT(prefill_->SendNotification("decode", ""),
              StatusIs(absl::StatusCode::kInvalidArgument, "empty"));
  EXPECT_THAT(prefill_->SendNotification("nobody", "x"),
              StatusIs(absl::StatusCode::kNotFound, "unknown peer 'nobody'"));
  std::vector<Notification> got = Receive(*decode_, 1);
  ASSERT_EQ(got.size(), 1u);  // the refused ones sent nothing
  EXPECT_EQ(got[0].payload, biggest);
  EXPECT_TRUE(decode_->WaitForNotifications(absl::Milliseconds(200)).empty());
  // A closed peer: refused with the reason.
  ASSERT_THAT(prefill_->Disconnect("decode"), IsOk());
  absl::Status closed = prefill_->SendNotification("decode", "x");
  EXPECT_THAT(closed, StatusIs(absl::StatusCode::kFailedPrecondition, "disconnected"));
  EXPECT_EQ(ReasonOf(closed), EndReason::kPeerDisconnected);
}

INSTANTIATE_TEST_SUITE_P(Transports, SendNotificationTest, ::testing::Values(kShm, kTcp),
                         TransportName);

// --- The peer in another process ----------------------------------------

// The child ("decode", TCP) prints every notification it receives, in
// order: "NOTE <sender> <payload>".
class EchoPeer {
 public:
  EchoPeer()
      : child_({KVFERRY_TEST_PEER, "--role=decode", "--tls=tcp", "--echo_notes=1",
                absl::StrCat("--peer_timeout=", absl::ToInt64Seconds(kPeerTimeout))}) {}
  void Start() {
    ASSERT_TRUE(child_.started());
    const uint16_t port = ParsePort(child_.ReadUntil("PORT"));
    ASSERT_NE(port, 0);
    AgentOptions o = TestAgentOptions("prefill", kTcp);
    o.peer_timeout = kPeerTimeout;
    auto agent = Agent::Create(o);
    ASSERT_THAT(agent, IsOk());
    agent_ = *std::move(agent);
    pool_ = *agent_->CreatePool("kv", Layout(32));
    auto peer = agent_->Connect("127.0.0.1", port);
    ASSERT_THAT(peer, IsOk());
    name_ = peer->name;
  }
  void Stop() {
    ASSERT_EQ(::kill(child_.pid(), SIGSTOP), 0);
    ASSERT_TRUE(WaitFor([&] { return IsStopped(child_.pid()); }));
  }
  void Continue() { ::kill(child_.pid(), SIGCONT); }
  // A READ of the child's blocks whose notification goes to the child: over
  // TCP it cannot complete while the child is stopped.
  absl::StatusOr<Transfer> Read(const BlockSet& into, uint32_t first, std::string note) {
    std::vector<uint32_t> remote;
    for (uint32_t i = 0; i < into.size(); ++i) remote.push_back(first + i);
    return agent_->PostTransfer({.op = TransferOp::kRead, .peer = name_, .local = &into,
                                 .remote_blocks = remote, .notification = std::move(note)});
  }
  // The payloads of the next `count` NOTE lines.
  std::vector<std::string> Notes(size_t count) {
    std::vector<std::string> notes;
    while (notes.size() < count) {
      auto line = child_.ReadUntil("NOTE ", kGenerous);
      if (!line || line->rfind("NOTE ", 0) != 0) break;
      const size_t space = line->find(' ', 5);
      EXPECT_EQ(line->substr(5, space - 5), "prefill");
      notes.push_back(space == std::string::npos ? "" : line->substr(space + 1));
    }
    return notes;
  }
  ChildProcess& child() { return child_; }
  Agent& agent() { return *agent_; }
  KvPool& pool() { return *pool_; }
  const std::string& name() const { return name_; }

 private:
  ChildProcess child_;
  std::unique_ptr<Agent> agent_;
  KvPool* pool_ = nullptr;
  std::string name_;
};

size_t IndexOf(const std::vector<std::string>& v, const std::string& s) {
  return static_cast<size_t>(std::find(v.begin(), v.end(), s) - v.begin());
}

TEST(SendNotificationProcessTest, ANotificationArrivesAfterTheTransfersPostedBeforeIt) {
  EchoPeer p;
  ASSERT_NO_FATAL_FAILURE(p.Start());
  BlockSet a = *p.pool().Lease(4);
  BlockSet b = *p.pool().Lease(4);
  ASSERT_NO_FATAL_FAILURE(p.Stop());
  auto t1 = p.Read(a, 0, "T1");
  ASSERT_THAT(t1, IsOk());
  ASSERT_THAT(p.agent().SendNotification(p.name(), "N1"), IsOk());  // never blocks
  auto t2 = p.Read(b, 8, "T2");
  ASSERT_THAT(t2, IsOk());
  ASSERT_THAT(p.agent().SendNotification(p.name(), "N2"), IsOk());
  ASSERT_THAT(p.agent().SendNotification(p.name(), "N3"), IsOk());
  // The peer is stopped: both transfers are surely still in flight, so N1
  // had to wait for T1 (and N2, N3 for T1 and T2).
  EXPECT_EQ(t1->state(), TransferState::kInFlight);
  EXPECT_EQ(t2->state(), TransferState::kInFlight);
  p.Continue();
  ASSERT_THAT(t1->Wait(kGenerous), IsOk());
  ASSERT_THAT(t2->Wait(kGenerous), IsOk());
  const std::vector<std::string> notes = p.Notes(5);
  ASSERT_EQ(notes.size(), 5u);
  EXPECT_LT(IndexOf(notes, "T1"), IndexOf(notes, "N1"));
  EXPECT_LT(IndexOf(notes, "T1"), IndexOf(notes, "N2"));
  EXPECT_LT(IndexOf(notes, "T2"), IndexOf(notes, "N2"));
  EXPECT_LT(IndexOf(notes, "N1"), IndexOf(notes, "N2"));
  EXPECT_LT(IndexOf(notes, "N2"), IndexOf(notes, "N3"));
  EXPECT_EQ(notes.back(), "N3");

  // With nothing in flight it goes at once, after what came before.
  ASSERT_THAT(p.agent().SendNotification(p.name(), "N4"), IsOk());
  EXPECT_EQ(p.Notes(1), std::vector<std::string>{"N4"});

  // A failed peer: refused, with the reason.
  p.child().Kill(SIGKILL);
  p.child().Wait();
  ASSERT_TRUE(WaitFor([&] {
    auto info = p.agent().GetPeer(p.name());
    return info.ok() && info->state == PeerState::kFailed;
  }));
  absl::Status failed = p.agent().SendNotification(p.name(), "late");
  EXPECT_THAT(failed, StatusIs(absl::StatusCode::kUnavailable, "failed"));
  EXPECT_EQ(ReasonOf(failed), EndReason::kPeerFailed);
}

TEST(SendNotificationProcessTest, DisconnectSendsWaitingNotificationsBeforeTheGoodbye) {
  EchoPeer p;
  ASSERT_NO_FATAL_FAILURE(p.Start());
  BlockSet a = *p.pool().Lease(4);
  ASSERT_NO_FATAL_FAILURE(p.Stop());
  auto t = p.Read(a, 0, "T");
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(p.agent().SendNotification(p.name(), "N"), IsOk());
  absl::Status disconnected;
  std::thread disconnect([&] { disconnected = p.agent().Disconnect(p.name()); });
  // Disconnect waits for the transfer (and the notifications behind it).
  // It has started once a notification is refused as "being disconnected";
  // the probes accepted before that are sent too, after N.
  int probes = 0;
  ASSERT_TRUE(WaitFor([&] {
    absl::Status s = p.agent().SendNotification(p.name(), "P");
    if (s.ok()) ++probes;
    return absl::IsFailedPrecondition(s) &&
           absl::StrContains(s.message(), "being disconnected");
  }));
  p.Continue();
  disconnect.join();
  EXPECT_THAT(disconnected, IsOk());
  EXPECT_THAT(t->Wait(kGenerous), IsOk());
  std::vector<std::string> want = {"T", "N"};
  want.insert(want.end(), probes, "P");
  EXPECT_EQ(p.Notes(want.size()), want);
}

}  // namespace
}  // namespace kvferry::test
