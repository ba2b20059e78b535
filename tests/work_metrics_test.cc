// The work metrics (kvferry/work_stats.h, src/work_metrics.h): a real agent
// pair over shared memory and over TCP moves blocks, lends and revokes
// offers, sends a notification and disconnects; each agent's /metrics,
// scraped over HTTP from a MetricsServer, passes `promtool check metrics`
// and its counters equal what happened. WorkMetrics alone: failures by
// code, bytes of failed transfers not counted, histogram buckets. The
// watchdog's alarm metrics. The shipped dashboard and rules
// (deploy/grafana/kvferry.json, deploy/prometheus/kvferry-rules.yml) parse
// and name only metrics an agent exports.
#include "src/work_metrics.h"

#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "kvferry/agent.h"
#include "kvferry/metrics_server.h"
#include "kvferry/watchdog.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// The body of GET /metrics from 127.0.0.1:port, or "" on failure.
std::string Scrape(uint16_t port) { return HttpGetBody(port, "/metrics"); }

struct Promtool {
  int exit_code = -1;
  std::string output;
};

// Runs `promtool check metrics` on `text` (its stdin), stdout and stderr
// together.
Promtool CheckMetrics(const std::string& text) {
  Promtool r;
  const std::string promtool = KVFERRY_PROMTOOL;
  if (promtool.empty() || promtool.find("NOTFOUND") != std::string::npos) {
    r.output = "promtool not found: run scripts/install-deps.sh (Debian package prometheus)";
    return r;
  }
  char path[] = "/tmp/kvferry_metrics_XXXXXX";
  const int fd = mkstemp(path);
  if (fd < 0) {
    r.output = "mkstemp failed";
    return r;
  }
  close(fd);
  std::ofstream(path) << text;
  FILE* p = popen(absl::StrCat(promtool, " check metrics < ", path, " 2>&1").c_str(), "r");
  if (p != nullptr) {
    char buf[4096];
    for (size_t n; (n = fread(buf, 1, sizeof(buf), p)) > 0;) r.output.append(buf, n);
    const int status = pclose(p);
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  unlink(path);
  return r;
}

// The value of the sample `series` (name and labels exactly as rendered),
// or -1 when it is absent.
double Value(const std::string& text, const std::string& series) {
  const std::string key = series + " ";
  size_t at = 0;
  while ((at = text.find(key, at)) != std::string::npos) {
    if (at == 0 || text[at - 1] == '\n') {
      return std::stod(text.substr(at + key.size(), text.find('\n', at) - at - key.size()));
    }
    at += key.size();
  }
  return -1;
}

class WorkMetricsTest : public AgentPairTest {
 protected:
  void MakePools() override {
    decode_pool_ = *decode_->CreatePool("kv", SmallLayout(32));
    prefill_pool_ = *prefill_->CreatePool("kv", SmallLayout(32));
  }
  // /metrics of `agent` through a real MetricsServer.
  std::string Metrics(Agent& agent) {
    auto server = MetricsServer::Start("127.0.0.1", 0, [&agent] {
      auto r = agent.GetMemoryReport();
      return r.ok() ? r->ToPrometheus() : std::string("# unavailable\n");
    });
    if (!server.ok()) return "";
    return Scrape((*server)->port());
  }
};

TEST_P(WorkMetricsTest, CountersMatchTheWorkAndPassPromtool) {
  const uint64_t block_bytes = SmallLayout(32).block_bytes();
  const std::string path = prefill_->GetPeer("decode")->data_path;
  ASSERT_EQ(decode_->GetPeer("prefill")->data_path, path);

  // Prefill writes 3 blocks with a notification; decode reads 5.
  {
    BlockSet local = *prefill_pool_->Lease(3);
    auto t = prefill_->PostTransfer({.op = TransferOp::kWrite, .peer = "decode",
                                     .local = &local, .remote_blocks = {1, 2, 9},
                                     .notification = "written"});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
  }
  {
    BlockSet local = *decode_pool_->Lease(5);
    auto t = decode_->PostTransfer({.op = TransferOp::kRead, .peer = "prefill",
                                    .local = &local, .remote_blocks = {0, 4, 5, 6, 30}});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
  }
  ASSERT_EQ(decode_->WaitForNotifications(absl::Seconds(30)).size(), 1u);
  // Decode lends two blocks that nobody takes (they expire) and one it
  // revokes.
  {
    BlockSet lent = *decode_pool_->Lease(2);
    auto expiring = decode_->Offer(lent, "prefill", absl::Milliseconds(100));
    ASSERT_THAT(expiring, IsOk());
    BlockSet other = *decode_pool_->Lease(1);
    auto revoked = decode_->Offer(other, "prefill", absl::Seconds(600));
    ASSERT_THAT(revoked, IsOk());
    EXPECT_THAT(revoked->Revoke(), StatusIs(absl::StatusCode::kCancelled, ""));
    EXPECT_THAT(expiring->Wait(absl::Seconds(60)),
                StatusIs(absl::StatusCode::kDeadlineExceeded, "expired"));
    EXPECT_EQ(expiring->state(), OfferState::kExpired);
  }

  const std::string prefill = Metrics(*prefill_);
  const std::string decode = Metrics(*decode_);
  for (const std::string* text : {&prefill, &decode}) {
    Promtool check = CheckMetrics(*text);
    EXPECT_EQ(check.exit_code, 0) << check.output;
    EXPECT_EQ(check.output, "") << "promtool check metrics complained about:\n" << *text;
  }

  const std::string write_labels =
      absl::StrCat("{agent=\"prefill\",peer=\"decode\",op=\"write\",data_path=\"", path, "\"");
  const std::string read_labels =
      absl::StrCat("{agent=\"decode\",peer=\"prefill\",op=\"read\",data_path=\"", path, "\"");
  EXPECT_EQ(Value(prefill, "kvferry_transferred_bytes_total" + write_labels + "}"),
            3 * block_bytes);
  EXPECT_EQ(Value(prefill, "kvferry_transfers_total" + write_labels + ",outcome=\"done\"}"), 1);
  EXPECT_EQ(Value(decode, "kvferry_transferred_bytes_total" + read_labels + "}"),
            5 * block_bytes);
  EXPECT_EQ(Value(decode, "kvferry_transfers_total" + read_labels + ",outcome=\"done\"}"), 1);
  EXPECT_THAT(prefill + decode, Not(HasSubstr("outcome=\"failed\"")));
  EXPECT_THAT(prefill + decode, Not(HasSubstr("kvferry_transfer_failures_total{")));
  const std::string hist_labels = absl::StrCat("{agent=\"prefill\",op=\"write\",data_path=\"",
                                               path, "\"");
  EXPECT_EQ(Value(prefill, "kvferry_transfer_duration_seconds_count" + hist_labels + "}"), 1);
  EXPECT_EQ(Value(prefill, "kvferry_transfer_duration_seconds_bucket" + hist_labels +
                               ",le=\"+Inf\"}"), 1);
  EXPECT_GT(Value(prefill, "kvferry_transfer_duration_seconds_sum" + hist_labels + "}"), 0);
  EXPECT_EQ(Value(prefill, "kvferry_transfers_in_flight{agent=\"prefill\"}"), 0);
  EXPECT_EQ(Value(prefill, "kvferry_transfer_oldest_in_flight_seconds{agent=\"prefill\"}"), 0);

  EXPECT_EQ(Value(decode, "kvferry_notifications_received_total{agent=\"decode\"}"), 1);
  EXPECT_EQ(Value(decode, "kvferry_notification_received_bytes_total{agent=\"decode\"}"),
            std::string("written").size());
  EXPECT_EQ(Value(prefill, "kvferry_notifications_received_total{agent=\"prefill\"}"), 0);

  EXPECT_EQ(Value(decode, "kvferry_offers_ended_total{agent=\"decode\",outcome=\"expired\"}"), 1);
  EXPECT_EQ(Value(decode, "kvferry_offers_ended_total{agent=\"decode\",outcome=\"revoked\"}"), 1);
  EXPECT_EQ(Value(decode, "kvferry_offers_ended_total{agent=\"decode\",outcome=\"consumed\"}"), 0);
  EXPECT_EQ(Value(decode, "kvferry_offers_open{agent=\"decode\"}"), 0);

  for (const auto& [text, agent, peer] :
       {std::tuple{&prefill, "prefill", "decode"}, std::tuple{&decode, "decode", "prefill"}}) {
    const std::string a = absl::StrCat("{agent=\"", agent, "\"");
    EXPECT_EQ(Value(*text, "kvferry_peers" + a + ",state=\"connected\"}"), 1) << agent;
    EXPECT_EQ(Value(*text, "kvferry_peers_connected_total" + a + "}"), 1) << agent;
    EXPECT_EQ(Value(*text, absl::StrCat("kvferry_peer_info", a, ",peer=\"", peer,
                                        "\",data_path=\"", path, "\"}")), 1) << agent;
    EXPECT_EQ(Value(*text, "kvferry_registered_bytes" + a + "}"),
              Value(*text, "kvferry_pool_registered_bytes" + a + ",pool=\"kv\"}")) << agent;
    EXPECT_GT(Value(*text, "kvferry_registered_bytes" + a + "}"), 0) << agent;
  }

  // A Disconnect ends the peer on both sides as closed, not failed.
  ASSERT_THAT(prefill_->Disconnect("decode"), IsOk());
  for (Agent* agent : {prefill_.get(), decode_.get()}) {
    const std::string a = absl::StrCat("{agent=\"", agent->name(), "\"");
    EXPECT_TRUE(WaitFor([&] {
      return Value(Metrics(*agent), "kvferry_peers_ended_total" + a + ",state=\"closed\"}") == 1;
    })) << agent->name();
    const std::string after = Metrics(*agent);
    EXPECT_EQ(Value(after, "kvferry_peers_ended_total" + a + ",state=\"failed\"}"), 0);
    EXPECT_EQ(Value(after, "kvferry_peers" + a + ",state=\"connected\"}"), 0);
    EXPECT_EQ(Value(after, "kvferry_handshakes_failed_total" + a + "}"), 0);
  }
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Every kvferry_* metric name in `text` (histogram series by their base name).
std::set<std::string> MetricNames(const std::string& text) {
  std::set<std::string> names;
  static const std::regex kName("kvferry_[a-z_]+");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), kName);
       it != std::sregex_iterator(); ++it) {
    std::string name = it->str();
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      if (absl::EndsWith(name, suffix) && absl::StrContains(name, "_duration_seconds")) {
        name.resize(name.size() - strlen(suffix));
      }
    }
    names.insert(name);
  }
  return names;
}

TEST_P(WorkMetricsTest, DashboardAndRulesNameExportedMetricsAndParse) {
  auto dog = Watchdog::Create(decode_.get(), WatchdogOptions());
  ASSERT_THAT(dog, IsOk());
  ASSERT_THAT((*dog)->Sample(), IsOk());
  const std::string exported = Metrics(*prefill_) + Metrics(*decode_) + (*dog)->ToPrometheus();
  std::set<std::string> typed;
  for (absl::string_view line : absl::StrSplit(exported, '\n')) {
    if (absl::ConsumePrefix(&line, "# TYPE ")) typed.insert(std::string(line.substr(0, line.find(' '))));
  }
  ASSERT_GT(typed.size(), 40u);

  const std::string rules = ReadFile(KVFERRY_SOURCE_DIR "/deploy/prometheus/kvferry-rules.yml");
  const std::string dashboard = ReadFile(KVFERRY_SOURCE_DIR "/deploy/grafana/kvferry.json");
  ASSERT_FALSE(rules.empty());
  ASSERT_FALSE(dashboard.empty());
  for (const std::string* text : {&rules, &dashboard}) {
    const std::set<std::string> used = MetricNames(*text);
    EXPECT_GT(used.size(), 10u);
    for (const std::string& name : used) {
      EXPECT_TRUE(typed.contains(name)) << name << " is not exported";
    }
  }

  // Every panel's query, with the dashboard's variables filled in, as a
  // recording rule: promtool check rules parses each.
  const nlohmann::json dash = nlohmann::json::parse(dashboard, nullptr, false);
  ASSERT_FALSE(dash.is_discarded());
  std::string check = "groups:\n  - name: dashboard\n    rules:\n";
  int exprs = 0;
  for (const nlohmann::json& panel : dash["panels"]) {
    if (!panel.contains("targets")) continue;
    for (const nlohmann::json& target : panel["targets"]) {
      std::string expr = target["expr"].get<std::string>();
      expr = absl::StrReplaceAll(expr, {{"$__rate_interval", "1m"}, {"$job", ".*"},
                                        {"$instance", ".*"}, {"$agent", ".*"}});
      absl::StrAppend(&check, "      - record: kvferry_dashboard_", exprs++, "\n        expr: '",
                      absl::StrReplaceAll(expr, {{"'", "''"}}), "'\n");
    }
  }
  EXPECT_GE(exprs, 20);
  char path[] = "/tmp/kvferry_dashboard_XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  close(fd);
  std::ofstream(path) << check;
  FILE* p = popen(absl::StrCat(KVFERRY_PROMTOOL, " check rules ", path, " 2>&1").c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof(buf), p)) > 0;) out.append(buf, n);
  const int status = pclose(p);
  unlink(path);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << out << "\n" << check;
  EXPECT_THAT(out, HasSubstr(absl::StrCat("SUCCESS: ", exprs, " rules found")));
}

INSTANTIATE_TEST_SUITE_P(Transports, WorkMetricsTest, ::testing::Values(kShm, kTcp),
                         TransportName);

TEST(WorkMetricsUnitTest, FailuresByCodeAndBuckets) {
  internal::WorkMetrics m;
  const std::vector<internal::CopyOp> copies = {{0, 0, 0, 0, 1000}, {0, 4096, 0, 8192, 24}};
  internal::WorkMetrics::Tag slow = internal::WorkMetrics::Begin(TransferOp::kWrite, copies);
  EXPECT_EQ(slow.bytes, 1024u);
  slow.started -= absl::Seconds(2);  // ended after about 2 s: the le="2.5" bucket
  m.TransferEnded("p", "tcp", slow, TransferState::kDone, absl::OkStatus());
  const internal::WorkMetrics::Tag failed = internal::WorkMetrics::Begin(TransferOp::kWrite, copies);
  m.TransferEnded("p", "tcp", failed, TransferState::kFailed, absl::UnavailableError("gone"));
  m.TransferEnded("p", "tcp", failed, TransferState::kCancelled, absl::CancelledError("c"));
  m.PeerEnded(PeerState::kHandshaking, PeerState::kFailed);
  m.PeerEnded(PeerState::kConnected, PeerState::kFailed);
  const std::string text = m.Snapshot().ToPrometheus("a\"b");

  Promtool check = CheckMetrics(text);
  EXPECT_EQ(check.exit_code, 0) << check.output;
  EXPECT_EQ(check.output, "") << text;
  const std::string l = "{agent=\"a\\\"b\",peer=\"p\",op=\"write\",data_path=\"tcp\"";
  EXPECT_EQ(Value(text, "kvferry_transferred_bytes_total" + l + "}"), 1024);  // done only
  EXPECT_EQ(Value(text, "kvferry_transfers_total" + l + ",outcome=\"done\"}"), 1);
  EXPECT_EQ(Value(text, "kvferry_transfers_total" + l + ",outcome=\"failed\"}"), 1);
  EXPECT_EQ(Value(text, "kvferry_transfers_total" + l + ",outcome=\"cancelled\"}"), 1);
  EXPECT_EQ(Value(text, "kvferry_transfer_failures_total{agent=\"a\\\"b\",peer=\"p\","
                        "op=\"write\",code=\"UNAVAILABLE\"}"), 1);
  const std::string h = "kvferry_transfer_duration_seconds_bucket{agent=\"a\\\"b\",op=\"write\","
                        "data_path=\"tcp\",le=";
  EXPECT_EQ(Value(text, h + "\"1\"}"), 2);    // the failed and the cancelled one
  EXPECT_EQ(Value(text, h + "\"2.5\"}"), 3);  // cumulative: the slow one too
  EXPECT_EQ(Value(text, h + "\"+Inf\"}"), 3);
  EXPECT_EQ(Value(text, "kvferry_handshakes_failed_total{agent=\"a\\\"b\"}"), 1);
  EXPECT_EQ(Value(text, "kvferry_peers_ended_total{agent=\"a\\\"b\",state=\"failed\"}"), 1);
}

// The watchdog's metrics name each reason; a sample that grows 100 MiB a
// second fires the two slopes (not the share: nothing is unexplained).
TEST(WorkMetricsUnitTest, WatchdogAlarmMetrics) {
  const absl::Time t0 = absl::Now();
  int sample = 0;
  WatchdogOptions options;
  options.period = absl::Seconds(1);
  options.window = absl::Seconds(4);
  int hooked = 0;
  options.on_alarm = [&hooked](const WatchdogEvent&) { ++hooked; };
  auto dog = Watchdog::Create(
      [&]() -> absl::StatusOr<MemoryReport> {
        MemoryReport r;
        r.agent = "dog";
        r.taken = t0 + absl::Seconds(sample);
        r.process.rss_bytes = (1ull << 30) + (100ull << 20) * sample;
        r.unexplained_signed_bytes = static_cast<int64_t>((100ull << 20) * sample);
        ++sample;
        return r;
      },
      options);
  ASSERT_THAT(dog, IsOk());
  const std::string before = (*dog)->ToPrometheus();
  EXPECT_EQ(Value(before, "kvferry_watchdog_alarms_total{agent=\"\",reason=\"rss_slope\"}"), 0);
  for (int i = 0; i < 6; ++i) ASSERT_THAT((*dog)->Sample(), IsOk());
  ASSERT_EQ(hooked, 2);
  const std::string text = (*dog)->ToPrometheus();
  Promtool check = CheckMetrics(text);
  EXPECT_EQ(check.exit_code, 0) << check.output;
  EXPECT_EQ(check.output, "") << text;
  for (const char* reason : {"rss_slope", "unexplained_slope"}) {
    const std::string l = absl::StrCat("{agent=\"dog\",reason=\"", reason, "\"}");
    EXPECT_EQ(Value(text, "kvferry_watchdog_alarms_total" + l), 1) << reason;
    EXPECT_EQ(Value(text, "kvferry_watchdog_in_alarm" + l), 1) << reason;
  }
  const std::string share = "{agent=\"dog\",reason=\"unexplained_share\"}";
  EXPECT_EQ(Value(text, "kvferry_watchdog_alarms_total" + share), 0);
  EXPECT_EQ(Value(text, "kvferry_watchdog_in_alarm" + share), 0);
}

// promtool itself rejects what it should: the check above can fail.
TEST(WorkMetricsUnitTest, PromtoolRejectsABadCounterName) {
  Promtool check = CheckMetrics(
      "# HELP kvferry_bad A counter without _total.\n# TYPE kvferry_bad counter\n"
      "kvferry_bad 1\n");
  EXPECT_THAT(check.output, HasSubstr("kvferry_bad"));
}

}  // namespace
}  // namespace kvferry::test
