// Two agents in one process, over shared memory and over TCP: handshake,
// READ and WRITE with verified contents, per-layer pipelining, fence before
// reuse, cancel, disconnect, and every bad-input case.
#include "kvferry/transfer.h"

#include <dirent.h>

#include <atomic>
#include <condition_variable>
#include <fstream>
#include <future>
#include <mutex>
#include <numeric>
#include <thread>

#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "src/access.h"
#include "src/agent_impl.h"
#include "src/transfer_core.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

using ::testing::HasSubstr;

class TransferTest : public AgentPairTest {
 protected:
  void MakePools() override {
    decode_pool_ = *decode_->CreatePool("kv", Layout(64));
    prefill_pool_ = *prefill_->CreatePool("kv", Layout(32));
  }

  // Writes `count` prefill blocks into decode blocks `remote` and checks them.
  void WriteAndVerify(const std::vector<uint32_t>& remote, uint64_t seed) {
    BlockSet local = *prefill_pool_->Lease(static_cast<uint32_t>(remote.size()));
    for (size_t i = 0; i < remote.size(); ++i) FillBlock(local, i, seed, remote[i]);
    auto t = prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                                     .remote_blocks = remote, .notification = "written"});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(absl::Seconds(20)), IsOk());
    EXPECT_EQ(t->state(), TransferState::kDone);
    auto notes = decode_->WaitForNotifications(absl::Seconds(30));
    ASSERT_EQ(notes.size(), 1u);
    EXPECT_EQ(notes[0].peer, "prefill");
    EXPECT_EQ(notes[0].payload, "written");
    BlockSet check = *decode_pool_->LeaseIds(remote);
    for (size_t i = 0; i < remote.size(); ++i) {
      EXPECT_EQ(BlockChecksum(check, i), ExpectedChecksum(Layout(32), seed, remote[i]))
          << "remote block " << remote[i];
    }
  }
};

TEST_P(TransferTest, PeersKnowEachOther) {
  auto seen = decode_->GetPeer("prefill");
  ASSERT_THAT(seen, IsOk());
  EXPECT_EQ(seen->state, PeerState::kConnected);
  EXPECT_EQ(seen->pools, std::vector<std::string>{"kv"});
  EXPECT_TRUE(seen->same_host);
  EXPECT_TRUE(seen->data_error_handling);
  // Default pools are UCX shared memory: the peer copies straight into them.
  const std::string path = std::string(GetParam().name) == "shm" ? kDataPathShmDirect : kDataPathTcp;
  EXPECT_EQ(seen->data_path, path);
  EXPECT_EQ(prefill_->GetPeer("decode")->data_path, path);
  EXPECT_EQ(decode_->ListPeers().size(), 1u);
  EXPECT_EQ(decode_->ListPeers()[0].data_path, path);
  EXPECT_THAT(decode_->GetPeer("nobody"), StatusIs(absl::StatusCode::kNotFound, "'nobody'"));
  EXPECT_EQ(prefill_->GetStats().Live(ResourceKind::kPeer), 1);
  EXPECT_EQ(prefill_->GetStats().Live(ResourceKind::kRemoteKey), 1);
}

TEST_P(TransferTest, WriteSingleBlock) { WriteAndVerify({7}, 1); }

TEST_P(TransferTest, WriteBatchedScattered) { WriteAndVerify({40, 3, 4, 5, 63, 0, 22}, 2); }

TEST_P(TransferTest, ReadBatched) {
  // Prefill holds the KV; decode pulls it (vLLM's default direction).
  BlockSet src = *prefill_pool_->Lease(12);
  for (size_t i = 0; i < src.size(); ++i) FillBlock(src, i, 3, src.ids()[i]);
  BlockSet dst = *decode_pool_->Lease(12);
  std::vector<uint32_t> remote(src.ids().begin(), src.ids().end());
  std::reverse(remote.begin(), remote.end());
  auto t = decode_->PostTransfer({.op = TransferOp::kRead, .peer = "prefill", .local = &dst,
                                  .remote_blocks = remote, .notification = "read-done"});
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(t->Wait(absl::Seconds(20)), IsOk());
  for (size_t i = 0; i < dst.size(); ++i) {
    EXPECT_EQ(BlockChecksum(dst, i), ExpectedChecksum(Layout(32), 3, remote[i]));
  }
  auto notes = prefill_->WaitForNotifications(absl::Seconds(30));
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_EQ(notes[0].payload, "read-done");
}

TEST_P(TransferTest, PerLayerPipelining) {
  BlockSet local = *prefill_pool_->Lease(4);
  std::vector<uint32_t> remote = {10, 11, 12, 13};
  for (size_t i = 0; i < 4; ++i) FillBlock(local, i, 4, remote[i]);
  BlockSet check = *decode_pool_->LeaseIds(remote);
  for (uint32_t layer = 0; layer < Layout(32).num_layers; ++layer) {
    auto t = prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                                     .remote_blocks = remote, .layer_begin = layer,
                                     .layer_end = layer + 1,
                                     .notification = "layer " + std::to_string(layer)});
    ASSERT_THAT(t, IsOk());
    // Decode waits for this layer only, and finds it complete.
    std::vector<Notification> notes;
    while (notes.empty()) notes = decode_->WaitForNotifications(absl::Seconds(30));
    ASSERT_EQ(notes.size(), 1u);
    EXPECT_EQ(notes[0].payload, "layer " + std::to_string(layer));
    for (size_t i = 0; i < 4; ++i) {
      EXPECT_EQ(BlockChecksum(check, i, layer, layer + 1),
                ExpectedChecksum(Layout(32), 4, remote[i], layer, layer + 1));
    }
    EXPECT_THAT(t->Wait(absl::Seconds(10)), IsOk());
  }
}

TEST_P(TransferTest, FenceBeforeReuse) {
  const uint32_t total = prefill_pool_->layout().num_blocks;
  for (int round = 0; round < 5; ++round) {
    Transfer t;
    {
      BlockSet local = *prefill_pool_->Lease(total);
      std::vector<uint32_t> remote(total);
      std::iota(remote.begin(), remote.end(), 0);
      t = *prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                                   .remote_blocks = remote});
    }  // the lease handle is gone; the transfer still holds the blocks
    while (t.state() == TransferState::kInFlight) {
      auto again = prefill_pool_->Lease(1);
      if (t.state() != TransferState::kInFlight) break;  // fenced in between
      EXPECT_THAT(again, StatusIs(absl::StatusCode::kResourceExhausted, "blocks requested"));
    }
    ASSERT_THAT(t.Wait(absl::Seconds(20)), IsOk());
    EXPECT_EQ(prefill_pool_->free_blocks(), total);
  }
}

TEST_P(TransferTest, DroppedHandleStillCompletes) {
  {
    BlockSet local = *prefill_pool_->Lease(8);
    std::vector<uint32_t> remote = {0, 1, 2, 3, 4, 5, 6, 7};
    ASSERT_THAT(prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode",
                                        .local = &local, .remote_blocks = remote,
                                        .notification = "dropped"}),
                IsOk());
  }
  auto notes = decode_->WaitForNotifications(absl::Seconds(30));
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_EQ(notes[0].payload, "dropped");
  EXPECT_TRUE(WaitFor([&] { return prefill_pool_->free_blocks() == 32; }))
      << prefill_pool_->free_blocks() << " free";
  EXPECT_TRUE(WaitFor([&] { return prefill_->GetStats().Live(ResourceKind::kTransfer) == 0; }))
      << prefill_->ledger().Report();
}

TEST_P(TransferTest, CancelReturnsOnlyWhenFenced) {
  const uint32_t total = prefill_pool_->layout().num_blocks;
  int cancelled = 0;
  for (int round = 0; round < 10; ++round) {
    Transfer t;
    {
      BlockSet local = *prefill_pool_->Lease(total);
      std::vector<uint32_t> remote(total);
      std::iota(remote.begin(), remote.end(), 32);
      t = *prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                                   .remote_blocks = remote, .notification = "must-not-arrive"});
    }
    absl::Status s = t.Cancel();
    EXPECT_NE(t.state(), TransferState::kInFlight);
    // Whatever the outcome, nothing is in flight: all blocks are back.
    EXPECT_EQ(prefill_pool_->free_blocks(), total);
    if (t.state() == TransferState::kCancelled) {
      EXPECT_THAT(s, StatusIs(absl::StatusCode::kCancelled, "cancelled"));
      ++cancelled;
    } else {
      EXPECT_THAT(s, IsOk());  // it had finished first
    }
    // A finished transfer's notification arrives (wait for it as long as it
    // takes); a cancelled one's never does (a short look is all a test can do).
    const bool done = t.state() == TransferState::kDone;
    auto notes = decode_->WaitForNotifications(done ? absl::Seconds(30) : absl::Milliseconds(50));
    EXPECT_EQ(notes.size(), done ? 1u : 0u);
  }
  EXPECT_GT(cancelled, 0);
  // The peer is still usable after cancellations.
  WriteAndVerify({1, 2}, 9);
}

TEST_P(TransferTest, BadInputLeavesNothingBehind) {
  BlockSet local = *prefill_pool_->Lease(2);
  const Stats before = prefill_->GetStats();
  auto post = [&](TransferSpec spec) { return prefill_->PostTransfer(spec); };
  TransferSpec good{.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                    .remote_blocks = {1, 2}};
  TransferSpec s = good;
  s.local = nullptr;
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kInvalidArgument, "empty batch"));
  BlockSet empty;
  s = good;
  s.local = &empty;
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kInvalidArgument, "empty batch"));
  s = good;
  s.remote_blocks = {};
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kInvalidArgument, "empty batch"));
  s = good;
  s.remote_blocks = {1, 2, 3};
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kInvalidArgument,
                                "pairs 2 local blocks with 3 remote blocks"));
  s = good;
  s.remote_blocks = {5, 5};
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kInvalidArgument, "remote block 5 listed twice"));
  s = good;
  s.remote_blocks = {1, 64};
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kOutOfRange,
                                "remote block id 64 is past the end of peer 'decode' pool 'kv' (64 blocks)"));
  s = good;
  s.peer = "nobody";
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kNotFound, "unknown peer 'nobody'"));
  s = good;
  s.remote_pool = "other";
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kNotFound, "exports no pool 'other'"));
  s = good;
  s.layer_begin = 2;
  s.layer_end = 2;
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kInvalidArgument, "layer range [2, 2)"));
  s.layer_begin = 0;
  s.layer_end = 9;
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kInvalidArgument, "past 4 layers"));
  s = good;
  s.notification = std::string(70000, 'n');
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kInvalidArgument, "notification of 70000"));
  BlockSet foreign = *decode_pool_->Lease(2);
  s = good;
  s.local = &foreign;
  EXPECT_THAT(post(s), StatusIs(absl::StatusCode::kInvalidArgument, "belongs to another agent"));
  EXPECT_EQ(prefill_->GetStats(), before);
  EXPECT_EQ(prefill_pool_->free_blocks(), 30u);
}

TEST_P(TransferTest, DisconnectThenReconnect) {
  ASSERT_THAT(prefill_->Disconnect("decode"), IsOk());
  BlockSet local = *prefill_pool_->Lease(1);
  EXPECT_THAT(prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode",
                                      .local = &local, .remote_blocks = {0}}),
              StatusIs(absl::StatusCode::kFailedPrecondition, "peer 'decode' is disconnected"));
  EXPECT_THAT(prefill_->Disconnect("decode"),
              StatusIs(absl::StatusCode::kFailedPrecondition, "not connected"));
  EXPECT_THAT(prefill_->Disconnect("ghost"), StatusIs(absl::StatusCode::kNotFound, "'ghost'"));
  // Decode hears the goodbye.
  EXPECT_TRUE(WaitFor([&] { return decode_->GetPeer("prefill")->state == PeerState::kClosed; }));
  EXPECT_EQ(prefill_->GetStats().Live(ResourceKind::kPeer), 0);
  EXPECT_EQ(prefill_->GetStats().Live(ResourceKind::kEndpoint), 0);
  EXPECT_EQ(prefill_->GetStats().Live(ResourceKind::kRemoteKey), 0);
  // Connect again under the same names.
  ASSERT_THAT(prefill_->Connect("127.0.0.1", port_), IsOk());
  ASSERT_THAT(decode_->WaitForPeer("prefill"), IsOk());
  local.Reset();
  WriteAndVerify({3}, 5);
}

TEST_P(TransferTest, DisconnectLetsPostedTransfersFinish) {
  std::vector<Transfer> posted;
  for (uint32_t i = 0; i < 4; ++i) {
    BlockSet local = *prefill_pool_->Lease(4);
    std::vector<uint32_t> remote = {4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3};
    auto t = prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                                     .remote_blocks = remote,
                                     .notification = "n" + std::to_string(i)});
    ASSERT_THAT(t, IsOk());
    posted.push_back(*std::move(t));
  }
  ASSERT_THAT(prefill_->Disconnect("decode"), IsOk());
  for (Transfer& t : posted) {
    EXPECT_THAT(t.Wait(absl::Seconds(30)), IsOk());
    EXPECT_EQ(t.state(), TransferState::kDone);
  }
  // The goodbye travels behind the notifications: once decode has seen it,
  // all four are already queued.
  EXPECT_TRUE(WaitFor([&] { return decode_->GetPeer("prefill")->state == PeerState::kClosed; }));
  std::vector<Notification> notes = decode_->PollNotifications();
  ASSERT_EQ(notes.size(), 4u);
  for (size_t i = 0; i < notes.size(); ++i) EXPECT_EQ(notes[i].payload, "n" + std::to_string(i));
}

// Cancelling one transfer at once (no grace) must not cost the others: its
// operations get the time to drain that fencing the peer would need anyway.
TEST_P(TransferTest, CancelWithoutGraceLeavesOtherTransfersAlone) {
  for (int round = 0; round < 5; ++round) {
    std::vector<Transfer> posted;
    for (uint32_t i = 0; i < 4; ++i) {
      BlockSet local = *prefill_pool_->Lease(8);
      std::vector<uint32_t> remote(8);
      std::iota(remote.begin(), remote.end(), 8 * i);
      auto t = prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode",
                                       .local = &local, .remote_blocks = remote});
      ASSERT_THAT(t, IsOk());
      posted.push_back(*std::move(t));
    }
    absl::Status s = posted[1].Cancel(absl::ZeroDuration());
    EXPECT_TRUE(s.ok() || absl::IsCancelled(s)) << s;
    EXPECT_THAT(s.message(), ::testing::Not(HasSubstr("fence")));
    for (size_t i = 0; i < posted.size(); ++i) {
      if (i == 1) continue;
      EXPECT_THAT(posted[i].Wait(absl::Seconds(30)), IsOk()) << "transfer " << i;
      EXPECT_EQ(posted[i].state(), TransferState::kDone) << "transfer " << i;
    }
    EXPECT_EQ(prefill_->GetPeer("decode")->state, PeerState::kConnected)
        << prefill_->GetPeer("decode")->status;
    EXPECT_EQ(decode_->GetPeer("prefill")->state, PeerState::kConnected);
  }
  WriteAndVerify({1, 2}, 11);  // and posts are still accepted
}

// Many threads post, some cancel at once, while the main thread disconnects
// the peer: every post either fails cleanly or ends fenced (kDone, or
// kCancelled for a cancelled one), and nothing leaks (kAbort). Under TSan
// this exercises the submission queue against the progress thread's data
// and control passes.
TEST_P(TransferTest, ConcurrentPostsCancelsAndDisconnect) {
  constexpr int kThreads = 4;
  std::atomic<int> posted{0};
  std::atomic<bool> refused_seen{false};
  std::vector<std::thread> threads;
  std::vector<std::string> errors(kThreads);
  for (int k = 0; k < kThreads; ++k) {
    threads.emplace_back([&, k] {
      for (uint32_t i = 0;; ++i) {
        auto local = prefill_pool_->Lease(2);
        if (!local.ok()) {
          errors[k] = local.status().ToString();
          return;
        }
        // Each thread writes its own 16 decode blocks.
        std::vector<uint32_t> remote = {16 * static_cast<uint32_t>(k) + (2 * i) % 16,
                                        16 * static_cast<uint32_t>(k) + (2 * i + 1) % 16};
        auto t = prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode",
                                         .local = &*local, .remote_blocks = remote});
        if (!t.ok()) {
          if (t.status().code() != absl::StatusCode::kFailedPrecondition) {
            errors[k] = t.status().ToString();
          }
          refused_seen.store(true);
          return;  // disconnected (or being disconnected)
        }
        posted.fetch_add(1);
        if (i % 3 == 0) {
          absl::Status s = t->Cancel(absl::ZeroDuration());
          if (t->state() != TransferState::kCancelled && t->state() != TransferState::kDone) {
            errors[k] = absl::StrCat("cancelled transfer ended ", static_cast<int>(t->state()),
                                     ": ", s.ToString());
            return;
          }
        } else {
          absl::Status s = t->Wait(absl::Seconds(60));
          if (!s.ok() || t->state() != TransferState::kDone) {
            errors[k] = absl::StrCat("transfer: ", s.ToString());
            return;
          }
        }
        if (i > 100000) return;  // never reached: the disconnect stops the loop
      }
    });
  }
  ASSERT_TRUE(WaitFor([&] { return posted.load() >= 60; }, absl::Seconds(120)));
  EXPECT_THAT(prefill_->Disconnect("decode"), IsOk());
  for (std::thread& t : threads) t.join();
  for (int k = 0; k < kThreads; ++k) EXPECT_EQ(errors[k], "") << "thread " << k;
  EXPECT_TRUE(refused_seen.load());
  EXPECT_EQ(prefill_->GetStats().Live(ResourceKind::kTransfer), 0);
}

INSTANTIATE_TEST_SUITE_P(Transports, TransferTest, ::testing::Values(kShm, kTcp), TransportName);

// PeerInfo::data_path for each combination of pool memory on each side:
// what each agent reports of the other, the one log line per peer on an
// emulated path (none on a direct one), and verified WRITE and READ on it.
struct PathCase {
  const char* name;
  const char* tls;
  PoolMemorySource decode_memory;
  PoolMemorySource prefill_memory;
  const char* prefill_sees;  // prefill's data_path to decode (decode's pools)
  const char* decode_sees;   // decode's data_path to prefill (prefill's pools)
};

class DataPathTest : public ::testing::TestWithParam<PathCase> {};

int CountLines(const std::string& log, const std::string& needle) {
  int n = 0;
  for (size_t at = log.find(needle); at != std::string::npos; at = log.find(needle, at + 1)) ++n;
  return n;
}

TEST_P(DataPathTest, ReportedLoggedAndUsable) {
  const PathCase& c = GetParam();
#if defined(__SANITIZE_THREAD__)
  // On the emulated shared-memory path the bytes are written by UCX's
  // (uninstrumented) progress code in the other agent's thread, through
  // shared-memory FIFOs whose ordering TSan cannot see, and TSan fails to
  // restore that writer's stack, so tests/tsan.supp's UCX entries do not
  // match. The same cases run in the release and asan suites.
  if (c.prefill_memory == PoolMemorySource::kAnonymousMmap ||
      c.decode_memory == PoolMemorySource::kAnonymousMmap) {
    GTEST_SKIP() << "emulated shared-memory path: UCX's writes are invisible to TSan";
  }
#endif
  auto options = [&c](const std::string& name, PoolMemorySource memory) {
    AgentOptions o;
    o.name = name;
    o.leak_policy = LeakPolicy::kAbort;
    o.ucx_config = {{"TLS", c.tls}};
    o.pool_memory = memory;
    return o;
  };
  auto decode = *Agent::Create(options("decode", c.decode_memory));
  auto prefill = *Agent::Create(options("prefill", c.prefill_memory));
  KvPool* dpool = *decode->CreatePool("kv", Layout(16));
  KvPool* ppool = *prefill->CreatePool("kv", Layout(16));
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  ::testing::internal::CaptureStderr();
  auto peer = prefill->Connect("127.0.0.1", port);
  ASSERT_THAT(peer, IsOk());
  auto back = decode->WaitForPeer("prefill");  // decode logs before it answers
  const std::string log = ::testing::internal::GetCapturedStderr();
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(peer->data_path, c.prefill_sees);
  EXPECT_EQ(prefill->ListPeers().at(0).data_path, c.prefill_sees);
  EXPECT_EQ(back->data_path, c.decode_sees);
  EXPECT_EQ(decode->GetPeer("prefill")->data_path, c.decode_sees);
  auto emulated = [](const std::string& path) {
    return path == kDataPathAmEmulated || path == kDataPathTcp;
  };
  EXPECT_EQ(CountLines(log, "agent 'prefill': data path to peer 'decode'"),
            emulated(c.prefill_sees) ? 1 : 0) << log;
  EXPECT_EQ(CountLines(log, "agent 'decode': data path to peer 'prefill'"),
            emulated(c.decode_sees) ? 1 : 0) << log;
  if (emulated(c.prefill_sees)) {
    EXPECT_THAT(log, HasSubstr(absl::StrCat("is ", c.prefill_sees, " (over ")));
  }

  // WRITE prefill -> decode, then READ decode <- prefill, both verified.
  BlockSet src = *ppool->Lease(4);
  std::vector<uint32_t> remote = {9, 3, 4, 15};
  for (size_t i = 0; i < 4; ++i) FillBlock(src, i, 21, remote[i]);
  auto w = prefill->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &src,
                                  .remote_blocks = remote});
  ASSERT_THAT(w, IsOk());
  ASSERT_THAT(w->Wait(absl::Seconds(30)), IsOk());
  BlockSet check = *dpool->LeaseIds(remote);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(BlockChecksum(check, i), ExpectedChecksum(Layout(32), 21, remote[i])) << i;
  }
  BlockSet dst = *dpool->Lease(4);
  std::vector<uint32_t> from(src.ids().begin(), src.ids().end());
  auto r = decode->PostTransfer({.op = TransferOp::kRead, .peer = "prefill", .local = &dst,
                                 .remote_blocks = from});
  ASSERT_THAT(r, IsOk());
  ASSERT_THAT(r->Wait(absl::Seconds(30)), IsOk());
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(BlockChecksum(dst, i), ExpectedChecksum(Layout(32), 21, remote[i])) << i;
  }
}

constexpr PoolMemorySource kUcx = PoolMemorySource::kUcxAllocated;
constexpr PoolMemorySource kMmap = PoolMemorySource::kAnonymousMmap;

INSTANTIATE_TEST_SUITE_P(
    PoolMemory, DataPathTest,
    ::testing::Values(
        PathCase{"UcxBoth", "posix,sysv,tcp", kUcx, kUcx, kDataPathShmDirect, kDataPathShmDirect},
        PathCase{"MmapBoth", "posix,sysv,tcp", kMmap, kMmap, kDataPathAmEmulated,
                 kDataPathAmEmulated},
        // Each side's pools decide what the other can map.
        PathCase{"MmapDecode", "posix,sysv,tcp", kMmap, kUcx, kDataPathAmEmulated,
                 kDataPathShmDirect},
        PathCase{"Tcp", "tcp", kUcx, kUcx, kDataPathTcp, kDataPathTcp}),
    [](const auto& param_info) { return std::string(param_info.param.name); });

// Handshake failures, with their own agents.
class HandshakeTest : public ::testing::Test {
 protected:
  static AgentOptions Options(const std::string& name) {
    AgentOptions o;
    o.name = name;
    o.leak_policy = LeakPolicy::kAbort;
    o.ucx_config = {{"TLS", "tcp"}};
    return o;
  }

  // Two WRITEs (`ta`, `tb`: 16 blocks each) from prefill into decode that
  // cannot end by themselves: decode has no progress thread, and over TCP a
  // write's flush needs decode's acknowledgement. Members go in reverse:
  // handles and leases before their agents.
  struct StuckWrites {
    std::unique_ptr<Agent> decode;
    std::unique_ptr<Agent> prefill;
    BlockSet a, b;
    Transfer ta, tb;
  };
  static void PostStuckWrites(StuckWrites* w) {
    AgentOptions d = Options("decode");
    d.progress_thread = false;
    w->decode = *Agent::Create(d);
    w->prefill = *Agent::Create(Options("prefill"));
    ASSERT_THAT(w->decode->CreatePool("kv", Layout(32)), IsOk());
    KvPool* pool = *w->prefill->CreatePool("kv", Layout(32));
    uint16_t port = *w->decode->Listen("127.0.0.1", 0);
    // Decode is driven here until prefill's Connect (which waits for the
    // data path's wireup) has returned, and then no more.
    std::atomic<bool> connected{false};
    std::thread accept([&] {
      EXPECT_THAT(w->decode->WaitForPeer("prefill", absl::Seconds(30)), IsOk());
      while (!connected.load()) w->decode->Progress();
    });
    auto peer = w->prefill->Connect("127.0.0.1", port, absl::Seconds(30));
    connected = true;
    accept.join();
    ASSERT_THAT(peer, IsOk());
    w->a = *pool->Lease(16);
    w->b = *pool->Lease(16);
    std::vector<uint32_t> ra(16), rb(16);
    std::iota(ra.begin(), ra.end(), 0);
    std::iota(rb.begin(), rb.end(), 16);
    w->ta = *w->prefill->PostTransfer(
        {.op = TransferOp::kWrite, .peer = "decode", .local = &w->a, .remote_blocks = ra});
    w->tb = *w->prefill->PostTransfer(
        {.op = TransferOp::kWrite, .peer = "decode", .local = &w->b, .remote_blocks = rb});
  }
};

// Tells when a Cancel is inside its agent: prefill's progress thread, at
// the start of each data pass (data_pass_test_hook), reads the watched
// transfer's cancel_passes. Only that thread writes the field (in its control
// pass, under mu_, once it sees the cancel flag the Cancel set under mu_), so
// a count above zero means the Cancel set its flag and let go of mu_: it is
// waiting inside the agent.
struct CancelGate {
  std::atomic<internal::TransferCore*> watched{nullptr};
  std::atomic<bool> cancel_inside{false};
};
std::atomic<CancelGate*> cancel_gate{nullptr};

void SeeCancel() {
  CancelGate* g = cancel_gate.load();
  if (g == nullptr) return;
  internal::TransferCore* t = g->watched.load();
  if (t != nullptr && t->cancel_passes > 0) g->cancel_inside.store(true);
}

// Transfer::Wait keeps its deadline while another thread is inside a long
// Cancel on the same agent (the cancel waits out its grace period, because
// decode never progresses and so never completes the flush).
TEST_F(HandshakeTest, WaitKeepsItsDeadlineDuringAnotherThreadsCancel) {
  StuckWrites w;
  ASSERT_NO_FATAL_FAILURE(PostStuckWrites(&w));
  std::unique_ptr<Agent>& decode = w.decode;
  Transfer& ta = w.ta;
  Transfer& tb = w.tb;
  CancelGate gate;
  gate.watched.store(internal::Access::Core(ta));
  cancel_gate.store(&gate);
  internal::data_pass_test_hook.store(&SeeCancel);
  std::atomic<bool> cancel_returned{false};
  std::thread canceller([&] {
    ta.Cancel(absl::Seconds(20)).IgnoreError();  // the outcome is checked below
    cancel_returned = true;
  });
  // The gate, not a sleep: the Cancel is waiting inside the agent.
  const bool inside = WaitFor([&] { return gate.cancel_inside.load(); }, absl::Seconds(60));
  internal::data_pass_test_hook.store(nullptr);
  cancel_gate.store(nullptr);
  EXPECT_TRUE(inside) << "the Cancel never reached the agent";
  // Over TCP a write's flush needs decode's acknowledgement: nothing ends.
  ASSERT_EQ(ta.state(), TransferState::kInFlight);
  EXPECT_THAT(tb.Wait(absl::Milliseconds(50)),
              StatusIs(absl::StatusCode::kDeadlineExceeded, "still in flight"));
  // Wait came back on its own deadline, not when the cancel ended.
  EXPECT_FALSE(cancel_returned.load());
  // Let decode progress so the cancel can finish.
  while (!cancel_returned.load()) decode->Progress();
  canceller.join();
  EXPECT_NE(ta.state(), TransferState::kInFlight);
  while (tb.state() == TransferState::kInFlight) decode->Progress();
}

// When a cancelled transfer truly cannot drain (decode never progresses, and
// over TCP a write's flush needs its acknowledgement), the peer is fenced,
// and every status involved says that a Cancel with that grace forced it.
TEST_F(HandshakeTest, CancelThatMustFenceThePeerSaysSo) {
  StuckWrites w;
  ASSERT_NO_FATAL_FAILURE(PostStuckWrites(&w));
  std::unique_ptr<Agent>& decode = w.decode;
  std::unique_ptr<Agent>& prefill = w.prefill;
  Transfer& ta = w.ta;
  Transfer& tb = w.tb;
  const absl::Time start = absl::Now();
  EXPECT_THAT(ta.Cancel(absl::ZeroDuration()),
              StatusIs(absl::StatusCode::kCancelled, "within Cancel(grace=0)"));
  // The fence waited for the minimum drain, not for the zero grace.
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(900));
  EXPECT_EQ(ta.state(), TransferState::kCancelled);
  EXPECT_THAT(ta.status(), StatusIs(absl::StatusCode::kCancelled, "was failed to fence it"));
  EXPECT_THAT(tb.Wait(absl::Seconds(30)),
              StatusIs(absl::StatusCode::kUnavailable, "Cancel(grace=0) of a transfer"));
  EXPECT_EQ(tb.state(), TransferState::kFailed);
  auto info = prefill->GetPeer("decode");
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->state, PeerState::kFailed);
  EXPECT_THAT(info->status, StatusIs(absl::StatusCode::kCancelled, "forced a fence of the peer"));
  // Decode, driven again, sees the connection go before it is destroyed.
  EXPECT_TRUE(WaitFor([&] {
    decode->Progress();
    return decode->GetPeer("prefill")->state != PeerState::kConnected;
  }));
}

// One connection per agent pair; a restart (same name, newer incarnation)
// takes over, an older or the same incarnation is refused.
TEST_F(HandshakeTest, IdentityByNameAndIncarnation) {
  auto decode = *Agent::Create(Options("decode"));
  ASSERT_THAT(decode->CreatePool("kv", Layout(32)), IsOk());
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  auto first = *Agent::Create(Options("prefill"));
  ASSERT_THAT(first->CreatePool("kv", Layout(32)), IsOk());
  auto peer = first->Connect("127.0.0.1", port);
  ASSERT_THAT(peer, IsOk());
  EXPECT_EQ(peer->address, absl::StrCat("127.0.0.1:", port));
  EXPECT_NE(peer->incarnation, 0u);
  ASSERT_THAT(decode->WaitForPeer("prefill"), IsOk());
  const uint64_t first_incarnation = decode->GetPeer("prefill")->incarnation;

  // The same agent again: already connected.
  EXPECT_THAT(first->Connect("127.0.0.1", port),
              StatusIs(absl::StatusCode::kAlreadyExists, "already connected to agent 'decode'"));
  EXPECT_EQ(first->GetPeer("decode")->state, PeerState::kConnected);

  // A restarted "prefill" (a newer incarnation) replaces the first.
  absl::SleepFor(absl::Microseconds(10));  // incarnations are start times in ns
  auto second = *Agent::Create(Options("prefill"));
  ASSERT_THAT(second->CreatePool("kv", Layout(32)), IsOk());
  ASSERT_THAT(second->Connect("127.0.0.1", port), IsOk());
  EXPECT_GT(decode->GetPeer("prefill")->incarnation, first_incarnation);
  EXPECT_TRUE(WaitFor([&] { return first->GetPeer("decode")->state == PeerState::kFailed; }));
  EXPECT_TRUE(absl::IsUnavailable(first->GetPeer("decode")->status))
      << first->GetPeer("decode")->status;

  // The old incarnation cannot take the name back while the new one lives.
  EXPECT_THAT(first->Connect("127.0.0.1", port),
              StatusIs(absl::StatusCode::kAlreadyExists, "already connected"));
  EXPECT_EQ(decode->GetPeer("prefill")->state, PeerState::kConnected);
  EXPECT_EQ(second->GetPeer("decode")->state, PeerState::kConnected);
}

// WaitForPeer waits for a connected peer: one that came and went before
// the call does not count, and the timeout says so (a race in the
// caller's protocol, as a listener that waits after its client left).
TEST_F(HandshakeTest, WaitForAPeerThatAlreadyLeftSaysItCameAndWent) {
  auto decode = *Agent::Create(Options("decode"));
  ASSERT_THAT(decode->CreatePool("kv", Layout(32)), IsOk());
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  EXPECT_THAT(decode->WaitForPeer("prefill", absl::Milliseconds(1)),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       "peer 'prefill' did not connect within 1ms"));
  auto prefill = *Agent::Create(Options("prefill"));
  ASSERT_THAT(prefill->CreatePool("kv", Layout(32)), IsOk());
  ASSERT_THAT(prefill->Connect("127.0.0.1", port), IsOk());
  ASSERT_THAT(decode->WaitForPeer("prefill"), IsOk());
  ASSERT_THAT(prefill->Disconnect("decode"), IsOk());
  EXPECT_TRUE(WaitFor([&] { return decode->GetPeer("prefill")->state == PeerState::kClosed; }));
  EXPECT_THAT(decode->WaitForPeer("prefill", absl::Milliseconds(1)),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       "(a peer of that name had connected, and ended before or during the "
                       "wait)"));
}

TEST_F(HandshakeTest, ConnectErrorsNameTheAddress) {
  auto decode = *Agent::Create(Options("decode"));
  ASSERT_THAT(decode->CreatePool("kv", Layout(32)), IsOk());
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  const std::string where = absl::StrCat("127.0.0.1:", port);
  auto prefill = *Agent::Create(Options("prefill"));
  ASSERT_THAT(prefill->CreatePool("kv", Layout(32)), IsOk());
  ASSERT_THAT(prefill->Connect("127.0.0.1", port), IsOk());
  // A second Connect to a connected peer is refused, naming the address.
  EXPECT_THAT(prefill->Connect("127.0.0.1", port),
              StatusIs(absl::StatusCode::kAlreadyExists, where));
  EXPECT_EQ(prefill->GetPeer("decode")->state, PeerState::kConnected);
  // Nobody listening any more: the error names the address too.
  decode.reset();
  auto gone = prefill->Connect("127.0.0.1", port, absl::Seconds(5));
  ASSERT_FALSE(gone.ok());
  EXPECT_THAT(gone.status().message(), HasSubstr(where)) << gone.status();
  EXPECT_THAT(gone.status().message(), ::testing::Not(HasSubstr("(handshaking)")));
}

TEST_F(HandshakeTest, EmptyTransferHandleIsEmptyNotFailed) {
  Transfer empty;
  EXPECT_TRUE(empty.empty());
  EXPECT_EQ(empty.state(), TransferState::kEmpty);
  EXPECT_THAT(empty.status(), StatusIs(absl::StatusCode::kFailedPrecondition, "empty"));
  EXPECT_THAT(empty.Wait(absl::ZeroDuration()),
              StatusIs(absl::StatusCode::kFailedPrecondition, "empty"));
  Transfer moved = std::move(empty);
  EXPECT_EQ(moved.state(), TransferState::kEmpty);
}

// A handle kept past its agent: the transfer ends saying the agent shut down
// (not that the peer disconnected), and the handle is a survivor with its
// PostTransfer site.
TEST_F(HandshakeTest, TransferHandleOutlivingItsAgent) {
  auto decode = *Agent::Create(Options("decode"));
  ASSERT_THAT(decode->CreatePool("kv", Layout(32)), IsOk());
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  AgentOptions p = Options("prefill");
  p.progress_thread = false;  // nothing completes the transfer before the shutdown
  p.leak_policy = LeakPolicy::kLog;
  auto prefill = *Agent::Create(p);
  KvPool* pool = *prefill->CreatePool("kv", Layout(32));
  ASSERT_THAT(prefill->Connect("127.0.0.1", port), IsOk());
  BlockSet local = *pool->Lease(2);
  const int line = __LINE__ + 1;
  auto t = prefill->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                                  .remote_blocks = {0, 1}});
  ASSERT_THAT(t, IsOk());
  local.Reset();
  ::testing::internal::CaptureStderr();
  prefill.reset();
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(t->state(), TransferState::kFailed);
  EXPECT_THAT(t->status(), StatusIs(absl::StatusCode::kCancelled, "agent 'prefill' shut down"));
  EXPECT_THAT(t->Wait(), StatusIs(absl::StatusCode::kCancelled, "agent 'prefill' shut down"));
  EXPECT_THAT(err, HasSubstr("agent 'prefill': destroyed while 1 objects"));
  EXPECT_THAT(err, HasSubstr("transfer_handle=1"));
  if (Ledger::SitesEnabled()) {
    EXPECT_THAT(err, HasSubstr(absl::StrCat("live transfer_handle created at ",
                                            __FILE__, ":", line)));
  }
}

// Under kAbort, the same survivor aborts the process after the report.
TEST_F(HandshakeTest, TransferHandleSurvivorAbortsUnderAbortPolicy) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto leak = [] {
    auto decode = *Agent::Create(Options("decode"));
    (void)decode->CreatePool("kv", Layout(32));
    uint16_t port = *decode->Listen("127.0.0.1", 0);
    AgentOptions p = Options("prefill");  // kAbort
    auto prefill = *Agent::Create(p);
    KvPool* pool = *prefill->CreatePool("kv", Layout(32));
    (void)prefill->Connect("127.0.0.1", port);
    BlockSet local = *pool->Lease(1);
    auto* kept = new Transfer(*prefill->PostTransfer(
        {.op = TransferOp::kWrite, .peer = "decode", .local = &local, .remote_blocks = {0}}));
    (void)kept;  // deliberately never freed
    local.Reset();
    prefill.reset();
  };
  EXPECT_DEATH(leak(), "agent 'prefill': destroyed while(.|\n)*transfer_handle=1");
}

TEST_F(HandshakeTest, NoSecretListensOnLoopbackOnly) {
  AgentOptions o = Options("decode");
  auto open = *Agent::Create(o);
  EXPECT_THAT(open->Listen("0.0.0.0", 0),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       "has no shared secret, so it listens only on loopback"));
  EXPECT_EQ(open->GetStats().Live(ResourceKind::kListener), 0);
  EXPECT_THAT(open->Listen("127.0.0.2", 0), IsOk());  // all of 127/8 is loopback
  o.name = "decode-insecure";
  o.allow_insecure = true;
  auto insecure = *Agent::Create(o);
  ::testing::internal::CaptureStderr();
  EXPECT_THAT(insecure->Listen("0.0.0.0", 0), IsOk());
  EXPECT_THAT(::testing::internal::GetCapturedStderr(),
              HasSubstr("without a shared secret: any host that reaches it may connect"));
  o.name = "decode-secret";
  o.allow_insecure = false;
  o.shared_secret = "s";
  auto secured = *Agent::Create(o);
  EXPECT_THAT(secured->Listen("0.0.0.0", 0), IsOk());
}

TEST_F(HandshakeTest, BadOptionsAreRefused) {
  AgentOptions o = Options("a b");
  EXPECT_THAT(Agent::Create(o), StatusIs(absl::StatusCode::kInvalidArgument,
                                         "AgentOptions.name has byte 0x20 at offset 1"));
  o = Options("a");
  o.handshake_timeout = absl::ZeroDuration();
  EXPECT_THAT(Agent::Create(o), StatusIs(absl::StatusCode::kInvalidArgument,
                                         "AgentOptions.handshake_timeout = 0"));
  o = Options("a");
  o.max_pending_handshakes = 0;
  EXPECT_THAT(Agent::Create(o), StatusIs(absl::StatusCode::kInvalidArgument,
                                         "AgentOptions.max_pending_handshakes = 0"));
  o = Options("a");
  o.shared_secret = std::string(2000, 's');
  EXPECT_THAT(Agent::Create(o), StatusIs(absl::StatusCode::kInvalidArgument, "2000 bytes"));
}

TEST_F(HandshakeTest, LayoutMismatchNamesBothValues) {
  auto decode = *Agent::Create(Options("decode"));
  auto prefill = *Agent::Create(Options("prefill"));
  KvLayout other = Layout(32);
  other.num_layers = 8;
  ASSERT_THAT(decode->CreatePool("kv", Layout(32)), IsOk());
  ASSERT_THAT(prefill->CreatePool("kv", other), IsOk());
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  EXPECT_THAT(prefill->Connect("127.0.0.1", port),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       "pool 'kv': KV layout mismatch: num_layers is 4 here but 8 on the peer"));
  EXPECT_EQ(prefill->GetStats().Live(ResourceKind::kPeer), 0);
  EXPECT_EQ(prefill->GetStats().Live(ResourceKind::kEndpoint), 0);
}

TEST_F(HandshakeTest, OnlyExportedPoolsAreReachable) {
  auto decode = *Agent::Create(Options("decode"));
  auto prefill = *Agent::Create(Options("prefill"));
  ASSERT_THAT(decode->CreatePool("kv", Layout(32)), IsOk());
  ASSERT_THAT(decode->CreatePool("scratch", Layout(32), /*exported=*/false), IsOk());
  KvPool* pool = *prefill->CreatePool("scratch", Layout(32));
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  auto peer = prefill->Connect("127.0.0.1", port);
  ASSERT_THAT(peer, IsOk());
  EXPECT_EQ(peer->pools, std::vector<std::string>{"kv"});
  BlockSet local = *pool->Lease(1);
  EXPECT_THAT(prefill->PostTransfer({.op = TransferOp::kRead, .peer = "decode", .local = &local,
                                     .remote_blocks = {0}}),
              StatusIs(absl::StatusCode::kNotFound, "exports no pool 'scratch'"));
  // The exported pool is reachable from a differently named local pool.
  EXPECT_THAT(prefill->PostTransfer({.op = TransferOp::kRead, .peer = "decode",
                                     .remote_pool = "kv", .local = &local, .remote_blocks = {0}})
                  .status(),
              IsOk());
}

TEST_F(HandshakeTest, WrongSecretIsRefused) {
  AgentOptions d = Options("decode");
  d.shared_secret = "right";
  AgentOptions p = Options("prefill");
  p.shared_secret = "wrong";
  auto decode = *Agent::Create(d);
  auto prefill = *Agent::Create(p);
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  ::testing::internal::CaptureStderr();
  auto result = prefill->Connect("127.0.0.1", port);
  // The listener logs before it closes the connection.
  EXPECT_TRUE(WaitFor([&] { return decode->GetStats().Live(ResourceKind::kConnection) == 0; }));
  std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(result, StatusIs(absl::StatusCode::kUnauthenticated, "shared secret mismatch"));
  // Each side logs the refusal; the listener names the address and the
  // (unproven) name of the client.
  EXPECT_THAT(log, HasSubstr("claims to be 'prefill'"));
  EXPECT_THAT(log, HasSubstr("shared secret mismatch"));
  EXPECT_TRUE(decode->ListPeers().empty());
  // The right secret gets in.
  p.name = "prefill-2";
  p.shared_secret = "right";
  auto good = *Agent::Create(p);
  EXPECT_THAT(good->Connect("127.0.0.1", port), IsOk());
}

// A refused wrong-secret connection reaches each agent's sink, with its
// severity and the agent's name, and nothing of it reaches stderr.
TEST_F(HandshakeTest, WrongSecretRefusalGoesToTheSinks) {
  LogCapture decode_log;
  LogCapture prefill_log;
  AgentOptions d = Options("decode");
  d.shared_secret = "right";
  d.log_sink = decode_log.sink();
  AgentOptions p = Options("prefill");
  p.shared_secret = "wrong";
  p.log_sink = prefill_log.sink();
  auto decode = *Agent::Create(d);
  auto prefill = *Agent::Create(p);
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  ::testing::internal::CaptureStderr();
  auto result = prefill->Connect("127.0.0.1", port);
  EXPECT_TRUE(WaitFor([&] { return decode->GetStats().Live(ResourceKind::kConnection) == 0; }));
  EXPECT_TRUE(WaitFor([&] { return !decode_log.Matching("shared secret mismatch").empty(); }));
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(result, StatusIs(absl::StatusCode::kUnauthenticated, "shared secret mismatch"));
  auto refused = decode_log.Matching("shared secret mismatch");
  ASSERT_EQ(refused.size(), 1u);
  EXPECT_EQ(refused[0].severity, LogSeverity::kWarning);
  EXPECT_EQ(refused[0].agent, "decode");
  EXPECT_THAT(refused[0].message, HasSubstr("claims to be 'prefill'"));
  for (const LogRecord& r : prefill_log.records()) EXPECT_EQ(r.agent, "prefill");
  EXPECT_THAT(err, ::testing::Not(HasSubstr("shared secret mismatch")));
  EXPECT_THAT(err, ::testing::Not(HasSubstr("kvferry: agent")));
}

TEST_F(HandshakeTest, NobodyListening) {
  auto prefill = *Agent::Create(Options("prefill"));
  uint16_t port;
  {
    auto decode = *Agent::Create(Options("decode"));
    port = *decode->Listen("127.0.0.1", 0);
  }
  auto result = prefill->Connect("127.0.0.1", port, absl::Seconds(5));
  EXPECT_FALSE(result.ok());
  EXPECT_TRUE(absl::IsUnavailable(result.status()) || absl::IsDeadlineExceeded(result.status()))
      << result.status();
  EXPECT_EQ(prefill->GetStats().Live(ResourceKind::kEndpoint), 0);
}

TEST_F(HandshakeTest, BadAddresses) {
  auto agent = *Agent::Create(Options("a"));
  EXPECT_THAT(agent->Listen("not-an-ip", 0),
              StatusIs(absl::StatusCode::kInvalidArgument, "'not-an-ip' is not an IPv4"));
  EXPECT_THAT(agent->Connect("300.1.1.1", 1),
              StatusIs(absl::StatusCode::kInvalidArgument, "'300.1.1.1'"));
  ASSERT_THAT(agent->Listen("127.0.0.1", 0), IsOk());
  EXPECT_THAT(agent->Listen("127.0.0.1", 0), StatusIs(absl::StatusCode::kAlreadyExists, "already listens"));
}

// PostTransfer never waits for the progress thread's data work: with
// prefill's progress thread held inside UCX's lock (its data pass), a post
// still returns, queued (kInFlight); both transfers complete once the thread
// is let go. (decode has no progress thread, so only prefill's thread runs
// the hook; a helper thread drives decode.) No timing is asserted: the
// guard below only turns a hang into a failure.
TEST_F(HandshakeTest, PostReturnsWhileTheProgressThreadIsInsideUcx) {
  AgentOptions d = Options("decode");
  d.progress_thread = false;
  auto decode = *Agent::Create(d);
  auto prefill = *Agent::Create(Options("prefill"));
  KvPool* decode_pool = *decode->CreatePool("kv", Layout(32));
  KvPool* prefill_pool = *prefill->CreatePool("kv", Layout(32));
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  std::atomic<bool> stop{false};
  std::thread drive([&] {
    while (!stop.load()) {
      decode->Progress();
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  });
  ASSERT_THAT(prefill->Connect("127.0.0.1", port, absl::Seconds(30)), IsOk());
  ASSERT_THAT(decode->WaitForPeer("prefill"), IsOk());

  {
  HookGate gate(&internal::data_pass_test_hook);
  BlockSet first = *prefill_pool->Lease(2);
  BlockSet second = *prefill_pool->Lease(2);
  for (size_t i = 0; i < 2; ++i) {
    FillBlock(first, i, 11, static_cast<uint32_t>(i));
    FillBlock(second, i, 11, static_cast<uint32_t>(10 + i));
  }
  auto t1 = prefill->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &first,
                                   .remote_blocks = {0, 1}});
  ASSERT_THAT(t1, IsOk());
  ASSERT_TRUE(gate.WaitEntered(absl::Seconds(60)));
  auto post = std::async(std::launch::async, [&] {
    return prefill->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &second,
                                  .remote_blocks = {10, 11}});
  });
  const bool returned = post.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  // Held: nothing of either transfer was posted, so neither can have ended.
  EXPECT_EQ(t1->state(), TransferState::kInFlight);
  gate.Open();
  EXPECT_TRUE(returned) << "PostTransfer waited for the progress thread's data pass";
  auto t2 = post.get();
  ASSERT_THAT(t2, IsOk());
  ASSERT_THAT(t1->Wait(absl::Seconds(60)), IsOk());
  ASSERT_THAT(t2->Wait(absl::Seconds(60)), IsOk());
  BlockSet check = *decode_pool->LeaseIds(std::vector<uint32_t>{0, 1, 10, 11});
  const std::vector<uint32_t> tags = {0, 1, 10, 11};
  for (size_t i = 0; i < tags.size(); ++i) {
    EXPECT_EQ(BlockChecksum(check, i), ExpectedChecksum(Layout(32), 11, tags[i])) << tags[i];
  }
  }  // the handles and leases go before their agents
  prefill.reset();
  stop.store(true);
  drive.join();
}

// Voluntary context switches of this process's progress threads.
uint64_t ProgressThreadSwitches(int* threads) {
  uint64_t total = 0;
  *threads = 0;
  DIR* dir = opendir("/proc/self/task");
  if (dir == nullptr) return 0;
  while (dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    const std::string task = std::string("/proc/self/task/") + e->d_name;
    std::string comm;
    std::getline(std::ifstream(task + "/comm") >> std::ws, comm);
    if (comm != internal::kProgressThreadName) continue;
    ++*threads;
    std::ifstream status(task + "/status");
    std::string line;
    while (std::getline(status, line)) {
      if (line.rfind("voluntary_ctxt_switches:", 0) == 0) {
        total += std::strtoull(line.substr(line.find(':') + 1).c_str(), nullptr, 10);
      }
    }
  }
  closedir(dir);
  return total;
}

// Two connected agents with nothing to do sleep: their progress threads wake
// for timers (pings every peer_timeout / 4) and the peer's pings, a few
// times a second at most, not every millisecond. A count, not a timing: the
// bound (5 a second per thread; about 1 is expected, where the previous
// loop's 100 ms cap on its wait gave about 10) holds on a loaded machine
// too, as a sleeping thread's wake-ups do not grow with load.
TEST_F(HandshakeTest, IdleConnectedAgentsSleep) {
  auto decode = *Agent::Create(Options("decode"));
  auto prefill = *Agent::Create(Options("prefill"));
  ASSERT_THAT(decode->CreatePool("kv", Layout(32)), IsOk());
  ASSERT_THAT(prefill->CreatePool("kv", Layout(32)), IsOk());
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  ASSERT_THAT(prefill->Connect("127.0.0.1", port), IsOk());
  ASSERT_THAT(decode->WaitForPeer("prefill"), IsOk());
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  int threads = 0;
  const uint64_t before = ProgressThreadSwitches(&threads);
  ASSERT_EQ(threads, 2);
  const absl::Time start = absl::Now();
  std::this_thread::sleep_for(std::chrono::seconds(3));
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  const uint64_t wakeups = ProgressThreadSwitches(&threads) - before;
  EXPECT_LT(static_cast<double>(wakeups) / seconds / 2, 5.0)
      << wakeups << " wake-ups of 2 progress threads in " << seconds << " s";
}

}  // namespace
}  // namespace kvferry::test
