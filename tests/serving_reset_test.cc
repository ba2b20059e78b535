// The serving engine's graceful reset, end to end: kvferry_serve with a leak
// injected into decode worker 0 (anonymous memory mapped and touched below
// malloc, as the incident's). Its watchdog fires on the unexplained growth,
// the worker drains (the router sends it nothing new, it finishes what it
// has), reports its memory, exits, and comes back under the same name as a
// new agent incarnation that its peers reconnect to; the run ends with
// every output correct and no request failed.
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "tests/child_process.h"
#include "tests/serve_run.h"

namespace kvferry::test {
namespace {

using Json = nlohmann::json;
using ::testing::HasSubstr;

int64_t Counter(const Json& counters, const char* key) {
  return counters.is_object() ? counters.value(key, int64_t{0}) : 0;
}

TEST(ServingResetTest, LeakingDecodeWorkerResetsWithoutLosingARequest) {
  constexpr int kRequests = 60;
  // 15 s of arrivals; the leak (32 MiB/s from decode0's start, 1920
  // MiB/min) passes the 900 MiB/min threshold once the 4 s window is half full, well
  // before the load ends. The run does not end while a reset is under way.
  ServeRun run = Serve({"--json", "--progress=false", "--timeout_s=240", "--prefill=1",
                        "--decode=2", absl::StrCat("--requests=", kRequests), "--rate=4",
                        "--inject_leak_mib_per_s=32", "--inject_leak_max_mib=512",
                        "--watchdog_reset", "--watchdog_period_s=0.25",
                        "--watchdog_window_s=4",
                        "--watchdog_max_unexplained_mib_per_min=900",
                        // The slope alone: under a sanitizer, malloc is the
                        // sanitizer's (mmap), so the heap counts as
                        // unexplained and would trip the share rule.
                        "--watchdog_min_unexplained_mib=1000000",
                        "--watchdog_max_rss_mib_per_min=1000000", "--prefill_ms_per_layer=5"});
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  const Json& s = run.summary;
  EXPECT_EQ(run.exit_status, 0) << run.output;
  EXPECT_TRUE(s["ok"].get<bool>()) << run.output;
  EXPECT_EQ(s["completed"], kRequests);
  EXPECT_EQ(s["correct"], kRequests);
  EXPECT_EQ(s["wrong"], 0);
  EXPECT_EQ(s["failed_over"], 0) << "a request failed and was retried:\n" << run.output;

  // Exactly one reset, of the leaking worker.
  ASSERT_EQ(s["resets"].size(), 1u) << s["resets"].dump(2) << run.output;
  const Json& r = s["resets"][0];
  SCOPED_TRACE(r.dump(2));
  EXPECT_EQ(r["name"], "decode0");
  EXPECT_TRUE(r["back"].get<bool>());
  EXPECT_EQ(r["exit_before"], 0);
  EXPECT_NE(r["pid_after"], r["pid_before"]);
  // The router sent nothing after acknowledging the drain.
  EXPECT_EQ(r["new_jobs_after_ack"], 0);

  // The alarm names the kind and where the memory sits: unnamed anonymous
  // mappings, by at least the leak's first 16 MiB.
  const Json& alarm = r["alarm"];
  ASSERT_TRUE(alarm.is_object());
  EXPECT_EQ(alarm["name"], "decode0");
  EXPECT_EQ(alarm["kind"], "unexplained");
  ASSERT_FALSE(alarm["origins"].empty());
  EXPECT_EQ(alarm["origins"][0]["origin"], "[anon]");
  EXPECT_GE(alarm["origins"][0]["grown_bytes"].get<int64_t>(), int64_t{16} << 20);
  EXPECT_THAT(alarm["text"].get<std::string>(), HasSubstr("grew in: [anon]"));
  bool listed = false;
  for (const Json& a : s["alarms"]) listed |= a["name"] == "decode0" && a["kind"] == "unexplained";
  EXPECT_TRUE(listed) << s["alarms"].dump(2);

  // Before the reset: nothing in flight, every block back, the leak in
  // its unexplained memory. After: a new incarnation with less of both.
  const Json& before = r["before"];
  EXPECT_EQ(before["per_request_live"], 0);
  EXPECT_EQ(before["pool"]["blocks_free"], before["pool"]["blocks_total"]);
  const Json& mb = r["memory_before"];
  const Json& ma = r["memory_after"];
  const uint64_t leaked = mb["leaked_bytes"].get<uint64_t>();
  EXPECT_GE(leaked, uint64_t{16} << 20);
  EXPECT_GE(mb["unexplained_bytes"].get<uint64_t>(), leaked / 2);
  EXPECT_LT(ma["rss_bytes"].get<uint64_t>(), mb["rss_bytes"].get<uint64_t>());
  EXPECT_LT(ma["unexplained_bytes"].get<uint64_t>() + leaked / 2, mb["unexplained_bytes"].get<uint64_t>());
  EXPECT_GT(r["incarnation_after"].get<uint64_t>(), before["incarnation"].get<uint64_t>());

  // Every request was decoded once: by the old incarnation before the
  // reset or by a decode worker's last incarnation.
  int64_t decoded = Counter(before["counters"], "completed");
  for (const Json& p : s["processes"]) {
    SCOPED_TRACE(p.dump());
    EXPECT_EQ(p["exit"], 0);
    EXPECT_TRUE(p["clean"].get<bool>());
    if (p["role"] == "decode") decoded += Counter(p["counters"], "completed");
    EXPECT_EQ(Counter(p["counters"], "handed_back"), 0);
  }
  EXPECT_EQ(decoded, kRequests);

  // The peers reconnected: prefill0 connected to the new incarnation, which
  // then served requests again (each moved from prefill0 over kvferry).
  EXPECT_EQ(r["reconnected"], Json::array({"prefill0"}));
  for (const Json& p : s["processes"]) {
    if (p["name"] == "decode0") {
      EXPECT_GT(Counter(p["counters"], "completed"), 0) << p.dump();
    }
  }
  EXPECT_THAT(run.output, HasSubstr("decode0 is draining for a reset"));
  EXPECT_THAT(run.output, HasSubstr("decode0 is back (incarnation 2"));
}

TEST(ServingResetTest, BadWatchdogFlagsAreNamed) {
  ServeRun run = Serve({"--watchdog_period_s=1", "--watchdog_window_s=1"});
  EXPECT_NE(run.exit_status, 0);
  EXPECT_THAT(run.output, HasSubstr("--watchdog_window_s=1 must span at least two periods"));
  run = Serve({"--inject_leak_mib_per_s=-1"});
  EXPECT_NE(run.exit_status, 0);
  EXPECT_THAT(run.output, HasSubstr("--inject_leak_mib_per_s=-1 is not in [0, 65536]"));
  run = Serve({"--watchdog_max_unexplained_mib_per_min=0"});
  EXPECT_NE(run.exit_status, 0);
  EXPECT_THAT(run.output, HasSubstr("--watchdog_max_unexplained_mib_per_min=0 is not positive"));
  run = Serve({"--help"});
  EXPECT_THAT(run.output, HasSubstr("--inject_leak_mib_per_s"));
  EXPECT_THAT(run.output, HasSubstr("--watchdog_reset"));
}

}  // namespace
}  // namespace kvferry::test
