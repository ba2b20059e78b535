#include "src/transfer_plan.h"

#include "tests/test_util.h"

namespace kvferry::internal {
namespace {

using testing::SmallLayout;

TEST(TransferPlanTest, AdjacentBlocksCoalesce) {
  KvLayout l = SmallLayout(16);
  std::vector<uint32_t> local = {3, 4, 5, 6};
  std::vector<uint32_t> remote = {10, 11, 12, 13};
  auto ops = PlanCopies(l, l, local, remote, 0, l.num_layers);
  ASSERT_EQ(ops.size(), l.num_layers * l.num_planes());  // one op per layer and plane
  EXPECT_EQ(ops[0], (CopyOp{l.Offset(0, 0, 3), l.Offset(0, 0, 10), 4 * l.chunk_bytes()}));
  EXPECT_EQ(ops[1], (CopyOp{l.Offset(0, 1, 3), l.Offset(0, 1, 10), 4 * l.chunk_bytes()}));
}

TEST(TransferPlanTest, OrderDoesNotMatterAndGapsSplit) {
  KvLayout l = SmallLayout(16);
  std::vector<uint32_t> local = {5, 3, 4, 9};
  std::vector<uint32_t> remote = {2, 0, 1, 7};
  auto ops = PlanCopies(l, l, local, remote, 1, 2);  // layer 1 only
  ASSERT_EQ(ops.size(), 2u * l.num_planes());
  EXPECT_EQ(ops[0], (CopyOp{l.Offset(1, 0, 3), l.Offset(1, 0, 0), 3 * l.chunk_bytes()}));
  EXPECT_EQ(ops[1], (CopyOp{l.Offset(1, 0, 9), l.Offset(1, 0, 7), l.chunk_bytes()}));
}

TEST(TransferPlanTest, RemoteGapBreaksARun) {
  KvLayout l = SmallLayout(16);
  l.separate_kv = false;
  std::vector<uint32_t> local = {0, 1, 2};
  std::vector<uint32_t> remote = {4, 5, 9};
  auto ops = PlanCopies(l, l, local, remote, 0, 1);
  ASSERT_EQ(ops.size(), 2u);
  EXPECT_EQ(ops[0].bytes, 2 * l.chunk_bytes());
  EXPECT_EQ(ops[1].remote_offset, l.Offset(0, 0, 9));
}

TEST(TransferPlanTest, DifferentBlockCountsUseEachSidesOffsets) {
  KvLayout local_layout = SmallLayout(8);
  KvLayout remote_layout = SmallLayout(32);
  std::vector<uint32_t> local = {1};
  std::vector<uint32_t> remote = {30};
  auto ops = PlanCopies(local_layout, remote_layout, local, remote, 2, 3);
  ASSERT_EQ(ops.size(), 2u);
  EXPECT_EQ(ops[1].local_offset, local_layout.Offset(2, 1, 1));
  EXPECT_EQ(ops[1].remote_offset, remote_layout.Offset(2, 1, 30));
}

}  // namespace
}  // namespace kvferry::internal
