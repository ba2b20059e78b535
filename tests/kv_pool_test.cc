#include "kvferry/kv_pool.h"

#include <cstring>
#include <type_traits>

#include "kvferry/agent.h"
#include "tests/test_util.h"

namespace kvferry {
namespace {

using testing::IsOk;
using testing::SmallLayout;
using testing::StatusIs;

static_assert(!std::is_copy_constructible_v<BlockSet>);
static_assert(!std::is_copy_assignable_v<BlockSet>);
static_assert(std::is_nothrow_move_constructible_v<BlockSet>);
static_assert(!std::is_copy_constructible_v<KvPool>);

class KvPoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    AgentOptions options;
    options.name = "pool-test";
    options.progress_thread = false;
    options.leak_policy = LeakPolicy::kAbort;
    auto agent = Agent::Create(options);
    ASSERT_THAT(agent, IsOk());
    agent_ = std::move(*agent);
  }
  Stats stats() const { return agent_->GetStats(); }
  std::unique_ptr<Agent> agent_;
};

TEST_F(KvPoolTest, RegisteredBytesFollowThePool) {
  EXPECT_EQ(stats().registered_bytes, 0);
  auto pool = agent_->CreatePool("kv", SmallLayout(16));
  ASSERT_THAT(pool, IsOk());
  EXPECT_EQ(stats().registered_bytes, static_cast<int64_t>(SmallLayout(16).total_bytes()));
  EXPECT_EQ(stats().Live(ResourceKind::kMemoryRegion), 1);
  EXPECT_EQ(stats().Live(ResourceKind::kPool), 1);
  EXPECT_EQ((*pool)->size_bytes(), SmallLayout(16).total_bytes());
  EXPECT_EQ(reinterpret_cast<uintptr_t>((*pool)->base()) % 4096, 0u);  // page-aligned
  agent_.reset();  // must not abort: nothing survives
}

TEST_F(KvPoolTest, InvalidLayoutsLeaveNothingBehind) {
  Stats before = stats();
  KvLayout bad = SmallLayout();
  bad.num_blocks = 0;
  EXPECT_THAT(agent_->CreatePool("kv", bad),
              StatusIs(absl::StatusCode::kInvalidArgument, "pool 'kv': KvLayout.num_blocks"));
  bad = SmallLayout();
  bad.tokens_per_block = 1;
  bad.num_kv_heads = 1;
  bad.head_dim = 3;
  EXPECT_THAT(agent_->CreatePool("kv", bad),
              StatusIs(absl::StatusCode::kInvalidArgument, "not a multiple of 64"));
  EXPECT_THAT(agent_->CreatePool("", SmallLayout()),
              StatusIs(absl::StatusCode::kInvalidArgument, "pool name must not be empty"));
  EXPECT_EQ(stats(), before);
  EXPECT_EQ(agent_->FindPool("kv"), nullptr);
}

TEST_F(KvPoolTest, DuplicateNameIsAlreadyExists) {
  ASSERT_THAT(agent_->CreatePool("kv", SmallLayout()), IsOk());
  Stats before = stats();
  EXPECT_THAT(agent_->CreatePool("kv", SmallLayout()),
              StatusIs(absl::StatusCode::kAlreadyExists, "'kv'"));
  EXPECT_EQ(stats(), before);
}

TEST_F(KvPoolTest, ExhaustionAndReuse) {
  KvPool* pool = *agent_->CreatePool("kv", SmallLayout(8));
  auto a = pool->Lease(5);
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ(pool->free_blocks(), 3u);
  EXPECT_THAT(pool->Lease(4), StatusIs(absl::StatusCode::kResourceExhausted,
                                       "4 blocks requested but only 3 of 8 are free"));
  EXPECT_THAT(pool->Lease(0), StatusIs(absl::StatusCode::kInvalidArgument, "lease of 0"));
  EXPECT_EQ(pool->free_blocks(), 3u);
  std::vector<uint32_t> first(a->ids().begin(), a->ids().end());
  EXPECT_EQ(first, (std::vector<uint32_t>{0, 1, 2, 3, 4}));
  a->Reset();
  EXPECT_EQ(pool->free_blocks(), 8u);
  auto b = pool->Lease(8);
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(b->size(), 8u);
  EXPECT_EQ(stats().Live(ResourceKind::kBlockSet), 1);
}

TEST_F(KvPoolTest, LeaseIdsIsAllOrNothing) {
  KvPool* pool = *agent_->CreatePool("kv", SmallLayout(8));
  std::vector<uint32_t> ids = {6, 2};
  auto a = pool->LeaseIds(ids);
  ASSERT_THAT(a, IsOk());
  std::vector<uint32_t> overlap = {1, 2};
  EXPECT_THAT(pool->LeaseIds(overlap),
              StatusIs(absl::StatusCode::kResourceExhausted, "block 2 is already leased"));
  EXPECT_EQ(pool->free_blocks(), 6u);  // block 1 was not taken
  std::vector<uint32_t> out_of_range = {8};
  EXPECT_THAT(pool->LeaseIds(out_of_range),
              StatusIs(absl::StatusCode::kInvalidArgument, "block id 8 out of range [0, 8)"));
  std::vector<uint32_t> dup = {3, 3};
  EXPECT_THAT(pool->LeaseIds(dup), StatusIs(absl::StatusCode::kInvalidArgument, "listed twice"));
  EXPECT_THAT(pool->LeaseIds({}), StatusIs(absl::StatusCode::kInvalidArgument, "0 blocks"));
  // Lease() skips leased ids.
  auto b = pool->Lease(3);
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(std::vector<uint32_t>(b->ids().begin(), b->ids().end()),
            (std::vector<uint32_t>{0, 1, 3}));
}

TEST_F(KvPoolTest, BlockSetMoveSemantics) {
  KvPool* pool = *agent_->CreatePool("kv", SmallLayout(8));
  BlockSet a = *pool->Lease(2);
  BlockSet b(std::move(a));
  EXPECT_TRUE(a.empty());  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(a.size(), 0u);
  EXPECT_EQ(b.size(), 2u);
  BlockSet& self = b;
  b = std::move(self);
  EXPECT_EQ(b.size(), 2u);
  EXPECT_EQ(pool->free_blocks(), 6u);
  BlockSet c;
  c = std::move(b);
  EXPECT_EQ(pool->free_blocks(), 6u);
  { BlockSet dead(std::move(c)); }  // destroying the moved-to object returns the blocks
  EXPECT_EQ(pool->free_blocks(), 8u);
  c.Reset();  // moved-from: harmless, twice
  c.Reset();
  EXPECT_EQ(stats().Live(ResourceKind::kBlockSet), 0);
}

TEST_F(KvPoolTest, ChunksAreDisjointAndWritable) {
  KvPool* pool = *agent_->CreatePool("kv", SmallLayout(4));
  BlockSet blocks = *pool->Lease(4);
  const KvLayout& l = pool->layout();
  for (size_t i = 0; i < blocks.size(); ++i) {
    for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
        auto chunk = blocks.Chunk(i, layer, plane);
        ASSERT_EQ(chunk.size(), l.chunk_bytes());
        std::memset(chunk.data(), static_cast<int>(i * 16 + layer * 2 + plane), chunk.size());
      }
    }
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
        auto chunk = blocks.Chunk(i, layer, plane);
        EXPECT_EQ(static_cast<int>(chunk[chunk.size() - 1]),
                  static_cast<int>(i * 16 + layer * 2 + plane));
      }
    }
  }
}

TEST_F(KvPoolTest, LeaseOutlivesAgentUnderLogPolicy) {
  AgentOptions options;
  options.progress_thread = false;
  options.leak_policy = LeakPolicy::kIgnore;
  auto agent = *Agent::Create(options);
  BlockSet blocks = *(*agent->CreatePool("kv", SmallLayout(4)))->Lease(2);
  agent.reset();
  // The lease keeps the memory and its registration alive.
  std::memset(blocks.Chunk(1, 3, 1).data(), 0x5a, blocks.layout().chunk_bytes());
  EXPECT_EQ(blocks.size(), 2u);
}

}  // namespace
}  // namespace kvferry
