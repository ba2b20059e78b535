// Agents in separate processes (fork/exec of kvferry_test_peer): transfers
// over shared memory and TCP with verified contents, kill -9 of either side
// mid-transfer in a loop, and two "hosts" made of network namespaces.
#include <signal.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <future>
#include <mutex>
#include <memory>
#include <ostream>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "src/kernel_copier.h"
#include "tests/child_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

constexpr const char* kPeerBinary = KVFERRY_TEST_PEER;

int FaultIterations() {
  int n = 20;
  if (const char* env = std::getenv("KVFERRY_FAULT_ITERATIONS")) (void)absl::SimpleAtoi(env, &n);
  return n;
}

// A helper process started with `args`, and an agent here (`options`, with a
// `blocks`-block pool) connected to it. Members go in reverse: the agent
// before the process.
struct ProcessPair {
  std::unique_ptr<ChildProcess> child;
  std::unique_ptr<Agent> agent;
  KvPool* pool = nullptr;
  PeerInfo peer;
  uint16_t port = 0;  // the helper's listener
};

void StartPair(const std::vector<std::string>& args, const AgentOptions& options,
               uint32_t blocks, ProcessPair* pair) {
  pair->child = std::make_unique<ChildProcess>(args);
  ASSERT_TRUE(pair->child->started());
  pair->port = ParsePort(pair->child->ReadUntil("PORT"));
  ASSERT_NE(pair->port, 0);
  pair->agent = *Agent::Create(options);
  pair->pool = *pair->agent->CreatePool("kv", Layout(blocks));
  auto peer = pair->agent->Connect("127.0.0.1", pair->port);
  ASSERT_THAT(peer, IsOk());
  pair->peer = *std::move(peer);
}

// A transport (UCX_TLS) and who allocates both sides' pools: anonymous
// memory on one host moves by kernel copy (AgentOptions::kernel_copy).
struct ProcessCase {
  const char* name;
  const char* tls;
  bool anonymous_pools = false;
};
void PrintTo(const ProcessCase& c, std::ostream* os) { *os << c.name; }

class ProcessTest : public ::testing::TestWithParam<ProcessCase> {
 protected:
  // `peer_timeout`: kLivenessPeerTimeout only in the tests that must detect
  // a killed or stopped peer (tests/test_util.h).
  AgentOptions Options(const std::string& name, absl::Duration peer_timeout = kPeerTimeout) {
    AgentOptions o;
    o.name = name;
    o.leak_policy = LeakPolicy::kAbort;
    o.peer_timeout = peer_timeout;
    o.ucx_config = {{"TLS", GetParam().tls}};
    if (GetParam().anonymous_pools) o.pool_memory = PoolMemorySource::kAnonymousMmap;
    return o;
  }
  // The helper process; it is never the side that must detect a failure
  // here, so it always gets the generous timeout.
  std::vector<std::string> PeerArgs(const std::string& role) {
    return {kPeerBinary, "--role=" + role, absl::StrCat("--tls=", GetParam().tls),
            GetParam().anonymous_pools ? "--pool_memory=anon" : "--pool_memory=ucx",
            absl::StrCat("--peer_timeout=", absl::ToInt64Seconds(kPeerTimeout))};
  }
  // The path this process's transfers to `peer` take: the one this case is for.
  void ExpectDataPath(const PeerInfo& peer) {
    const std::string tls = GetParam().tls;
    EXPECT_EQ(peer.data_path, tls == "tcp"                  ? kDataPathTcp
                              : GetParam().anonymous_pools ? kDataPathKernelCopy
                                                           : kDataPathShmDirect)
        << peer.name;
  }
  // kvferry_test_peer as decode, and an agent "prefill" here (32 blocks)
  // connected to it.
  void StartDecode(absl::Duration peer_timeout, ProcessPair* p) {
    StartPair(PeerArgs("decode"), Options("prefill", peer_timeout), 32, p);
  }
  void KillMidTransfer(const std::string& self, const std::string& role, TransferOp op,
                       uint32_t pool_blocks, uint32_t batch, uint32_t remote_blocks);
  void ChurnRounds(TransferOp op);
};

TEST_P(ProcessTest, WriteIntoDecodeProcess) {
  ProcessPair p;
  ASSERT_NO_FATAL_FAILURE(StartPair(PeerArgs("decode"), Options("prefill"), 32, &p));
  ChildProcess& child = *p.child;
  Agent* prefill = p.agent.get();
  KvPool* pool = p.pool;
  ExpectDataPath(p.peer);
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
  ProcessPair p;
  ASSERT_NO_FATAL_FAILURE(StartPair(PeerArgs("prefill-serve"), Options("decode"), 64, &p));
  Agent* decode = p.agent.get();
  KvPool* pool = p.pool;
  ExpectDataPath(p.peer);
  BlockSet local = *pool->Lease(32);
  std::vector<uint32_t> remote(32);
  for (uint32_t i = 0; i < 32; ++i) remote[i] = 31 - i;
  auto t = decode->PostTransfer({.op = TransferOp::kRead, .peer = p.peer.name, .local = &local,
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
                                  uint32_t remote_blocks) {
  std::unique_ptr<Agent> agent;
  KvPool* pool = nullptr;
  Stats baseline;
  int failed_transfers = 0;
  for (int iter = 0; iter < FaultIterations(); ++iter) {
    if (agent == nullptr) {
      agent = *Agent::Create(Options(self, kLivenessPeerTimeout));
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
      absl::Status s = t.Wait(absl::Seconds(30));
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

// One survivor reconnects to a restarted peer of the same name every round,
// over shared memory and TCP alike.

// kill -9 of the decode process while this (prefill) process writes into it.
TEST_P(ProcessTest, KillDecodeMidTransfer) {
  KillMidTransfer("prefill", "decode", TransferOp::kWrite, /*pool_blocks=*/32, /*batch=*/8,
                  /*remote_blocks=*/64);
}

// kill -9 of the prefill process while this (decode) process reads from it.
TEST_P(ProcessTest, KillPrefillMidRead) {
  KillMidTransfer("decode", "prefill-serve", TransferOp::kRead, /*pool_blocks=*/64,
                  /*batch=*/16, /*remote_blocks=*/32);
}

// A peer's death touches only that peer: transfers to another peer go on.
TEST_P(ProcessTest, KillOnePeerOthersUntouched) {
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
  EXPECT_TRUE(WaitFor([&] { return prefill->GetPeer("decode")->state == PeerState::kFailed; }));
  EXPECT_EQ(prefill->GetPeer("decode-b")->state, PeerState::kConnected);
  EXPECT_THAT(before->Wait(absl::Seconds(30)), IsOk());
  auto after = prefill->PostTransfer({.op = TransferOp::kWrite, .peer = "decode-b",
                                      .local = &to_b, .remote_blocks = remote,
                                      .notification = "after the kill"});
  ASSERT_THAT(after, IsOk());
  ASSERT_THAT(after->Wait(absl::Seconds(30)), IsOk());
  // The receiver reads the blocks once told they are there.
  auto notes = other->WaitForNotifications(absl::Seconds(30));
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_EQ(notes[0].payload, "after the kill");
  BlockSet check = *other_pool->LeaseIds(remote);
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(BlockChecksum(check, i), ExpectedChecksum(Layout(64), 77, remote[i]));
  }
}

int ChurnRoundCount() {
  int n = 100;
  if (const char* env = std::getenv("KVFERRY_CHURN_ROUNDS")) (void)absl::SimpleAtoi(env, &n);
  return n;
}

// One agent outlives ChurnRounds() peers of the same name, each a new process
// (a restart: new incarnation). Every round the survivor connects, moves and
// verifies a batch (`op`: WRITE into a decode process or READ from a prefill
// process), and the peer departs: gracefully (stdin closed, it says goodbye)
// or killed with SIGKILL, alternately. Every round must connect; afterwards
// the survivor's counters, its UCX shared-memory segments, their mapped size
// and the resident shared memory must be back where they were before the
// first peer came.
void ProcessTest::ChurnRounds(TransferOp op) {
  const bool write = op == TransferOp::kWrite;
  auto agent = *Agent::Create(Options(write ? "prefill" : "decode"));
  KvPool* pool = *agent->CreatePool("kv", Layout(64));
  const Stats baseline = agent->GetStats();
  auto before = agent->GetMemoryReport();
  ASSERT_THAT(before, IsOk());
  int connected = 0, verified = 0;
  const int rounds = ChurnRoundCount();
  for (int round = 0; round < rounds; ++round) {
    const uint64_t seed = 1000 + round;
    std::vector<std::string> args = PeerArgs(write ? "decode" : "prefill-serve");
    args.push_back(absl::StrCat("--seed=", seed));
    ChildProcess child(args);
    uint16_t port = ParsePort(child.ReadUntil("PORT"));
    ASSERT_NE(port, 0) << "round " << round;
    auto peer = agent->Connect("127.0.0.1", port);
    EXPECT_THAT(peer, IsOk()) << "round " << round;
    if (!peer.ok()) continue;
    ++connected;
    BlockSet local = *pool->Lease(8);
    std::vector<uint32_t> remote;
    for (uint32_t j = 0; j < 8; ++j) remote.push_back((round * 8 + j) % 32);
    std::string note;
    if (write) {
      for (size_t j = 0; j < 8; ++j) FillBlock(local, j, seed, remote[j]);
      note = absl::StrCat("CHECK ", seed);
      for (uint32_t r : remote) absl::StrAppend(&note, " ", r);
    }
    auto t = agent->PostTransfer({.op = op, .peer = peer->name, .local = &local,
                                  .remote_blocks = remote, .notification = note});
    ASSERT_THAT(t, IsOk()) << "round " << round;
    EXPECT_THAT(t->Wait(absl::Seconds(30)), IsOk()) << "round " << round;
    bool ok = true;
    if (write) {
      ok = child.ReadUntil("OK").value_or("timeout") == absl::StrCat("OK ", seed);
    } else {
      for (size_t j = 0; j < 8; ++j) {
        ok = ok && BlockChecksum(local, j) == ExpectedChecksum(Layout(64), seed, remote[j]);
      }
    }
    EXPECT_TRUE(ok) << "round " << round;
    verified += ok ? 1 : 0;
    local.Reset();
    if (round % 2 == 0) {
      child.CloseStdin();  // it says goodbye and exits
      EXPECT_EQ(child.Wait(), 0) << "round " << round;
    } else {
      child.Kill(SIGKILL);
      child.Wait();
    }
    EXPECT_TRUE(WaitFor([&] { return agent->GetPeer(peer->name)->state != PeerState::kConnected; }))
        << "round " << round;
  }
  EXPECT_EQ(connected, rounds);
  EXPECT_EQ(verified, rounds);
  EXPECT_TRUE(WaitFor([&] { return agent->GetStats() == baseline; })) << agent->ledger().Report();
  // UCX releases what a departed peer left (its segments) once the endpoint
  // is gone; wait for exactly what is asserted.
  absl::StatusOr<MemoryReport> after;
  EXPECT_TRUE(WaitFor([&] {
    after = agent->GetMemoryReport();
    return after.ok() && after->process.ucx_segments <= before->process.ucx_segments &&
           after->process.ucx_segment_bytes <= before->process.ucx_segment_bytes;
  }));
  ASSERT_THAT(after, IsOk());
  std::printf("churn %s %s: %d/%d rounds connected and verified; ucx segments %llu -> %llu, "
              "mapped %.1f -> %.1f MiB, resident shared %.1f -> %.1f MiB\n",
              write ? "WRITE" : "READ", GetParam().name, verified, rounds,
              static_cast<unsigned long long>(before->process.ucx_segments),
              static_cast<unsigned long long>(after->process.ucx_segments),
              before->process.ucx_segment_bytes / 1048576.0,
              after->process.ucx_segment_bytes / 1048576.0,
              before->process.shmem_rss_bytes / 1048576.0,
              after->process.shmem_rss_bytes / 1048576.0);
  EXPECT_EQ(after->process.ucx_segments, before->process.ucx_segments);
  EXPECT_EQ(after->process.ucx_segment_bytes, before->process.ucx_segment_bytes);
  // Resident shared memory: the survivor's own FIFOs may have been touched
  // further; what must not happen is growth per departed peer.
  EXPECT_LE(after->process.shmem_rss_bytes, before->process.shmem_rss_bytes + (8u << 20));
}

TEST_P(ProcessTest, ReconnectAndChurnWrite) { ChurnRounds(TransferOp::kWrite); }
TEST_P(ProcessTest, ReconnectAndChurnRead) { ChurnRounds(TransferOp::kRead); }

// A decode process stopped (SIGSTOP) while this process writes into it: the
// writer gives up on it after peer_timeout (its transfers end kUnavailable),
// then the process resumes (SIGCONT). Neither process may die; the resumed
// one accepts new connections, from the same writer and from a fresh one.
// Offers to another process: killed, its offers end and the blocks come
// back; stopped, an expired offer's fence waits for the peer until its
// liveness timeout fails it, and only then do the blocks come back.
TEST_P(ProcessTest, OfferToKilledPeerReturnsItsBlocks) {
  ProcessPair p;
  ASSERT_NO_FATAL_FAILURE(StartDecode(kLivenessPeerTimeout, &p));
  BlockSet lent = *p.pool->Lease(8);
  auto offer = p.agent->Offer(lent, "decode", absl::Seconds(600));
  ASSERT_THAT(offer, IsOk());
  lent.Reset();
  EXPECT_EQ(p.pool->free_blocks(), 24u);
  ASSERT_EQ(kill(p.child->pid(), SIGKILL), 0);
  EXPECT_THAT(offer->Wait(absl::Seconds(60)),
              StatusIs(absl::StatusCode::kUnavailable, "ended with the peer"));
  EXPECT_EQ(offer->state(), OfferState::kPeerFailed);
  EXPECT_EQ(p.pool->free_blocks(), 32u);
  EXPECT_EQ(p.agent->GetStats().Live(ResourceKind::kOffer), 0);
}

TEST_P(ProcessTest, ExpiredOfferToStalledPeerWaitsForItsFence) {
  // Liveness, with room: the checks below must run before the stopped peer
  // is failed, i.e. within peer_timeout of the SIGSTOP, even when this
  // thread is starved on a busy machine.
  constexpr absl::Duration kStallTimeout = absl::Seconds(10);
  ProcessPair p;
  ASSERT_NO_FATAL_FAILURE(StartDecode(kStallTimeout, &p));
  ASSERT_EQ(kill(p.child->pid(), SIGSTOP), 0);
  BlockSet lent = *p.pool->Lease(4);
  constexpr absl::Duration kTtl = absl::Milliseconds(100);
  auto offer = p.agent->Offer(lent, "decode", kTtl);
  const absl::Time expired_at = absl::Now() + kTtl;  // after the offer's own deadline
  ASSERT_THAT(offer, IsOk());
  lent.Reset();
  // Past the ttl, a pass of this agent (Progress runs one: its offer check
  // begins the expiry and asks the peer for its fence) ...
  ASSERT_TRUE(WaitFor([&] { return absl::Now() > expired_at; }));
  p.agent->Progress();
  // ... and the stopped peer cannot confirm its fence: still lent while the
  // peer counts as connected. Read in that order: the peer fails before the
  // offer can end, so a peer still connected after the reads was connected
  // during them.
  const uint32_t free_seen = p.pool->free_blocks();
  const OfferState seen = offer->state();
  ASSERT_EQ(p.agent->GetPeer("decode")->state, PeerState::kConnected)
      << "this thread was held for longer than peer_timeout after the SIGSTOP";
  EXPECT_EQ(seen, OfferState::kOpen);
  EXPECT_EQ(free_seen, 28u);
  // The liveness timeout fails the peer and closes its data endpoint.
  EXPECT_THAT(offer->Wait(absl::Seconds(60)),
              StatusIs(absl::StatusCode::kDeadlineExceeded, "expired"));
  EXPECT_EQ(offer->state(), OfferState::kExpired);
  EXPECT_EQ(p.agent->GetPeer("decode")->state, PeerState::kFailed);
  EXPECT_EQ(p.pool->free_blocks(), 32u);
  ASSERT_EQ(kill(p.child->pid(), SIGCONT), 0);
}

TEST_P(ProcessTest, StalledPeerResumes) {
  ProcessPair p;
  ASSERT_NO_FATAL_FAILURE(StartDecode(kLivenessPeerTimeout, &p));
  std::vector<Transfer> transfers;
  for (int i = 0; i < 4; ++i) {
    BlockSet local = *p.pool->Lease(8);
    std::vector<uint32_t> remote = {0, 1, 2, 3, 4, 5, 6, 7};
    auto t = p.agent->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                                    .remote_blocks = remote});
    ASSERT_THAT(t, IsOk());
    transfers.push_back(*std::move(t));
    if (i == 1) {
      ASSERT_EQ(kill(p.child->pid(), SIGSTOP), 0);
    }
  }
  EXPECT_TRUE(WaitFor([&] { return p.agent->GetPeer("decode")->state == PeerState::kFailed; }));
  for (Transfer& t : transfers) {
    absl::Status s = t.Wait(absl::Seconds(30));
    EXPECT_TRUE(s.ok() || absl::IsUnavailable(s)) << s;
  }
  EXPECT_EQ(p.pool->free_blocks(), 32u);
  ASSERT_EQ(kill(p.child->pid(), SIGCONT), 0);
  // The resumed process notices that its peer left, and takes it back.
  absl::StatusOr<PeerInfo> again;
  EXPECT_TRUE(WaitFor([&] {
    again = p.agent->Connect("127.0.0.1", p.port);
    return again.ok();
  })) << again.status();
  BlockSet local = *p.pool->Lease(2);
  FillBlock(local, 0, 77, 10);
  FillBlock(local, 1, 77, 11);
  auto t = p.agent->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                                  .remote_blocks = {10, 11}, .notification = "CHECK 77 10 11"});
  ASSERT_THAT(t, IsOk());
  EXPECT_THAT(t->Wait(absl::Seconds(30)), IsOk());
  EXPECT_EQ(p.child->ReadUntil("OK").value_or("timeout"), "OK 77");
  // Stopped again, and this time the writer is destroyed while it sleeps.
  ASSERT_EQ(kill(p.child->pid(), SIGSTOP), 0);
  local.Reset();
  t = Transfer();
  transfers.clear();  // a handle kept past its agent would be a survivor
  p.agent.reset();
  ASSERT_EQ(kill(p.child->pid(), SIGCONT), 0);
  auto fresh = *Agent::Create(Options("prefill-2"));
  KvPool* fresh_pool = *fresh->CreatePool("kv", Layout(32));
  ASSERT_THAT(fresh->Connect("127.0.0.1", p.port), IsOk());
  BlockSet more = *fresh_pool->Lease(1);
  FillBlock(more, 0, 78, 12);
  auto t2 = fresh->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &more,
                                 .remote_blocks = {12}, .notification = "CHECK 78 12"});
  ASSERT_THAT(t2, IsOk());
  EXPECT_THAT(t2->Wait(absl::Seconds(30)), IsOk());
  EXPECT_EQ(p.child->ReadUntil("OK").value_or("timeout"), "OK 78");
  p.child->CloseStdin();
  EXPECT_EQ(p.child->Wait(), 0);
}

// The kernel-copy path takes no work from the peer: a stopped process
// (SIGSTOP) is written into and read from, and each transfer completes while
// it is stopped (UCX's am-emulated path would wait for the peer's progress
// thread). The written blocks are checked by the peer once it resumes.
// A kvferry_test_peer in `role` with anonymous pools on shared memory, an
// agent `name` here with a `blocks`-block pool of the same kind, connected
// to it over kernel copy.
void StartKernelCopyPair(std::vector<std::string> role_args, const std::string& name,
                         uint32_t blocks, ProcessPair* pair,
                         absl::Duration peer_timeout = absl::Seconds(60)) {
  std::vector<std::string> args = {kPeerBinary, "--tls=posix,sysv,tcp", "--pool_memory=anon"};
  args.insert(args.end(), role_args.begin(), role_args.end());
  AgentOptions o;
  o.name = name;
  o.leak_policy = LeakPolicy::kAbort;
  o.peer_timeout = peer_timeout;  // by default long: a stopped peer is not a failure
  o.ucx_config = {{"TLS", "posix,sysv,tcp"}};
  o.pool_memory = PoolMemorySource::kAnonymousMmap;
  ASSERT_NO_FATAL_FAILURE(StartPair(args, o, blocks, pair));
  ASSERT_EQ(pair->peer.data_path, kDataPathKernelCopy);
}

TEST(KernelCopyTest, MovesDataWhileThePeerProcessIsStopped) {
  {
    ProcessPair p;
    ASSERT_NO_FATAL_FAILURE(StartKernelCopyPair({"--role=decode"}, "prefill", 32, &p));
    ASSERT_EQ(kill(p.child->pid(), SIGSTOP), 0);
    BlockSet local = *p.pool->Lease(8);
    std::vector<uint32_t> remote = {3, 9, 10, 11, 12, 40, 41, 63};
    for (size_t j = 0; j < remote.size(); ++j) FillBlock(local, j, 501, remote[j]);
    std::string note = "CHECK 501";
    for (uint32_t r : remote) absl::StrAppend(&note, " ", r);
    auto t = p.agent->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                                    .remote_blocks = remote, .notification = note});
    ASSERT_THAT(t, IsOk());
    EXPECT_THAT(t->Wait(absl::Seconds(30)), IsOk());
    ASSERT_EQ(kill(p.child->pid(), SIGCONT), 0);
    EXPECT_EQ(p.child->ReadUntil("OK").value_or("timeout"), "OK 501");
    p.child->CloseStdin();
    EXPECT_EQ(p.child->Wait(), 0);
  }
  {
    ProcessPair p;
    ASSERT_NO_FATAL_FAILURE(
        StartKernelCopyPair({"--role=prefill-serve", "--seed=502"}, "decode", 64, &p));
    ASSERT_EQ(kill(p.child->pid(), SIGSTOP), 0);
    BlockSet local = *p.pool->Lease(32);
    std::vector<uint32_t> remote(32);
    for (uint32_t i = 0; i < 32; ++i) remote[i] = (i * 7) % 32;
    auto t = p.agent->PostTransfer({.op = TransferOp::kRead, .peer = p.peer.name,
                                    .local = &local, .remote_blocks = remote});
    ASSERT_THAT(t, IsOk());
    EXPECT_THAT(t->Wait(absl::Seconds(30)), IsOk());
    for (size_t i = 0; i < 32; ++i) {
      EXPECT_EQ(BlockChecksum(local, i), ExpectedChecksum(Layout(64), 502, remote[i])) << i;
    }
    ASSERT_EQ(kill(p.child->pid(), SIGCONT), 0);
    p.child->CloseStdin();
    EXPECT_EQ(p.child->Wait(), 0);
  }
}

// A kernel copy in progress delays nothing but the copies queued behind it:
// a post on an offer's ticket returns, a handshake with a third process
// completes, and pings keep flowing both ways (the peer process fails a peer
// it has not heard from for 3 s; the copy is held for three times that).
TEST(KernelCopyTest, NothingWaitsBehindACopyInProgress) {
  ProcessPair p;
  ASSERT_NO_FATAL_FAILURE(StartKernelCopyPair(
      {"--role=prefill-serve", "--seed=504", "--offer_to=decode", "--peer_timeout=3"}, "decode",
      64, &p,
      /*peer_timeout=*/absl::Seconds(4)));
  const std::string line = p.child->ReadUntil("TICKET").value_or("timeout");
  ASSERT_TRUE(absl::StartsWith(line, "TICKET ")) << line;
  const std::string ticket = absl::HexStringToBytes(line.substr(7));
  ChildProcess other({kPeerBinary, "--role=decode", "--name=other", "--tls=posix,sysv,tcp",
                      "--pool_memory=anon"});
  const uint16_t other_port = ParsePort(other.ReadUntil("PORT"));
  ASSERT_NE(other_port, 0);

  // Holds the kernel copier's next copy until opened.
  HookGate gate(&internal::kernel_copy_test_hook);
  BlockSet first = *p.pool->Lease(1);
  auto held = p.agent->PostTransfer(
      {.op = TransferOp::kRead, .peer = p.peer.name, .local = &first, .remote_blocks = {5}});
  ASSERT_THAT(held, IsOk());
  ASSERT_TRUE(gate.WaitEntered(absl::Seconds(60)));
  const absl::Time held_since = absl::Now();

  BlockSet second = *p.pool->Lease(32);
  auto post = std::async(std::launch::async, [&] {
    return p.agent->PostTransfer(
        {.op = TransferOp::kRead, .local = &second, .offer_ticket = ticket});
  });
  const bool posted = post.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  absl::StatusOr<PeerInfo> third = absl::DeadlineExceededError("not tried: the post waited");
  if (posted) third = p.agent->Connect("127.0.0.1", other_port, absl::Seconds(60));
  // Hold on for three of the peer's timeouts.
  while (absl::Now() - held_since < absl::Seconds(9)) absl::SleepFor(absl::Milliseconds(50));
  const TransferState held_state = held->state();
  auto info = p.agent->GetPeer(p.peer.name);
  gate.Open();

  EXPECT_TRUE(posted) << "a post on an offer's ticket waited for a kernel copy";
  EXPECT_THAT(third, IsOk()) << "a handshake waited for a kernel copy";
  EXPECT_EQ(held_state, TransferState::kInFlight);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->state, PeerState::kConnected)
      << "the peer process failed this one while a copy was held: " << info->status;
  EXPECT_THAT(held->Wait(absl::Seconds(60)), IsOk());
  EXPECT_EQ(BlockChecksum(first, 0), ExpectedChecksum(Layout(64), 504, 5));
  if (posted) {
    auto on_ticket = post.get();
    ASSERT_THAT(on_ticket, IsOk());
    EXPECT_THAT(on_ticket->Wait(absl::Seconds(60)), IsOk());
    // The offer holds the peer's 32 blocks in lease order, 0..31.
    for (size_t i = 0; i < second.size(); ++i) {
      EXPECT_EQ(BlockChecksum(second, i), ExpectedChecksum(Layout(64), 504, i)) << i;
    }
  }
  other.CloseStdin();
  EXPECT_EQ(other.Wait(), 0);
  p.child->CloseStdin();
  EXPECT_EQ(p.child->Wait(), 0);
}

INSTANTIATE_TEST_SUITE_P(Transports, ProcessTest,
                         ::testing::Values(ProcessCase{"Shm", "posix,sysv,tcp"},
                                           ProcessCase{"Tcp", "tcp"},
                                           ProcessCase{"KernelCopy", "posix,sysv,tcp", true}),
                         [](const auto& param_info) {
                           return std::string(param_info.param.name);
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
}  // namespace kvferry::test
