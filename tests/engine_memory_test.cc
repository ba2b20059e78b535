// Engine-owned memory (Agent::RegisterPool): per-layer K and V regions on
// one side, per-layer regions on the other, blocks moved both ways over
// shared memory and TCP and checked in the engine's own buffers; every bad
// registration refused with nothing left registered; pools made after
// Connect announced to the peer.
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

// Three layers of the transfer tests' layout (4 KiB chunks).
KvLayout EngineLayout(uint32_t blocks = 16) { return Layout(blocks, /*layers=*/3); }

// Memory an engine allocated: `count` buffers of `bytes`, 64-byte aligned
// but (on purpose) not page-aligned.
class EngineBuffers {
 public:
  EngineBuffers(size_t count, uint64_t bytes) {
    for (size_t i = 0; i < count; ++i) {
      auto* raw = static_cast<std::byte*>(std::aligned_alloc(4096, bytes + 4096));
      std::memset(raw, 0, bytes + 4096);
      owned_.emplace_back(raw, &std::free);
      regions_.push_back({raw + 64, bytes});
    }
  }
  std::vector<KvRegion>& regions() { return regions_; }
  std::byte* at(size_t region) const { return static_cast<std::byte*>(regions_[region].base); }

 private:
  std::vector<std::unique_ptr<std::byte, decltype(&std::free)>> owned_;
  std::vector<KvRegion> regions_;
};

class EngineMemoryTest : public AgentPairTest {
 protected:
  void MakePools() override {
    const KvLayout l = EngineLayout();
    // Decode: separate K and V tensors per layer (region layer * 2 + plane).
    auto d = decode_->RegisterPool("kv", l, decode_mem_.regions());
    ASSERT_THAT(d, IsOk());
    decode_pool_ = *d;
    // Prefill: one tensor per layer holding K then V.
    auto p = prefill_->RegisterPool("kv", l, prefill_mem_.regions());
    ASSERT_THAT(p, IsOk());
    prefill_pool_ = *p;
  }
  // Engine memory on one host moves over UCX's emulated path: its bytes are
  // written by UCX's (uninstrumented) progress code in the other agent's
  // thread, through shared-memory FIFOs TSan cannot see, and TSan fails to
  // restore that writer's stack, so tests/tsan.supp's UCX entries cannot
  // match. The same checks run in the release and asan suites.
  bool DataChecksInvisibleToTsan() const {
#if defined(__SANITIZE_THREAD__)
    return std::string(GetParam().name) == "shm";
#else
    return false;
#endif
  }

  EngineBuffers decode_mem_{3 * 2, EngineLayout().plane_bytes()};
  EngineBuffers prefill_mem_{3, EngineLayout().layer_bytes()};  // outlive the agents (TearDown)
};

TEST_P(EngineMemoryTest, RegisteredAsTheEngineLaidItOut) {
  EXPECT_EQ(decode_pool_->num_regions(), 6u);
  EXPECT_EQ(prefill_pool_->num_regions(), 3u);
  EXPECT_EQ(decode_pool_->memory_source(), PoolMemorySource::kEngineOwned);
  EXPECT_EQ(decode_pool_->backing(), "engine-owned");
  EXPECT_EQ(decode_pool_->memory_type(), MemoryType::kHost);
  EXPECT_EQ(decode_->GetStats().Live(ResourceKind::kMemoryRegion), 6);
  // Chunk() points into the engine's buffers where the engine expects.
  BlockSet b = *decode_pool_->LeaseIds(std::vector<uint32_t>{5});
  const uint64_t chunk = EngineLayout().chunk_bytes();
  EXPECT_EQ(b.Chunk(0, 2, 1).data(), decode_mem_.at(2 * 2 + 1) + 5 * chunk);
  BlockSet c = *prefill_pool_->LeaseIds(std::vector<uint32_t>{5});
  EXPECT_EQ(c.Chunk(0, 2, 1).data(), prefill_mem_.at(2) + EngineLayout().plane_bytes() + 5 * chunk);
  auto report = decode_->GetMemoryReport();
  ASSERT_THAT(report, IsOk());
  ASSERT_EQ(report->pools.size(), 1u);
  EXPECT_EQ(report->pools[0].registered_bytes, EngineLayout().total_bytes());
  EXPECT_EQ(report->pools[0].backing, "engine-owned");
}

TEST_P(EngineMemoryTest, BlocksMoveBothWays) {
  if (DataChecksInvisibleToTsan()) GTEST_SKIP() << "emulated shared-memory path under TSan";
  const KvLayout l = EngineLayout();
  const uint64_t chunk = l.chunk_bytes();
  // WRITE: prefill pushes blocks 1, 2, 3 (one run) and 9 into decode 4, 5, 6 and 12.
  BlockSet src = *prefill_pool_->LeaseIds(std::vector<uint32_t>{1, 2, 3, 9});
  const std::vector<uint32_t> dst = {4, 5, 6, 12};
  for (size_t i = 0; i < dst.size(); ++i) FillBlock(src, i, 77, dst[i]);
  auto t = prefill_->PostTransfer(
      {.op = TransferOp::kWrite, .peer = "decode", .local = &src, .remote_blocks = dst});
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
  // Checked in decode's own K and V tensors, not through kvferry.
  for (size_t i = 0; i < dst.size(); ++i) {
    for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < 2; ++plane) {
        EXPECT_EQ(std::memcmp(decode_mem_.at(layer * 2 + plane) + dst[i] * chunk,
                              src.Chunk(i, layer, plane).data(), chunk),
                  0)
            << "block " << dst[i] << " layer " << layer << " plane " << plane;
      }
    }
  }
  // READ: decode pulls them back into its blocks 0 and 1 from prefill's 1 and 9.
  BlockSet back = *decode_pool_->LeaseIds(std::vector<uint32_t>{0, 1});
  auto r = decode_->PostTransfer(
      {.op = TransferOp::kRead, .peer = "prefill", .local = &back, .remote_blocks = {1, 9}});
  ASSERT_THAT(r, IsOk());
  ASSERT_THAT(r->Wait(absl::Seconds(30)), IsOk());
  EXPECT_EQ(BlockChecksum(back, 0), ExpectedChecksum(l, 77, 4));
  EXPECT_EQ(BlockChecksum(back, 1), ExpectedChecksum(l, 77, 12));
}

TEST_P(EngineMemoryTest, PoolMadeAfterConnectIsAnnounced) {
  if (DataChecksInvisibleToTsan()) GTEST_SKIP() << "emulated shared-memory path under TSan";
  EngineBuffers late_mem(1, EngineLayout().total_bytes());
  auto late = decode_->RegisterPool("late", EngineLayout(), late_mem.regions());
  ASSERT_THAT(late, IsOk());
  ASSERT_TRUE(WaitFor([&] {
    auto peer = prefill_->GetPeer("decode");
    return peer.ok() && peer->pools.size() == 2;
  }));
  // And a pool kvferry allocates, too.
  ASSERT_THAT(decode_->CreatePool("late2", EngineLayout(8)), IsOk());
  ASSERT_TRUE(WaitFor([&] { return prefill_->GetPeer("decode")->pools.size() == 3; }));
  BlockSet src = *prefill_pool_->Lease(2);
  FillBlock(src, 0, 5, 0);
  FillBlock(src, 1, 5, 1);
  auto t = prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode",
                                   .remote_pool = "late", .local = &src, .remote_blocks = {0, 1}});
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
  BlockSet check = *(*late)->LeaseIds(std::vector<uint32_t>{0, 1});
  EXPECT_EQ(BlockChecksum(check, 0), ExpectedChecksum(EngineLayout(), 5, 0));
  EXPECT_EQ(BlockChecksum(check, 1), ExpectedChecksum(EngineLayout(), 5, 1));
}

INSTANTIATE_TEST_SUITE_P(Transports, EngineMemoryTest, ::testing::Values(kShm, kTcp), TransportName);

// Every bad registration: a clear error naming the region, and nothing
// registered, counted or half-made afterwards.
TEST(EngineMemoryErrors, RefusedWithNothingLeftBehind) {
  AgentOptions o;
  o.name = "engine";
  o.leak_policy = LeakPolicy::kAbort;
  auto agent = *Agent::Create(o);
  const KvLayout l = EngineLayout();
  EngineBuffers mem(6, l.plane_bytes());
  Stats before = agent->GetStats();
  auto refused = [&](std::vector<KvRegion> regions, absl::StatusCode code,
                     const std::string& text, MemoryType type = MemoryType::kHost) {
    auto pool = agent->RegisterPool("bad", l, regions, true, type);
    EXPECT_THAT(pool, StatusIs(code, text));
    EXPECT_EQ(agent->FindPool("bad"), nullptr);
    const Stats after = agent->GetStats();
    EXPECT_EQ(after.Live(ResourceKind::kMemoryRegion), before.Live(ResourceKind::kMemoryRegion));
    EXPECT_EQ(after.Live(ResourceKind::kPackedRkey), before.Live(ResourceKind::kPackedRkey));
    EXPECT_EQ(after.Live(ResourceKind::kPool), before.Live(ResourceKind::kPool));
    EXPECT_EQ(after.registered_bytes, before.registered_bytes);
  };
  std::vector<KvRegion> good = mem.regions();

  std::vector<KvRegion> three(good.begin(), good.begin() + 4);
  refused(three, absl::StatusCode::kInvalidArgument, "has 4 regions");
  std::vector<KvRegion> none;
  refused(none, absl::StatusCode::kInvalidArgument, "has 0 regions");

  std::vector<KvRegion> shorter = good;
  shorter[3].length -= 64;
  refused(shorter, absl::StatusCode::kInvalidArgument, "region 3 (layer 1, plane V): length");

  std::vector<KvRegion> longer = good;
  longer[0].length += 4096;
  refused(longer, absl::StatusCode::kInvalidArgument, "region 0 (layer 0, plane K): length");

  std::vector<KvRegion> unaligned = good;
  unaligned[2].base = static_cast<std::byte*>(unaligned[2].base) + 8;
  refused(unaligned, absl::StatusCode::kInvalidArgument, "is not aligned to 64 bytes");

  std::vector<KvRegion> null_base = good;
  null_base[5].base = nullptr;
  refused(null_base, absl::StatusCode::kInvalidArgument, "region 5 (layer 2, plane V): null base");

  std::vector<KvRegion> overlapping = good;
  overlapping[4].base = static_cast<std::byte*>(good[1].base) + 128;
  refused(overlapping, absl::StatusCode::kInvalidArgument, "overlaps region 1");

  // Memory that is not mapped: a range just unmapped.
  const size_t bytes = l.plane_bytes();
  void* gone = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(gone, MAP_FAILED);
  munmap(gone, bytes);
  std::vector<KvRegion> unmapped = good;
  unmapped[1].base = gone;
  refused(unmapped, absl::StatusCode::kInvalidArgument, "is not mapped memory");

  // This UCX (Debian's) has no CUDA support.
  refused(good, absl::StatusCode::kFailedPrecondition, "cannot register cuda memory",
          MemoryType::kCuda);

  KvLayout bad_layout = l;
  bad_layout.head_dim = 0;
  EXPECT_THAT(agent->RegisterPool("bad", bad_layout, good),
              StatusIs(absl::StatusCode::kInvalidArgument, "head_dim"));

  // The good registration works, and a second one over the same memory
  // (another pool) is an overlap too.
  ASSERT_THAT(agent->RegisterPool("kv", l, good), IsOk());
  before = agent->GetStats();
  EXPECT_THAT(agent->RegisterPool("kv", l, good),
              StatusIs(absl::StatusCode::kAlreadyExists, "'kv'"));
  refused(good, absl::StatusCode::kInvalidArgument, "overlaps pool 'kv'");
}

}  // namespace
}  // namespace kvferry::test
