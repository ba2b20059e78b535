#include "kvferry/ledger.h"

#include <type_traits>

#include "src/tracked.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

using internal::Tracked;
using ::testing::HasSubstr;

static_assert(!std::is_copy_constructible_v<Tracked>);
static_assert(std::is_nothrow_move_constructible_v<Tracked>);

TEST(LedgerTest, TrackedCountsAndUncounts) {
  LedgerPtr ledger = internal::Access::MakeLedger("t");
  {
    Tracked a(ledger, ResourceKind::kBlockSet, SourceLocation::current());
    Tracked b(ledger, ResourceKind::kBlockSet, SourceLocation::current());
    Tracked c(ledger, ResourceKind::kTransfer, SourceLocation::current());
    EXPECT_EQ(ledger->Snapshot().Live(ResourceKind::kBlockSet), 2);
    EXPECT_EQ(ledger->Snapshot().Live(ResourceKind::kTransfer), 1);
    EXPECT_EQ(ledger->Snapshot().TotalLive(), 3);
  }
  EXPECT_EQ(ledger->Snapshot().TotalLive(), 0);
}

TEST(LedgerTest, MoveTransfersTheCount) {
  LedgerPtr ledger = internal::Access::MakeLedger("t");
  Tracked a(ledger, ResourceKind::kPeer, SourceLocation::current());
  Tracked b(std::move(a));
  EXPECT_TRUE(a.empty());  // NOLINT(bugprone-use-after-move): moved-from is empty
  EXPECT_EQ(ledger->Snapshot().Live(ResourceKind::kPeer), 1);
  Tracked c;
  c = std::move(b);
  EXPECT_EQ(ledger->Snapshot().Live(ResourceKind::kPeer), 1);
  auto& self = c;
  c = std::move(self);  // self-move keeps the count
  EXPECT_EQ(ledger->Snapshot().Live(ResourceKind::kPeer), 1);
  c.Reset();
  c.Reset();  // double reset is harmless
  EXPECT_EQ(ledger->Snapshot().Live(ResourceKind::kPeer), 0);
}

TEST(LedgerTest, NullLedgerCountsNothing) {
  Tracked t(nullptr, ResourceKind::kContext, SourceLocation::current());
  EXPECT_TRUE(t.empty());
}

TEST(LedgerTest, ReportNamesTheCreationSite) {
  LedgerPtr ledger = internal::Access::MakeLedger("report");
  const int line = __LINE__ + 1;
  Tracked t(ledger, ResourceKind::kBlockSet, SourceLocation::current());
  std::string report = ledger->Report();
  EXPECT_THAT(report, HasSubstr("block_set=1"));
  if (Ledger::SitesEnabled()) {
    EXPECT_THAT(report, HasSubstr("ledger_test.cc:" + std::to_string(line)));
    ASSERT_EQ(ledger->Survivors().size(), 1u);
    EXPECT_EQ(ledger->Survivors()[0].kind, ResourceKind::kBlockSet);
    EXPECT_EQ(ledger->Survivors()[0].line, static_cast<uint32_t>(line));
  } else {
    EXPECT_THAT(report, HasSubstr("not recorded"));
    EXPECT_TRUE(ledger->Survivors().empty());
  }
}

TEST(LedgerTest, RegisteredBytes) {
  LedgerPtr ledger = internal::Access::MakeLedger("bytes");
  internal::Access::AddRegisteredBytes(*ledger, 4096);
  EXPECT_EQ(ledger->Snapshot().registered_bytes, 4096);
  internal::Access::AddRegisteredBytes(*ledger, -4096);
  EXPECT_EQ(ledger->Snapshot().registered_bytes, 0);
}

TEST(LedgerTest, KindNamesAreDistinct) {
  for (int i = 0; i < kNumResourceKinds; ++i) {
    for (int j = i + 1; j < kNumResourceKinds; ++j) {
      EXPECT_NE(ResourceKindName(static_cast<ResourceKind>(i)),
                ResourceKindName(static_cast<ResourceKind>(j)));
    }
  }
  EXPECT_EQ(ResourceKindName(ResourceKind::kBlockSet), "block_set");
  EXPECT_EQ(ResourceKindName(static_cast<ResourceKind>(99)), "unknown");
}

TEST(LedgerTest, StatsToStringListsEveryKind) {
  Stats s;
  s.live[static_cast<int>(ResourceKind::kTransfer)] = 3;
  s.registered_bytes = 7;
  EXPECT_THAT(s.ToString(), HasSubstr("transfer=3"));
  EXPECT_THAT(s.ToString(), HasSubstr("registered_bytes=7"));
  EXPECT_EQ(s.TotalLive(), 3);
}

}  // namespace
}  // namespace kvferry::test
