// The serving engine (examples/disagg_serving/, kvferry_serve) end to end:
// a router and its prefill and decode worker processes over real UCX. Each
// run's JSON summary carries every output's check and what each worker
// reported before exiting (live handles, pool, exit status), and the tests
// assert on those.
#include <fstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tests/child_process.h"
#include "tests/etcd_process.h"
#include "tests/serve_run.h"

namespace kvferry::test {
namespace {

using Json = nlohmann::json;

// Engine-owned memory on one host moves by kernel copy (under TSan too: the
// copy is the kernel's, and each side's threads reach the blocks only
// through the agent's own synchronization).
constexpr char kEnginePath[] = "shm-kernel-copy";

std::vector<std::string> Args(std::vector<std::string> extra) {
  std::vector<std::string> a = {"--json", "--progress=false", "--timeout_s=240"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

// Every process that was not killed on purpose ended clean.
void ExpectSurvivorsClean(const Json& s) {
  for (const Json& p : s["processes"]) {
    SCOPED_TRACE(p.dump());
    if (p["killed"].get<bool>()) continue;
    EXPECT_EQ(p["exit"], 0);
    EXPECT_TRUE(p["clean"].get<bool>());
    EXPECT_EQ(p["per_request_live"], 0);
    EXPECT_EQ(p["pool"]["blocks_free"], p["pool"]["blocks_total"]);
    for (const char* kind : {"block_set", "transfer", "transfer_handle", "offer", "request"}) {
      EXPECT_EQ(p["live"][kind], 0) << kind;
    }
  }
}

TEST(DisaggServingTest, TwoPrefillTwoDecodeServeEveryRequestCorrectly) {
  ServeRun run = Serve(Args({"--prefill=2", "--decode=2", "--requests=24", "--rate=40"}));
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  const Json& s = run.summary;
  EXPECT_EQ(run.exit_status, 0) << run.output;
  EXPECT_TRUE(s["ok"].get<bool>()) << run.output;
  EXPECT_EQ(s["requests"], 24);
  EXPECT_EQ(s["completed"], 24);
  EXPECT_EQ(s["correct"], 24);
  EXPECT_EQ(s["failed_over"], 0);
  EXPECT_EQ(s["prefill_outcomes"]["consumed"], 24) << s["prefill_outcomes"].dump();
  EXPECT_GT(s["bytes_moved"].get<uint64_t>(), 0u);
  ASSERT_EQ(s["processes"].size(), 4u);
  int64_t decoded = 0;
  for (const Json& p : s["processes"]) {
    if (p["role"] != "decode") continue;
    decoded += p["counters"].value("completed", int64_t{0});
    EXPECT_EQ(p["counters"].value("bad_rows", int64_t{-1}), 0);
  }
  EXPECT_EQ(decoded, 24);
  // Engine-owned memory on one host: kvferry's kernel copy, not UCX's
  // am-emulated path.
  for (const Json& p : s["processes"]) {
    if (p["role"] != "decode" && p["role"] != "prefill") continue;
    ASSERT_FALSE(p["peers"].empty()) << p.dump();
    for (const Json& peer : p["peers"]) EXPECT_EQ(peer["data_path"], kEnginePath) << p.dump();
  }
  ExpectSurvivorsClean(s);
}

TEST(DisaggServingTest, KilledDecodeWorkersRequestsFailOver) {
  ServeRun run = Serve(Args({"--prefill=2", "--decode=2", "--requests=32", "--rate=40",
                        "--kill-decode-after=6"}));
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  const Json& s = run.summary;
  EXPECT_EQ(run.exit_status, 0) << run.output;
  EXPECT_TRUE(s["ok"].get<bool>()) << run.output;
  EXPECT_EQ(s["completed"], 32);
  EXPECT_EQ(s["correct"], 32);
  ASSERT_EQ(s["kills"].size(), 1u);
  // The victim had requests in flight (the router waits for that).
  EXPECT_GE(s["failed_over"].get<int>(), 1) << run.output;
  int killed = 0;
  for (const Json& p : s["processes"]) {
    if (!p["killed"].get<bool>()) continue;
    ++killed;
    EXPECT_EQ(p["role"], "decode");
    EXPECT_EQ(p["signal"], 9);
  }
  EXPECT_EQ(killed, 1);
  ExpectSurvivorsClean(s);
}

TEST(DisaggServingTest, KilledPrefillWorkersRequestsFailOver) {
  ServeRun run = Serve(Args({"--prefill=2", "--decode=2", "--requests=24", "--rate=40",
                        "--kill-prefill-after=5"}));
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  const Json& s = run.summary;
  EXPECT_TRUE(s["ok"].get<bool>()) << run.output;
  EXPECT_EQ(s["completed"], 24);
  EXPECT_EQ(s["correct"], 24);
  ASSERT_EQ(s["kills"].size(), 1u);
  ExpectSurvivorsClean(s);
}

TEST(DisaggServingTest, PushModeWritesIntoDecodesOffer) {
  ServeRun run = Serve(Args({"--prefill=1", "--decode=1", "--requests=8", "--push"}));
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  const Json& s = run.summary;
  EXPECT_TRUE(s["ok"].get<bool>()) << run.output;
  EXPECT_EQ(s["correct"], 8);
  EXPECT_EQ(s["prefill_outcomes"]["written"], 8) << s["prefill_outcomes"].dump();
  ExpectSurvivorsClean(s);
}

TEST(DisaggServingTest, EtcdDiscovery) {
  EtcdCluster etcd(1);
  if (!etcd.available()) GTEST_SKIP() << "etcd is not installed (Debian: etcd-server)";
  ASSERT_TRUE(etcd.ok()) << etcd.LogTail(0);
  ServeRun run = Serve(Args({"--prefill=1", "--decode=1", "--requests=8",
                        absl::StrCat("--etcd=", etcd.Endpoint(0))}));
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  const Json& s = run.summary;
  EXPECT_TRUE(s["ok"].get<bool>()) << run.output;
  EXPECT_EQ(s["config"]["discovery"], "etcd");
  EXPECT_EQ(s["correct"], 8);
  ExpectSurvivorsClean(s);
}

TEST(DisaggServingTest, PromptFileIsServedAndBadOnesAreNamed) {
  const std::string path = ::testing::TempDir() + "/prompts.txt";
  {
    std::ofstream f(path);
    f << "# three prompts\n[1, 2, 3, 4]\n5 6 7 8 9 10 11 12 13 14 15 16 17 18\n\n42\n";
  }
  ServeRun run = Serve(Args({absl::StrCat("--prompt_file=", path)}));
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  EXPECT_EQ(run.summary["requests"], 3);
  EXPECT_EQ(run.summary["correct"], 3);

  {
    std::ofstream f(path);
    f << "1 2 3\n4 five 6\n";
  }
  run = Serve({absl::StrCat("--prompt_file=", path)});
  EXPECT_NE(run.exit_status, 0);
  EXPECT_THAT(run.output, ::testing::HasSubstr("line 2: 'five' is not a token id"));
}

TEST(DisaggServingTest, BadFlagsAreNamed) {
  ServeRun run = Serve({"--prefill=0"});
  EXPECT_NE(run.exit_status, 0);
  EXPECT_THAT(run.output, ::testing::HasSubstr("--prefill=0 is out of range"));
  run = Serve({"--decode=1", "--kill-decode-after=3"});
  EXPECT_NE(run.exit_status, 0);
  EXPECT_THAT(run.output, ::testing::HasSubstr("--decode=1 is < 2"));
  run = Serve({"--help"});
  EXPECT_THAT(run.output, ::testing::HasSubstr("--kill_decode_after"));
  EXPECT_THAT(run.output, ::testing::HasSubstr("default: 1"));
}

}  // namespace
}  // namespace kvferry::test
