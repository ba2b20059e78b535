// Runs kvferry-bench (and kvferry_soak --help) with tiny sizes and checks
// that they work and print valid JSON with the fields the issue asks for.
// No figure is checked: these are benchmarks, not timed tests.
#include <sys/wait.h>

#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "tests/child_process.h"

namespace {

struct Output {
  int status = -1;
  std::string text;
};

Output RunTool(std::vector<std::string> argv) {
  kvferry::test::ChildProcess child(argv);
  Output out;
  while (auto line = child.ReadLine(absl::Seconds(300))) out.text += *line + "\n";
  out.status = child.Wait();
  return out;
}

std::vector<std::string> Tiny(std::vector<std::string> extra) {
  // llama-3-8b cut to 4 layers: 256 KiB blocks, 8 MiB pools of 32 blocks.
  std::vector<std::string> argv = {KVFERRY_BENCH, "--spawn", "--json", "--layers=4",
                                   "--working_set_mib=8", "--requests=6",
                                   "--prompt_tokens=uniform:16:64", "--verify",
                                   "--progress_seconds=0"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return argv;
}

void CheckRun(const std::vector<std::string>& argv) {
  const Output out = RunTool(argv);
  ASSERT_TRUE(WIFEXITED(out.status) && WEXITSTATUS(out.status) == 0) << out.text;
  nlohmann::json j = nlohmann::json::parse(out.text, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(j.is_discarded()) << out.text;
  for (const char* key : {"gb_per_s", "descriptors_per_s", "cpu_seconds_per_gb", "requests",
                          "bytes", "data_path", "machine", "config"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  for (const char* key : {"p50", "p90", "p99", "max"}) EXPECT_TRUE(j["latency_us"].contains(key));
  for (const char* key : {"us_per_call", "ns_per_descriptor"}) EXPECT_TRUE(j["post"].contains(key));
  for (const char* key : {"start_bytes", "end_bytes", "slope_mb_per_min"}) {
    EXPECT_TRUE(j["rss"].contains(key));
  }
  EXPECT_EQ(j["requests"].get<int>(), 6);
  EXPECT_GT(j["gb_per_s"].get<double>(), 0);
  EXPECT_GT(j["verified_bytes"].get<uint64_t>(), 0u);
  EXPECT_EQ(j["verify_errors"].get<uint64_t>(), 0u);
  EXPECT_TRUE(j["transient_counters_zero"].get<bool>()) << j["live_end"].dump();
  for (const char* kind : {"transfer", "transfer_handle", "block_set", "request", "offer"}) {
    EXPECT_EQ(j["live_end"][kind].get<int64_t>(), 0) << kind;
    EXPECT_EQ(j["peer"]["live_end"][kind].get<int64_t>(), 0) << kind;
  }
  EXPECT_TRUE(j["peer"]["baseline_restored"].get<bool>()) << j["peer"].dump();
  EXPECT_TRUE(j["ok"].get<bool>()) << j["failures"].dump();
}

TEST(KvferryBenchTest, ReadVerified) { CheckRun(Tiny({"--op=read"})); }

TEST(KvferryBenchTest, WriteVerifiedOnArrival) { CheckRun(Tiny({"--op=write", "--scattered"})); }

TEST(KvferryBenchTest, OffersPerLayer) {
  CheckRun(Tiny({"--op=read", "--offers", "--per_layer"}));
  CheckRun(Tiny({"--op=write", "--offers", "--per_layer"}));
}

TEST(KvferryBenchTest, EngineOwnedMemory) {
  CheckRun(Tiny({"--op=read", "--memory=engine", "--prompt_tokens=16"}));
}

TEST(KvferryBenchTest, ChurnSoakCountersReturn) {
  const Output out = RunTool(Tiny({"--op=read", "--duration=3", "--churn=1", "--sample_seconds=1"}));
  ASSERT_TRUE(WIFEXITED(out.status) && WEXITSTATUS(out.status) == 0) << out.text;
  nlohmann::json j = nlohmann::json::parse(out.text, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << out.text;
  EXPECT_GE(j["sessions"].get<int>(), 2);
  EXPECT_EQ(j["peer"]["baseline_not_restored_sessions"].get<int>(), 0);
  EXPECT_TRUE(j["ok"].get<bool>()) << j["failures"].dump();
}

TEST(KvferryBenchTest, HelpListsEveryFlagWithDefault) {
  const Output out = RunTool({KVFERRY_BENCH, "--help"});
  for (const char* flag : {"--preset", "--working_set_mib", "--op", "--offers", "--per_layer",
                           "--verify", "--json", "--compare", "--duration", "--churn",
                           "--max_rss_slope_mb_per_min", "--memory", "--tls"}) {
    EXPECT_TRUE(absl::StrContains(out.text, flag)) << flag << "\n" << out.text;
  }
  EXPECT_TRUE(absl::StrContains(out.text, "default: 2048"));
  EXPECT_FALSE(absl::StrContains(out.text, "No flags matched"));
}

TEST(KvferryBenchTest, SoakHelpListsItsFlags) {
  const Output out = RunTool({KVFERRY_SOAK, "--help"});
  EXPECT_TRUE(absl::StrContains(out.text, "--max_rss_slope_mib_per_min")) << out.text;
  EXPECT_FALSE(absl::StrContains(out.text, "No flags matched")) << out.text;
}

}  // namespace
