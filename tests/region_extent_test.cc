// src/region_extent.h: parsing /proc/<pid>/maps, and the two extent checks
// on captured maps and on this process's real mappings (a System V segment
// attached between two reads, anonymous memory with a PROT_NONE tail).
#include "src/region_extent.h"

#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <unistd.h>

#include <atomic>
#include <random>
#include <string>
#include <thread>

#include "tests/test_util.h"

namespace kvferry::internal {
namespace {

using ::kvferry::test::IsOk;
using ::kvferry::test::StatusIs;
using ::testing::HasSubstr;

constexpr char kMaps[] =
    "55d0c4a2b000-55d0c4a2d000 r--p 00000000 fd:01 1234                       /usr/bin/cat\n"
    "55d0c4a2d000-55d0c4a32000 r-xp 00002000 fd:01 1234                       /usr/bin/cat\n"
    "55d0c5000000-55d0c5021000 rw-p 00000000 00:00 0                          [heap]\n"
    "7f0000000000-7f0000040000 rw-s 00000000 00:01 98310  /SYSV00000000 (deleted)\n"
    "7f0000040000-7f0000140000 rw-p 00000000 00:00 0 \n"
    "7f0000200000-7f0000240000 rw-s 00000000 00:1a 77  /dev/shm/with space (deleted)\n"
    "7f0000240000-7f0000250000 ---p 00000000 00:00 0 \n";

MemoryMap Parse(const char* text) {
  auto map = ParseMemoryMap(text);
  EXPECT_THAT(map, IsOk());
  return map.ok() ? *std::move(map) : MemoryMap{};
}

TEST(ParseMemoryMapTest, ReadsEveryField) {
  const MemoryMap map = Parse(kMaps);
  ASSERT_EQ(map.size(), 7u);
  EXPECT_EQ(map[0].start, 0x55d0c4a2b000u);
  EXPECT_EQ(map[0].end, 0x55d0c4a2d000u);
  EXPECT_TRUE(map[0].readable);
  EXPECT_FALSE(map[0].writable);
  EXPECT_EQ(map[0].path, "/usr/bin/cat");
  EXPECT_EQ(map[1].offset, 0x2000u);
  EXPECT_EQ(map[3].inode, 98310u);
  EXPECT_TRUE(map[3].shared);
  EXPECT_EQ(map[3].device, "00:01");
  EXPECT_EQ(map[3].path, "/SYSV00000000 (deleted)");
  EXPECT_EQ(map[4].path, "");
  EXPECT_FALSE(map[4].shared);
  EXPECT_EQ(map[5].path, "/dev/shm/with space (deleted)");
  EXPECT_FALSE(map[6].readable);
}

TEST(ParseMemoryMapTest, RefusesMalformedLinesNamingThem) {
  EXPECT_THAT(ParseMemoryMap("7f00-7e00 rw-p 0 00:00 0\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, "line 1"));
  EXPECT_THAT(ParseMemoryMap("7f00-7f10 rw-p 0 00:00 0\nzz rw-p 0 00:00 0\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, "line 2"));
  EXPECT_THAT(ParseMemoryMap("7f00-7f10 rw 0 00:00 0\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, "permissions"));
  EXPECT_THAT(ParseMemoryMap("7f00-7f10 rw-p 0 00:00 x\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, "inode"));
  EXPECT_THAT(ParseMemoryMap("7f00-7f10 rw-p 0 00:00 0\n7f08-7f20 rw-p 0 00:00 0\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, "overlaps"));
  EXPECT_THAT(ParseMemoryMap(""), IsOk());
}

TEST(FindMappingTest, FindsTheMappingHoldingAnAddress) {
  const MemoryMap map = Parse(kMaps);
  EXPECT_EQ(FindMapping(map, 0x55d0c4a2b000), &map[0]);
  EXPECT_EQ(FindMapping(map, 0x55d0c4a2cfff), &map[0]);
  EXPECT_EQ(FindMapping(map, 0x55d0c4a2d000), &map[1]);
  EXPECT_EQ(FindMapping(map, 0x7f000003ffff), &map[3]);
  EXPECT_EQ(FindMapping(map, 0x7f0000140000), nullptr);  // a gap
  EXPECT_EQ(FindMapping(map, 0x1000), nullptr);
  EXPECT_EQ(FindMapping(map, 0x7fffffffffff), nullptr);
}

TEST(CheckAttachedRangeTest, AcceptsARangeInsideTheNewSegment) {
  const MemoryMap after = Parse(kMaps);
  MemoryMap before = after;
  before.erase(before.begin() + 3);  // the SYSV segment is new
  EXPECT_THAT(CheckAttachedRange(before, after, 0x7f0000000000, 0x40000), IsOk());
  EXPECT_THAT(CheckAttachedRange(before, after, 0x7f0000010000, 0x30000), IsOk());
}

TEST(CheckAttachedRangeTest, RefusesARangePastTheSegment) {
  const MemoryMap after = Parse(kMaps);
  MemoryMap before = after;
  before.erase(before.begin() + 3);
  // 40 blocks of 32 KiB over the real 256 KiB: into the private mapping after it.
  absl::Status s = CheckAttachedRange(before, after, 0x7f0000000000, 40 * 32768);
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument,
                          "runs 1048576 bytes past the end of the segment"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("/SYSV00000000"));
  EXPECT_THAT(CheckAttachedRange(before, after, 0x7f0000000000, 0x40001),
              StatusIs(absl::StatusCode::kInvalidArgument, "runs 1 bytes past"));
  EXPECT_THAT(CheckAttachedRange(before, after, 0x7f0000000000, uint64_t{32768} * 1000000),
              StatusIs(absl::StatusCode::kInvalidArgument, "past the end"));
}

TEST(CheckAttachedRangeTest, RefusesMemoryThisProcessHadAlready) {
  const MemoryMap map = Parse(kMaps);
  // The key points at a shared segment that was there before the unpack
  // (this process's own pool, say).
  EXPECT_THAT(CheckAttachedRange(map, map, 0x7f0000200000, 0x1000),
              StatusIs(absl::StatusCode::kInvalidArgument, "before the key was unpacked"));
  // Private memory, old or new.
  EXPECT_THAT(CheckAttachedRange(map, map, 0x55d0c5000000, 0x1000),
              StatusIs(absl::StatusCode::kInvalidArgument, "before the key was unpacked"));
  MemoryMap before = map;
  before.erase(before.begin() + 4);
  EXPECT_THAT(CheckAttachedRange(before, map, 0x7f0000040000, 0x1000),
              StatusIs(absl::StatusCode::kInvalidArgument, "private mapping"));
  // Nothing there.
  EXPECT_THAT(CheckAttachedRange({}, map, 0x7f0000140000, 0x1000),
              StatusIs(absl::StatusCode::kInvalidArgument, "maps nothing"));
}

TEST(CheckAttachedRangeTest, ARemappedRangeIsNotTheOldMapping) {
  const MemoryMap after = Parse(kMaps);
  MemoryMap before = after;
  before[3].end = 0x7f0000020000;  // a smaller mapping was there: not the same one
  EXPECT_THAT(CheckAttachedRange(before, after, 0x7f0000000000, 0x40000), IsOk());
  before[3] = after[3];
  before[3].inode = 1;  // another segment was mapped at the same place
  EXPECT_THAT(CheckAttachedRange(before, after, 0x7f0000000000, 0x40000), IsOk());
}

TEST(CheckProcessRangeTest, AcceptsReadWriteMemoryAcrossAdjacentMappings) {
  const MemoryMap map = Parse(kMaps);
  // The SYSV segment and the private mapping after it touch.
  EXPECT_THAT(CheckProcessRange(map, 0x7f0000000000, 0x140000), IsOk());
  EXPECT_THAT(CheckProcessRange(map, 0x7f0000030000, 0x20000), IsOk());
}

TEST(CheckProcessRangeTest, RefusesGapsAndMemoryItCannotWrite) {
  const MemoryMap map = Parse(kMaps);
  EXPECT_THAT(CheckProcessRange(map, 0x7f0000000000, 0x140001),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "is not mapped at 0x7f0000140000 (1310720 bytes in)"));
  EXPECT_THAT(CheckProcessRange(map, 0x7f0000200000, 0x40001),
              StatusIs(absl::StatusCode::kInvalidArgument, "not readable and writable"));
  EXPECT_THAT(CheckProcessRange(map, 0x55d0c4a2b000, 0x10),
              StatusIs(absl::StatusCode::kInvalidArgument, "not readable and writable"));
  EXPECT_THAT(CheckProcessRange(map, 0x1000, 0x10),
              StatusIs(absl::StatusCode::kInvalidArgument, "is not mapped at 0x1000"));
}

// The real thing: a System V segment attached between two reads of this
// process's map, as UCX's sysv transport attaches a peer's segment.
TEST(RealMappingsTest, ASegmentAttachedBetweenTwoReadsHoldsItsLengthOnly) {
  constexpr size_t kBytes = 256 << 10;
  auto before = ReadMemoryMap(0);
  ASSERT_THAT(before, IsOk());
  const int id = shmget(IPC_PRIVATE, kBytes, IPC_CREAT | 0600);
  ASSERT_GE(id, 0);
  void* at = shmat(id, nullptr, 0);
  shmctl(id, IPC_RMID, nullptr);
  ASSERT_NE(at, reinterpret_cast<void*>(-1));
  auto after = ReadMemoryMap(0);
  ASSERT_THAT(after, IsOk());
  const uint64_t local = reinterpret_cast<uintptr_t>(at);
  const Mapping* m = FindMapping(*after, local);
  ASSERT_NE(m, nullptr);
  EXPECT_TRUE(m->shared);
  EXPECT_EQ(m->inode, static_cast<uint64_t>(id));
  EXPECT_THAT(m->path, HasSubstr("SYSV"));
  EXPECT_THAT(CheckAttachedRange(*before, *after, local, kBytes), IsOk());
  EXPECT_THAT(CheckAttachedRange(*before, *after, local + 4096, kBytes - 4096), IsOk());
  EXPECT_THAT(CheckAttachedRange(*before, *after, local, kBytes + 1),
              StatusIs(absl::StatusCode::kInvalidArgument, "past the end of the segment"));
  // Read again: now it is memory this process had already.
  EXPECT_THAT(CheckAttachedRange(*after, *after, local, kBytes),
              StatusIs(absl::StatusCode::kInvalidArgument, "before the key was unpacked"));
  shmdt(at);
}

TEST(RealMappingsTest, AnonymousMemoryWithAGuardAfterIt) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* mem = mmap(nullptr, 3 * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  ASSERT_EQ(mprotect(mem, 2 * page, PROT_READ | PROT_WRITE), 0);
  auto map = ReadMemoryMap(getpid());
  ASSERT_THAT(map, IsOk());
  const uint64_t base = reinterpret_cast<uintptr_t>(mem);
  EXPECT_THAT(CheckProcessRange(*map, base, 2 * page), IsOk());
  EXPECT_THAT(CheckProcessRange(*map, base, 2 * page + 1),
              StatusIs(absl::StatusCode::kInvalidArgument, "not readable and writable"));
  munmap(mem, 3 * page);
}

// The kernel lists a process's mappings a page of text at a time and lets
// them change between pages. Here another thread keeps merging and splitting
// mappings spread over many pages of the listing (making one page of a
// rw/none/rw run writable merges three mappings into one), so reads tear;
// every read must still come back whole and in order.
TEST(RealMappingsTest, ReadsWhileAnotherThreadRemapsComeBackWhole) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  constexpr size_t kPairs = 1500;  // ~3000 lines: dozens of pages of text
  char* area = static_cast<char*>(
      mmap(nullptr, 2 * kPairs * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(area, MAP_FAILED);
  for (size_t i = 0; i < kPairs; ++i) {
    ASSERT_EQ(mprotect(area + 2 * i * page, page, PROT_READ | PROT_WRITE), 0);
  }
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> flips{0};
  std::thread churn([&] {
    std::minstd_rand rng(7);
    while (!stop.load(std::memory_order_relaxed)) {
      char* gap = area + (2 * (rng() % (kPairs - 1)) + 1) * page;
      mprotect(gap, page, PROT_READ | PROT_WRITE);
      mprotect(gap, page, PROT_NONE);
      flips.fetch_add(1, std::memory_order_relaxed);
    }
  });
  const uint64_t base = reinterpret_cast<uintptr_t>(area);
  for (int i = 0; i < 300; ++i) {
    auto map = ReadMemoryMap(0);
    ASSERT_THAT(map, IsOk()) << "read " << i;
    // Whatever the churn did, the first and last pages stayed readable.
    EXPECT_THAT(CheckProcessRange(*map, base, page), IsOk());
    EXPECT_THAT(CheckProcessRange(*map, base + 2 * (kPairs - 1) * page, page), IsOk());
  }
  stop = true;
  churn.join();
  EXPECT_GT(flips.load(), 0u);
  munmap(area, 2 * kPairs * page);
}

TEST(RealMappingsTest, AProcessThatDoesNotExist) {
  // Above the largest pid Linux hands out (4194304).
  EXPECT_THAT(ReadMemoryMap(4194305), StatusIs(absl::StatusCode::kNotFound, "/proc/4194305/maps"));
}

}  // namespace
}  // namespace kvferry::internal
