// AgentOptions::populate_pools and PopulatePages (src/populate.h): pages
// resident without a byte changed, in a private mapping, in a second
// mapping of shared memory (as a peer's pool is mapped here), and through
// agents with the knob on and off, whose transfers still move exact bytes.
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "kvferry/agent.h"
#include "src/populate.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry {
namespace {

using ::kvferry::test::ExpectedChecksum;
using ::kvferry::test::FillBlock;
using ::kvferry::test::BlockChecksum;
using ::kvferry::test::IsOk;

size_t Page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

size_t ResidentPages(void* base, size_t bytes) {
  std::vector<unsigned char> v(bytes / Page());
  if (mincore(base, bytes, v.data()) != 0) return 0;
  size_t n = 0;
  for (unsigned char c : v) n += c & 1;
  return n;
}

TEST(PopulatePagesTest, EveryPageResidentAndNoByteChanged) {
  constexpr size_t kPages = 64;
  const size_t bytes = kPages * Page();
  auto* p = static_cast<std::byte*>(
      mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(p, MAP_FAILED);
  for (size_t i = 0; i < kPages; i += 4) std::memset(p + i * Page(), static_cast<int>(i + 1), 100);
  ASSERT_LT(ResidentPages(p, bytes), kPages);
  // An unaligned range is widened to whole pages.
  internal::PopulateMethod method;
  ASSERT_THAT(internal::PopulatePages(p + 100, bytes - 200, &method), IsOk());
  EXPECT_EQ(ResidentPages(p, bytes), kPages);
  for (size_t i = 0; i < kPages; ++i) {
    const std::byte want = i % 4 == 0 ? static_cast<std::byte>(i + 1) : std::byte{0};
    EXPECT_EQ(p[i * Page()], want) << "page " << i;
    EXPECT_EQ(p[i * Page() + 100], std::byte{0}) << "page " << i;
  }
  munmap(p, bytes);
}

TEST(PopulatePagesTest, ASecondMappingOfSharedMemoryKeepsItsContents) {
  constexpr size_t kPages = 32;
  const size_t bytes = kPages * Page();
  int fd = memfd_create("kvferry-populate-test", 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, static_cast<off_t>(bytes)), 0);
  auto* owner = static_cast<std::byte*>(
      mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  ASSERT_NE(owner, MAP_FAILED);
  for (size_t i = 0; i < bytes; ++i) owner[i] = static_cast<std::byte>(i * 7 + 3);
  auto* view = static_cast<std::byte*>(
      mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  ASSERT_NE(view, MAP_FAILED);
  ASSERT_THAT(internal::PopulatePages(view, bytes), IsOk());
  EXPECT_EQ(ResidentPages(view, bytes), kPages);
  EXPECT_EQ(std::memcmp(view, owner, bytes), 0);
  // Still one memory: a write through the view shows in the owner.
  view[5] = std::byte{0xee};
  EXPECT_EQ(owner[5], std::byte{0xee});
  munmap(view, bytes);
  munmap(owner, bytes);
  close(fd);
}

TEST(PopulatePagesTest, AnUnmappedRangeIsAnErrorNamingIt) {
  const size_t bytes = 4 * Page();
  {
    // Only the kernel's populate can refuse a range; the fallback (before
    // Linux 5.14) would touch it.
    std::vector<std::byte> probe(bytes);
    internal::PopulateMethod method;
    ASSERT_THAT(internal::PopulatePages(probe.data(), probe.size(), &method), IsOk());
    if (method != internal::PopulateMethod::kMadvise) {
      GTEST_SKIP() << "no MADV_POPULATE_WRITE in this kernel";
    }
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  ASSERT_EQ(munmap(p, bytes), 0);
  const absl::Status st = internal::PopulatePages(p, bytes);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("MADV_POPULATE_WRITE"), absl::string_view::npos) << st;
}

// (populate_pools, pool memory source)
class PopulateAgentTest
    : public ::testing::TestWithParam<std::tuple<bool, PoolMemorySource>> {
 protected:
  AgentOptions Options(const std::string& name) {
    AgentOptions o = test::TestAgentOptions(name, test::kShm);
    o.populate_pools = std::get<0>(GetParam());
    o.pool_memory = std::get<1>(GetParam());
    return o;
  }
};

TEST_P(PopulateAgentTest, PoolsResidentAsAskedAndTransfersMoveExactBytes) {
  const bool populate = std::get<0>(GetParam());
#if defined(__SANITIZE_THREAD__)
  // Anonymous pools of one process move over UCX's emulated path, whose
  // writes TSan cannot attribute (as in engine_memory_test).
  if (std::get<1>(GetParam()) == PoolMemorySource::kAnonymousMmap) {
    GTEST_SKIP() << "emulated shared-memory path under TSan";
  }
#endif
  const KvLayout layout = test::Layout(64);
  auto prefill = Agent::Create(Options("prefill"));
  ASSERT_THAT(prefill, IsOk());
  auto decode = Agent::Create(Options("decode"));
  ASSERT_THAT(decode, IsOk());
  auto prefill_pool = (*prefill)->CreatePool("kv", layout);
  ASSERT_THAT(prefill_pool, IsOk());
  auto decode_pool = (*decode)->CreatePool("kv", layout);
  ASSERT_THAT(decode_pool, IsOk());
  auto report = (*decode)->GetMemoryReport();
  ASSERT_THAT(report, IsOk());
  ASSERT_EQ(report->pools.size(), 1u);
  EXPECT_EQ(report->pools[0].resident_bytes, populate ? layout.total_bytes() : 0u);

  // Prefill's blocks hold their pattern before decode maps (and, with the
  // knob, populates) prefill's pool: populating must not change them.
  BlockSet src = *(*prefill_pool)->LeaseIds(std::vector<uint32_t>{3, 4, 10, 40});
  for (size_t i = 0; i < src.size(); ++i) FillBlock(src, i, 5, src.ids()[i]);
  auto port = (*decode)->Listen("127.0.0.1", 0);
  ASSERT_THAT(port, IsOk());
  ASSERT_THAT((*prefill)->Connect("127.0.0.1", *port), IsOk());
  ASSERT_THAT((*decode)->WaitForPeer("prefill"), IsOk());

  // READ, scattered: decode 0..3 from prefill 40, 10, 4, 3.
  BlockSet dst = *(*decode_pool)->LeaseIds(std::vector<uint32_t>{0, 1, 2, 3});
  auto r = (*decode)->PostTransfer({.op = TransferOp::kRead, .peer = "prefill", .local = &dst,
                                    .remote_blocks = {40, 10, 4, 3}});
  ASSERT_THAT(r, IsOk());
  ASSERT_THAT(r->Wait(absl::Seconds(60)), IsOk());
  EXPECT_EQ(BlockChecksum(dst, 0), ExpectedChecksum(layout, 5, 40));
  EXPECT_EQ(BlockChecksum(dst, 1), ExpectedChecksum(layout, 5, 10));
  EXPECT_EQ(BlockChecksum(dst, 2), ExpectedChecksum(layout, 5, 4));
  EXPECT_EQ(BlockChecksum(dst, 3), ExpectedChecksum(layout, 5, 3));

  // WRITE back from prefill into decode 20..23, and read them back here.
  auto w = (*prefill)->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &src,
                                     .remote_blocks = {23, 22, 21, 20}});
  ASSERT_THAT(w, IsOk());
  ASSERT_THAT(w->Wait(absl::Seconds(60)), IsOk());
  BlockSet got = *(*decode_pool)->LeaseIds(std::vector<uint32_t>{20, 21, 22, 23});
  EXPECT_EQ(BlockChecksum(got, 0), ExpectedChecksum(layout, 5, 40));
  EXPECT_EQ(BlockChecksum(got, 1), ExpectedChecksum(layout, 5, 10));
  EXPECT_EQ(BlockChecksum(got, 2), ExpectedChecksum(layout, 5, 4));
  EXPECT_EQ(BlockChecksum(got, 3), ExpectedChecksum(layout, 5, 3));
}

INSTANTIATE_TEST_SUITE_P(
    KnobAndSource, PopulateAgentTest,
    ::testing::Combine(::testing::Bool(), ::testing::Values(PoolMemorySource::kUcxAllocated,
                                                            PoolMemorySource::kAnonymousMmap)),
    [](const auto& p) {
      return std::string(std::get<0>(p.param) ? "Populated" : "Lazy") +
             (std::get<1>(p.param) == PoolMemorySource::kUcxAllocated ? "Ucx" : "Anonymous");
    });

}  // namespace
}  // namespace kvferry
