// The watchdog's alarms name what grew and where (the kind, and for
// unexplained memory the mappings' origins from /proc/self/smaps), fire
// once per episode, and Reset() starts a new episode.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "kvferry/watchdog.h"

namespace kvferry {
namespace {

using ::testing::HasSubstr;
using Reason = WatchdogEvent::Reason;

constexpr double kMiB = 1048576.0;

// Synthetic reports on a synthetic clock: RSS and unexplained memory grow
// by `rss_per_s` and `unexplained_per_s`.
class SyntheticProcess {
 public:
  Watchdog::Source source() {
    return [this]() -> absl::StatusOr<MemoryReport> {
      MemoryReport r;
      r.agent = "decode0";
      r.taken = now_;
      r.process.rss_bytes = static_cast<uint64_t>(rss_);
      r.unexplained_signed_bytes = static_cast<int64_t>(unexplained_);
      r.unexplained_bytes = unexplained_ > 0 ? static_cast<uint64_t>(unexplained_) : 0;
      return r;
    };
  }
  // Advances `seconds` one-second samples, growing as given; returns the
  // events fired.
  std::vector<WatchdogEvent> Run(Watchdog& dog, int seconds, double rss_per_s,
                                 double unexplained_per_s) {
    std::vector<WatchdogEvent> fired;
    for (int i = 0; i < seconds; ++i) {
      now_ += absl::Seconds(1);
      rss_ += rss_per_s;
      unexplained_ += unexplained_per_s;
      absl::StatusOr<std::vector<WatchdogEvent>> got = dog.Sample();
      EXPECT_TRUE(got.ok()) << got.status();
      if (got.ok()) fired.insert(fired.end(), got->begin(), got->end());
    }
    return fired;
  }

 private:
  absl::Time now_ = absl::FromUnixSeconds(1700000000);
  double rss_ = 512 * kMiB;
  double unexplained_ = 8 * kMiB;
};

// Origins a test controls: each read returns `now`, and counts.
struct FakeOrigins {
  std::vector<MappingOrigin> now;
  int reads = 0;
  std::function<absl::StatusOr<std::vector<MappingOrigin>>()> fn() {
    return [this]() -> absl::StatusOr<std::vector<MappingOrigin>> {
      ++reads;
      return now;
    };
  }
};

MappingOrigin Origin(std::string name, uint64_t maps, double rss_mib) {
  return MappingOrigin{.origin = std::move(name), .mappings = maps,
                       .size_bytes = static_cast<uint64_t>(rss_mib * kMiB),
                       .rss_bytes = static_cast<uint64_t>(rss_mib * kMiB)};
}

WatchdogOptions Options() {
  WatchdogOptions o;
  o.period = absl::Seconds(1);
  o.window = absl::Seconds(10);
  o.max_rss_slope = 4 * kMiB;          // per second
  o.max_unexplained_slope = 4 * kMiB;  // per second
  o.min_unexplained_bytes = ~0ull;     // no share alarms here
  o.realarm_after = absl::InfiniteDuration();
  o.on_alarm = [](const WatchdogEvent&) {};
  return o;
}

TEST(WatchdogEpisodeTest, UnexplainedAlarmNamesKindAndTheOriginsThatGrew) {
  SyntheticProcess proc;
  FakeOrigins origins;
  origins.now = {Origin("[heap]", 1, 20), Origin("[anon]", 40, 30), Origin("/usr/lib/libucs.so", 4, 2),
                 Origin("[stack]", 1, 0.125)};
  WatchdogOptions o = Options();
  o.origins = origins.fn();
  std::vector<std::string> logged;
  o.on_alarm = [&logged](const WatchdogEvent& e) { logged.push_back(e.ToString()); };
  auto dog = Watchdog::Create(proc.source(), o);
  ASSERT_TRUE(dog.ok()) << dog.status();

  // The baseline is read at the first sample.
  EXPECT_TRUE(proc.Run(**dog, 1, 0, 0).empty());
  EXPECT_EQ(origins.reads, 1);
  // Then anonymous mappings grow (16 MiB/s below malloc) and the heap a bit.
  origins.now = {Origin("[heap]", 1, 21), Origin("[anon]", 200, 190),
                 Origin("/usr/lib/libucs.so", 4, 2), Origin("/dev/shm/ucx-new", 1, 3),
                 Origin("[stack]", 1, 0.1328125)};  // +8 KiB: the fourth, left out
  std::vector<WatchdogEvent> fired = proc.Run(**dog, 20, 16 * kMiB, 16 * kMiB);

  std::vector<WatchdogEvent> unexplained;
  for (const WatchdogEvent& e : fired) {
    if (e.reason == Reason::kUnexplainedSlope) unexplained.push_back(e);
  }
  ASSERT_EQ(unexplained.size(), 1u);  // one alarm for the episode
  const WatchdogEvent& e = unexplained[0];
  EXPECT_FALSE(e.repeat);
  EXPECT_STREQ(e.kind(), "unexplained");
  EXPECT_STREQ(WatchdogEvent::ReasonName(e.reason), "unexplained_slope");
  ASSERT_EQ(e.origins.size(), 3u);  // max_origins (default 3) of 4 grown; libucs did not grow
  EXPECT_EQ(e.origins[0].origin, "[anon]");
  EXPECT_EQ(e.origins[0].grown_rss_bytes, static_cast<int64_t>(160 * kMiB));
  EXPECT_EQ(e.origins[0].grown_mappings, 160);
  EXPECT_EQ(e.origins[0].rss_bytes, static_cast<uint64_t>(190 * kMiB));
  EXPECT_EQ(e.origins[1].origin, "/dev/shm/ucx-new");  // new since the baseline
  EXPECT_EQ(e.origins[1].grown_rss_bytes, static_cast<int64_t>(3 * kMiB));
  EXPECT_EQ(e.origins[2].origin, "[heap]");
  EXPECT_EQ(e.origins[2].grown_rss_bytes, static_cast<int64_t>(1 * kMiB));
  EXPECT_THAT(e.ToString(), HasSubstr("(kind unexplained)"));
  EXPECT_THAT(e.ToString(), HasSubstr("grew in: [anon] +160.0 MiB resident (+160 mappings"));

  // The RSS slope fired in the same episode too: its kind is rss, and it
  // names no origins.
  int rss_alarms = 0;
  for (const WatchdogEvent& f : fired) {
    if (f.reason != Reason::kRssSlope) continue;
    ++rss_alarms;
    EXPECT_STREQ(f.kind(), "rss");
    EXPECT_TRUE(f.origins.empty());
  }
  EXPECT_EQ(rss_alarms, 1);
  EXPECT_EQ(logged.size(), fired.size());
  EXPECT_EQ((*dog)->alarms(), 2);
}

TEST(WatchdogEpisodeTest, SmallGrowthIsShownInKiB) {
  WatchdogEvent e;
  e.reason = Reason::kUnexplainedShare;
  e.origins = {Origin("[anon]", 3, 70), Origin("[stack]", 1, 1)};
  e.origins[0].grown_rss_bytes = 64 << 20;
  e.origins[0].grown_mappings = 2;
  e.origins[1].grown_rss_bytes = 8 << 10;
  EXPECT_THAT(e.ToString(), HasSubstr("unexplained share of RSS (kind unexplained)"));
  EXPECT_THAT(e.ToString(), HasSubstr("grew in: [anon] +64.0 MiB resident (+2 mappings, 70.0 MiB "
                                      "now), [stack] +8 KiB resident (+0 mappings, 1.0 MiB now)"));
}

TEST(WatchdogEpisodeTest, OneAlarmPerEpisodeAndResetStartsANewOne) {
  SyntheticProcess proc;
  FakeOrigins origins;
  origins.now = {Origin("[anon]", 10, 10)};
  WatchdogOptions o = Options();
  o.max_rss_slope = 1e15;  // the unexplained slope only
  o.origins = origins.fn();
  auto dog = Watchdog::Create(proc.source(), o);
  ASSERT_TRUE(dog.ok()) << dog.status();

  // A leak that goes on for a minute: one alarm.
  std::vector<WatchdogEvent> fired = proc.Run(**dog, 60, 16 * kMiB, 16 * kMiB);
  ASSERT_EQ(fired.size(), 1u);
  EXPECT_TRUE((*dog)->in_alarm(Reason::kUnexplainedSlope));
  EXPECT_EQ((*dog)->alarms(), 1);
  const int reads_before_reset = origins.reads;

  // Reset: the episode ends at once, the counts stay.
  (*dog)->Reset();
  EXPECT_FALSE((*dog)->in_alarm(Reason::kUnexplainedSlope));
  EXPECT_EQ((*dog)->alarms(), 1);
  EXPECT_THAT((*dog)->ToPrometheus(),
              HasSubstr("kvferry_watchdog_in_alarm{agent=\"decode0\",reason=\"unexplained_slope\"} 0"));

  // The window was cleared: steady memory after the reset fires nothing,
  // even though the old samples would have carried the slope on.
  EXPECT_TRUE(proc.Run(**dog, 20, 0, 0).empty());
  EXPECT_EQ(origins.reads, reads_before_reset + 1);  // a new baseline
  EXPECT_FALSE((*dog)->in_alarm(Reason::kUnexplainedSlope));

  // The next leak is a new episode: a first alarm (not a repeat), with the
  // growth counted from the new baseline.
  origins.now = {Origin("[anon]", 30, 50)};
  fired = proc.Run(**dog, 30, 16 * kMiB, 16 * kMiB);
  ASSERT_EQ(fired.size(), 1u);
  EXPECT_FALSE(fired[0].repeat);
  ASSERT_FALSE(fired[0].origins.empty());
  EXPECT_EQ(fired[0].origins[0].grown_rss_bytes, static_cast<int64_t>(40 * kMiB));
  EXPECT_EQ((*dog)->alarms(), 2);
}

// Without Reset, growth that goes on stays one episode: one alarm.
TEST(WatchdogEpisodeTest, WithoutResetTheSameEpisodeSuppressesTheNextAlarm) {
  SyntheticProcess proc;
  WatchdogOptions o = Options();
  o.max_rss_slope = 1e15;
  FakeOrigins origins;
  o.origins = origins.fn();
  auto dog = Watchdog::Create(proc.source(), o);
  ASSERT_TRUE(dog.ok()) << dog.status();
  ASSERT_EQ(proc.Run(**dog, 30, 16 * kMiB, 16 * kMiB).size(), 1u);
  // Growth goes on at the same pace: still one episode, nothing more.
  EXPECT_TRUE(proc.Run(**dog, 30, 16 * kMiB, 16 * kMiB).empty());
  EXPECT_EQ((*dog)->alarms(), 1);
}

// /proc/self/smaps as it is: a file mapping shows under its path, and
// anonymous memory mapped and touched outside malloc shows under [anon].
TEST(WatchdogEpisodeTest, ReadMappingOriginsSeesFileAndAnonymousMappings) {
  // smaps names the file by its canonical path: no doubled slash.
  std::string dir = ::testing::TempDir();
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  const std::string path = dir + "/watchdog_episode_mapping";
  const size_t file_bytes = 4 << 20;
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, static_cast<off_t>(file_bytes)), 0);
  void* file = mmap(nullptr, file_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ASSERT_NE(file, MAP_FAILED);
  std::memset(file, 1, file_bytes);

  absl::StatusOr<std::vector<MappingOrigin>> before = ReadMappingOrigins();
  ASSERT_TRUE(before.ok()) << before.status();
  uint64_t anon_before = 0;
  bool found_file = false;
  for (const MappingOrigin& o : *before) {
    if (o.origin == "[anon]") anon_before = o.rss_bytes;
    if (o.origin == path) {
      found_file = true;
      EXPECT_EQ(o.mappings, 1u);
      EXPECT_EQ(o.size_bytes, file_bytes);
      EXPECT_EQ(o.rss_bytes, file_bytes);
    }
  }
  EXPECT_TRUE(found_file) << "no origin " << path;

  const size_t anon_bytes = 32 << 20;
  void* anon = mmap(nullptr, anon_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(anon, MAP_FAILED);
  std::memset(anon, 1, anon_bytes);
  absl::StatusOr<std::vector<MappingOrigin>> after = ReadMappingOrigins();
  ASSERT_TRUE(after.ok()) << after.status();
  uint64_t anon_after = 0;
  for (const MappingOrigin& o : *after) {
    if (o.origin == "[anon]") anon_after = o.rss_bytes;
  }
  EXPECT_GE(anon_after, anon_before + anon_bytes - (1 << 20));
  munmap(anon, anon_bytes);
  munmap(file, file_bytes);
  close(fd);
  unlink(path.c_str());
}

// The default origins are this process's smaps: a real anonymous mapping
// made between the baseline and the alarm is named as [anon].
TEST(WatchdogEpisodeTest, DefaultOriginsNameARealAnonymousLeak) {
  SyntheticProcess proc;
  WatchdogOptions o = Options();
  o.max_rss_slope = 1e15;
  o.origins = nullptr;  // the default: ReadMappingOrigins
  auto dog = Watchdog::Create(proc.source(), o);
  ASSERT_TRUE(dog.ok()) << dog.status();
  ASSERT_TRUE(proc.Run(**dog, 1, 0, 0).empty());  // the baseline
  const size_t leak = 64 << 20;
  void* p = mmap(nullptr, leak, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  std::memset(p, 1, leak);
  std::vector<WatchdogEvent> fired = proc.Run(**dog, 20, 16 * kMiB, 16 * kMiB);
  ASSERT_EQ(fired.size(), 1u);
  ASSERT_FALSE(fired[0].origins.empty());
  EXPECT_EQ(fired[0].origins[0].origin, "[anon]") << fired[0].ToString();
  EXPECT_GE(fired[0].origins[0].grown_rss_bytes, static_cast<int64_t>(leak - (1 << 20)))
      << fired[0].ToString();
  munmap(p, leak);
}

// A report read before a Reset belongs to the old episode: the Sample that
// read it records nothing and fires nothing.
TEST(WatchdogEpisodeTest, ASampleOverlappingAResetRecordsNothing) {
  SyntheticProcess proc;
  Watchdog* dog_ptr = nullptr;
  bool reset_while_reading = false;
  Watchdog::Source inner = proc.source();
  WatchdogOptions o = Options();
  o.max_rss_slope = 1e15;
  FakeOrigins origins;
  o.origins = origins.fn();
  auto dog = Watchdog::Create(
      [&]() -> absl::StatusOr<MemoryReport> {
        absl::StatusOr<MemoryReport> r = inner();
        if (reset_while_reading) dog_ptr->Reset();  // as another thread might, meanwhile
        return r;
      },
      o);
  ASSERT_TRUE(dog.ok()) << dog.status();
  dog_ptr = dog->get();
  // Leaking for 5 samples: not yet half the window.
  ASSERT_TRUE(proc.Run(**dog, 5, 16 * kMiB, 16 * kMiB).empty());
  // This one would have fired (the samples span half the window); a Reset
  // lands while it reads, so it records nothing.
  reset_while_reading = true;
  EXPECT_TRUE(proc.Run(**dog, 1, 16 * kMiB, 16 * kMiB).empty());
  reset_while_reading = false;
  EXPECT_EQ((*dog)->alarms(), 0);
  // The new episode starts empty: it takes half a window again to fire.
  EXPECT_TRUE(proc.Run(**dog, 5, 16 * kMiB, 16 * kMiB).empty());
  EXPECT_EQ(proc.Run(**dog, 1, 16 * kMiB, 16 * kMiB).size(), 1u);
}

TEST(WatchdogEpisodeTest, BadOptionsAreRefused) {
  SyntheticProcess proc;
  WatchdogOptions o = Options();
  o.window = absl::Seconds(1);
  absl::StatusOr<std::unique_ptr<Watchdog>> dog = Watchdog::Create(proc.source(), o);
  ASSERT_FALSE(dog.ok());
  EXPECT_EQ(dog.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(dog.status().message()), HasSubstr("window"));
}

}  // namespace
}  // namespace kvferry
