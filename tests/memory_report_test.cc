// MemoryReport against /proc, its three renderings, and the proof that it
// sees what heap profilers miss: anonymous mappings made with mmap below
// malloc grow the unexplained figure and fire the watchdog, while steady
// transfers under kvferry's defaults do not.
#include "kvferry/memory_report.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kvferry/agent.h"
#include "kvferry/watchdog.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

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

// A touched pool is explained whichever memory it lives in. Anonymous
// (kAnonymousMmap): resident anonymous memory, subtracted, so not
// unexplained. UCX shared memory (the default, with a shared-memory
// transport): the kernel counts it as shared memory, so anonymous and
// unexplained memory do not grow with it, the resident shared memory does,
// and its segment is the agent's pool segment rather than a UCX segment.
class PoolsAreExplainedTest : public ::testing::TestWithParam<PoolMemorySource> {};

TEST_P(PoolsAreExplainedTest, WhereverTheyLive) {
  AgentOptions o;
  o.name = "pools";
  o.leak_policy = LeakPolicy::kAbort;
  o.ucx_config = {{"TLS", "posix,sysv,tcp"}};
  o.pool_memory = GetParam();
  o.populate_pools = false;  // resident only once touched, below
  auto agent = *Agent::Create(o);
  const bool shared = GetParam() == PoolMemorySource::kUcxAllocated;
  KvLayout layout = SmallLayout(8192);  // 32 MiB
  KvPool* pool = *agent->CreatePool("kv", layout);
  ASSERT_EQ(pool->shared_memory(), shared) << pool->backing();
  const MemoryReport before = *agent->GetMemoryReport();
  EXPECT_EQ(before.pools[0].resident_bytes, 0u);
  BlockSet all = *pool->Lease(8192);
  for (size_t i = 0; i < all.size(); ++i) {
    for (uint32_t l = 0; l < layout.num_layers; ++l) {
      for (uint32_t p = 0; p < 2; ++p) std::memset(all.Chunk(i, l, p).data(), 1, layout.chunk_bytes());
    }
  }
  auto report = agent->GetMemoryReport();
  ASSERT_THAT(report, IsOk());
  const uint64_t total = layout.total_bytes();
  ASSERT_EQ(report->pools.size(), 1u);
  EXPECT_EQ(report->pools[0].registered_bytes, total);
  EXPECT_EQ(report->pools[0].resident_bytes, total);
  EXPECT_EQ(report->pools[0].blocks_free, 0u);
  EXPECT_EQ(report->pools[0].backing, shared ? "ucx-sysv" : "anonymous-mmap");
  EXPECT_EQ(report->pools[0].shared_memory, shared);
  EXPECT_EQ(report->registered_bytes, total);
  auto grew = [](uint64_t a, uint64_t b) {
    return static_cast<int64_t>(b) - static_cast<int64_t>(a);
  };
  const int64_t anonymous = grew(before.process.anonymous_bytes, report->process.anonymous_bytes);
  const int64_t shmem = grew(before.process.shmem_rss_bytes, report->process.shmem_rss_bytes);
  const int64_t unexplained = report->unexplained_signed_bytes - before.unexplained_signed_bytes;
  const int64_t t = static_cast<int64_t>(total);
  if (shared) {
    EXPECT_GE(shmem, t * 9 / 10);
#if !defined(__SANITIZE_THREAD__)  // TSan's shadow of the touched pool is anonymous memory
    EXPECT_LT(anonymous, t / 4);
#endif
    EXPECT_EQ(report->process.pool_segments, 1u);
    EXPECT_EQ(report->process.pool_segment_bytes, total);
    // The same process read without the agent's pools: one more UCX segment.
    auto plain = ReadProcessMemory();
    ASSERT_THAT(plain, IsOk());
    EXPECT_EQ(plain->pool_segments, 0u);
    EXPECT_EQ(plain->ucx_segments, report->process.ucx_segments + 1);
    EXPECT_EQ(plain->ucx_segment_bytes, report->process.ucx_segment_bytes + total);
  } else {
    EXPECT_GE(anonymous, t * 9 / 10);
    EXPECT_LT(shmem, t / 4);
    EXPECT_EQ(report->process.pool_segments, 0u);
  }
  if (kRealMalloc) {
    // Either way the pool's 32 MiB are explained: unexplained memory does not
    // grow with it (nor, for a shared pool, drop by it, which would hide as
    // much real growth).
    EXPECT_LT(std::abs(unexplained), t / 4) << report->ToText();
    EXPECT_LT(report->unexplained_bytes, report->process.anonymous_bytes);
  }
}

INSTANTIATE_TEST_SUITE_P(PoolMemory, PoolsAreExplainedTest,
                         ::testing::Values(PoolMemorySource::kUcxAllocated,
                                           PoolMemorySource::kAnonymousMmap),
                         [](const auto& param_info) {
                           return std::string(param_info.param == PoolMemorySource::kUcxAllocated
                                                  ? "UcxAllocated"
                                                  : "AnonymousMmap");
                         });

TEST(MemoryReportTest, Renderings) {
  auto agent = MakeAgent("render\"er");
  ASSERT_THAT(agent->CreatePool("kv", SmallLayout()), IsOk());
  MemoryReport r = *agent->GetMemoryReport();
  EXPECT_THAT(r.ToText(), HasSubstr("pool 'kv'"));
  EXPECT_THAT(r.ToText(), HasSubstr(absl::StrCat("blocks leased, ", r.pools[0].backing)));
  EXPECT_THAT(r.ToText(), HasSubstr("unexplained"));
  auto json = nlohmann::json::parse(r.ToJson());
  EXPECT_EQ(json["agent"], "render\"er");
  EXPECT_EQ(json["process"]["rss_bytes"].get<uint64_t>(), r.process.rss_bytes);
  EXPECT_EQ(json["pools"][0]["name"], "kv");
  EXPECT_EQ(json["pools"][0]["backing"], r.pools[0].backing);
  EXPECT_EQ(json["pools"][0]["shared_memory"].get<bool>(), r.pools[0].shared_memory);
  EXPECT_EQ(json["process"]["pool_segments"].get<uint64_t>(), r.process.pool_segments);
  EXPECT_EQ(json["ucx"]["alloc_prio"], r.ucx.alloc_prio);
  EXPECT_EQ(json["live_objects"]["pool"].get<int64_t>(), 1);
  EXPECT_EQ(json["ucx"]["rcache"], r.ucx.rcache);
  EXPECT_EQ(json["unexplained_bytes"].get<uint64_t>(), r.unexplained_bytes);
  EXPECT_EQ(json["unexplained_signed_bytes"].get<int64_t>(), r.unexplained_signed_bytes);
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
      // Counters end in _total, as Prometheus names them; the one histogram
      // is the transfer latency; everything else is a gauge.
      EXPECT_EQ(w[3], absl::EndsWith(w[2], "_total")                      ? "counter"
                      : w[2] == "kvferry_transfer_duration_seconds" ? "histogram"
                                                                          : "gauge")
          << line;
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
  EXPECT_THAT(prom, HasSubstr(absl::StrCat("kvferry_pool_info{agent=\"render\\\"er\",pool=\"kv\",backing=\"",
                                           r.pools[0].backing, "\",shared_memory=\"",
                                           r.pools[0].shared_memory ? "true" : "false", "\"} 1\n")));
  EXPECT_THAT(prom, HasSubstr(absl::StrCat("kvferry_unexplained_signed_bytes{agent=\"render\\\"er\"} ",
                                           r.unexplained_signed_bytes, "\n")));
}

// The signed figure is the difference as it is; the plain one floors it.
TEST(MemoryReportTest, UnexplainedIsSignedAndFloored) {
  auto agent = MakeAgent("signed");
  MemoryReport r = *agent->GetMemoryReport();
  EXPECT_EQ(r.unexplained_bytes,
            r.unexplained_signed_bytes > 0 ? static_cast<uint64_t>(r.unexplained_signed_bytes) : 0);
  uint64_t explained = r.process.heap_system_bytes;
  for (const PoolMemory& p : r.pools) explained += p.resident_bytes;
  EXPECT_EQ(r.unexplained_signed_bytes,
            static_cast<int64_t>(r.process.anonymous_bytes) - static_cast<int64_t>(explained));

  // Below zero, every rendering shows the signed figure.
  r.unexplained_bytes = 0;
  r.unexplained_signed_bytes = -(int64_t{300} << 20);
  EXPECT_THAT(r.ToText(), HasSubstr("= -300.0 MiB, floored at 0)"));
  auto json = nlohmann::json::parse(r.ToJson());
  EXPECT_EQ(json["unexplained_bytes"].get<uint64_t>(), 0u);
  EXPECT_EQ(json["unexplained_signed_bytes"].get<int64_t>(), -(int64_t{300} << 20));
  EXPECT_THAT(r.ToPrometheus(),
              HasSubstr("kvferry_unexplained_signed_bytes{agent=\"signed\"} -314572800\n"));
  EXPECT_THAT(r.ToPrometheus(), HasSubstr("kvferry_unexplained_bytes{agent=\"signed\"} 0\n"));
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
  // Real reports of this process, stamped one period apart: the slope is
  // then the injected bytes per period, however slowly a loaded machine
  // (or a sanitizer) takes the samples.
  absl::Time clock = first.taken;
  auto dog = Watchdog::Create(
      [&]() -> absl::StatusOr<MemoryReport> {
        absl::StatusOr<MemoryReport> r = agent->GetMemoryReport();
        if (r.ok()) r->taken = clock += wo.period;
        return r;
      },
      wo);
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
  }
  const MemoryReport last = *agent->GetMemoryReport();
  const uint64_t injected = maps.size() * kChunk;
  for (void* p : maps) munmap(p, kChunk);

  ASSERT_EQ(events.size(), 1u) << "the watchdog never fired after " << injected << " bytes";
  EXPECT_EQ(events[0].reason, WatchdogEvent::Reason::kUnexplainedSlope);
  EXPECT_GT(events[0].unexplained_slope, wo.max_unexplained_slope);
  EXPECT_THAT(events[0].ToString(), HasSubstr("unexplained-memory growth"));
  // Fired within its window: the samples it needs to span half the window.
  EXPECT_LE(samples, wo.window / wo.period);
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
      (void)decode->PollNotifications();  // drops them: only the bytes moved count here
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
  wo = WatchdogOptions{};
  wo.realarm_after = absl::Seconds(-1);
  EXPECT_THAT(Watchdog::Create(agent.get(), wo),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "WatchdogOptions.realarm_after must not be negative (got -1s)"));
  wo.realarm_after = absl::ZeroDuration();  // fires on every sample over a threshold
  EXPECT_THAT(Watchdog::Create(agent.get(), wo), IsOk());
  wo.realarm_after = absl::InfiniteDuration();  // once per episode, never repeated
  EXPECT_THAT(Watchdog::Create(agent.get(), wo), IsOk());
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

// A process the watchdog watches through a Source: the test chooses its
// figures and moves its clock (the reports' `taken`), so nothing below
// depends on wall-clock timing.
class FakeProcess {
 public:
  static constexpr double kMiB = 1048576;
  static constexpr absl::Duration kPeriod = absl::Seconds(10);  // WatchdogOptions' default

  FakeProcess(double rss, double unexplained) : rss_(rss), unexplained_(unexplained) {}

  Watchdog::Source source() {
    return [this]() -> absl::StatusOr<MemoryReport> {
      MemoryReport r;
      r.taken = now_;
      r.agent = "fake";
      r.process.rss_bytes = static_cast<uint64_t>(rss_);
      r.unexplained_signed_bytes = static_cast<int64_t>(unexplained_);
      r.unexplained_bytes = unexplained_ > 0 ? static_cast<uint64_t>(unexplained_) : 0;
      return r;
    };
  }

  // Samples `dog` every kPeriod for `span`, RSS and unexplained memory
  // growing at the given bytes per minute (both: an anonymous leak), and
  // returns the events that fired.
  std::vector<WatchdogEvent> Run(Watchdog& dog, absl::Duration span, double rss_per_min,
                                 double unexplained_per_min) {
    std::vector<WatchdogEvent> fired;
    for (absl::Time end = now_ + span; now_ < end;) {
      now_ += kPeriod;
      const double minutes = absl::ToDoubleMinutes(kPeriod);
      rss_ += rss_per_min * minutes;
      unexplained_ += unexplained_per_min * minutes;
      absl::StatusOr<std::vector<WatchdogEvent>> events = dog.Sample();
      EXPECT_THAT(events, IsOk());
      if (events.ok()) fired.insert(fired.end(), events->begin(), events->end());
    }
    return fired;
  }
  // Frees what leaked: the figures drop back to `rss` and `unexplained`.
  void Reset(double rss, double unexplained) {
    rss_ = rss;
    unexplained_ = unexplained;
  }
  absl::Time now() const { return now_; }

 private:
  absl::Time now_ = absl::FromUnixSeconds(1'800'000'000);
  double rss_;
  double unexplained_;
};

constexpr double kLeak = 400e6;  // bytes a minute: the 400 MB/min anonymous-mmap leak
constexpr double kBaseRss = 2.0 * (1 << 30);
constexpr double kBaseUnexplained = 100.0 * (1 << 20);

int Count(const std::vector<WatchdogEvent>& events, WatchdogEvent::Reason reason) {
  return static_cast<int>(std::count_if(events.begin(), events.end(),
                                        [reason](const WatchdogEvent& e) { return e.reason == reason; }));
}

constexpr WatchdogEvent::Reason kReasons[] = {WatchdogEvent::Reason::kUnexplainedSlope,
                                              WatchdogEvent::Reason::kRssSlope,
                                              WatchdogEvent::Reason::kUnexplainedShare};

// (a) A steady leak is one episode: each reason fires once and then stays in
// alarm, however long the leak lasts, while the slopes keep being fitted.
TEST(WatchdogTest, SteadyLeakAlarmsOncePerReason) {
  FakeProcess proc(kBaseRss, kBaseUnexplained);
  WatchdogOptions wo;
  wo.realarm_after = absl::InfiniteDuration();
  std::vector<WatchdogEvent> hooked;
  wo.on_alarm = [&hooked](const WatchdogEvent& e) { hooked.push_back(e); };
  auto dog = Watchdog::Create(proc.source(), wo);
  ASSERT_THAT(dog, IsOk());
  for (WatchdogEvent::Reason r : kReasons) EXPECT_FALSE((*dog)->in_alarm(r));

  std::vector<WatchdogEvent> fired = proc.Run(**dog, absl::Minutes(70), kLeak, kLeak);
  ASSERT_EQ(fired.size(), 3u);  // was one per reason per window, and share on every sample
  for (WatchdogEvent::Reason r : kReasons) {
    EXPECT_EQ(Count(fired, r), 1);
    EXPECT_TRUE((*dog)->in_alarm(r));
  }
  EXPECT_EQ((*dog)->alarms(), 3);
  ASSERT_EQ(hooked.size(), fired.size());
  for (size_t i = 0; i < fired.size(); ++i) {
    EXPECT_EQ(hooked[i].reason, fired[i].reason);
    EXPECT_FALSE(fired[i].repeat);
  }
  // The slopes fire once half the window (2.5 min) is spanned, not before.
  EXPECT_EQ(fired[0].reason, WatchdogEvent::Reason::kUnexplainedSlope);
  EXPECT_EQ(fired[1].reason, WatchdogEvent::Reason::kRssSlope);
  EXPECT_EQ(fired[0].report.taken, fired[1].report.taken);
  EXPECT_NEAR(fired[0].unexplained_slope * 60, kLeak, kLeak * 1e-6);
  EXPECT_NEAR(fired[1].rss_slope * 60, kLeak, kLeak * 1e-6);
}

// (b) Once the leak is gone long enough for the slopes (and the share) to
// fall under 80% of their thresholds, each reason re-arms, and a new leak is
// a new episode with its own alarms.
TEST(WatchdogTest, ClearedConditionRearms) {
  FakeProcess proc(kBaseRss, kBaseUnexplained);
  WatchdogOptions wo;
  wo.realarm_after = absl::InfiniteDuration();  // only clearing re-arms here
  wo.on_alarm = [](const WatchdogEvent&) {};
  auto dog = Watchdog::Create(proc.source(), wo);
  ASSERT_THAT(dog, IsOk());

  std::vector<WatchdogEvent> first = proc.Run(**dog, absl::Minutes(10), kLeak, kLeak);
  EXPECT_EQ(first.size(), 3u);
  proc.Reset(kBaseRss, kBaseUnexplained);  // the leaked memory is freed
  std::vector<WatchdogEvent> quiet = proc.Run(**dog, absl::Minutes(10), 0, 0);
  EXPECT_TRUE(quiet.empty());
  for (WatchdogEvent::Reason r : kReasons) EXPECT_FALSE((*dog)->in_alarm(r));

  std::vector<WatchdogEvent> second = proc.Run(**dog, absl::Minutes(10), kLeak, kLeak);
  ASSERT_EQ(second.size(), 3u);
  for (WatchdogEvent::Reason r : kReasons) {
    EXPECT_EQ(Count(second, r), 1);
    EXPECT_TRUE((*dog)->in_alarm(r));
  }
  for (const WatchdogEvent& e : second) EXPECT_FALSE(e.repeat);
  EXPECT_EQ((*dog)->alarms(), 6);
}

// Hysteresis: a slope that dips under its threshold but stays above 80% of it
// keeps the episode open; crossing the threshold again fires nothing.
TEST(WatchdogTest, HysteresisKeepsAnEpisodeOpen) {
  FakeProcess proc(kBaseRss, 0);
  WatchdogOptions wo;
  wo.realarm_after = absl::InfiniteDuration();
  wo.max_unexplained_slope = 1e12;  // judge the RSS slope only
  wo.min_unexplained_bytes = ~0ull;
  wo.on_alarm = [](const WatchdogEvent&) {};
  auto dog = Watchdog::Create(proc.source(), wo);
  ASSERT_THAT(dog, IsOk());
  const double threshold = wo.max_rss_slope * 60;  // bytes a minute

  EXPECT_EQ(proc.Run(**dog, absl::Minutes(10), 1.5 * threshold, 0).size(), 1u);
  EXPECT_TRUE(proc.Run(**dog, absl::Minutes(10), 0.9 * threshold, 0).empty());
  EXPECT_TRUE((*dog)->in_alarm(WatchdogEvent::Reason::kRssSlope));
  EXPECT_TRUE(proc.Run(**dog, absl::Minutes(10), 1.5 * threshold, 0).empty());
  // Under 80%: cleared, and the next crossing is a new episode.
  EXPECT_TRUE(proc.Run(**dog, absl::Minutes(10), 0.7 * threshold, 0).empty());
  EXPECT_FALSE((*dog)->in_alarm(WatchdogEvent::Reason::kRssSlope));
  EXPECT_EQ(proc.Run(**dog, absl::Minutes(10), 1.5 * threshold, 0).size(), 1u);
  EXPECT_EQ((*dog)->alarms(), 2);
}

// (c) While a leak goes on, the same reason fires again every realarm_after
// (default 10 minutes), marked as a repeat.
TEST(WatchdogTest, BackOffRealarmsWhileLeaking) {
  FakeProcess proc(kBaseRss, kBaseUnexplained);
  WatchdogOptions wo;
  EXPECT_EQ(wo.realarm_after, absl::Minutes(10));
  wo.max_rss_slope = 1e12;  // judge the unexplained slope only
  wo.min_unexplained_bytes = ~0ull;
  wo.on_alarm = [](const WatchdogEvent&) {};
  auto dog = Watchdog::Create(proc.source(), wo);
  ASSERT_THAT(dog, IsOk());

  const absl::Time start = proc.now();
  std::vector<WatchdogEvent> fired = proc.Run(**dog, absl::Minutes(35), kLeak, kLeak);
  // First when the samples (the first taken one period in) span half the
  // 5-minute window, then every 10 minutes.
  ASSERT_EQ(fired.size(), 4u);
  for (size_t i = 0; i < fired.size(); ++i) {
    EXPECT_EQ(fired[i].reason, WatchdogEvent::Reason::kUnexplainedSlope);
    EXPECT_EQ(fired[i].repeat, i > 0);
    EXPECT_EQ(fired[i].report.taken - start,
              FakeProcess::kPeriod + wo.window / 2 + i * wo.realarm_after)
        << i;
    EXPECT_NEAR(fired[i].unexplained_slope * 60, kLeak, kLeak * 1e-6);
  }
  EXPECT_THAT(fired[1].ToString(), HasSubstr("unexplained-memory growth (continuing)"));
  EXPECT_EQ((*dog)->alarms(), 4);
  EXPECT_TRUE((*dog)->in_alarm(WatchdogEvent::Reason::kUnexplainedSlope));
  EXPECT_FALSE((*dog)->in_alarm(WatchdogEvent::Reason::kRssSlope));
}

// (d) A slow leak that starts while the explained bytes exceed the anonymous
// ones: the floored figure stays 0 throughout, the signed one grows, and the
// watchdog fits (and fires on) the signed one.
TEST(WatchdogTest, LeakFromBelowZeroFires) {
  FakeProcess proc(kBaseRss, -64.0 * FakeProcess::kMiB);
  WatchdogOptions wo;
  wo.max_unexplained_slope = 0.5 * FakeProcess::kMiB / 60;  // 0.5 MiB/min; the leak is 1
  wo.realarm_after = absl::InfiniteDuration();
  wo.on_alarm = [](const WatchdogEvent&) {};
  auto dog = Watchdog::Create(proc.source(), wo);
  ASSERT_THAT(dog, IsOk());

  std::vector<WatchdogEvent> fired =
      proc.Run(**dog, absl::Minutes(30), FakeProcess::kMiB, FakeProcess::kMiB);
  ASSERT_EQ(fired.size(), 1u);
  EXPECT_EQ(fired[0].reason, WatchdogEvent::Reason::kUnexplainedSlope);
  EXPECT_NEAR(fired[0].unexplained_slope * 60, FakeProcess::kMiB, 1);
  EXPECT_EQ(fired[0].report.unexplained_bytes, 0u);
  EXPECT_LT(fired[0].report.unexplained_signed_bytes, 0);
  EXPECT_THAT(fired[0].ToString(), HasSubstr("(-6"));  // the signed figure, in MiB
  const MemoryReport last = *proc.source()();
  EXPECT_EQ(last.unexplained_bytes, 0u);
  EXPECT_LT(last.unexplained_signed_bytes, 0);
}

}  // namespace
}  // namespace kvferry::test
