#include "src/transfer_plan.h"

#include "src/region_map.h"

#include "tests/test_util.h"

namespace kvferry::internal {
namespace {

using test::SmallLayout;

TEST(TransferPlanTest, AdjacentBlocksCoalesce) {
  KvLayout l = SmallLayout(16);
  std::vector<uint32_t> local = {3, 4, 5, 6};
  std::vector<uint32_t> remote = {10, 11, 12, 13};
  auto ops = PlanCopies(l, 1, l, 1, local, remote, 0, l.num_layers);
  ASSERT_EQ(ops.size(), l.num_layers * l.num_planes());  // one op per layer and plane
  EXPECT_EQ(ops[0], (CopyOp{0, l.Offset(0, 0, 3), 0, l.Offset(0, 0, 10), 4 * l.chunk_bytes()}));
  EXPECT_EQ(ops[1], (CopyOp{0, l.Offset(0, 1, 3), 0, l.Offset(0, 1, 10), 4 * l.chunk_bytes()}));
}

TEST(TransferPlanTest, OrderDoesNotMatterAndGapsSplit) {
  KvLayout l = SmallLayout(16);
  std::vector<uint32_t> local = {5, 3, 4, 9};
  std::vector<uint32_t> remote = {2, 0, 1, 7};
  auto ops = PlanCopies(l, 1, l, 1, local, remote, 1, 2);  // layer 1 only
  ASSERT_EQ(ops.size(), 2u * l.num_planes());
  EXPECT_EQ(ops[0], (CopyOp{0, l.Offset(1, 0, 3), 0, l.Offset(1, 0, 0), 3 * l.chunk_bytes()}));
  EXPECT_EQ(ops[1], (CopyOp{0, l.Offset(1, 0, 9), 0, l.Offset(1, 0, 7), l.chunk_bytes()}));
}

TEST(TransferPlanTest, RemoteGapBreaksARun) {
  KvLayout l = SmallLayout(16);
  l.separate_kv = false;
  std::vector<uint32_t> local = {0, 1, 2};
  std::vector<uint32_t> remote = {4, 5, 9};
  auto ops = PlanCopies(l, 1, l, 1, local, remote, 0, 1);
  ASSERT_EQ(ops.size(), 2u);
  EXPECT_EQ(ops[0].bytes, 2 * l.chunk_bytes());
  EXPECT_EQ(ops[1].remote_offset, l.Offset(0, 0, 9));
}

TEST(TransferPlanTest, DifferentBlockCountsUseEachSidesOffsets) {
  KvLayout local_layout = SmallLayout(8);
  KvLayout remote_layout = SmallLayout(32);
  std::vector<uint32_t> local = {1};
  std::vector<uint32_t> remote = {30};
  auto ops = PlanCopies(local_layout, 1, remote_layout, 1, local, remote, 2, 3);
  ASSERT_EQ(ops.size(), 2u);
  EXPECT_EQ(ops[1].local_offset, local_layout.Offset(2, 1, 1));
  EXPECT_EQ(ops[1].remote_offset, remote_layout.Offset(2, 1, 30));
}

// Engine memory: the same blocks land at per-region offsets, and runs still
// coalesce inside a region.
TEST(TransferPlanTest, RegionsPerPlaneAndPerLayer) {
  KvLayout l = SmallLayout(16);
  const uint64_t per_plane = uint64_t{l.num_layers} * l.num_planes();
  std::vector<uint32_t> local = {3, 4};
  std::vector<uint32_t> remote = {7, 8};
  auto ops = PlanCopies(l, per_plane, l, l.num_layers, local, remote, 1, 2);
  ASSERT_EQ(ops.size(), 2u);  // layer 1, planes K and V, one run each
  const uint64_t chunk = l.chunk_bytes();
  // Local: region layer * planes + plane, offset from block 0 of the plane.
  EXPECT_EQ(ops[0], (CopyOp{2, 3 * chunk, 1, 7 * chunk, 2 * chunk}));
  // Remote, one region per layer: plane V starts a plane after K.
  EXPECT_EQ(ops[1], (CopyOp{3, 3 * chunk, 1, l.plane_bytes() + 7 * chunk, 2 * chunk}));
}

TEST(TransferPlanTest, RegionShapesAgreeOnEveryChunk) {
  KvLayout l = SmallLayout(8);
  const uint64_t counts[] = {1, l.num_layers, uint64_t{l.num_layers} * l.num_planes()};
  for (uint64_t n : counts) {
    for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
        PlaneAt at = LocatePlane(l, n, layer, plane);
        // Laid end to end, the regions reproduce the single-arena offsets.
        EXPECT_EQ(at.region * RegionBytes(l, n) + at.offset, l.Offset(layer, plane, 0))
            << n << " regions, layer " << layer << " plane " << plane;
      }
    }
  }
  EXPECT_FALSE(CheckRegionCount("pool", l, 3).ok());
}

}  // namespace
}  // namespace kvferry::internal
