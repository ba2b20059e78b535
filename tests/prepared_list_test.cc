// Prepared descriptor lists (Agent::Prepare, Agent::PostPrepared) with the
// peer agent in another process (kvferry_test_peer), over shared memory and
// TCP: WRITE then READ back through lists with reordered and repeated
// indices, compared byte for byte; head slices; a peer pool removed or
// replaced and a peer killed refuse later posts with their reason and keep
// nothing of the peer alive; bad input is refused naming the value and
// leaves no count behind; FenceBlocks fences prepared posts; a list alive
// when its agent goes is a survivor.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "tests/child_process.h"
#include "tests/engine_cache.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/tp_pattern.h"

namespace kvferry::test {
namespace {

using ::testing::HasSubstr;

constexpr const char* kPeerBinary = KVFERRY_TEST_PEER;
constexpr uint32_t kBlocks = 16;
constexpr uint64_t kSeed = 11;

struct PreparedCase {
  const char* name;
  const char* tls;       // UCX_TLS of both processes
  bool progress_thread;  // of the agent here
};
void PrintTo(const PreparedCase& c, std::ostream* os) { *os << c.name; }

class PreparedListTest : public ::testing::TestWithParam<PreparedCase> {
 protected:
  // Starts kvferry_test_peer --role=decode (pool "kv" of 64 blocks of
  // `peer_heads` heads, or Layout's), an agent "engine" here with engine
  // memory of `layout` registered as pool "kv", and connects them.
  void Start(const KvLayout& layout, uint32_t peer_heads = 0) {
    std::vector<std::string> argv = {kPeerBinary, "--role=decode",
                                     absl::StrCat("--tls=", GetParam().tls),
                                     absl::StrCat("--peer_timeout=",
                                                  absl::ToInt64Seconds(kPeerTimeout))};
    if (peer_heads != 0) argv.push_back(absl::StrCat("--heads=", peer_heads));
    child_ = std::make_unique<ChildProcess>(argv);
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
    cache_ = std::make_unique<EngineCache>(layout);
    const KvRegion region = cache_->region();
    auto pool = agent_->RegisterPool("kv", layout, {&region, 1});
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
  // progress thread.
  std::optional<std::string> PeerLine() {
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (absl::Now() < deadline) {
      if (!GetParam().progress_thread) agent_->Progress();
      if (auto line = child_->ReadLine(absl::Milliseconds(20))) return line;
    }
    return std::nullopt;
  }
  // Waits for `condition`, driving this agent when it has no progress thread.
  template <typename Condition>
  bool Await(Condition condition) {
    return WaitFor([&] {
      if (!GetParam().progress_thread) agent_->Progress();
      return condition();
    }, absl::Seconds(60));
  }
  bool PeerExports(const std::string& pool) {
    auto info = agent_->GetPeer(peer_);
    if (!info.ok()) return false;
    for (const std::string& p : info->pools) {
      if (p == pool) return true;
    }
    return false;
  }

  void ExpectNoCounts() {
    EXPECT_EQ(pool_->busy_blocks(), 0u);
    for (uint32_t id = 0; id < kBlocks; ++id) {
      auto n = pool_->InFlight(id);
      ASSERT_THAT(n, IsOk());
      EXPECT_EQ(*n, 0u) << "block " << id;
    }
    EXPECT_EQ(agent_->GetStats().Live(ResourceKind::kTransfer), 0);
  }

  absl::StatusOr<PreparedList> LocalList(std::span<const uint32_t> blocks,
                                         uint64_t slice_offset = 0, uint64_t slice_bytes = 0) {
    return agent_->Prepare({.pool = "kv", .blocks = blocks, .slice_offset = slice_offset,
                            .slice_bytes = slice_bytes});
  }
  absl::StatusOr<PreparedList> RemoteList(std::span<const uint32_t> blocks) {
    return agent_->Prepare({.peer = peer_, .pool = "kv", .blocks = blocks});
  }

  std::unique_ptr<EngineCache> cache_;  // outlives the agent
  std::unique_ptr<ChildProcess> child_;
  std::unique_ptr<Agent> agent_;
  KvPool* pool_ = nullptr;
  std::string peer_;
};

const std::vector<uint32_t> kAllLocal = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
// Remote blocks in descending order: list index i is block 63 - i.
const std::vector<uint32_t> kRemote = {63, 62, 61, 60, 59, 58, 57, 56};

// WRITE local blocks to the peer, then READ them back into other local
// blocks, both through prepared lists with indices out of order and
// repeated (a local block written to two remote blocks; a remote block read
// into two local blocks). The blocks read back equal the blocks written,
// byte for byte; blocks no index named stay zero.
TEST_P(PreparedListTest, WriteThenReadBackReorderedAndRepeated) {
  const KvLayout layout = Layout(kBlocks);
  ASSERT_NO_FATAL_FAILURE(Start(layout));
  for (uint32_t b = 0; b < 4; ++b) cache_->Fill(b, kSeed, 100 + b);
  auto local = LocalList(kAllLocal);
  ASSERT_THAT(local, IsOk());
  auto remote = RemoteList(kRemote);
  ASSERT_THAT(remote, IsOk());
  EXPECT_EQ(local->size(), kBlocks);
  EXPECT_FALSE(local->remote());
  EXPECT_TRUE(remote->remote());
  EXPECT_EQ(remote->peer(), peer_);
  EXPECT_EQ(remote->pool(), "kv");

  // Remote 63 <- 3, 62 <- 0, 61 <- 2, 60 <- 1, 59 <- 3.
  const std::vector<uint32_t> write_local = {3, 0, 2, 1, 3};
  const std::vector<uint32_t> write_remote = {0, 1, 2, 3, 4};
  auto w = agent_->PostPrepared(*local, write_local, *remote, write_remote,
                                {.op = TransferOp::kWrite});
  ASSERT_THAT(w, IsOk());
  ASSERT_THAT(w->Wait(absl::Seconds(60)), IsOk());
  EXPECT_EQ(w->telemetry().bytes, 5 * layout.chunk_bytes() * layout.num_layers *
                                      layout.num_planes());

  // 8 <- 59 (3), 9 <- 60 (1), 10 <- 61 (2), 11 <- 62 (0), 12 <- 63 (3),
  // 13 <- 63 again.
  const std::vector<uint32_t> read_local = {8, 9, 10, 11, 12, 13};
  const std::vector<uint32_t> read_remote = {4, 3, 2, 1, 0, 0};
  auto r = agent_->PostPrepared(*local, read_local, *remote, read_remote,
                                {.op = TransferOp::kRead});
  ASSERT_THAT(r, IsOk());
  ASSERT_THAT(r->Wait(absl::Seconds(60)), IsOk());
  EXPECT_EQ(r->state(), TransferState::kDone);

  const uint64_t chunk = layout.chunk_bytes();
  EXPECT_EQ(cache_->Differs(8, 0, 3, 0, chunk), "");
  EXPECT_EQ(cache_->Differs(9, 0, 1, 0, chunk), "");
  EXPECT_EQ(cache_->Differs(10, 0, 2, 0, chunk), "");
  EXPECT_EQ(cache_->Differs(11, 0, 0, 0, chunk), "");
  EXPECT_EQ(cache_->Differs(12, 0, 3, 0, chunk), "");
  EXPECT_EQ(cache_->Differs(13, 0, 3, 0, chunk), "");
  EXPECT_FALSE(cache_->AllZero(8, 0, chunk));  // the pattern, not zeros
  EXPECT_TRUE(cache_->AllZero(14, 0, chunk));
  EXPECT_TRUE(cache_->AllZero(15, 0, chunk));
  ExpectNoCounts();
}

// A layer range moves those layers only.
TEST_P(PreparedListTest, LayerRangeMovesThoseLayersOnly) {
  const KvLayout layout = Layout(kBlocks);
  ASSERT_NO_FATAL_FAILURE(Start(layout));
  cache_->Fill(0, kSeed, 7);
  auto local = LocalList(kAllLocal);
  ASSERT_THAT(local, IsOk());
  auto remote = RemoteList(kRemote);
  ASSERT_THAT(remote, IsOk());
  const std::vector<uint32_t> zero = {0}, one = {1};
  auto w = agent_->PostPrepared(*local, zero, *remote, zero, {.op = TransferOp::kWrite});
  ASSERT_THAT(w, IsOk());
  ASSERT_THAT(w->Wait(absl::Seconds(60)), IsOk());
  auto r = agent_->PostPrepared(*local, one, *remote, zero,
                                {.op = TransferOp::kRead, .layer_begin = 1, .layer_end = 3});
  ASSERT_THAT(r, IsOk());
  ASSERT_THAT(r->Wait(absl::Seconds(60)), IsOk());
  for (uint32_t layer = 0; layer < layout.num_layers; ++layer) {
    for (uint32_t plane = 0; plane < layout.num_planes(); ++plane) {
      const bool moved = layer >= 1 && layer < 3;
      EXPECT_EQ(std::memcmp(cache_->chunk(layer, plane, 1), cache_->chunk(layer, plane, 0),
                            layout.chunk_bytes()) == 0,
                moved)
          << "layer " << layer << " plane " << plane;
    }
  }
  ExpectNoCounts();
}

// Head slices: this rank holds 4 heads, the peer 2. Heads [2, 4) of local
// blocks go to whole remote chunks and come back into heads [0, 2) of
// other local blocks; heads [2, 4) of those stay zero.
TEST_P(PreparedListTest, HeadSlices) {
  const KvLayout layout = HeadLayout(kBlocks, 4);
  ASSERT_NO_FATAL_FAILURE(Start(layout, /*peer_heads=*/2));
  const uint64_t two_heads = 2 * layout.head_bytes();
  for (uint32_t b = 0; b < 2; ++b) cache_->Fill(b, kSeed, 200 + b);
  const std::vector<uint32_t> sources = {0, 1}, targets = {4, 5};
  auto upper = LocalList(sources, two_heads, two_heads);
  ASSERT_THAT(upper, IsOk());
  auto lower = LocalList(targets, 0, two_heads);
  ASSERT_THAT(lower, IsOk());
  auto remote = RemoteList(kRemote);
  ASSERT_THAT(remote, IsOk());
  const std::vector<uint32_t> ab = {0, 1}, ba = {1, 0};
  auto w = agent_->PostPrepared(*upper, ab, *remote, ba, {.op = TransferOp::kWrite});
  ASSERT_THAT(w, IsOk());
  ASSERT_THAT(w->Wait(absl::Seconds(60)), IsOk());
  auto r = agent_->PostPrepared(*lower, ab, *remote, ab, {.op = TransferOp::kRead});
  ASSERT_THAT(r, IsOk());
  ASSERT_THAT(r->Wait(absl::Seconds(60)), IsOk());
  // Remote list 0 (63) holds block 1's upper heads, list 1 (62) block 0's.
  EXPECT_EQ(cache_->Differs(4, 0, 1, two_heads, two_heads), "");
  EXPECT_EQ(cache_->Differs(5, 0, 0, two_heads, two_heads), "");
  EXPECT_FALSE(cache_->AllZero(4, 0, two_heads));
  EXPECT_TRUE(cache_->AllZero(4, two_heads, two_heads));
  EXPECT_TRUE(cache_->AllZero(5, two_heads, two_heads));

  // A whole 4-head chunk does not fit a 2-head one.
  auto whole = LocalList(sources);
  ASSERT_THAT(whole, IsOk());
  EXPECT_THAT(agent_->PostPrepared(*whole, ab, *remote, ab, {.op = TransferOp::kWrite}),
              StatusIs(absl::StatusCode::kInvalidArgument, "moves 8192 bytes per chunk"));
  EXPECT_THAT(LocalList(sources, layout.head_bytes() / 2, two_heads),
              StatusIs(absl::StatusCode::kInvalidArgument, "must be whole heads"));
  EXPECT_THAT(LocalList(sources, 3 * layout.head_bytes(), two_heads),
              StatusIs(absl::StatusCode::kInvalidArgument, "is past the"));
  ExpectNoCounts();
}

// The peer removes its pool: a post on the list refuses, naming peer and
// pool. It registers a new pool of the name: the old list still refuses
// (replaced), a list prepared again moves data.
TEST_P(PreparedListTest, PeerPoolRemovedThenReplaced) {
  ASSERT_NO_FATAL_FAILURE(Start(Layout(kBlocks)));
  auto local = LocalList(kAllLocal);
  ASSERT_THAT(local, IsOk());
  auto remote = RemoteList(kRemote);
  ASSERT_THAT(remote, IsOk());
  const std::vector<uint32_t> idx = {0, 1};
  auto before = agent_->PostPrepared(*local, idx, *remote, idx, {.op = TransferOp::kWrite});
  ASSERT_THAT(before, IsOk());
  ASSERT_THAT(before->Wait(absl::Seconds(60)), IsOk());

  ASSERT_THAT(agent_->SendNotification(peer_, "REMOVE"), IsOk());
  EXPECT_EQ(PeerLine().value_or("(none)"), "REMOVED OK");
  ASSERT_TRUE(Await([&] { return !PeerExports("kv"); }));
  auto gone = agent_->PostPrepared(*local, idx, *remote, idx, {.op = TransferOp::kWrite});
  EXPECT_THAT(gone, StatusIs(absl::StatusCode::kFailedPrecondition,
                             "peer 'decode' no longer exports pool 'kv'"));
  EXPECT_EQ(ReasonOf(gone.status()), EndReason::kPoolRemoved);
  ExpectNoCounts();

  ASSERT_THAT(agent_->SendNotification(peer_, "REGISTER"), IsOk());
  EXPECT_EQ(PeerLine().value_or("(none)"), "REGISTERED OK");
  ASSERT_TRUE(Await([&] { return PeerExports("kv"); }));
  EXPECT_THAT(agent_->PostPrepared(*local, idx, *remote, idx, {.op = TransferOp::kWrite}),
              StatusIs(absl::StatusCode::kFailedPrecondition, "replaced pool 'kv'"));
  ExpectNoCounts();

  auto again = RemoteList(kRemote);
  ASSERT_THAT(again, IsOk());
  cache_->Fill(2, kSeed, 300);
  const std::vector<uint32_t> two = {2}, three = {3}, first = {0};
  auto w = agent_->PostPrepared(*local, two, *again, first, {.op = TransferOp::kWrite});
  ASSERT_THAT(w, IsOk());
  ASSERT_THAT(w->Wait(absl::Seconds(60)), IsOk());
  auto r = agent_->PostPrepared(*local, three, *again, first, {.op = TransferOp::kRead});
  ASSERT_THAT(r, IsOk());
  ASSERT_THAT(r->Wait(absl::Seconds(60)), IsOk());
  EXPECT_EQ(cache_->Differs(3, 0, 2, 0, Layout(kBlocks).chunk_bytes()), "");
  ExpectNoCounts();
}

// The peer is killed: a post on the list refuses with kUnavailable naming
// peer and pool, and the list keeps none of the peer's endpoints or remote
// keys alive.
TEST_P(PreparedListTest, PeerKilled) {
  ASSERT_NO_FATAL_FAILURE(Start(Layout(kBlocks)));
  auto local = LocalList(kAllLocal);
  ASSERT_THAT(local, IsOk());
  auto remote = RemoteList(kRemote);
  ASSERT_THAT(remote, IsOk());
  child_->Kill();
  child_->Wait();
  ASSERT_TRUE(Await([&] {
    auto info = agent_->GetPeer(peer_);
    return !info.ok() || info->state != PeerState::kConnected;
  }));
  const std::vector<uint32_t> idx = {0, 1};
  auto post = agent_->PostPrepared(*local, idx, *remote, idx, {.op = TransferOp::kRead});
  EXPECT_THAT(post, StatusIs(absl::StatusCode::kUnavailable,
                             "remote list of peer 'decode' pool 'kv'"));
  EXPECT_EQ(ReasonOf(post.status()), EndReason::kPeerFailed);
  // The list is alive; the peer's endpoints and keys go all the same.
  EXPECT_TRUE(Await([&] {
    const Stats s = agent_->GetStats();
    return s.Live(ResourceKind::kEndpoint) == 0 && s.Live(ResourceKind::kRemoteKey) == 0;
  })) << agent_->ledger().Report();
  EXPECT_EQ(agent_->GetStats().Live(ResourceKind::kPreparedList), 2);
  ExpectNoCounts();
  local = PreparedList();
  *remote = PreparedList();
  EXPECT_EQ(agent_->GetStats().Live(ResourceKind::kPreparedList), 0);
}

// Bad input: each refused with its code and a message naming the value;
// nothing is counted or left in flight.
TEST_P(PreparedListTest, BadInputIsRefusedAndLeavesNothing) {
  ASSERT_NO_FATAL_FAILURE(Start(Layout(kBlocks)));
  const std::vector<uint32_t> four = {0, 1, 2, 3};
  auto local = LocalList(four);
  ASSERT_THAT(local, IsOk());
  auto remote = RemoteList(kRemote);
  ASSERT_THAT(remote, IsOk());
  const std::vector<uint32_t> ok2 = {0, 1}, past_local = {1, 4}, past_remote = {0, 8},
                              three = {0, 1, 2};
  using Code = absl::StatusCode;
  EXPECT_THAT(agent_->PostPrepared(*local, past_local, *remote, ok2),
              StatusIs(Code::kOutOfRange,
                       "local index 4 (position 1) is past the local list's 4 descriptors"));
  EXPECT_THAT(agent_->PostPrepared(*local, ok2, *remote, past_remote),
              StatusIs(Code::kOutOfRange,
                       "remote index 8 (position 1) is past the remote list's 8 descriptors"));
  EXPECT_THAT(agent_->PostPrepared(*local, three, *remote, ok2),
              StatusIs(Code::kInvalidArgument, "batch pairs 3 local indices with 2 remote"));
  EXPECT_THAT(agent_->PostPrepared(*local, {}, *remote, {}),
              StatusIs(Code::kInvalidArgument, "empty batch"));
  EXPECT_THAT(agent_->PostPrepared(*remote, ok2, *remote, ok2),
              StatusIs(Code::kInvalidArgument,
                       "the local side is a remote list of peer 'decode' pool 'kv'"));
  EXPECT_THAT(agent_->PostPrepared(*local, ok2, *local, ok2),
              StatusIs(Code::kInvalidArgument, "the remote side is a local list of pool 'kv'"));
  EXPECT_THAT(agent_->PostPrepared(PreparedList(), ok2, *remote, ok2),
              StatusIs(Code::kInvalidArgument, "empty PreparedList handle on the local side"));
  EXPECT_THAT(agent_->PostPrepared(*local, ok2, *remote, ok2,
                                   {.op = static_cast<TransferOp>(7)}),
              StatusIs(Code::kInvalidArgument, "PreparedPost.op 7"));
  EXPECT_THAT(agent_->PostPrepared(*local, ok2, *remote, ok2, {.layer_begin = 3, .layer_end = 9}),
              StatusIs(Code::kInvalidArgument, "layer range [3, 9)"));
  {
    // A list of another agent.
    AgentOptions o;
    o.name = "other";
    o.leak_policy = LeakPolicy::kAbort;
    o.ucx_config = {{"TLS", GetParam().tls}};
    auto other = Agent::Create(o);
    ASSERT_THAT(other, IsOk());
    ASSERT_THAT((*other)->CreatePool("kv", Layout(kBlocks)), IsOk());
    auto foreign = (*other)->Prepare({.pool = "kv", .blocks = four});
    ASSERT_THAT(foreign, IsOk());
    EXPECT_THAT(agent_->PostPrepared(*foreign, ok2, *remote, ok2),
                StatusIs(Code::kInvalidArgument,
                         "local list of pool 'kv' (4 descriptors) was prepared by another "
                         "agent, not by agent 'engine'"));
  }
  // Prepare's own refusals.
  const std::vector<uint32_t> past = {0, 16};
  EXPECT_THAT(LocalList(past), StatusIs(Code::kOutOfRange,
                                        "PrepareSpec.blocks[1]: block id 16 is past the end of "
                                        "pool 'kv' (16 blocks)"));
  const std::vector<uint32_t> past_peer = {64};
  EXPECT_THAT(RemoteList(past_peer),
              StatusIs(Code::kOutOfRange, "block id 64 is past the end of peer 'decode' pool 'kv'"));
  EXPECT_THAT(agent_->Prepare({.pool = "nope", .blocks = four}),
              StatusIs(Code::kNotFound, "this agent has no pool 'nope'"));
  EXPECT_THAT(agent_->Prepare({.peer = "nobody", .pool = "kv", .blocks = four}),
              StatusIs(Code::kNotFound, "unknown peer 'nobody'"));
  EXPECT_THAT(agent_->Prepare({.peer = peer_, .pool = "nope", .blocks = four}),
              StatusIs(Code::kNotFound, "peer 'decode' exports no pool 'nope'"));
  EXPECT_THAT(agent_->Prepare({.pool = "kv"}),
              StatusIs(Code::kInvalidArgument, "PrepareSpec.blocks is empty"));
  EXPECT_THAT(agent_->Prepare({.pool = "kv", .blocks = four, .slice_offset = 64}),
              StatusIs(Code::kInvalidArgument, "slice_offset 64 without slice_bytes"));
  ExpectNoCounts();
  EXPECT_EQ(agent_->GetStats().Live(ResourceKind::kPreparedList), 2);
}

// FenceBlocks waits for prepared posts like any other; a block named twice
// by one post counts twice until then.
TEST_P(PreparedListTest, FenceBlocksFencesPreparedPosts) {
  ASSERT_NO_FATAL_FAILURE(Start(Layout(kBlocks)));
  auto local = LocalList(kAllLocal);
  ASSERT_THAT(local, IsOk());
  auto remote = RemoteList(kRemote);
  ASSERT_THAT(remote, IsOk());
  for (uint32_t b = 0; b < 3; ++b) cache_->Fill(b, kSeed, 400 + b);
  const std::vector<uint32_t> li = {0, 1, 2, 0}, ri = {0, 1, 2, 3};
  auto w = agent_->PostPrepared(*local, li, *remote, ri, {.op = TransferOp::kWrite});
  ASSERT_THAT(w, IsOk());
  if (!GetParam().progress_thread) {
    // Nothing ends without progress: the counts show the post.
    EXPECT_EQ(*pool_->InFlight(0), 2u);
    EXPECT_EQ(*pool_->InFlight(1), 1u);
    EXPECT_EQ(*pool_->InFlight(3), 0u);
  }
  const std::vector<uint32_t> fence = {0, 1, 2};
  ASSERT_THAT(agent_->FenceBlocks("kv", fence, absl::Seconds(60)), IsOk());
  EXPECT_EQ(w->state(), TransferState::kDone);
  ExpectNoCounts();
  // Reuse: the fenced blocks are rewritten and read back from the peer.
  const std::vector<uint32_t> back_local = {8, 9}, back_remote = {3, 1};
  auto r = agent_->PostPrepared(*local, back_local, *remote, back_remote);
  ASSERT_THAT(r, IsOk());
  ASSERT_THAT(agent_->FenceBlocks("kv", back_local, absl::Seconds(60)), IsOk());
  EXPECT_EQ(r->state(), TransferState::kDone);
  EXPECT_EQ(cache_->Differs(8, 0, 0, 0, Layout(kBlocks).chunk_bytes()), "");
  EXPECT_EQ(cache_->Differs(9, 0, 1, 0, Layout(kBlocks).chunk_bytes()), "");
  ExpectNoCounts();
}

// This agent removes the local pool: a post on its list refuses.
TEST_P(PreparedListTest, LocalPoolRemoved) {
  ASSERT_NO_FATAL_FAILURE(Start(Layout(kBlocks)));
  auto local = LocalList(kAllLocal);
  ASSERT_THAT(local, IsOk());
  auto remote = RemoteList(kRemote);
  ASSERT_THAT(remote, IsOk());
  ASSERT_THAT(agent_->RemovePool("kv", absl::Seconds(60)), IsOk());
  pool_ = nullptr;
  const std::vector<uint32_t> idx = {0};
  auto post = agent_->PostPrepared(*local, idx, *remote, idx);
  EXPECT_THAT(post, StatusIs(absl::StatusCode::kFailedPrecondition,
                             "local list of pool 'kv' (16 descriptors) is of a pool this agent "
                             "removed"));
  EXPECT_EQ(ReasonOf(post.status()), EndReason::kPoolRemoved);
  EXPECT_EQ(agent_->GetStats().Live(ResourceKind::kTransfer), 0);
}

INSTANTIATE_TEST_SUITE_P(Paths, PreparedListTest,
                         ::testing::Values(PreparedCase{"shm_no_progress_thread",
                                                        "posix,sysv,tcp", false},
                                           PreparedCase{"tcp_progress_thread", "tcp", true}),
                         [](const auto& c) { return std::string(c.param.name); });

// A list alive when its agent is destroyed is reported as a survivor.
TEST(PreparedListSurvivorTest, ListOutlivingItsAgentIsReported) {
  AgentOptions o;
  o.name = "lonely";
  o.leak_policy = LeakPolicy::kLog;
  o.ucx_config = {{"TLS", "posix,sysv,tcp"}};
  auto agent = Agent::Create(o);
  ASSERT_THAT(agent, IsOk());
  ASSERT_THAT((*agent)->CreatePool("kv", Layout(4)), IsOk());
  const std::vector<uint32_t> ids = {0, 1};
  auto list = (*agent)->Prepare({.pool = "kv", .blocks = ids});
  ASSERT_THAT(list, IsOk());
  ::testing::internal::CaptureStderr();
  agent->reset();
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(err, HasSubstr("agent 'lonely': destroyed while"));
  EXPECT_THAT(err, HasSubstr("prepared_list=1"));
}

}  // namespace
}  // namespace kvferry::test
