// Agent::completion_fd and Agent::PollCompletions (include/kvferry/
// completion.h) with real agents: two in this process over shared memory and
// TCP, and one case with the peer in another process (killed while a
// transfer waits on it). The tests block in ::poll on the fd (generous
// timeouts), never spin on the batch call.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>

#include <atomic>
#include <cerrno>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "kvferry/completion.h"
#include "tests/child_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

constexpr absl::Duration kGenerous = absl::Seconds(60);

// Whether `fd` is readable now (no wait).
bool Readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1 && (p.revents & POLLIN) != 0;
}

// Blocks in ::poll until `fd` is readable or `timeout` passes.
bool WaitReadable(int fd, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return Readable(fd);
    pollfd p{fd, POLLIN, 0};
    int n = ::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
    if (n == 1 && (p.revents & POLLIN) != 0) return true;
    if (n < 0 && errno != EINTR) return false;
  }
}

void Append(Completions* all, Completions batch) {
  for (auto& t : batch.transfers) all->transfers.push_back(std::move(t));
  for (auto& o : batch.offers) all->offers.push_back(std::move(o));
  for (auto& n : batch.notifications) all->notifications.push_back(std::move(n));
  all->dropped += batch.dropped;
}

// Waits on the agent's fd and takes batches until `done(all)` holds or
// `timeout` passes; returns everything taken.
template <typename Done>
Completions Collect(Agent& agent, Done done, absl::Duration timeout = kGenerous) {
  Completions all;
  const absl::Time deadline = absl::Now() + timeout;
  while (!done(all)) {
    if (!WaitReadable(agent.completion_fd(), deadline - absl::Now())) break;
    Completions batch = agent.PollCompletions();
    EXPECT_FALSE(batch.empty()) << "the fd was readable but the batch is empty";
    Append(&all, std::move(batch));
  }
  return all;
}

class CompletionTest : public AgentPairTest {
 protected:
  void MakePools() override {
    decode_pool_ = *decode_->CreatePool("kv", Layout(16));
    prefill_pool_ = *prefill_->CreatePool("kv", Layout(16));
  }
  // Decode reads prefill's `remote` blocks into a lease of as many.
  absl::StatusOr<Transfer> Read(const BlockSet& into, std::vector<uint32_t> remote,
                                std::string note = "") {
    return decode_->PostTransfer({.op = TransferOp::kRead, .peer = "prefill", .local = &into,
                                  .remote_blocks = std::move(remote),
                                  .notification = std::move(note)});
  }
};

TEST_P(CompletionTest, FdWakesWhenATransferEndsAndIsDrainedByTheBatch) {
  const int fd = decode_->completion_fd();
  ASSERT_GE(fd, 0);
  EXPECT_EQ(fd, decode_->completion_fd());  // the same for the agent's life
  EXPECT_NE(fd, prefill_->completion_fd());
  EXPECT_FALSE(Readable(fd));  // nothing ended yet
  EXPECT_TRUE(decode_->PollCompletions().empty());

  BlockSet from = *prefill_pool_->LeaseIds(std::vector<uint32_t>{2, 5});
  FillBlock(from, 0, 7, 2);
  FillBlock(from, 1, 7, 5);
  BlockSet into = *decode_pool_->Lease(2);
  auto t = Read(into, {2, 5});
  ASSERT_THAT(t, IsOk());
  EXPECT_GE(t->id(), 1u);
  EXPECT_EQ(Transfer().id(), 0u);

  ASSERT_TRUE(WaitReadable(fd, kGenerous));
  Completions c = decode_->PollCompletions();
  ASSERT_EQ(c.transfers.size(), 1u);
  EXPECT_EQ(c.transfers[0].id, t->id());
  EXPECT_EQ(c.transfers[0].state, TransferState::kDone);
  EXPECT_THAT(c.transfers[0].status, IsOk());
  EXPECT_TRUE(c.offers.empty());
  EXPECT_EQ(c.dropped, 0u);
  // Recorded once the transfer ended: its handle agrees.
  EXPECT_EQ(t->state(), TransferState::kDone);
  EXPECT_THAT(t->Wait(kGenerous), IsOk());
  EXPECT_EQ(BlockChecksum(into, 1), ExpectedChecksum(Layout(16), 7, 5));

  EXPECT_FALSE(Readable(fd));  // drained
  EXPECT_TRUE(decode_->PollCompletions().empty());
  // The other agent posted nothing: its fd stays quiet.
  EXPECT_FALSE(Readable(prefill_->completion_fd()));

  // Readable again for the next end, and ids grow.
  auto t2 = Read(into, {3, 4});
  ASSERT_THAT(t2, IsOk());
  EXPECT_GT(t2->id(), t->id());
  c = Collect(*decode_, [](const Completions& a) { return !a.transfers.empty(); });
  ASSERT_EQ(c.transfers.size(), 1u);
  EXPECT_EQ(c.transfers[0].id, t2->id());
  EXPECT_FALSE(Readable(fd));
}

TEST_P(CompletionTest, EachEndedTransferAppearsOnceWithItsHandlesStatus) {
  // Each transfer reads into blocks of its own.
  std::vector<BlockSet> into;
  std::map<uint64_t, Transfer> handles;
  for (uint32_t i = 0; i < 8; ++i) {
    into.push_back(*decode_pool_->Lease(1));
    auto t = Read(into.back(), {i});
    ASSERT_THAT(t, IsOk());
    // Dropped handles (odd i) are recorded too.
    if (i % 2 == 0) handles.emplace(t->id(), *std::move(t));
  }
  into.push_back(*decode_pool_->Lease(1));
  auto cancelled = Read(into.back(), {9});
  ASSERT_THAT(cancelled, IsOk());
  const absl::Status cancel_status = cancelled->Cancel();
  const uint64_t cancelled_id = cancelled->id();
  const TransferState cancelled_state = cancelled->state();

  Completions c = Collect(*decode_, [](const Completions& a) { return a.transfers.size() >= 9; });
  ASSERT_EQ(c.transfers.size(), 9u);
  std::map<uint64_t, int> seen;
  for (const TransferCompletion& tc : c.transfers) {
    ++seen[tc.id];
    if (tc.id == cancelled_id) {
      EXPECT_EQ(tc.state, cancelled_state);
      EXPECT_EQ(tc.status, cancel_status);
    } else if (auto it = handles.find(tc.id); it != handles.end()) {
      EXPECT_EQ(tc.state, it->second.state());
      EXPECT_EQ(tc.status, it->second.status());
      EXPECT_EQ(tc.state, TransferState::kDone) << tc.status;
    } else {
      EXPECT_EQ(tc.state, TransferState::kDone) << tc.status;
    }
  }
  EXPECT_EQ(seen.size(), 9u);
  for (const auto& [id, n] : seen) EXPECT_EQ(n, 1) << "transfer " << id;
  EXPECT_FALSE(Readable(decode_->completion_fd()));
  EXPECT_TRUE(decode_->PollCompletions().empty());
}

TEST_P(CompletionTest, OfferEndsAppearOnTheOfferingAgent) {
  BlockSet a = *prefill_pool_->LeaseIds(std::vector<uint32_t>{1});
  BlockSet b = *prefill_pool_->LeaseIds(std::vector<uint32_t>{2});
  BlockSet e = *prefill_pool_->LeaseIds(std::vector<uint32_t>{3});
  auto consumed = prefill_->Offer(a, "decode", absl::Seconds(60));
  auto revoked = prefill_->Offer(b, "decode", absl::Seconds(60));
  auto expired = prefill_->Offer(e, "decode", absl::Milliseconds(200));
  ASSERT_THAT(consumed, IsOk());
  ASSERT_THAT(revoked, IsOk());
  ASSERT_THAT(expired, IsOk());
  a = BlockSet();
  b = BlockSet();
  e = BlockSet();

  BlockSet into = *decode_pool_->Lease(1);
  auto t = decode_->PostTransfer(
      {.op = TransferOp::kRead, .local = &into, .offer_ticket = consumed->ticket()});
  ASSERT_THAT(t, IsOk());
  EXPECT_THAT(revoked->Revoke(), StatusIs(absl::StatusCode::kCancelled, "revoked"));

  Completions c = Collect(*prefill_, [](const Completions& all) { return all.offers.size() >= 3; });
  ASSERT_EQ(c.offers.size(), 3u);
  std::map<uint64_t, OfferCompletion> by_id;
  for (OfferCompletion& o : c.offers) by_id.emplace(o.id, std::move(o));
  ASSERT_EQ(by_id.size(), 3u);
  EXPECT_EQ(by_id[consumed->id()].state, OfferState::kConsumed);
  EXPECT_THAT(by_id[consumed->id()].status, IsOk());
  EXPECT_EQ(by_id[revoked->id()].state, OfferState::kRevoked);
  EXPECT_EQ(by_id[revoked->id()].status, revoked->status());
  EXPECT_EQ(by_id[expired->id()].state, OfferState::kExpired);
  EXPECT_EQ(by_id[expired->id()].status, expired->status());
  EXPECT_TRUE(c.transfers.empty());  // prefill posted none
  EXPECT_FALSE(Readable(prefill_->completion_fd()));

  // The taking side sees its transfer on the ticket.
  Completions d = Collect(*decode_, [](const Completions& all) { return !all.transfers.empty(); });
  ASSERT_EQ(d.transfers.size(), 1u);
  EXPECT_EQ(d.transfers[0].id, t->id());
  EXPECT_EQ(d.transfers[0].state, TransferState::kDone);
}

TEST_P(CompletionTest, NotificationsWakeTheFdAndAreDeliveredOnce) {
  const int fd = prefill_->completion_fd();
  BlockSet into = *decode_pool_->Lease(1);
  auto t = Read(into, {4}, "first");
  ASSERT_THAT(t, IsOk());
  // Prefill (the peer of the READ) hears the notification.
  Completions c =
      Collect(*prefill_, [](const Completions& a) { return !a.notifications.empty(); });
  ASSERT_EQ(c.notifications.size(), 1u);
  EXPECT_EQ(c.notifications[0].peer, "decode");
  EXPECT_EQ(c.notifications[0].payload, "first");
  EXPECT_TRUE(prefill_->PollNotifications().empty());  // not delivered twice
  EXPECT_FALSE(Readable(fd));

  // Taken by PollNotifications instead: the fd goes quiet with it.
  auto t2 = Read(into, {5}, "second");
  ASSERT_THAT(t2, IsOk());
  ASSERT_TRUE(WaitReadable(fd, kGenerous));
  std::vector<Notification> notes = prefill_->WaitForNotifications(kGenerous);
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_EQ(notes[0].payload, "second");
  EXPECT_FALSE(Readable(fd));
  EXPECT_TRUE(prefill_->PollCompletions().empty());
}

TEST_P(CompletionTest, AFullQueueDropsAndCounts) {
  AgentOptions o = Options("small");
  o.max_queued_completions = 2;
  auto small = Agent::Create(o);
  ASSERT_THAT(small, IsOk());
  KvPool* pool = *(*small)->CreatePool("kv", Layout(16));
  ASSERT_THAT((*small)->Connect("127.0.0.1", port_), IsOk());
  BlockSet into = *pool->Lease(1);
  std::vector<uint64_t> ids;
  for (uint32_t i = 0; i < 5; ++i) {
    auto t = (*small)->PostTransfer(
        {.op = TransferOp::kRead, .peer = "decode", .local = &into, .remote_blocks = {i}});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(kGenerous), IsOk());
    ids.push_back(t->id());
  }
  const int fd = (*small)->completion_fd();
  // Each end was recorded before its Wait returned: all five are accounted.
  ASSERT_TRUE(Readable(fd));
  Completions c = (*small)->PollCompletions();
  ASSERT_EQ(c.transfers.size(), 2u);
  EXPECT_EQ(c.transfers[0].id, ids[0]);
  EXPECT_EQ(c.transfers[1].id, ids[1]);
  EXPECT_EQ(c.dropped, 3u);
  EXPECT_FALSE(Readable(fd));
  // Room again after the poll; the count restarts.
  auto t = (*small)->PostTransfer(
      {.op = TransferOp::kRead, .peer = "decode", .local = &into, .remote_blocks = {9}});
  ASSERT_THAT(t, IsOk());
  c = Collect(**small, [](const Completions& a) { return !a.transfers.empty(); });
  ASSERT_EQ(c.transfers.size(), 1u);
  EXPECT_EQ(c.transfers[0].id, t->id());
  EXPECT_EQ(c.dropped, 0u);

  AgentOptions bad = Options("zero");
  bad.max_queued_completions = 0;
  EXPECT_THAT(Agent::Create(bad),
              StatusIs(absl::StatusCode::kInvalidArgument, "max_queued_completions = 0"));
}

TEST_P(CompletionTest, ManyThreadsPostWhileOnePolls) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 25;
  std::atomic<int> posted{0};
  std::mutex ids_mu;
  std::vector<uint64_t> posted_ids;
  std::vector<std::thread> posters;
  for (int i = 0; i < kThreads; ++i) {
    posters.emplace_back([&, i] {
      BlockSet into = *decode_pool_->Lease(1);
      for (int j = 0; j < kPerThread; ++j) {
        auto t = Read(into, {static_cast<uint32_t>((i * kPerThread + j) % 16)});
        EXPECT_THAT(t, IsOk());
        if (!t.ok()) return;
        {
          std::lock_guard<std::mutex> l(ids_mu);
          posted_ids.push_back(t->id());
        }
        ++posted;
        EXPECT_THAT(t->Wait(kGenerous), IsOk());
      }
    });
  }
  Completions c = Collect(*decode_, [&](const Completions& a) {
    return a.transfers.size() >= static_cast<size_t>(kThreads * kPerThread);
  });
  for (std::thread& t : posters) t.join();
  ASSERT_EQ(posted.load(), kThreads * kPerThread);
  ASSERT_EQ(c.transfers.size(), static_cast<size_t>(kThreads * kPerThread));
  std::map<uint64_t, int> seen;
  for (const TransferCompletion& tc : c.transfers) {
    ++seen[tc.id];
    EXPECT_EQ(tc.state, TransferState::kDone) << tc.status;
  }
  for (uint64_t id : posted_ids) EXPECT_EQ(seen[id], 1) << "transfer " << id;
  EXPECT_EQ(seen.size(), posted_ids.size());
  EXPECT_EQ(c.dropped, 0u);
  EXPECT_FALSE(Readable(decode_->completion_fd()));
}

TEST_P(CompletionTest, DestroyingTheAgentClosesTheFd) {
  const int fd = prefill_->completion_fd();
  char link[64] = {};
  std::string path = absl::StrCat("/proc/self/fd/", fd);
  ASSERT_GT(::readlink(path.c_str(), link, sizeof(link) - 1), 0);
  EXPECT_STREQ(link, "anon_inode:[eventfd]");
  EXPECT_NE(::fcntl(fd, F_GETFD) & FD_CLOEXEC, 0);
  EXPECT_NE(::fcntl(fd, F_GETFL) & O_NONBLOCK, 0);
  prefill_.reset();
  errno = 0;
  const bool closed = ::fcntl(fd, F_GETFD) == -1 && errno == EBADF;
  // The number may have been reused already; then not by an eventfd of ours.
  char again[64] = {};
  EXPECT_TRUE(closed || ::readlink(path.c_str(), again, sizeof(again) - 1) <= 0 ||
              std::string(again) != "anon_inode:[eventfd]")
      << "fd " << fd << " still open";
}

INSTANTIATE_TEST_SUITE_P(Transports, CompletionTest, ::testing::Values(kShm, kTcp),
                         TransportName);

// The peer in its own process over TCP, where a READ needs the peer to run:
// stopped, the transfer waits and the fd stays quiet; killed, the transfer
// fails and the fd wakes with it.
TEST(CompletionProcessTest, KilledPeersTransferWakesTheFdFailed) {
  ChildProcess child({KVFERRY_TEST_PEER, "--role=prefill-serve", "--tls=tcp",
                      "--pool_memory=ucx", "--seed=31",
                      absl::StrCat("--peer_timeout=", absl::ToInt64Seconds(kPeerTimeout))});
  ASSERT_TRUE(child.started());
  const uint16_t port = ParsePort(child.ReadUntil("PORT"));
  ASSERT_NE(port, 0);
  // The generous timeout: the kill is seen through the control connection.
  AgentOptions o = TestAgentOptions("decode", kTcp);
  o.peer_timeout = kPeerTimeout;
  auto agent = Agent::Create(o);
  ASSERT_THAT(agent, IsOk());
  KvPool* pool = *(*agent)->CreatePool("kv", Layout(64));
  auto peer = (*agent)->Connect("127.0.0.1", port);
  ASSERT_THAT(peer, IsOk());
  const int fd = (*agent)->completion_fd();

  BlockSet into = *pool->Lease(4);
  auto ok = (*agent)->PostTransfer({.op = TransferOp::kRead, .peer = peer->name, .local = &into,
                                    .remote_blocks = {0, 1, 2, 3}});
  ASSERT_THAT(ok, IsOk());
  Completions c = Collect(**agent, [](const Completions& a) { return !a.transfers.empty(); });
  ASSERT_EQ(c.transfers.size(), 1u);
  EXPECT_EQ(c.transfers[0].id, ok->id());
  EXPECT_EQ(c.transfers[0].state, TransferState::kDone) << c.transfers[0].status;

  ASSERT_EQ(::kill(child.pid(), SIGSTOP), 0);
  ASSERT_TRUE(WaitFor([&] { return IsStopped(child.pid()); }));
  auto stuck = (*agent)->PostTransfer({.op = TransferOp::kRead, .peer = peer->name,
                                       .local = &into, .remote_blocks = {4, 5, 6, 7}});
  ASSERT_THAT(stuck, IsOk());
  // While the peer cannot answer, nothing ended: the fd stays quiet.
  EXPECT_FALSE(WaitReadable(fd, absl::Milliseconds(300)));
  EXPECT_EQ(stuck->state(), TransferState::kInFlight);
  child.Kill(SIGKILL);
  child.Wait();
  c = Collect(**agent, [](const Completions& a) { return !a.transfers.empty(); });
  ASSERT_EQ(c.transfers.size(), 1u);
  EXPECT_EQ(c.transfers[0].id, stuck->id());
  EXPECT_EQ(c.transfers[0].state, TransferState::kFailed);
  EXPECT_EQ(c.transfers[0].status.code(), absl::StatusCode::kUnavailable)
      << c.transfers[0].status;
  EXPECT_EQ(c.transfers[0].status, stuck->status());
  EXPECT_FALSE(Readable(fd));
}

}  // namespace
}  // namespace kvferry::test
