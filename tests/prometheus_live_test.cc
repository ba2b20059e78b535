// The rules and the dashboard against a real Prometheus (Debian's
// prometheus 2.42 on loopback, a temporary data directory) that finds a
// running kvferry_serve's workers through the router's file-SD file:
// registered bytes equal each worker's KV cache, bandwidth is non-zero while
// requests flow, no transfer fails, every rule evaluates healthy and every
// panel's query evaluates.
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "tests/child_process.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

using Json = nlohmann::json;

// The body of GET `path` from 127.0.0.1:port (HTTP/1.0), or "".
std::string Get(uint16_t port, const std::string& path) { return HttpGetBody(port, path); }

std::string UrlEncode(absl::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppend(&out, absl::StrFormat("%%%02X", c));
    }
  }
  return out;
}

// A port nobody listens on now (the kernel's pick).
uint16_t FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return 0;
  }
  close(fd);
  return ntohs(addr.sin_port);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class Prometheus {
 public:
  explicit Prometheus(uint16_t port) : port_(port) {}
  // The instant query's result vector, or a JSON null when the query failed.
  Json Query(const std::string& expr) const {
    Json r = Json::parse(Get(port_, "/api/v1/query?query=" + UrlEncode(expr)), nullptr, false);
    if (r.is_discarded() || r["status"] != "success") return nullptr;
    return r["data"]["result"];
  }
  // The value of a query that returns one series (NaN otherwise).
  double Scalar(const std::string& expr) const {
    Json r = Query(expr);
    if (!r.is_array() || r.size() != 1) return std::nan("");
    return std::stod(r[0]["value"][1].get<std::string>());
  }
  uint16_t port() const { return port_; }

 private:
  uint16_t port_;
};

TEST(PrometheusLiveTest, RulesAndPanelsAgainstARunningEngine) {
  const std::string prometheus_bin = KVFERRY_PROMETHEUS;
  ASSERT_TRUE(!prometheus_bin.empty() && prometheus_bin.find("NOTFOUND") == std::string::npos)
      << "prometheus not found: run scripts/install-deps.sh (Debian package prometheus)";
  char dir[] = "/tmp/kvferry_prometheus_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string sd = absl::StrCat(dir, "/targets.json");
  // 400 requests at 10 a second: the engine serves for 40 s at least, however
  // fast the machine.
  ChildProcess engine({KVFERRY_SERVE, "--json", "--progress=false", "--timeout_s=240",
                       "--prefill=1", "--decode=2", "--requests=400", "--rate=10",
                       "--prometheus_sd_file=" + sd});
  ASSERT_TRUE(WaitFor([&] { return !ReadFile(sd).empty(); }, absl::Seconds(120)));

  std::ofstream(absl::StrCat(dir, "/prometheus.yml"))
      << "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
      << "rule_files: ['" << KVFERRY_SOURCE_DIR << "/deploy/prometheus/kvferry-rules.yml']\n"
      << "scrape_configs:\n  - job_name: kvferry\n    file_sd_configs:\n"
      << "      - files: ['" << sd << "']\n";
  const uint16_t port = FreePort();
  ASSERT_NE(port, 0);
  ChildProcess server({"/bin/sh", "-c",
                       absl::StrCat("exec ", prometheus_bin, " --config.file=", dir,
                                    "/prometheus.yml --storage.tsdb.path=", dir,
                                    "/data --web.listen-address=127.0.0.1:", port,
                                    " --log.level=warn 2>", dir, "/prometheus.log")});
  const Prometheus prom(port);
  ASSERT_TRUE(WaitFor([&] { return Get(port, "/-/ready").find("Ready") != std::string::npos; },
                      absl::Seconds(60)))
      << ReadFile(absl::StrCat(dir, "/prometheus.log"));

  // Three workers scraped; bandwidth while requests flow.
  EXPECT_TRUE(WaitFor([&] { return prom.Scalar("count(up{job=\"kvferry\"} == 1)") == 3; },
                      absl::Seconds(60)));
  EXPECT_TRUE(WaitFor([&] {
    return prom.Scalar("sum(rate(kvferry_transferred_bytes_total{job=\"kvferry\"}[10s]))") > 0;
  }, absl::Seconds(60))) << ReadFile(absl::StrCat(dir, "/prometheus.log"));
  // Each worker registered its whole KV cache (the engine's default shape:
  // 8 layers x K,V x 512 blocks x 16 tokens x 4 heads x 64 x 2 bytes).
  const Json registered = prom.Query("kvferry_registered_bytes{job=\"kvferry\"}");
  ASSERT_TRUE(registered.is_array());
  EXPECT_EQ(registered.size(), 3u);
  for (const Json& s : registered) {
    EXPECT_EQ(s["value"][1], "67108864") << s.dump();
  }
  EXPECT_EQ(prom.Scalar("sum(kvferry_transfers_total{outcome=\"failed\"}) or vector(0)"), 0);
  const Json failures = prom.Query("kvferry_transfer_failures_total");
  ASSERT_TRUE(failures.is_array());
  EXPECT_EQ(failures.size(), 0u) << failures.dump();

  // Every rule evaluated, healthy; no kvferry alert fires on a healthy run.
  EXPECT_TRUE(WaitFor([&] {
    Json rules = Json::parse(Get(port, "/api/v1/rules"), nullptr, false);
    if (rules.is_discarded()) return false;
    int evaluated = 0;
    for (const Json& g : rules["data"]["groups"]) {
      for (const Json& r : g["rules"]) {
        if (r["health"] != "ok") return false;
        ++evaluated;
      }
    }
    return evaluated >= 20;
  }, absl::Seconds(60))) << Get(port, "/api/v1/rules");
  const Json firing = prom.Query("ALERTS{alertname=~\"Kvferry.*\",alertstate=\"firing\"}");
  ASSERT_TRUE(firing.is_array());
  EXPECT_EQ(firing.size(), 0u) << firing.dump();
  // The recording rules have series.
  EXPECT_TRUE(WaitFor([&] {
    return prom.Query("kvferry:transferred_bytes:rate1m").size() > 0 &&
           prom.Query("kvferry:rss_bytes:deriv15m").size() == 3;
  }, absl::Seconds(60)));

  // Every panel's query evaluates; the memory, transfer and peer panels
  // have series.
  const Json dash = Json::parse(ReadFile(KVFERRY_SOURCE_DIR "/deploy/grafana/kvferry.json"),
                                nullptr, false);
  ASSERT_FALSE(dash.is_discarded());
  for (const Json& panel : dash["panels"]) {
    if (!panel.contains("targets")) continue;
    const std::string title = panel["title"];
    size_t series = 0;
    for (const Json& target : panel["targets"]) {
      const std::string expr = absl::StrReplaceAll(
          target["expr"].get<std::string>(),
          {{"$__rate_interval", "10s"}, {"$job", ".*"}, {"$instance", ".*"}, {"$agent", ".*"}});
      const Json result = prom.Query(expr);
      ASSERT_TRUE(result.is_array()) << title << ": " << expr;
      series += result.size();
    }
    for (const char* must : {"Memory breakdown", "UCX segments and mappings",
                             "Bandwidth by peer, direction and data path",
                             "Transfer latency percentiles", "Transfers by outcome", "In flight",
                             "Peers by state", "Connected peers and their data paths",
                             "Pools: blocks by state"}) {
      if (title == must) {
        EXPECT_GT(series, 0u) << title;
      }
    }
  }

  std::string output;
  while (auto line = engine.ReadLine(absl::Minutes(5))) absl::StrAppend(&output, *line, "\n");
  const int status = engine.Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << output;
  server.Kill(SIGTERM);
  server.Wait();
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

}  // namespace
}  // namespace kvferry::test
