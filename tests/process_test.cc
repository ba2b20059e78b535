// Agents in separate processes (fork/exec of kvferry_test_peer): transfers
// over shared memory and TCP with verified contents, kill -9 of either side
// mid-transfer in a loop, and two "hosts" made of network namespaces.
#include <signal.h>

#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "tests/child_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"

namespace kvferry {
namespace {

using testing::BlockChecksum;
using testing::ChildProcess;
using testing::ExpectedChecksum;
using testing::FillBlock;
using testing::IsOk;

constexpr const char* kPeerBinary = KVFERRY_TEST_PEER;

KvLayout Layout(uint32_t blocks) {
  return KvLayout{.num_layers = 4, .num_blocks = blocks, .tokens_per_block = 16,
                  .num_kv_heads = 2, .head_dim = 64, .element_bytes = 2};
}

bool SharedMemory(const char* tls) {
  return std::string(tls).find("posix") != std::string::npos;
}

int FaultIterations() {
  int n = 20;
  if (const char* env = std::getenv("KVFERRY_FAULT_ITERATIONS")) (void)absl::SimpleAtoi(env, &n);
  return n;
}

uint16_t ParsePort(const std::optional<std::string>& line) {
  uint32_t port = 0;
  if (!line || line->rfind("PORT ", 0) != 0 || !absl::SimpleAtoi(line->substr(5), &port)) return 0;
  return static_cast<uint16_t>(port);
}

class ProcessTest : public ::testing::TestWithParam<const char*> {
 protected:
  AgentOptions Options(const std::string& name) {
    AgentOptions o;
    o.name = name;
    o.leak_policy = LeakPolicy::kAbort;
    o.peer_timeout = absl::Seconds(3);
    o.ucx_config = {{"TLS", GetParam()}};
    return o;
  }
  std::vector<std::string> PeerArgs(const std::string& role) {
    return {kPeerBinary, "--role=" + role, absl::StrCat("--tls=", GetParam())};
  }
  void KillMidTransfer(const std::string& self, const std::string& role, TransferOp op,
                       uint32_t pool_blocks, uint32_t batch, uint32_t remote_blocks,
                       bool fresh_survivor = false);
};

TEST_P(ProcessTest, WriteIntoDecodeProcess) {
  ChildProcess child(PeerArgs("decode"));
  ASSERT_TRUE(child.started());
  uint16_t port = ParsePort(child.ReadUntil("PORT"));
  ASSERT_NE(port, 0);
  auto prefill = *Agent::Create(Options("prefill"));
  KvPool* pool = *prefill->CreatePool("kv", Layout(32));
  ASSERT_THAT(prefill->Connect("127.0.0.1", port), IsOk());
  for (uint64_t seed = 100; seed < 108; ++seed) {
    BlockSet local = *pool->Lease(8);
    std::vector<uint32_t> remote;
    for (uint32_t j = 0; j < 8; ++j) remote.push_back(static_cast<uint32_t>((seed * 8 + j) % 64));
    for (size_t j = 0; j < 8; ++j) FillBlock(local, j, seed, remote[j]);
    std::string note = absl::StrCat("CHECK ", seed);
    for (uint32_t r : remote) absl::StrAppend(&note, " ", r);
    auto t = prefill->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                                    .remote_blocks = remote, .notification = note});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
    EXPECT_EQ(child.ReadUntil("OK").value_or("timeout"), absl::StrCat("OK ", seed));
  }
  child.CloseStdin();
  EXPECT_EQ(child.Wait(), 0);
}

TEST_P(ProcessTest, ReadFromPrefillProcess) {
  ChildProcess child(PeerArgs("prefill-serve"));
  ASSERT_TRUE(child.started());
  uint16_t port = ParsePort(child.ReadUntil("PORT"));
  ASSERT_NE(port, 0);
  auto decode = *Agent::Create(Options("decode"));
  KvPool* pool = *decode->CreatePool("kv", Layout(64));
  auto peer = decode->Connect("127.0.0.1", port);
  ASSERT_THAT(peer, IsOk());
  BlockSet local = *pool->Lease(32);
  std::vector<uint32_t> remote(32);
  for (uint32_t i = 0; i < 32; ++i) remote[i] = 31 - i;
  auto t = decode->PostTransfer({.op = TransferOp::kRead, .peer = peer->name, .local = &local,
                                 .remote_blocks = remote});
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
  for (size_t i = 0; i < 32; ++i) {
    EXPECT_EQ(BlockChecksum(local, i), ExpectedChecksum(Layout(64), 1, remote[i])) << i;
  }
}

// Runs FaultIterations() rounds: start a `role` helper, connect to it, keep
// up to four `op` transfers of `batch` blocks in flight, kill -9 the helper a
// few milliseconds in, and check what the survivor (this process) is left
// with: the peer failed with kUnavailable, every transfer ended (done or
// kUnavailable) without handing its blocks back early, the pool whole, and
// every counter back at its baseline.
void ProcessTest::KillMidTransfer(const std::string& self, const std::string& role,
                                  TransferOp op, uint32_t pool_blocks, uint32_t batch,
                                  uint32_t remote_blocks, bool fresh_survivor) {
  std::unique_ptr<Agent> agent;
  KvPool* pool = nullptr;
  Stats baseline;
  int failed_transfers = 0;
  for (int iter = 0; iter < FaultIterations(); ++iter) {
    if (agent == nullptr || fresh_survivor) {
      agent.reset();
      agent = *Agent::Create(Options(self));
      pool = *agent->CreatePool("kv", Layout(pool_blocks));
      baseline = agent->GetStats();
    }
    ChildProcess child(PeerArgs(role));
    uint16_t port = ParsePort(child.ReadUntil("PORT"));
    ASSERT_NE(port, 0) << "iteration " << iter;
    auto peer = agent->Connect("127.0.0.1", port);
    ASSERT_THAT(peer, IsOk()) << "iteration " << iter << ", helper "
                              << (kill(child.pid(), 0) == 0 ? "alive" : "gone");
    std::vector<Transfer> transfers;
    const absl::Time kill_at = absl::Now() + absl::Milliseconds(20 + 7 * (iter % 5));
    bool killed = false;
    const absl::Time deadline = absl::Now() + absl::Seconds(15);
    while (absl::Now() < deadline) {
      if (!killed && absl::Now() >= kill_at) {
        child.Kill(SIGKILL);
        killed = true;
      }
      auto info = agent->GetPeer(peer->name);
      if (info.ok() && info->state != PeerState::kConnected) break;
      std::erase_if(transfers,
                    [](const Transfer& t) { return t.state() != TransferState::kInFlight; });
      absl::StatusOr<BlockSet> local = absl::ResourceExhaustedError("four in flight");
      if (transfers.size() < 4) local = pool->Lease(batch);
      if (!local.ok()) {  // wait for a transfer to end
        absl::SleepFor(absl::Microseconds(200));
        continue;
      }
      std::vector<uint32_t> remote(batch);
      for (uint32_t j = 0; j < batch; ++j) remote[j] = (iter * batch + j) % remote_blocks;
      auto t = agent->PostTransfer(
          {.op = op, .peer = peer->name, .local = &*local, .remote_blocks = remote});
      if (t.ok()) transfers.push_back(*std::move(t));
    }
    auto info = agent->GetPeer(peer->name);
    ASSERT_THAT(info, IsOk());
    EXPECT_EQ(info->state, PeerState::kFailed) << "iteration " << iter;
    EXPECT_TRUE(absl::IsUnavailable(info->status)) << info->status;
    for (Transfer& t : transfers) {
      absl::Status s = t.Wait(absl::Seconds(10));
      EXPECT_TRUE(s.ok() || absl::IsUnavailable(s)) << s;
      failed_transfers += absl::IsUnavailable(s) ? 1 : 0;
    }
    transfers.clear();
    EXPECT_EQ(pool->free_blocks(), pool_blocks) << "iteration " << iter;
    EXPECT_EQ(agent->GetStats(), baseline)
        << "iteration " << iter << "\n" << agent->ledger().Report();
    child.Wait();
  }
  std::printf("%s survived %d kills of %s; %d transfers ended with kUnavailable\n",
              self.c_str(), FaultIterations(), role.c_str(), failed_transfers);
}

// Known limitation with UCX 1.13, shared memory only: after a peer is killed
// mid-transfer, the surviving worker sometimes accepts no new shared-memory
// connection (seen under the sanitizer builds, in about 1 of 20 rounds in
// either direction: a new Connect from the same agent hangs in its
// handshake, while one from a fresh agent to the same peer succeeds). The
// likely cause is a shared-memory FIFO slot the dead peer reserved but never
// completed. So over shared memory each round uses a fresh survivor; its
// cleanup is checked all the same. Over TCP one survivor reconnects to a
// restarted peer of the same name every round.

// kill -9 of the decode process while this (prefill) process writes into it.
TEST_P(ProcessTest, KillDecodeMidTransfer) {
  KillMidTransfer("prefill", "decode", TransferOp::kWrite, /*pool_blocks=*/32, /*batch=*/8,
                  /*remote_blocks=*/64, /*fresh_survivor=*/SharedMemory(GetParam()));
}

// kill -9 of the prefill process while this (decode) process reads from it.
TEST_P(ProcessTest, KillPrefillMidRead) {
  KillMidTransfer("decode", "prefill-serve", TransferOp::kRead, /*pool_blocks=*/64,
                  /*batch=*/16, /*remote_blocks=*/32, /*fresh_survivor=*/SharedMemory(GetParam()));
}

// A peer's death touches only that peer: transfers to another peer go on.
TEST_P(ProcessTest, KillOnePeerOthersUntouched) {
  if (SharedMemory(GetParam())) {
    // The survivor keeps using its worker after the kill, which the known
    // shared-memory limitation (see KillDecodeMidTransfer) can stall.
    GTEST_SKIP() << "shared memory: a worker may stall after a peer is killed (UCX 1.13)";
  }
  auto prefill = *Agent::Create(Options("prefill"));
  KvPool* pool = *prefill->CreatePool("kv", Layout(32));
  auto other = *Agent::Create(Options("decode-b"));
  KvPool* other_pool = *other->CreatePool("kv", Layout(64));
  uint16_t other_port = *other->Listen("127.0.0.1", 0);
  ASSERT_THAT(prefill->Connect("127.0.0.1", other_port), IsOk());
  ChildProcess child(PeerArgs("decode"));
  uint16_t port = ParsePort(child.ReadUntil("PORT"));
  ASSERT_NE(port, 0);
  ASSERT_THAT(prefill->Connect("127.0.0.1", port), IsOk());

  BlockSet to_b = *pool->Lease(8);
  for (size_t i = 0; i < 8; ++i) FillBlock(to_b, i, 77, static_cast<uint32_t>(40 + i));
  std::vector<uint32_t> remote = {40, 41, 42, 43, 44, 45, 46, 47};
  auto before = prefill->PostTransfer({.op = TransferOp::kWrite, .peer = "decode-b",
                                       .local = &to_b, .remote_blocks = remote});
  ASSERT_THAT(before, IsOk());
  child.Kill(SIGKILL);
  child.Wait();
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (prefill->GetPeer("decode")->state == PeerState::kConnected && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(prefill->GetPeer("decode")->state, PeerState::kFailed);
  EXPECT_EQ(prefill->GetPeer("decode-b")->state, PeerState::kConnected);
  EXPECT_THAT(before->Wait(absl::Seconds(10)), IsOk());
  auto after = prefill->PostTransfer({.op = TransferOp::kWrite, .peer = "decode-b",
                                      .local = &to_b, .remote_blocks = remote,
                                      .notification = "after the kill"});
  ASSERT_THAT(after, IsOk());
  ASSERT_THAT(after->Wait(absl::Seconds(10)), IsOk());
  // The receiver reads the blocks once told they are there.
  auto notes = other->WaitForNotifications(absl::Seconds(10));
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_EQ(notes[0].payload, "after the kill");
  BlockSet check = *other_pool->LeaseIds(remote);
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(BlockChecksum(check, i), ExpectedChecksum(Layout(64), 77, remote[i]));
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, ProcessTest, ::testing::Values("posix,sysv,tcp", "tcp"),
                         [](const auto& param_info) {
                           return std::string(param_info.index == 0 ? "shm" : "tcp");
                         });

// Two hosts: a decode process in one network namespace, a prefill process in
// another, joined by a veth pair with addresses that exist only there.
class NetnsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    suffix_ = std::to_string(getpid() % 100000);
    ns_a_ = "kvfa" + suffix_;
    ns_b_ = "kvfb" + suffix_;
    subnet_ = "10.231." + std::to_string(getpid() % 250) + ".";
    if (!Run("ip netns add " + ns_a_)) {
      GTEST_SKIP() << "cannot create network namespaces here (needs root and iproute2)";
    }
    created_ = true;
    ASSERT_TRUE(Run("ip netns add " + ns_b_));
    ASSERT_TRUE(Run("ip link add va" + suffix_ + " netns " + ns_a_ + " type veth peer name vb" +
                    suffix_ + " netns " + ns_b_));
    ASSERT_TRUE(InNs(ns_a_, "ip addr add " + subnet_ + "1/24 dev va" + suffix_));
    ASSERT_TRUE(InNs(ns_b_, "ip addr add " + subnet_ + "2/24 dev vb" + suffix_));
    for (const std::string& ns : {ns_a_, ns_b_}) {
      ASSERT_TRUE(InNs(ns, "ip link set lo up"));
    }
    ASSERT_TRUE(InNs(ns_a_, "ip link set va" + suffix_ + " up"));
    ASSERT_TRUE(InNs(ns_b_, "ip link set vb" + suffix_ + " up"));
    // A veth pair carries traffic only once both ends report carrier.
    absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (!(Run("ip -n " + ns_a_ + " link show va" + suffix_ + " | grep -q 'state UP'") &&
             Run("ip -n " + ns_b_ + " link show vb" + suffix_ + " | grep -q 'state UP'"))) {
      ASSERT_LT(absl::Now(), deadline) << "veth pair never came up";
      absl::SleepFor(absl::Milliseconds(20));
    }
  }
  void TearDown() override {
    if (!created_) return;
    Run("ip netns del " + ns_a_);
    Run("ip netns del " + ns_b_);
  }
  static bool Run(const std::string& cmd) {
    return std::system((cmd + " >/dev/null 2>&1").c_str()) == 0;
  }
  static bool InNs(const std::string& ns, const std::string& cmd) {
    return Run("ip netns exec " + ns + " " + cmd);
  }

  std::string suffix_, ns_a_, ns_b_, subnet_;
  bool created_ = false;
};

TEST_F(NetnsTest, PrefillHostWritesIntoDecodeHostOverTcp) {
  // Another host's address needs a shared secret (or an explicit opt-out).
  ChildProcess decode({"ip", "netns", "exec", ns_a_, kPeerBinary, "--role=decode",
                       "--tls=tcp", "--listen=" + subnet_ + "1", "--secret=netns-test"});
  uint16_t port = ParsePort(decode.ReadUntil("PORT"));
  ASSERT_NE(port, 0);
  ChildProcess prefill({"ip", "netns", "exec", ns_b_, kPeerBinary, "--role=prefill-push",
                        "--tls=tcp", "--count=8", "--seed=500", "--secret=netns-test",
                        absl::StrCat("--connect=", subnet_, "1:", port)});
  ASSERT_EQ(prefill.ReadUntil("READY").value_or("timeout"), "READY decode");
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(decode.ReadUntil("OK").value_or("timeout"), absl::StrCat("OK ", 500 + i));
  }
  EXPECT_EQ(prefill.Wait(), 0);
  decode.CloseStdin();
  EXPECT_EQ(decode.Wait(), 0);
}

TEST_F(NetnsTest, NamespacesCannotReachEachOtherWithoutTheLink) {
  // The decode host listens on its veth address; the loopback of another
  // namespace is another host, so a connection there must fail.
  ChildProcess decode({"ip", "netns", "exec", ns_a_, kPeerBinary, "--role=decode",
                       "--tls=tcp", "--listen=127.0.0.1"});
  uint16_t port = ParsePort(decode.ReadUntil("PORT"));
  ASSERT_NE(port, 0);
  ChildProcess prefill({"ip", "netns", "exec", ns_b_, kPeerBinary, "--role=prefill-push",
                        "--tls=tcp", "--count=1", absl::StrCat("--connect=127.0.0.1:", port)});
  auto line = prefill.ReadLine(absl::Seconds(20));
  ASSERT_TRUE(line.has_value());
  EXPECT_EQ(line->rfind("ERROR Connect", 0), 0u) << *line;
  prefill.Wait();
}

}  // namespace
}  // namespace kvferry
