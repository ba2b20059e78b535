#include "kvferry/kv_layout.h"

#include "tests/test_util.h"

namespace kvferry::test {
namespace {

TEST(KvLayoutTest, DerivedSizes) {
  KvLayout l{.num_layers = 32, .num_blocks = 100, .tokens_per_block = 16, .num_kv_heads = 8,
             .head_dim = 128, .element_bytes = 2};
  ASSERT_THAT(l.Validate(), IsOk());
  EXPECT_EQ(l.chunk_bytes(), 16u * 8 * 128 * 2);
  EXPECT_EQ(l.block_bytes(), l.chunk_bytes() * 2 * 32);
  EXPECT_EQ(l.total_bytes(), l.block_bytes() * 100);
  EXPECT_EQ(l.Offset(0, 0, 1), l.chunk_bytes());
  EXPECT_EQ(l.Offset(0, 1, 0), l.chunk_bytes() * 100);
  EXPECT_EQ(l.Offset(1, 0, 0), l.chunk_bytes() * 200);
  l.separate_kv = false;
  EXPECT_EQ(l.num_planes(), 1u);
  EXPECT_EQ(l.block_bytes(), l.chunk_bytes() * 32);
}

TEST(KvLayoutTest, EachZeroFieldIsNamed) {
  const char* names[] = {"num_layers", "num_blocks", "tokens_per_block",
                         "num_kv_heads", "head_dim", "element_bytes"};
  for (int i = 0; i < 6; ++i) {
    KvLayout l = SmallLayout();
    uint32_t* fields[] = {&l.num_layers, &l.num_blocks, &l.tokens_per_block,
                          &l.num_kv_heads, &l.head_dim, &l.element_bytes};
    *fields[i] = 0;
    EXPECT_THAT(l.Validate(), StatusIs(absl::StatusCode::kInvalidArgument,
                                       std::string(names[i]) + " must be > 0 (got 0)"));
  }
}

TEST(KvLayoutTest, AbsurdValuesAreNamed) {
  KvLayout l = SmallLayout();
  l.num_layers = 5000;
  EXPECT_THAT(l.Validate(),
              StatusIs(absl::StatusCode::kInvalidArgument, "num_layers = 5000 is larger"));
  l = SmallLayout();
  l.element_bytes = 3;
  EXPECT_THAT(l.Validate(),
              StatusIs(absl::StatusCode::kInvalidArgument, "element_bytes = 3 is not 1, 2, 4 or 8"));
  l = SmallLayout();
  l.num_kv_heads = 100000;
  EXPECT_THAT(l.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, "num_kv_heads = 100000"));
}

TEST(KvLayoutTest, UnalignedChunk) {
  KvLayout l = SmallLayout();
  l.head_dim = 3;
  l.num_kv_heads = 1;
  l.tokens_per_block = 1;  // 6-byte chunk
  EXPECT_THAT(l.Validate(), StatusIs(absl::StatusCode::kInvalidArgument,
                                     "chunk of 6 bytes"));
}

TEST(KvLayoutTest, OverflowAndTooLarge) {
  KvLayout l{.num_layers = 1024, .num_blocks = 1u << 31, .tokens_per_block = 65536,
             .num_kv_heads = 4096, .head_dim = 65536, .element_bytes = 8};
  EXPECT_THAT(l.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, "overflows 64 bits"));
  KvLayout big{.num_layers = 80, .num_blocks = 1u << 20, .tokens_per_block = 16,
               .num_kv_heads = 8, .head_dim = 128, .element_bytes = 2};
  EXPECT_THAT(big.Validate(), StatusIs(absl::StatusCode::kInvalidArgument,
                                       "exceeds the maximum of 1099511627776 bytes"));
}

TEST(KvLayoutTest, CompatibilityNamesBothValues) {
  KvLayout a = SmallLayout(16);
  KvLayout b = SmallLayout(64);  // block counts may differ
  EXPECT_THAT(a.CheckCompatible(b), IsOk());
  b.num_layers = 8;
  EXPECT_THAT(a.CheckCompatible(b), StatusIs(absl::StatusCode::kFailedPrecondition,
                                             "num_layers is 4 here but 8 on the peer"));
  b = a;
  b.head_dim = 16;
  EXPECT_THAT(a.CheckCompatible(b), StatusIs(absl::StatusCode::kFailedPrecondition,
                                             "block bytes per layer is 512 here but 1024"));
  b = a;
  b.separate_kv = false;
  EXPECT_THAT(a.CheckCompatible(b), StatusIs(absl::StatusCode::kFailedPrecondition, "planes"));
  b = a;
  b.element_bytes = 1;
  b.head_dim = 16;  // same chunk bytes, other element size
  EXPECT_THAT(a.CheckCompatible(b), StatusIs(absl::StatusCode::kFailedPrecondition,
                                             "element_bytes is 2 here but 1"));
  b = a;
  b.tokens_per_block = 32;
  b.num_kv_heads = 1;
  EXPECT_THAT(a.CheckCompatible(b), StatusIs(absl::StatusCode::kFailedPrecondition,
                                             "tokens_per_block is 16 here but 32"));
}

}  // namespace
}  // namespace kvferry::test
