#include "kvferry/kv_pool.h"

#include <sys/sysinfo.h>

#include <cstring>
#include <fstream>
#include <type_traits>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kvferry/agent.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

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

// The /proc/self/maps line of the mapping that holds `address`, or "".
std::string MappingOf(const void* address) {
  const uint64_t addr = reinterpret_cast<uint64_t>(address);
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    std::vector<std::string> range = absl::StrSplit(line.substr(0, line.find(' ')), '-');
    uint64_t lo = 0, hi = 0;
    if (range.size() == 2 && absl::SimpleHexAtoi(range[0], &lo) &&
        absl::SimpleHexAtoi(range[1], &hi) && addr >= lo && addr < hi) {
      return line;
    }
  }
  return "";
}

struct MemoryCase {
  const char* name;
  PoolMemorySource source;
  const char* tls;
  const char* backing;  // KvPool::backing() expected
  bool shared;
  const char* maps_path;  // what /proc/self/maps shows for the pool
};

class PoolMemoryTest : public ::testing::TestWithParam<MemoryCase> {};

// Each option gives the memory it says, page-aligned, zeroed and writable;
// the registration counts it; and destroying the agent frees it.
TEST_P(PoolMemoryTest, PoolMemoryFollowsTheOption) {
  const MemoryCase& c = GetParam();
  AgentOptions options;
  options.name = "pool-memory";
  options.progress_thread = false;
  options.leak_policy = LeakPolicy::kAbort;
  options.ucx_config = {{"TLS", c.tls}};
  options.pool_memory = c.source;
  auto agent = Agent::Create(options);
  ASSERT_THAT(agent, IsOk());
  EXPECT_EQ((*agent)->ucx_settings().alloc_prio,
            c.source == PoolMemorySource::kUcxAllocated ? "md:sysv,mmap"
                                                        : "unused (pools are not UCX-allocated)");
  const KvLayout layout = SmallLayout(64);  // 256 KiB
  auto pool = (*agent)->CreatePool("kv", layout);
  ASSERT_THAT(pool, IsOk());
  KvPool* p = *pool;
  EXPECT_EQ(p->memory_source(), c.source);
  EXPECT_EQ(p->backing(), c.backing);
  EXPECT_EQ(p->shared_memory(), c.shared);
  EXPECT_EQ(p->size_bytes(), layout.total_bytes());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p->base()) % 4096, 0u);
  EXPECT_EQ((*agent)->GetStats().registered_bytes, static_cast<int64_t>(layout.total_bytes()));
  const std::string mapping = MappingOf(p->base());
  if (*c.maps_path != '\0') {
    EXPECT_THAT(mapping, ::testing::HasSubstr(c.maps_path)) << mapping;
  } else {
    EXPECT_FALSE(absl::StrContains(mapping, "/")) << "not anonymous: " << mapping;
  }
  EXPECT_EQ(mapping.substr(mapping.find(' ') + 4, 1), c.shared ? "s" : "p") << mapping;
  // Fresh memory reads as zeros, every byte of it is ours to write.
  std::vector<std::byte> zeros(layout.total_bytes());
  EXPECT_EQ(std::memcmp(p->base(), zeros.data(), zeros.size()), 0);
  std::memset(p->base(), 0xa5, p->size_bytes());
  EXPECT_EQ(static_cast<int>(p->base()[p->size_bytes() - 1]), 0xa5);
  void* base = p->base();
  agent->reset();  // must not abort: nothing survives
  const std::string after = MappingOf(base);
  EXPECT_FALSE(absl::StrContains(after, "/SYSV")) << "the pool's segment outlived the agent: "
                                                 << after;
}

INSTANTIATE_TEST_SUITE_P(
    Options, PoolMemoryTest,
    ::testing::Values(
        // With a shared-memory transport: a System V segment of UCX's sysv md.
        MemoryCase{"UcxShm", PoolMemorySource::kUcxAllocated, "posix,sysv,tcp", "ucx-sysv", true,
                   "/SYSV"},
        // Without one, UCX has no segment to give: private anonymous memory.
        MemoryCase{"UcxTcp", PoolMemorySource::kUcxAllocated, "tcp", "ucx-mmap", false, ""},
        MemoryCase{"AnonymousShm", PoolMemorySource::kAnonymousMmap, "posix,sysv,tcp",
                   "anonymous-mmap", false, ""}),
    [](const auto& param_info) { return std::string(param_info.param.name); });

// A pool UCX cannot allocate (the largest layout kvferry accepts, 1 TiB, on a
// host that cannot commit that much) fails with kResourceExhausted naming
// the pool and its size, and leaves nothing registered or counted.
TEST_F(KvPoolTest, UnallocatableSizeIsResourceExhausted) {
  std::ifstream overcommit("/proc/sys/vm/overcommit_memory");
  int mode = 0;
  overcommit >> mode;
  struct sysinfo si = {};
  ASSERT_EQ(sysinfo(&si), 0);
  const double commit_limit = (static_cast<double>(si.totalram) + static_cast<double>(si.totalswap)) * si.mem_unit;
  if (mode == 1 || commit_limit >= static_cast<double>(KvLayout::kMaxTotalBytes)) {
    GTEST_SKIP() << "this host would commit 1 TiB (overcommit_memory=" << mode << ")";
  }
  KvLayout huge{.num_layers = 64, .num_blocks = 1u << 19, .tokens_per_block = 16,
                .num_kv_heads = 8, .head_dim = 64, .element_bytes = 2};
  ASSERT_EQ(huge.total_bytes(), KvLayout::kMaxTotalBytes);
  ASSERT_THAT(huge.Validate(), IsOk());
  const Stats before = stats();
  auto pool = agent_->CreatePool("huge", huge);
  EXPECT_THAT(pool, StatusIs(absl::StatusCode::kResourceExhausted,
                             "pool 'huge': UCX could not allocate 1099511627776 bytes"));
  EXPECT_THAT(pool, StatusIs(absl::StatusCode::kResourceExhausted,
                             "allocation methods tried: ALLOC_PRIO=md:sysv,mmap"));
  EXPECT_EQ(stats(), before);
  EXPECT_EQ(stats().registered_bytes, 0);
  EXPECT_EQ(agent_->FindPool("huge"), nullptr);
  // The agent is still fine for a pool it can have.
  EXPECT_THAT(agent_->CreatePool("huge", SmallLayout()), IsOk());
}

TEST_F(KvPoolTest, BadPoolMemoryOptionIsRefused) {
  AgentOptions options;
  options.pool_memory = static_cast<PoolMemorySource>(7);
  EXPECT_THAT(Agent::Create(options), StatusIs(absl::StatusCode::kInvalidArgument,
                                               "AgentOptions.pool_memory = 7"));
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

TEST_F(KvPoolTest, ChunkOutOfRangeIsEmptyInEveryBuild) {
  KvPool* pool = *agent_->CreatePool("kv", SmallLayout(4));
  BlockSet one = *pool->Lease(1);
  const KvLayout& l = pool->layout();
  ASSERT_EQ(one.Chunk(0, l.num_layers - 1, l.num_planes() - 1).size(), l.chunk_bytes());
  EXPECT_TRUE(one.Chunk(1, 0, 0).empty());  // index == size()
  EXPECT_TRUE(one.Chunk(5, 0, 0).empty());
  EXPECT_EQ(one.Chunk(5, 0, 0).data(), nullptr);
  EXPECT_TRUE(one.Chunk(0, l.num_layers, 0).empty());
  EXPECT_TRUE(one.Chunk(0, 0, l.num_planes()).empty());
  EXPECT_TRUE(one.Chunk(static_cast<size_t>(-1), UINT32_MAX, UINT32_MAX).empty());
  BlockSet none;
  EXPECT_TRUE(none.Chunk(0, 0, 0).empty());
}

TEST_F(KvPoolTest, LeaseOutlivesAgentUnderLogPolicy) {
  LogCapture logs;  // outlives the agent and the lease, which log into it
  AgentOptions options;
  options.progress_thread = false;
  options.leak_policy = LeakPolicy::kLog;
  options.log_sink = logs.sink();
  auto agent = *Agent::Create(options);
  BlockSet blocks = *(*agent->CreatePool("kv", SmallLayout(4)))->Lease(2);
  agent.reset();
  // kLog reports the survivor, once, and carries on.
  auto lines = logs.Matching("destroyed while");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0].severity, LogSeverity::kWarning);
  EXPECT_THAT(lines[0].message, ::testing::HasSubstr("block_set=1"));
  // The lease keeps the memory and its registration alive.
  std::memset(blocks.Chunk(1, 3, 1).data(), 0x5a, blocks.layout().chunk_bytes());
  EXPECT_EQ(blocks.size(), 2u);
}

}  // namespace
}  // namespace kvferry::test
