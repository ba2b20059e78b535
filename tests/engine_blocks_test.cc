// Engine-owned block ids (TransferSpec::local_pool / local_blocks): transfers
// posted by ids on engine-registered memory, without leases, with a peer
// agent in another process (kvferry_test_peer). Two transfers in flight name
// the same block; Agent::FenceBlocks then lets the engine rewrite the blocks
// at once with canaries, and no late byte ever lands on them (READ) or
// leaves them (WRITE). Bad input is refused with its reason and leaves no
// count, transfer or lease behind; RemovePool fences id-posted transfers.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvferry/agent.h"
#include "tests/child_process.h"
#include "tests/engine_cache.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

constexpr const char* kPeerBinary = KVFERRY_TEST_PEER;
constexpr uint32_t kBlocks = 16;
constexpr uint64_t kSeed = 7;  // what the prefill-serve peer fills its blocks with

struct EngineCase {
  const char* name;
  const char* tls;       // UCX_TLS of both processes
  bool progress_thread;  // of the agent here
};
void PrintTo(const EngineCase& c, std::ostream* os) { *os << c.name; }

class EngineBlocksTest : public ::testing::TestWithParam<EngineCase> {
 protected:
  // Starts kvferry_test_peer in `role`, an agent "engine" here with the
  // engine's cache registered as pool "kv", and connects them.
  void Start(const std::string& role) {
    child_ = std::make_unique<ChildProcess>(std::vector<std::string>{
        kPeerBinary, "--role=" + role, absl::StrCat("--tls=", GetParam().tls),
        absl::StrCat("--seed=", kSeed),
        absl::StrCat("--peer_timeout=", absl::ToInt64Seconds(kPeerTimeout))});
    ASSERT_TRUE(child_->started());
    std::optional<std::string> line = child_->ReadUntil("PORT");
    uint32_t port = 0;
    ASSERT_TRUE(line && absl::SimpleAtoi(line->substr(5), &port)) << line.value_or("(eof)");
    AgentOptions o;
    o.name = "engine";
    o.leak_policy = LeakPolicy::kAbort;
    o.peer_timeout = kPeerTimeout;
    o.progress_thread = GetParam().progress_thread;
    o.ucx_config = {{"TLS", GetParam().tls}};
    auto agent = Agent::Create(o);
    ASSERT_THAT(agent, IsOk());
    agent_ = *std::move(agent);
    const KvRegion region = cache_.region();
    auto pool = agent_->RegisterPool("kv", layout_, {&region, 1});
    ASSERT_THAT(pool, IsOk());
    pool_ = *pool;
    auto peer = agent_->Connect("127.0.0.1", static_cast<uint16_t>(port));
    ASSERT_THAT(peer, IsOk());
    peer_ = peer->name;
  }
  void TearDown() override {
    agent_.reset();  // before the child, whose exit it would otherwise see
    child_.reset();
  }

  // The peer's next line, driving this agent meanwhile when it has no
  // progress thread (its notification may wait for a pass to be sent).
  std::optional<std::string> Verdict() {
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (absl::Now() < deadline) {
      if (!GetParam().progress_thread) agent_->Progress();
      if (auto line = child_->ReadLine(absl::Milliseconds(20))) return line;
    }
    return std::nullopt;
  }

  // Nothing of the id-posted transfers is left: counts, transfers, leases.
  void ExpectNothingLeft() {
    EXPECT_EQ(pool_->busy_blocks(), 0u);
    for (uint32_t id = 0; id < kBlocks; ++id) {
      auto n = pool_->InFlight(id);
      ASSERT_THAT(n, IsOk());
      EXPECT_EQ(*n, 0u) << "block " << id;
    }
    EXPECT_EQ(pool_->free_blocks(), kBlocks);
    const Stats stats = agent_->GetStats();
    EXPECT_EQ(stats.Live(ResourceKind::kTransfer), 0);
    EXPECT_EQ(stats.Live(ResourceKind::kBlockSet), 0);
  }

  const KvLayout layout_ = Layout(kBlocks);
  EngineCache cache_{layout_};  // outlives the agent
  std::unique_ptr<ChildProcess> child_;
  std::unique_ptr<Agent> agent_;
  KvPool* pool_ = nullptr;
  std::string peer_;
};

// Two READs into engine blocks, sharing four (a prefix both requests use):
// fence, rewrite with canaries at once, and no byte of either transfer
// arrives afterwards.
TEST_P(EngineBlocksTest, FenceThenRewriteNeverSeesALateByte) {
  ASSERT_NO_FATAL_FAILURE(Start("prefill-serve"));
  // A: local 0..7 <- remote 10..17. B: local 0..3, 8..11 <- remote 10..13,
  // 20..23, so the shared blocks get the same bytes from either.
  const std::vector<uint32_t> local_a = {0, 1, 2, 3, 4, 5, 6, 7};
  const std::vector<uint32_t> local_b = {0, 1, 2, 3, 8, 9, 10, 11};
  const std::vector<uint32_t> remote_b = {10, 11, 12, 13, 20, 21, 22, 23};
  auto a = agent_->PostTransfer({.op = TransferOp::kRead, .peer = peer_, .local_pool = "kv",
                                 .local_blocks = local_a,
                                 .remote_blocks = {10, 11, 12, 13, 14, 15, 16, 17}});
  ASSERT_THAT(a, IsOk());
  auto b = agent_->PostTransfer({.op = TransferOp::kRead, .peer = peer_, .local_pool = "kv",
                                 .local_blocks = local_b, .remote_ids = remote_b});
  ASSERT_THAT(b, IsOk());
  if (!GetParam().progress_thread) {
    // Nothing ends without progress: both are in flight, and the counts say so.
    EXPECT_EQ(*pool_->InFlight(0), 2u);
    EXPECT_EQ(*pool_->InFlight(3), 2u);
    EXPECT_EQ(*pool_->InFlight(4), 1u);
    EXPECT_EQ(*pool_->InFlight(11), 1u);
    EXPECT_EQ(*pool_->InFlight(12), 0u);
    EXPECT_EQ(pool_->busy_blocks(), 12u);
    // Named blocks are not leased out while named, leased or not.
    EXPECT_THAT(pool_->LeaseIds(std::vector<uint32_t>{2}),
                StatusIs(absl::StatusCode::kResourceExhausted, "block 2 is still named by 2"));
    EXPECT_THAT(pool_->Lease(kBlocks - 11),
                StatusIs(absl::StatusCode::kResourceExhausted, "not named by a transfer"));
    // A fence that cannot complete says how many are busy.
    EXPECT_THAT(agent_->FenceBlocks("kv", local_b, absl::ZeroDuration()),
                StatusIs(absl::StatusCode::kDeadlineExceeded, "8 of 8 blocks"));
  } else {
    EXPECT_LE(*pool_->InFlight(0), 2u);
  }
  // Blocks 12..15 were never named: fenced at once.
  EXPECT_THAT(agent_->FenceBlocks("kv", std::vector<uint32_t>{12, 13, 14, 15},
                                  absl::ZeroDuration()),
              IsOk());

  std::vector<uint32_t> named = local_a;
  named.insert(named.end(), local_b.begin() + 4, local_b.end());
  ASSERT_THAT(agent_->FenceBlocks("kv", named, absl::Seconds(60)), IsOk());
  // Fenced: the engine frees the blocks and rewrites them at once.
  for (uint32_t id : named) cache_.WriteCanary(id);
  EXPECT_EQ(a->state(), TransferState::kDone) << a->status();
  EXPECT_EQ(b->state(), TransferState::kDone) << b->status();
  ExpectNothingLeft();

  // A generous wait, driving progress meanwhile, for any late byte.
  const absl::Time until = absl::Now() + absl::Seconds(2);
  while (absl::Now() < until) {
    if (!GetParam().progress_thread) agent_->Progress();
    absl::SleepFor(absl::Milliseconds(5));
  }
  for (uint32_t id : named) {
    EXPECT_EQ(cache_.FirstNonCanary(id), -1) << "a late byte in block " << id;
  }
  // The data itself had arrived before the fence: rerun the reads, fence,
  // and check every block against the peer's whole pattern.
  a = agent_->PostTransfer({.op = TransferOp::kRead, .peer = peer_, .local_pool = "kv",
                            .local_blocks = local_a,
                            .remote_blocks = {10, 11, 12, 13, 14, 15, 16, 17}});
  ASSERT_THAT(a, IsOk());
  b = agent_->PostTransfer({.op = TransferOp::kRead, .peer = peer_, .local_pool = "kv",
                            .local_blocks = local_b, .remote_ids = remote_b});
  ASSERT_THAT(b, IsOk());
  ASSERT_THAT(agent_->FenceBlocks("kv", named, absl::Seconds(60)), IsOk());
  for (size_t i = 0; i < local_a.size(); ++i) {
    EXPECT_EQ(cache_.Checksum(local_a[i]), ExpectedChecksum(layout_, kSeed, static_cast<uint32_t>(10 + i)))
        << "block " << local_a[i];
  }
  for (size_t i = 4; i < local_b.size(); ++i) {
    EXPECT_EQ(cache_.Checksum(local_b[i]), ExpectedChecksum(layout_, kSeed, remote_b[i]))
        << "block " << local_b[i];
  }
  ExpectNothingLeft();
}

// WRITEs out of engine blocks by id: fenced, then overwritten with
// canaries at once; the peer, checking on the notification (sent once the
// data is visible there), sees the engine's bytes, never a canary.
TEST_P(EngineBlocksTest, WriteByIdsFenceThenRewrite) {
  ASSERT_NO_FATAL_FAILURE(Start("decode"));
  for (int round = 0; round < 4; ++round) {
    const uint64_t seed = 100 + round;
    std::vector<uint32_t> local, remote;
    for (uint32_t i = 0; i < 6; ++i) {
      local.push_back((round * 5 + i * 3) % kBlocks);  // scattered engine blocks
      remote.push_back(round * 8 + i);
    }
    for (size_t i = 0; i < local.size(); ++i) cache_.Fill(local[i], seed, remote[i]);
    auto t = agent_->PostTransfer(
        {.op = TransferOp::kWrite, .peer = peer_, .local_pool = "kv", .local_blocks = local,
         .remote_ids = remote,
         .notification = absl::StrCat("CHECK ", seed, " ", absl::StrJoin(remote, " "))});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(agent_->FenceBlocks("kv", local, absl::Seconds(60)), IsOk());
    for (uint32_t id : local) cache_.WriteCanary(id);
    EXPECT_THAT(t->status(), IsOk());
    std::optional<std::string> verdict = Verdict();
    ASSERT_TRUE(verdict.has_value());
    EXPECT_EQ(*verdict, absl::StrCat("OK ", seed));
  }
  ExpectNothingLeft();
}

// Bad input: each refused with its reason, and nothing left behind.
TEST_P(EngineBlocksTest, BadInputIsRefusedAndLeavesNothing) {
  ASSERT_NO_FATAL_FAILURE(Start("prefill-serve"));
  auto leased = pool_->LeaseIds(std::vector<uint32_t>{0, 1});
  ASSERT_THAT(leased, IsOk());
  const std::vector<uint32_t> two = {2, 3};
  const std::vector<uint32_t> remote = {4, 5};
  auto post = [&](TransferSpec spec) {
    spec.peer = peer_;
    return agent_->PostTransfer(spec).status();
  };
  EXPECT_THAT(post({.local = &*leased, .local_pool = "kv", .local_blocks = two,
                    .remote_blocks = remote}),
              StatusIs(absl::StatusCode::kInvalidArgument, "are both set"));
  EXPECT_THAT(post({.remote_blocks = remote}),
              StatusIs(absl::StatusCode::kInvalidArgument, "no local blocks"));
  EXPECT_THAT(post({.local_blocks = two, .remote_blocks = remote}),
              StatusIs(absl::StatusCode::kInvalidArgument, "needs local_pool"));
  EXPECT_THAT(post({.local_pool = "kv", .remote_blocks = remote}),
              StatusIs(absl::StatusCode::kInvalidArgument, "no local blocks"));
  EXPECT_THAT(post({.local_pool = "kv", .local_blocks = std::vector<uint32_t>{2, kBlocks},
                    .remote_blocks = remote}),
              StatusIs(absl::StatusCode::kOutOfRange,
                       absl::StrCat("local block id ", kBlocks, " is past the end of pool 'kv'")));
  EXPECT_THAT(post({.local_pool = "nope", .local_blocks = two, .remote_blocks = remote}),
              StatusIs(absl::StatusCode::kNotFound, "no pool 'nope'"));
  EXPECT_THAT(post({.local_pool = "kv", .local_blocks = std::vector<uint32_t>{3, 3},
                    .remote_blocks = remote}),
              StatusIs(absl::StatusCode::kInvalidArgument, "local block 3 listed twice"));
  EXPECT_THAT(post({.local_pool = "kv", .local_blocks = two, .remote_blocks = remote,
                    .remote_ids = remote}),
              StatusIs(absl::StatusCode::kInvalidArgument, "remote_ids (2 ids) are both set"));
  EXPECT_THAT(post({.local_pool = "kv", .local_blocks = two, .remote_ids = {remote.data(), 1}}),
              StatusIs(absl::StatusCode::kInvalidArgument, "pairs 2 local blocks with 1"));
  EXPECT_THAT(post({.local_pool = "kv", .local_blocks = two,
                    .remote_ids = std::vector<uint32_t>{4, 1000}}),
              StatusIs(absl::StatusCode::kOutOfRange, "remote block id 1000"));
  EXPECT_THAT(post({.local_pool = "kv", .local_blocks = two, .remote_blocks = remote,
                    .layer_begin = 9}),
              StatusIs(absl::StatusCode::kInvalidArgument, "layer range"));
  // The fence and the counts.
  EXPECT_THAT(agent_->FenceBlocks("nope", two), StatusIs(absl::StatusCode::kNotFound, "'nope'"));
  EXPECT_THAT(agent_->FenceBlocks("kv", std::vector<uint32_t>{kBlocks + 5}),
              StatusIs(absl::StatusCode::kOutOfRange, absl::StrCat("block id ", kBlocks + 5)));
  EXPECT_THAT(agent_->FenceBlocks("kv", two, absl::Seconds(-1)),
              StatusIs(absl::StatusCode::kInvalidArgument, "negative"));
  EXPECT_THAT(agent_->FenceBlocks("kv", {}, absl::ZeroDuration()), IsOk());
  EXPECT_THAT(pool_->InFlight(kBlocks),
              StatusIs(absl::StatusCode::kInvalidArgument, absl::StrCat("block id ", kBlocks)));
  leased->Reset();
  ExpectNothingLeft();
  EXPECT_EQ(agent_->GetStats().Live(ResourceKind::kTransferHandle), 0);

  // An id-post on a leased block is allowed (the engine owns its ids); the
  // lease's blocks come back once both the lease and the transfer are gone.
  auto lease = pool_->LeaseIds(std::vector<uint32_t>{5});
  ASSERT_THAT(lease, IsOk());
  auto t = agent_->PostTransfer({.op = TransferOp::kRead, .peer = peer_, .local_pool = "kv",
                                 .local_blocks = std::vector<uint32_t>{5},
                                 .remote_blocks = {6}});
  ASSERT_THAT(t, IsOk());
  lease->Reset();
  ASSERT_THAT(agent_->FenceBlocks("kv", std::vector<uint32_t>{5}, absl::Seconds(60)), IsOk());
  EXPECT_THAT(t->status(), IsOk());
  EXPECT_EQ(cache_.Checksum(5), ExpectedChecksum(layout_, kSeed, 6));
  ExpectNothingLeft();
}

// RemovePool waits for (and, past its timeout, cancels) transfers posted by
// ids: when it returns OK none is left, and the engine's memory is its own.
TEST_P(EngineBlocksTest, RemovePoolFencesIdPostedTransfers) {
  ASSERT_NO_FATAL_FAILURE(Start("prefill-serve"));
  std::vector<Transfer> posted;
  for (uint32_t i = 0; i < 4; ++i) {
    auto t = agent_->PostTransfer({.op = TransferOp::kRead, .peer = peer_, .local_pool = "kv",
                                   .local_blocks = std::vector<uint32_t>{0, 1, 2, i + 3},
                                   .remote_blocks = {i, i + 4, i + 8, i + 12}});
    ASSERT_THAT(t, IsOk());
    posted.push_back(*std::move(t));
  }
  ASSERT_THAT(agent_->RemovePool("kv", absl::Seconds(60)), IsOk());
  for (const Transfer& t : posted) {
    EXPECT_NE(t.state(), TransferState::kInFlight);
  }
  EXPECT_EQ(agent_->GetStats().Live(ResourceKind::kTransfer), 0);
  EXPECT_EQ(agent_->FindPool("kv"), nullptr);
  pool_ = nullptr;
  EXPECT_THAT(agent_->FenceBlocks("kv", std::vector<uint32_t>{0}),
              StatusIs(absl::StatusCode::kNotFound, "no pool 'kv'"));
  EXPECT_THAT(agent_->PostTransfer({.op = TransferOp::kRead, .peer = peer_, .local_pool = "kv",
                                    .local_blocks = std::vector<uint32_t>{0},
                                    .remote_blocks = {0}}),
              StatusIs(absl::StatusCode::kNotFound, "no pool 'kv'"));
}

INSTANTIATE_TEST_SUITE_P(Paths, EngineBlocksTest,
                         ::testing::Values(EngineCase{"shm_no_progress_thread", "posix,sysv,tcp", false},
                                           EngineCase{"tcp_progress_thread", "tcp", true}),
                         [](const auto& c) { return std::string(c.param.name); });

}  // namespace
}  // namespace kvferry::test
