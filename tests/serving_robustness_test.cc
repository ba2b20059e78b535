// The serving engine (kvferry_serve) when things go wrong, end to end with
// real worker processes over real UCX: a worker that stops (SIGSTOP) is
// found by its missing heartbeats, killed and failed over; failing requests
// are retried a bounded number of times and then fail with their reason;
// failover completes every request exactly once; the scheduler spreads work
// over equal workers; bad usage exits 2 with the value named; SIGTERM ends
// the run with its summary.
//
// KVFERRY_SERVE_BIN in the environment overrides the binary under test (to
// show that these tests fail on an older build).
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>

#include <cstdlib>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/child_process.h"
#include "tests/etcd_process.h"
#include "tests/serve_run.h"

namespace kvferry::test {
namespace {

using Json = nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;

// Reads lines into `run.output` until one satisfies `want`; the line, or
// empty when the output ended first (or after 5 minutes).
template <typename F>
std::string ReadUntil(ChildProcess& child, ServeRun& run, F want) {
  const absl::Time deadline = absl::Now() + absl::Minutes(5);
  while (auto line = child.ReadLine(deadline - absl::Now())) {
    TakeServeLine(*line, run);
    if (want(*line)) return *line;
  }
  return "";
}

// The pid in "kvferry_serve: started NAME (pid N)".
pid_t PidOf(const std::string& started_line) {
  const size_t at = started_line.find("(pid ");
  int pid = -1;
  if (at == std::string::npos ||
      !absl::SimpleAtoi(started_line.substr(at + 5, started_line.find(')', at) - at - 5), &pid)) {
    return -1;
  }
  return pid;
}

// The N in a progress line "[ 1.0s] done N/M ...", or -1.
int DoneIn(const std::string& line) {
  const size_t at = line.find("] done ");
  if (line.empty() || line[0] != '[' || at == std::string::npos) return -1;
  int done = -1;
  const size_t slash = line.find('/', at);
  return absl::SimpleAtoi(line.substr(at + 7, slash - at - 7), &done) ? done : -1;
}

int64_t Counter(const Json& p, const char* key) {
  return p.contains("counters") && p["counters"].is_object() ? p["counters"].value(key, int64_t{0})
                                                              : 0;
}

// Starts a 2P2D run, SIGSTOPs worker `victim` once 5 requests completed, and
// checks that the router killed it after --worker_timeout_s and served every
// request elsewhere, with no leak reported.
void StopWorkerMidRun(const std::string& victim, const std::vector<std::string>& extra) {
  constexpr int kRequests = 40;
  std::vector<std::string> args = {"--json", "--progress", "--timeout_s=200", "--prefill=2",
                                   "--decode=2", absl::StrCat("--requests=", kRequests),
                                   "--rate=8", "--worker_timeout_s=3"};
  args.insert(args.end(), extra.begin(), extra.end());
  ServeRun run;
  auto child = StartServe(args);
  const std::string started = ReadUntil(*child, run, [&](const std::string& l) {
    return l.find(absl::StrCat("started ", victim, " ")) != std::string::npos;
  });
  const pid_t pid = PidOf(started);
  ASSERT_GT(pid, 0) << run.output;
  ASSERT_NE(ReadUntil(*child, run, [](const std::string& l) { return DoneIn(l) >= 5; }), "")
      << run.output;
  const absl::Time stopped_at = absl::Now();
  ASSERT_EQ(kill(pid, SIGSTOP), 0);
  FinishServe(*child, run);
  const absl::Duration after_stop = absl::Now() - stopped_at;
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  const Json& s = run.summary;
  EXPECT_EQ(run.exit_status, 0) << run.output;
  EXPECT_TRUE(s["ok"].get<bool>()) << run.output;
  EXPECT_EQ(s["completed"], kRequests);
  EXPECT_EQ(s["correct"], kRequests);
  EXPECT_EQ(s["failed"], 0);
  // The stop was noticed, not waited out: the run ends long before
  // --timeout_s (the arrivals themselves take about 5 s).
  EXPECT_LT(after_stop, absl::Seconds(120)) << run.output;
  EXPECT_THAT(run.output, HasSubstr(absl::StrCat(victim, " (pid ", pid, ") sent nothing for")));
  // Nothing leaked, and the summary says so: the stopped worker was killed
  // (no report expected), every other one ended clean.
  EXPECT_TRUE(s["all_clean"].get<bool>()) << run.output;
  for (const Json& p : s["processes"]) {
    SCOPED_TRACE(p.dump());
    if (p["name"] == victim) {
      EXPECT_TRUE(p["unresponsive"].get<bool>());
      EXPECT_EQ(p["signal"], SIGKILL);
    } else {
      EXPECT_FALSE(p["unresponsive"].get<bool>());
      EXPECT_EQ(p["exit"], 0);
      EXPECT_TRUE(p["clean"].get<bool>());
    }
  }
}

TEST(ServingRobustnessTest, StoppedDecodeWorkerIsKilledAndFailedOver) {
  StopWorkerMidRun("decode1", {});
}

TEST(ServingRobustnessTest, StoppedPrefillWorkerIsKilledAndFailedOver) {
  StopWorkerMidRun("prefill1", {});
}

TEST(ServingRobustnessTest, StoppedDecodeWorkerIsKilledAndFailedOverWithPush) {
  StopWorkerMidRun("decode0", {"--push"});
}

TEST(ServingRobustnessTest, RetriesAreBoundedAndFailedRequestsSayWhy) {
  // Offers that expire after 1 ms: (almost) every attempt fails on a live
  // worker. Without a bound the router retried them until --timeout_s.
  constexpr int kRequests = 4;
  const absl::Time start = absl::Now();
  ServeRun run = Serve({"--json", "--progress=false", "--timeout_s=120", "--offer_ttl_s=0.001",
                        absl::StrCat("--requests=", kRequests), "--max_retries=2",
                        "--retry_backoff_ms=20"});
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  const Json& s = run.summary;
  EXPECT_LT(absl::Now() - start, absl::Seconds(100)) << run.output;
  EXPECT_EQ(s["error"], "") << run.output;
  const int failed = s["failed"].get<int>();
  EXPECT_EQ(s["completed"].get<int>() + failed, kRequests) << run.output;
  EXPECT_GT(failed, 0) << "an offer with a 1 ms ttl was consumed every time:\n" << run.output;
  EXPECT_LE(s["retries"].get<int>(), 2 * kRequests);
  ASSERT_EQ(s["failures"].size(), static_cast<size_t>(failed));
  for (const Json& f : s["failures"]) {
    SCOPED_TRACE(f.dump());
    EXPECT_EQ(f["attempts"], 3);
    EXPECT_THAT(f["reason"].get<std::string>(), HasSubstr("after 2 retries (--max_retries=2)"));
    EXPECT_THAT(f["reason"].get<std::string>(), HasSubstr("expired"));
  }
  // A failed request is a failed run: exit 1; every worker still ended clean.
  EXPECT_FALSE(s["ok"].get<bool>());
  EXPECT_EQ(run.exit_status, 1) << run.output;
  EXPECT_TRUE(s["all_clean"].get<bool>()) << run.output;
}

TEST(ServingRobustnessTest, FailoverCompletesEveryRequestExactlyOnce) {
  // Everything arrives at once, so many requests are in flight (and some
  // just finished) on the prefill worker killed.
  for (const char* mode : {"--nopush", "--push"}) {
    SCOPED_TRACE(mode);
    constexpr int kRequests = 48;
    ServeRun run = Serve({"--json", "--progress=false", "--timeout_s=240", "--prefill=2",
                          "--decode=2", absl::StrCat("--requests=", kRequests), "--rate=0",
                          "--kill-prefill-after=6", mode});
    ASSERT_TRUE(run.summary.is_object()) << run.output;
    const Json& s = run.summary;
    EXPECT_EQ(run.exit_status, 0) << run.output;
    EXPECT_TRUE(s["ok"].get<bool>()) << run.output;
    EXPECT_EQ(s["completed"], kRequests);
    EXPECT_EQ(s["correct"], kRequests);
    ASSERT_EQ(s["kills"].size(), 1u);
    // Failed over: at most the requests not yet completed at the kill.
    EXPECT_LE(s["failed_over"].get<int>(), kRequests - 6) << run.output;
    // The decode workers (both survive) completed each request once.
    int64_t decoded = 0;
    for (const Json& p : s["processes"]) {
      if (p["role"] == "decode") decoded += Counter(p, "completed");
    }
    EXPECT_EQ(decoded, kRequests) << run.output;
  }
}

TEST(ServingRobustnessTest, OffersToAKilledDecodeWorkerEndPeerFailed) {
  constexpr int kRequests = 48;
  ServeRun run = Serve({"--json", "--progress=false", "--timeout_s=240", "--prefill=2",
                        "--decode=2", absl::StrCat("--requests=", kRequests), "--rate=0",
                        "--kill-decode-after=4"});
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  const Json& s = run.summary;
  EXPECT_EQ(run.exit_status, 0) << run.output;
  EXPECT_EQ(s["completed"], kRequests);
  EXPECT_EQ(s["correct"], kRequests);
  // Each offer was consumed or ended with its peer; none with "error".
  for (const auto& [outcome, n] : s["prefill_outcomes"].items()) {
    EXPECT_TRUE(outcome == "consumed" || outcome == "peer-failed") << outcome << " " << n;
  }
}

TEST(ServingRobustnessTest, EqualWorkersGetEqualShares) {
  constexpr int kRequests = 60;
  ServeRun run = Serve({"--json", "--progress=false", "--timeout_s=240", "--prefill=3",
                        "--decode=3", absl::StrCat("--requests=", kRequests), "--rate=30"});
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  const Json& s = run.summary;
  EXPECT_EQ(run.exit_status, 0) << run.output;
  EXPECT_TRUE(s["ok"].get<bool>()) << run.output;
  EXPECT_EQ(s["failed_over"], 0);
  EXPECT_EQ(s["retries"], 0);
  // An even share is 20 of 60; allow half again either way.
  for (const char* role : {"prefill", "decode"}) {
    int total = 0;
    for (const Json& p : s["processes"]) {
      if (p["role"] != role) continue;
      SCOPED_TRACE(p.dump());
      const int n = p["dispatched"].get<int>();
      total += n;
      EXPECT_GE(n, kRequests / 3 / 2);
      EXPECT_LE(n, kRequests / 3 * 3 / 2);
    }
    EXPECT_EQ(total, kRequests) << role;
  }
}

TEST(ServingRobustnessTest, SummaryReportsWhatAServingBenchmarkReads) {
  for (const char* mode : {"--nopush", "--push"}) {
    SCOPED_TRACE(mode);
    constexpr int kRequests = 12;
    ServeRun run = Serve({"--json", "--progress=false", "--timeout_s=240",
                          absl::StrCat("--requests=", kRequests), "--rate=20",
                          "--output_min=4", "--output_max=8", mode});
    ASSERT_TRUE(run.summary.is_object()) << run.output;
    EXPECT_EQ(run.exit_status, 0) << run.output;
    const Json& b = run.summary["bench"];
    ASSERT_TRUE(b.is_object()) << run.output;
    SCOPED_TRACE(b.dump(2));
    EXPECT_EQ(b["completed"], kRequests);
    EXPECT_EQ(b["failed"], 0);
    EXPECT_GE(b["output_tokens"].get<int>(), 4 * kRequests);
    EXPECT_LE(b["output_tokens"].get<int>(), 8 * kRequests);
    EXPECT_GE(b["prompt_tokens"].get<int>(), 64 * kRequests);
    const double secs = b["duration_s"].get<double>();
    ASSERT_GT(secs, 0);
    EXPECT_NEAR(b["request_throughput"].get<double>(), kRequests / secs, 1e-6);
    EXPECT_NEAR(b["output_token_throughput"].get<double>(),
                b["output_tokens"].get<double>() / secs, 1e-6);
    // Latencies in order: the first token before the last.
    EXPECT_GT(b["ttft_ms"]["p50"].get<double>(), 0);
    EXPECT_GE(b["e2e_ms"]["p50"].get<double>(), b["ttft_ms"]["p50"].get<double>());
    EXPECT_GE(b["tpot_ms"]["mean"].get<double>(), 0);
    // The KV cache's own move, per request: time and rate, and the
    // verification timed on its own.
    EXPECT_GT(b["kv_transfer_ms"]["p50"].get<double>(), 0);
    EXPECT_GT(b["kv_transfer_gb_per_s"]["p50"].get<double>(), 0);
    EXPECT_GT(b["verify_ms"]["p50"].get<double>(), 0);
  }
}

TEST(ServingRobustnessTest, BadUsageExitsTwoAndNamesTheValue) {
  ServeRun run = Serve({"--requests=4", "--decode=2", "--kill-decode-after=4"});
  EXPECT_EQ(run.exit_status, 2) << run.output;
  EXPECT_THAT(run.output, HasSubstr("--kill_decode_after=4 would kill nothing"));
  EXPECT_THAT(run.output, Not(HasSubstr("started")));  // no worker was started
  run = Serve({"--requests=4", "--prefill=2", "--kill-prefill-after=9"});
  EXPECT_EQ(run.exit_status, 2) << run.output;
  EXPECT_THAT(run.output, HasSubstr("--kill_prefill_after=9 would kill nothing"));
  run = Serve({"--no_such_flag=1"});
  EXPECT_EQ(run.exit_status, 2) << run.output;
  EXPECT_THAT(run.output, HasSubstr("unknown flag '--no_such_flag'"));
  run = Serve({"--requests=many"});
  EXPECT_EQ(run.exit_status, 2) << run.output;
  EXPECT_THAT(run.output, HasSubstr("--requests='many' is not a valid value"));
  run = Serve({"--max_retries=-1"});
  EXPECT_EQ(run.exit_status, 2) << run.output;
  EXPECT_THAT(run.output, HasSubstr("--max_retries=-1 is out of range"));
  run = Serve({"--heartbeat_ms=1000", "--worker_timeout_s=1"});
  EXPECT_EQ(run.exit_status, 2) << run.output;
  EXPECT_THAT(run.output, HasSubstr("--worker_timeout_s=1 must span at least two heartbeats"));
  // --help exits 0 and says what moves the bytes and what the exit codes mean.
  run = Serve({"--help"});
  EXPECT_EQ(run.exit_status, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("shm-kernel-copy"));
  EXPECT_THAT(run.output, HasSubstr("2 bad usage"));
  EXPECT_THAT(run.output, HasSubstr("--worker_timeout_s"));
  EXPECT_THAT(run.output, HasSubstr("--max_retries"));
}

TEST(ServingRobustnessTest, LosingEtcdMidRunIsLoggedAtOnce) {
  EtcdCluster etcd(1);
  if (!etcd.available()) GTEST_SKIP() << "etcd is not installed (Debian: etcd-server)";
  ASSERT_TRUE(etcd.ok()) << etcd.LogTail(0);
  ServeRun run;
  auto child = StartServe({"--json", "--progress", "--timeout_s=240", "--requests=2000", "--rate=10",
                      absl::StrCat("--etcd=", etcd.Endpoint(0))});
  ASSERT_NE(ReadUntil(*child, run, [](const std::string& l) { return DoneIn(l) >= 3; }), "")
      << run.output;
  etcd.Kill(0);
  // The router says so while the run goes on (not at its end): the line
  // comes before any summary.
  const std::string lost = ReadUntil(*child, run, [](const std::string& l) {
    return l.find(": etcd lost: ") != std::string::npos || (!l.empty() && l[0] == '{');
  });
  EXPECT_THAT(lost, HasSubstr(": etcd lost: ")) << run.output;
  ASSERT_EQ(kill(child->pid(), SIGTERM), 0);
  FinishServe(*child, run);
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  ASSERT_FALSE(run.summary["directory_events"].empty()) << run.output;
  EXPECT_FALSE(run.summary["directory_events"][0]["ok"].get<bool>());
}

// A run started again under the same --cluster right after a crash finds
// its worker's name still held by the dead process's entry (a real agent
// published it, then was SIGKILLed, so the key outlives it until its lease
// lapses). The worker waits for the lease instead of failing the run.
TEST(ServingRobustnessTest, RestartUnderTheSameClusterWaitsForTheDeadRunsLease) {
  EtcdCluster etcd(1);
  if (!etcd.available()) GTEST_SKIP() << "etcd is not installed (Debian: etcd-server)";
  ASSERT_TRUE(etcd.ok()) << etcd.LogTail(0);
  const std::string cluster = absl::StrCat("restart-", getpid());
  ChildProcess dead({KVFERRY_TEST_PEER, "--role=prefill-serve", "--name=prefill0",
                     absl::StrCat("--etcd=", etcd.Endpoint(0)), "--cluster=" + cluster, "--ttl=4"});
  ASSERT_EQ(dead.ReadUntil("PUBLISHED", absl::Minutes(2)).value_or("timeout"), "PUBLISHED");
  ASSERT_EQ(kill(dead.pid(), SIGKILL), 0);
  dead.Wait();
  const ServeRun run = Serve({"--json", "--timeout_s=240", "--prefill=1", "--decode=1",
                              "--requests=4", absl::StrCat("--etcd=", etcd.Endpoint(0)),
                              "--cluster=" + cluster});
  EXPECT_EQ(run.exit_status, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("for its lease to lapse")) << run.output;
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  EXPECT_EQ(run.summary["completed"], 4) << run.output;
}

TEST(ServingRobustnessTest, SigtermEndsTheRunWithItsSummary) {
  ServeRun run;
  auto child = StartServe({"--json", "--progress", "--timeout_s=240", "--prefill=1", "--decode=1",
                      "--requests=500", "--rate=5"});
  ASSERT_NE(ReadUntil(*child, run, [](const std::string& l) { return DoneIn(l) >= 3; }), "")
      << run.output;
  ASSERT_EQ(kill(child->pid(), SIGTERM), 0);
  FinishServe(*child, run);
  ASSERT_TRUE(run.summary.is_object()) << run.output;
  const Json& s = run.summary;
  EXPECT_EQ(run.exit_status, 1) << run.output;
  EXPECT_EQ(s["interrupted_by"], "SIGTERM");
  EXPECT_THAT(s["error"].get<std::string>(), HasSubstr("interrupted by SIGTERM"));
  EXPECT_GE(s["completed"].get<int>(), 3);
  EXPECT_LT(s["completed"].get<int>(), 500);
  // The workers were shut down as at the end of a run: clean, exit 0.
  EXPECT_TRUE(s["all_clean"].get<bool>()) << run.output;
  for (const Json& p : s["processes"]) {
    SCOPED_TRACE(p.dump());
    EXPECT_EQ(p["exit"], 0);
  }
}

}  // namespace
}  // namespace kvferry::test
