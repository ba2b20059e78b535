#include "kvferry/agent.h"

#include <cstdlib>

#include "absl/cleanup/cleanup.h"
#include "src/access.h"
#include "src/agent_impl.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

using ::testing::HasSubstr;

AgentOptions Options(std::string name = "agent-test") {
  AgentOptions options;
  options.name = std::move(name);
  options.progress_thread = false;
  options.leak_policy = LeakPolicy::kAbort;
  return options;
}

TEST(AgentTest, CreateCountsContextAndWorker) {
  auto agent = Agent::Create(Options());
  ASSERT_THAT(agent, IsOk());
  Stats s = (*agent)->GetStats();
  EXPECT_EQ(s.Live(ResourceKind::kContext), 1);
  EXPECT_EQ(s.Live(ResourceKind::kWorker), 1);
  EXPECT_EQ(s.registered_bytes, 0);
  EXPECT_EQ((*agent)->name(), "agent-test");
  EXPECT_GE((*agent)->Progress(), 0);
}

TEST(AgentTest, BadNameIsInvalidArgument) {
  EXPECT_THAT(Agent::Create(Options("")),
              StatusIs(absl::StatusCode::kInvalidArgument, "name must have 1..255 characters (got 0)"));
  EXPECT_THAT(Agent::Create(Options(std::string(300, 'x'))),
              StatusIs(absl::StatusCode::kInvalidArgument, "(got 300)"));
}

TEST(AgentTest, BadUcxSettingNamesIt) {
  AgentOptions options = Options();
  options.ucx_config = {{"NO_SUCH_SETTING_X", "1"}};
  EXPECT_THAT(Agent::Create(options),
              StatusIs(absl::StatusCode::kInvalidArgument, "unknown UCX setting NO_SUCH_SETTING_X=1"));
  options.ucx_config = {{"UCX_TLS", "tcp"}};  // the prefix does not belong
  EXPECT_THAT(Agent::Create(options),
              StatusIs(absl::StatusCode::kInvalidArgument, "unknown UCX setting UCX_TLS"));
}

TEST(AgentTest, CachesOffByDefaultAndUserWins) {
  if (std::getenv("UCX_RCACHE_ENABLE") != nullptr || std::getenv("UCX_MEMTYPE_CACHE") != nullptr) {
    GTEST_SKIP() << "the environment sets UCX_RCACHE_ENABLE or UCX_MEMTYPE_CACHE";
  }
  auto agent = *Agent::Create(Options());
  const UcxSettings& s = agent->ucx_settings();
  EXPECT_EQ(s.rcache, "n");
  EXPECT_FALSE(s.rcache_from_user);
  EXPECT_EQ(s.memtype_cache, "n");
  EXPECT_FALSE(s.mmap_hook_mode.empty());
  EXPECT_THAT(s.ToString(), HasSubstr("rcache=n(kvferry)"));

  AgentOptions options = Options();
  options.ucx_config = {{"RCACHE_ENABLE", "try"}};
  auto user = *Agent::Create(options);
  EXPECT_EQ(user->ucx_settings().rcache, "try");
  EXPECT_TRUE(user->ucx_settings().rcache_from_user);
  EXPECT_EQ(user->ucx_settings().memtype_cache, "n");
}

TEST(AgentTest, HookModeReportsTheEnvironment) {
  auto agent = *Agent::Create(Options());
  const char* env = std::getenv("UCX_MEM_MMAP_HOOK_MODE");
  EXPECT_EQ(agent->ucx_settings().mmap_hook_from_env, env != nullptr);
  if (env != nullptr) {
    EXPECT_EQ(agent->ucx_settings().mmap_hook_mode, env);
  }
}

// The progress thread (named internal::kProgressThreadName) runs exactly
// while an agent with progress_thread = true lives, and never without it.
TEST(AgentTest, ProgressThreadStartsAndStops) {
  const std::string name = internal::kProgressThreadName;
  ASSERT_EQ(ThreadsNamed(name), 0);
  AgentOptions options = Options();
  options.progress_thread = true;
  auto agent = *Agent::Create(options);
  // The thread names itself once it runs.
  EXPECT_TRUE(WaitFor([&] { return ThreadsNamed(name) == 1; })) << ThreadsNamed(name);
  KvPool* pool = *agent->CreatePool("kv", SmallLayout());
  { BlockSet b = *pool->Lease(3); }
  EXPECT_EQ(pool->free_blocks(), 16u);
  EXPECT_EQ(ThreadsNamed(name), 1);
  agent.reset();
  // Joined by the destructor (the kernel may take a moment to drop its task).
  EXPECT_TRUE(WaitFor([&] { return ThreadsNamed(name) == 0; })) << ThreadsNamed(name);

  options.progress_thread = false;
  auto manual = *Agent::Create(options);
  KvPool* manual_pool = *manual->CreatePool("kv", SmallLayout());
  { BlockSet b = *manual_pool->Lease(3); }
  EXPECT_GE(manual->Progress(), 0);
  EXPECT_EQ(manual_pool->free_blocks(), 16u);
  EXPECT_EQ(ThreadsNamed(name), 0);
}

TEST(AgentDeathTest, SurvivorAbortsWithItsCreationSite) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto leak = [] {
    auto agent = *Agent::Create(Options("leaky"));
    KvPool* pool = *agent->CreatePool("kv", SmallLayout());
    auto* leaked = new BlockSet(*pool->Lease(2));  // deliberately never freed
    (void)leaked;
    agent.reset();
  };
  std::string expected = Ledger::SitesEnabled() ? "live block_set created at .*agent_test.cc:"
                                                : "block_set=1";
  EXPECT_DEATH(leak(), "agent 'leaky': destroyed while .* objects it created are still alive"
                       "(.|\n)*" + expected);
}

TEST(AgentTest, SurvivorReportUnderLogPolicy) {
  AgentOptions options = Options("logger");
  options.leak_policy = LeakPolicy::kLog;
  auto agent = *Agent::Create(options);
  KvPool* pool = *agent->CreatePool("kv", SmallLayout());
  const int line = __LINE__ + 1;
  BlockSet survivor = *pool->Lease(1);
  const Ledger& ledger = agent->ledger();
  LedgerPtr keep = internal::Access::Retain(ledger);
  ::testing::internal::CaptureStderr();
  agent.reset();
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(err, HasSubstr("agent 'logger': destroyed while"));
  if (Ledger::SitesEnabled()) {
    EXPECT_THAT(err, HasSubstr("agent_test.cc:" + std::to_string(line)));
  }
  // The survivor keeps its pool (and so the memory region and context).
  EXPECT_EQ(keep->Snapshot().Live(ResourceKind::kBlockSet), 1);
  EXPECT_EQ(keep->Snapshot().Live(ResourceKind::kMemoryRegion), 1);
  EXPECT_EQ(keep->Snapshot().Live(ResourceKind::kWorker), 0);
  survivor.Reset();
  EXPECT_EQ(keep->Snapshot().TotalLive(), 0);
  EXPECT_EQ(keep->Snapshot().registered_bytes, 0);
}

TEST(LogSinkTest, InsecureListenLineGoesToTheAgentsSink) {
  LogCapture logs;
  AgentOptions options = Options("open-door");
  options.allow_insecure = true;
  options.log_sink = logs.sink();
  auto agent = *Agent::Create(options);
  ::testing::internal::CaptureStderr();
  ASSERT_THAT(agent->Listen("0.0.0.0", 0), IsOk());
  const std::string err = ::testing::internal::GetCapturedStderr();
  auto lines = logs.Matching("without a shared secret");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0].severity, LogSeverity::kWarning);
  EXPECT_EQ(lines[0].agent, "open-door");
  EXPECT_THAT(lines[0].message, HasSubstr("listening on 0.0.0.0:"));
  EXPECT_THAT(err, ::testing::Not(HasSubstr("without a shared secret")));
}

TEST(LogSinkTest, SurvivorReportGoesToTheAgentsSink) {
  LogCapture logs;
  AgentOptions options = Options("survived");
  options.leak_policy = LeakPolicy::kLog;
  options.log_sink = logs.sink();
  auto agent = *Agent::Create(options);
  KvPool* pool = *agent->CreatePool("kv", SmallLayout());
  BlockSet survivor = *pool->Lease(1);
  ::testing::internal::CaptureStderr();
  agent.reset();
  const std::string err = ::testing::internal::GetCapturedStderr();
  auto lines = logs.Matching("destroyed while");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0].severity, LogSeverity::kWarning);
  EXPECT_EQ(lines[0].agent, "survived");
  EXPECT_THAT(lines[0].message, HasSubstr("block_set=1"));
  EXPECT_THAT(err, ::testing::Not(HasSubstr("destroyed while")));
}

// Without an agent sink, an agent's lines go to the process-wide sink, with
// the agent's name; an empty sink restores stderr.
TEST(LogSinkTest, ProcessWideSinkTakesAgentLinesByDefault) {
  LogCapture logs;
  LogSink previous = SetLogSink(logs.sink());
  // Restores the previous sink even if an assertion below returns early.
  absl::Cleanup restore = [&previous] { SetLogSink(std::move(previous)); };
  AgentOptions options = Options("process-wide");
  options.allow_insecure = true;
  auto agent = *Agent::Create(options);
  ::testing::internal::CaptureStderr();
  ASSERT_THAT(agent->Listen("0.0.0.0", 0), IsOk());
  std::string err = ::testing::internal::GetCapturedStderr();
  std::move(restore).Invoke();
  auto lines = logs.Matching("without a shared secret");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0].agent, "process-wide");
  EXPECT_EQ(lines[0].severity, LogSeverity::kWarning);
  EXPECT_THAT(err, ::testing::Not(HasSubstr("without a shared secret")));
  // Back on stderr, in the default format.
  options.name = "process-wide-2";
  auto again = *Agent::Create(options);
  ::testing::internal::CaptureStderr();
  ASSERT_THAT(again->Listen("0.0.0.0", 0), IsOk());
  err = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(err, HasSubstr("kvferry: agent 'process-wide-2': listening on 0.0.0.0:"));
  EXPECT_STREQ(LogSeverityName(LogSeverity::kError), "error");
}

}  // namespace
}  // namespace kvferry::test
