// KernelCopyTarget::Copy against a real forked process: many scattered
// elements in calls of up to IOV_MAX, a call the kernel stops short (its cap
// on one call's bytes) resumed inside an element, and a hole in the peer's
// memory ending the copy with the bytes that moved named.
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <random>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvferry/transfer.h"
#include "src/kernel_copy.h"
#include "tests/child_process.h"
#include "tests/test_util.h"

namespace kvferry::internal {
namespace {

using ::kvferry::test::IsOk;

constexpr char kProbe[] = "kernel-copy-batch-test probe";

absl::StatusOr<std::shared_ptr<KernelCopyTarget>> OpenChild(const test::ForkedTwin& child) {
  return KernelCopyTarget::Open(static_cast<uint64_t>(child.pid()),
                                reinterpret_cast<uintptr_t>(kProbe), kProbe);
}

void Fill(std::vector<std::byte>& v, uint32_t seed) {
  std::mt19937 rng(seed);
  for (std::byte& b : v) b = static_cast<std::byte>(rng());
}

TEST(KernelCopyBatchTest, ThousandsOfScatteredElementsMoveExactly) {
  constexpr size_t kRemote = 8 << 20;
  std::vector<std::byte> remote(kRemote, std::byte{0});  // zeros here and in the child
  test::ForkedTwin child;
  ASSERT_GT(child.pid(), 0);
  auto target = OpenChild(child);
  ASSERT_THAT(target, IsOk());

  // 3000 elements (three calls at IOV_MAX) of 64 B to 4 KiB, each remote
  // element at a mirrored, non-adjacent slot.
  constexpr size_t kElements = 3000;
  constexpr size_t kSlot = 2048 + 640;  // > the largest element: no overlap
  std::mt19937 rng(7);
  std::vector<size_t> lengths(kElements);
  size_t total = 0;
  for (size_t& n : lengths) {
    n = 64 * (1 + rng() % 32);  // 64 .. 2048
    total += n;
  }
  std::vector<std::byte> local(total);
  Fill(local, 11);
  std::vector<iovec> l, r;
  size_t at = 0;
  for (size_t i = 0; i < kElements; ++i) {
    l.push_back({local.data() + at, lengths[i]});
    r.push_back({remote.data() + (kElements - 1 - i) * kSlot, lengths[i]});
    at += lengths[i];
  }
  ASSERT_LE(kElements * kSlot, kRemote);
  ASSERT_THAT((*target)->Copy(TransferOp::kWrite, l, r), IsOk());
  EXPECT_EQ(remote[0], std::byte{0});  // written there, not here

  // Read it all back, element by element into a cleared buffer, and
  // compare; then the whole remote buffer, to see nothing else was touched.
  std::vector<std::byte> back(total, std::byte{0});
  std::vector<iovec> b;
  at = 0;
  for (size_t i = 0; i < kElements; ++i) {
    b.push_back({back.data() + at, lengths[i]});
    at += lengths[i];
  }
  ASSERT_THAT((*target)->Copy(TransferOp::kRead, b, r), IsOk());
  EXPECT_EQ(std::memcmp(back.data(), local.data(), total), 0);

  std::vector<std::byte> image(kRemote);
  ASSERT_THAT((*target)->Copy(TransferOp::kRead, {{image.data(), kRemote}},
                              {{remote.data(), kRemote}}),
              IsOk());
  size_t outside_nonzero = 0;
  for (size_t i = 0; i < kElements; ++i) {
    const size_t slot = (kElements - 1 - i) * kSlot;
    for (size_t k = slot + lengths[i]; k < slot + kSlot && k < kRemote; ++k) {
      if (image[k] != std::byte{0}) ++outside_nonzero;
    }
  }
  EXPECT_EQ(outside_nonzero, 0u);
}

// The kernel moves at most MAX_RW_COUNT (2 GiB less a page) per call: a
// copy of more stops short inside an element and must resume exactly
// there. Elements may repeat their buffers, so 2 GiB + 32 MiB of elements
// need only 12 MiB of memory on each side.
TEST(KernelCopyBatchTest, ACallTheKernelStopsShortResumesInsideTheElement) {
  constexpr size_t kChunk = 4 << 20;
  std::vector<std::byte> r1(kChunk, std::byte{0}), r2(kChunk, std::byte{0}),
      r3(kChunk, std::byte{0});
  test::ForkedTwin child;
  ASSERT_GT(child.pid(), 0);
  auto target = OpenChild(child);
  ASSERT_THAT(target, IsOk());
  std::vector<std::byte> l1(kChunk), l2(kChunk), l3(kChunk);
  Fill(l1, 1);
  Fill(l2, 2);
  Fill(l3, 3);

  const uint64_t cap = 0x7ffff000;  // MAX_RW_COUNT with 4 KiB pages
  const size_t before = cap / kChunk;  // whole elements inside the cap: 511
  std::vector<iovec> l, r;
  for (size_t i = 0; i < before; ++i) {
    l.push_back({l1.data(), kChunk});
    r.push_back({r1.data(), kChunk});
  }
  // The element the cap falls in (4 KiB before its end), then 8 more.
  l.push_back({l2.data(), kChunk});
  r.push_back({r2.data(), kChunk});
  for (int i = 0; i < 8; ++i) {
    l.push_back({l3.data(), kChunk});
    r.push_back({r3.data(), kChunk});
  }
  ASSERT_THAT((*target)->Copy(TransferOp::kWrite, l, r), IsOk());

  for (auto [here, there] : {std::pair{&l1, &r1}, std::pair{&l2, &r2}, std::pair{&l3, &r3}}) {
    std::vector<std::byte> got(kChunk, std::byte{0});
    ASSERT_THAT((*target)->Copy(TransferOp::kRead, {{got.data(), kChunk}},
                                {{there->data(), kChunk}}),
                IsOk());
    EXPECT_EQ(std::memcmp(got.data(), here->data(), kChunk), 0)
        << "remote buffer " << (there == &r1 ? 1 : there == &r2 ? 2 : 3);
  }

  // READ the same way: the cut lands in l2's element, which must end up
  // whole.
  std::vector<iovec> rl, rr;
  std::vector<std::byte> sink(kChunk), tail(kChunk, std::byte{0});
  for (size_t i = 0; i < before; ++i) {
    rl.push_back({sink.data(), kChunk});
    rr.push_back({r1.data(), kChunk});
  }
  rl.push_back({tail.data(), kChunk});
  rr.push_back({r2.data(), kChunk});
  ASSERT_THAT((*target)->Copy(TransferOp::kRead, rl, rr), IsOk());
  EXPECT_EQ(std::memcmp(tail.data(), l2.data(), kChunk), 0);
}

// A page the peer does not have: the kernel moves what precedes it and
// stops; the call that resumes at the hole fails, and the copy's error
// says how many bytes had moved.
TEST(KernelCopyBatchTest, AHoleInThePeerEndsTheCopyNamingTheBytesMoved) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  auto* region = static_cast<std::byte*>(
      mmap(nullptr, 8 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(region, MAP_FAILED);
  for (size_t i = 0; i < 8 * page; ++i) region[i] = static_cast<std::byte>(i % 251 + 1);
  ASSERT_EQ(munmap(region + 5 * page, page), 0);  // the hole, in the child too
  auto child = std::make_unique<test::ForkedTwin>();
  ASSERT_GT(child->pid(), 0);
  auto target = OpenChild(*child);
  ASSERT_THAT(target, IsOk());

  std::vector<std::byte> got(8 * page, std::byte{0});
  const absl::Status st = (*target)->Copy(TransferOp::kRead, {{got.data(), 8 * page}},
                                          {{region, 8 * page}});
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_NE(st.message().find(absl::StrCat("(", 5 * page, " of ", 8 * page, " bytes moved)")),
            absl::string_view::npos)
      << st;
  EXPECT_NE(st.message().find("process_vm_readv"), absl::string_view::npos) << st;
  EXPECT_EQ(std::memcmp(got.data(), region, 5 * page), 0);
  EXPECT_EQ(got[5 * page], std::byte{0});
  child.reset();
  munmap(region, 5 * page);
  munmap(region + 6 * page, 2 * page);
}

}  // namespace
}  // namespace kvferry::internal
