// MemoryReport against /proc, its three renderings, and the proof that it
// sees what heap profilers miss: anonymous mappings made with mmap below
// malloc grow the unexplained figure and fire the watchdog, while steady
// transfers under kvferry's defaults do not.
#include "kvferry/memory_report.h"

#include <sys/mman.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kvferry/agent.h"
#include "kvferry/watchdog.h"
#include "tests/test_util.h"

namespace kvferry {
namespace {

using testing::IsOk;
using testing::SmallLayout;
using testing::StatusIs;
using ::testing::HasSubstr;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
// Sanitizer builds replace malloc with an allocator malloc_info cannot see, so
// its heap shows up as unexplained: the heap-dependent checks are meaningless.
constexpr bool kRealMalloc = false;
#else
constexpr bool kRealMalloc = true;
#endif

uint64_t StatusKb(const std::string& key) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key + ":", 0) != 0) continue;
    std::vector<std::string> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
    uint64_t kb = 0;
    if (f.size() >= 2 && absl::SimpleAtoi(f[f.size() - 2], &kb)) return kb * 1024;
  }
  return 0;
}

void ExpectClose(uint64_t a, uint64_t b, const char* what) {
  const double tol = 0.01 * static_cast<double>(std::max(a, b)) + 8.0 * 1048576;
  EXPECT_LE(std::abs(static_cast<double>(a) - static_cast<double>(b)), tol)
      << what << ": " << a << " vs " << b;
}

std::unique_ptr<Agent> MakeAgent(const std::string& name) {
  AgentOptions o;
  o.name = name;
  o.leak_policy = LeakPolicy::kAbort;
  auto agent = Agent::Create(o);
  EXPECT_THAT(agent, IsOk());
  return agent.ok() ? std::move(*agent) : nullptr;
}

TEST(MemoryReportTest, AgreesWithProcWithinTolerance) {
  auto agent = MakeAgent("report");
  auto report = agent->GetMemoryReport();
  ASSERT_THAT(report, IsOk());
  ExpectClose(report->process.rss_bytes, StatusKb("VmRSS"), "rss vs VmRSS");
  ExpectClose(report->process.anonymous_bytes, StatusKb("RssAnon"), "anonymous vs RssAnon");
  EXPECT_GT(report->process.mappings, report->process.anonymous_mappings);
  EXPECT_GT(report->process.anonymous_mappings, 0u);
  if (kRealMalloc) {
    EXPECT_GT(report->process.heap_system_bytes, 0u);
    EXPECT_LE(report->process.heap_in_use_bytes, report->process.heap_system_bytes);
  }
  EXPECT_EQ(report->live.Live(ResourceKind::kWorker), 1);
  EXPECT_FALSE(report->ucx.mmap_hook_mode.empty());
}

TEST(MemoryReportTest, HeapFollowsMalloc) {
  if (!kRealMalloc) GTEST_SKIP() << "sanitizer allocator replaces malloc";
  auto before = ReadProcessMemory();
  ASSERT_THAT(before, IsOk());
  std::vector<std::unique_ptr<char[]>> blocks;
  for (int i = 0; i < 64; ++i) {
    blocks.emplace_back(new char[256 << 10]);
    std::memset(blocks.back().get(), i, 256 << 10);
  }
  auto after = ReadProcessMemory();
  ASSERT_THAT(after, IsOk());
  EXPECT_GE(after->heap_in_use_bytes, before->heap_in_use_bytes + (15u << 20));
}

TEST(MemoryReportTest, PoolsAreExplained) {
  auto agent = MakeAgent("pools");
  KvLayout layout = SmallLayout(2048);  // 8 MiB
  KvPool* pool = *agent->CreatePool("kv", layout);
  BlockSet all = *pool->Lease(2048);
  for (size_t i = 0; i < all.size(); ++i) {
    for (uint32_t l = 0; l < layout.num_layers; ++l) {
      for (uint32_t p = 0; p < 2; ++p) std::memset(all.Chunk(i, l, p).data(), 1, layout.chunk_bytes());
    }
  }
  auto report = agent->GetMemoryReport();
  ASSERT_THAT(report, IsOk());
  ASSERT_EQ(report->pools.size(), 1u);
  EXPECT_EQ(report->pools[0].registered_bytes, layout.total_bytes());
  EXPECT_EQ(report->pools[0].resident_bytes, layout.total_bytes());
  EXPECT_EQ(report->pools[0].blocks_free, 0u);
  EXPECT_EQ(report->registered_bytes, layout.total_bytes());
  if (kRealMalloc) {
    // The touched pool is resident anonymous memory, but not unexplained.
    EXPECT_LT(report->unexplained_bytes, report->process.anonymous_bytes);
    EXPECT_LT(report->unexplained_bytes + layout.total_bytes() / 2,
              report->process.anonymous_bytes);
  }
}

TEST(MemoryReportTest, Renderings) {
  auto agent = MakeAgent("render\"er");
  ASSERT_THAT(agent->CreatePool("kv", SmallLayout()), IsOk());
  MemoryReport r = *agent->GetMemoryReport();
  EXPECT_THAT(r.ToText(), HasSubstr("pool 'kv'"));
  EXPECT_THAT(r.ToText(), HasSubstr("unexplained"));
  auto json = nlohmann::json::parse(r.ToJson());
  EXPECT_EQ(json["agent"], "render\"er");
  EXPECT_EQ(json["process"]["rss_bytes"].get<uint64_t>(), r.process.rss_bytes);
  EXPECT_EQ(json["pools"][0]["name"], "kv");
  EXPECT_EQ(json["live_objects"]["pool"].get<int64_t>(), 1);
  EXPECT_EQ(json["ucx"]["rcache"], r.ucx.rcache);
  // Prometheus: every sample line's metric has HELP and TYPE lines before it.
  std::string prom = r.ToPrometheus();
  std::set<std::string> helped, typed;
  int samples = 0;
  for (absl::string_view line : absl::StrSplit(prom, '\n', absl::SkipEmpty())) {
    std::vector<std::string> w = absl::StrSplit(line, ' ');
    if (line.substr(0, 7) == "# HELP ") {
      helped.insert(w[2]);
    } else if (line.substr(0, 7) == "# TYPE ") {
      typed.insert(w[2]);
      EXPECT_EQ(w[3], "gauge");
    } else {
      std::string name = std::string(line.substr(0, line.find('{')));
      EXPECT_EQ(name.rfind("kvferry_", 0), 0u) << line;
      EXPECT_TRUE(helped.contains(name) && typed.contains(name)) << line;
      EXPECT_THAT(std::string(line), HasSubstr("agent=\"render\\\"er\""));
      ++samples;
    }
  }
  EXPECT_GT(samples, 20);
  EXPECT_THAT(prom, HasSubstr("kvferry_pool_blocks{agent=\"render\\\"er\",pool=\"kv\",state=\"free\"} 16"));
}

// Anonymous memory mapped below malloc, as UCX's hooks and registration cache
// did: the heap stays flat, the report's anonymous and unexplained bytes grow,
// and the watchdog fires within its window.
TEST(MemoryReportTest, InjectedMappingsFireTheWatchdog) {
  auto agent = MakeAgent("leaky");
  const MemoryReport first = *agent->GetMemoryReport();
  WatchdogOptions wo;
  wo.period = absl::Milliseconds(50);
  wo.window = absl::Milliseconds(600);
  wo.max_rss_slope = 1e12;  // judge the unexplained slope only
  wo.max_unexplained_slope = 16.0 * 1048576;  // 16 MiB/s; we inject ~160
  wo.min_unexplained_bytes = ~0ull;
  std::vector<WatchdogEvent> events;
  wo.on_alarm = [&events](const WatchdogEvent& e) { events.push_back(e); };
  auto dog = Watchdog::Create(agent.get(), wo);
  ASSERT_THAT(dog, IsOk());

  constexpr size_t kChunk = 8 << 20;
  std::vector<void*> maps;
  int samples = 0;
  for (int i = 0; i < 40 && events.empty(); ++i) {
    void* p = mmap(nullptr, kChunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(p, MAP_FAILED);
    std::memset(p, 0x5a, kChunk);  // resident, like a filled cache
    maps.push_back(p);
    ASSERT_THAT((*dog)->Sample(), IsOk());
    ++samples;
    absl::SleepFor(wo.period);
  }
  const MemoryReport last = *agent->GetMemoryReport();
  const uint64_t injected = maps.size() * kChunk;
  for (void* p : maps) munmap(p, kChunk);

  ASSERT_EQ(events.size(), 1u) << "the watchdog never fired after " << injected << " bytes";
  EXPECT_EQ(events[0].reason, WatchdogEvent::Reason::kUnexplainedSlope);
  EXPECT_GT(events[0].unexplained_slope, wo.max_unexplained_slope);
  EXPECT_THAT(events[0].ToString(), HasSubstr("unexplained-memory growth"));
  // Fired within its window: the samples it needs to span half the window,
  // plus slack for samples that a slow machine spreads further apart.
  EXPECT_LE(samples, wo.window / wo.period + 4);
  EXPECT_GE(last.process.anonymous_bytes, first.process.anonymous_bytes + injected * 9 / 10);
  EXPECT_GE(last.process.anonymous_mappings, first.process.anonymous_mappings + 1);
  if (kRealMalloc) {
    EXPECT_GE(last.unexplained_bytes, first.unexplained_bytes + injected * 9 / 10);
    // What a heap profiler sees: nothing.
    EXPECT_LT(last.process.heap_in_use_bytes, first.process.heap_in_use_bytes + (4u << 20));
  }
}

// The mirror: steady shared-memory transfers under kvferry's defaults grow
// neither RSS nor unexplained memory at anything like that rate.
TEST(MemoryReportTest, SteadyTransfersDoNotGrow) {
  if (!kRealMalloc) GTEST_SKIP() << "sanitizer allocators grow their quarantine by design";
  auto decode = MakeAgent("decode");
  auto prefill = MakeAgent("prefill");
  KvLayout layout = SmallLayout(256);
  ASSERT_THAT(decode->CreatePool("kv", layout), IsOk());
  KvPool* pool = *prefill->CreatePool("kv", layout);
  uint16_t port = *decode->Listen("127.0.0.1", 0);
  ASSERT_THAT(prefill->Connect("127.0.0.1", port), IsOk());
  auto run = [&](absl::Duration d) {
    absl::Time end = absl::Now() + d;
    uint32_t round = 0;
    while (absl::Now() < end) {
      BlockSet local = *pool->Lease(16);
      std::vector<uint32_t> remote(16);
      for (uint32_t j = 0; j < 16; ++j) remote[j] = (round * 16 + j) % 256;
      auto t = prefill->PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &local,
                                      .remote_blocks = remote, .notification = "n"});
      ASSERT_THAT(t, IsOk());
      ASSERT_THAT(t->Wait(absl::Seconds(10)), IsOk());
      decode->PollNotifications();
      ++round;
    }
  };
  run(absl::Milliseconds(500));  // warm up UCX's pools
  WatchdogOptions wo;
  wo.period = absl::Milliseconds(50);
  wo.window = absl::Milliseconds(600);
  wo.max_rss_slope = 16.0 * 1048576;
  wo.max_unexplained_slope = 16.0 * 1048576;
  wo.min_unexplained_bytes = ~0ull;
  int alarms = 0;
  wo.on_alarm = [&alarms](const WatchdogEvent&) { ++alarms; };
  auto dog = *Watchdog::Create(prefill.get(), wo);
  for (int i = 0; i < 20; ++i) {
    run(wo.period);
    ASSERT_THAT(dog->Sample(), IsOk());
  }
  EXPECT_EQ(alarms, 0);
}

TEST(WatchdogTest, OptionsAreValidated) {
  auto agent = MakeAgent("dog");
  WatchdogOptions wo;
  wo.period = absl::ZeroDuration();
  EXPECT_THAT(Watchdog::Create(agent.get(), wo),
              StatusIs(absl::StatusCode::kInvalidArgument, "period must be positive"));
  wo.period = absl::Seconds(1);
  wo.window = absl::Seconds(1);
  EXPECT_THAT(Watchdog::Create(agent.get(), wo),
              StatusIs(absl::StatusCode::kInvalidArgument, "at least two periods"));
  EXPECT_THAT(Watchdog::Create(static_cast<const Agent*>(nullptr), WatchdogOptions{}),
              StatusIs(absl::StatusCode::kInvalidArgument, "null agent"));
}

TEST(WatchdogTest, SlopeIsLeastSquares) {
  std::deque<std::pair<absl::Time, double>> pts;
  absl::Time t0 = absl::FromUnixSeconds(1000);
  for (int i = 0; i < 10; ++i) pts.emplace_back(t0 + absl::Seconds(i), 5.0 + 3.0 * i + (i % 2 ? 0.5 : -0.5));
  EXPECT_NEAR(Watchdog::Slope(pts), 3.0, 0.1);
  EXPECT_EQ(Watchdog::Slope({}), 0.0);
}

TEST(WatchdogTest, ThreadSamplesAndStopsCleanly) {
  std::atomic<int> samples{0};
  uint64_t fake = 0;
  WatchdogOptions wo;
  wo.period = absl::Milliseconds(5);
  wo.window = absl::Milliseconds(40);
  wo.max_rss_slope = 1e9;  // 1 GB/s; the fake source grows 100 MB per sample
  wo.run_thread = true;
  std::atomic<int> alarms{0};
  wo.on_alarm = [&alarms](const WatchdogEvent& e) {
    EXPECT_EQ(e.reason, WatchdogEvent::Reason::kRssSlope);
    ++alarms;
  };
  auto dog = Watchdog::Create(
      [&]() -> absl::StatusOr<MemoryReport> {
        MemoryReport r;
        r.taken = absl::Now();
        fake += 100'000'000;
        r.process.rss_bytes = fake;
        ++samples;
        return r;
      },
      wo);
  ASSERT_THAT(dog, IsOk());
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (alarms.load() == 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  (*dog)->Stop();
  (*dog)->Stop();
  const int after_stop = samples.load();
  absl::SleepFor(absl::Milliseconds(30));
  EXPECT_EQ(samples.load(), after_stop);
  EXPECT_GE(alarms.load(), 1);
  EXPECT_EQ((*dog)->alarms(), alarms.load());
}

}  // namespace
}  // namespace kvferry
