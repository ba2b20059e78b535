// The serving engine's workers serve /metrics and the router writes their
// targets for Prometheus's file-based service discovery: a real
// kvferry_serve run (router, one prefill and one decode process) is scraped
// while it serves; each worker's /metrics passes `promtool check metrics`,
// and the decode worker's transferred bytes grow while requests flow.
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "tests/child_process.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

using Json = nlohmann::json;

// The body of GET /metrics at `target` ("127.0.0.1:port"), or "".
std::string Scrape(const std::string& target) {
  std::vector<std::string> parts = absl::StrSplit(target, ':');
  uint32_t port = 0;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[1], &port) || port > 65535) return "";
  return HttpGetBody(static_cast<uint16_t>(port), "/metrics", parts[0]);
}

// `promtool check metrics` on `text`: its exit code and output.
std::pair<int, std::string> CheckMetrics(const std::string& text) {
  const std::string promtool = KVFERRY_PROMTOOL;
  if (promtool.empty() || promtool.find("NOTFOUND") != std::string::npos) {
    return {-1, "promtool not found: run scripts/install-deps.sh (Debian package prometheus)"};
  }
  char path[] = "/tmp/kvferry_serve_metrics_XXXXXX";
  const int fd = mkstemp(path);
  if (fd < 0) return {-1, "mkstemp failed"};
  close(fd);
  std::ofstream(path) << text;
  std::string out;
  FILE* p = popen(absl::StrCat(promtool, " check metrics < ", path, " 2>&1").c_str(), "r");
  int code = -1;
  if (p != nullptr) {
    char buf[4096];
    for (size_t n; (n = fread(buf, 1, sizeof(buf), p)) > 0;) out.append(buf, n);
    const int status = pclose(p);
    code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  unlink(path);
  return {code, out};
}

// The sum of every sample of `metric` in `text` (-1 when it has none).
double Sum(const std::string& text, const std::string& metric) {
  double sum = -1;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, metric) || line.empty() || (line[0] != '{' && line[0] != ' ')) {
      continue;
    }
    double v = 0;
    if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) sum = (sum < 0 ? 0 : sum) + v;
  }
  return sum;
}

TEST(ServingMetricsTest, WorkersServeMetricsFoundThroughFileServiceDiscovery) {
  char dir[] = "/tmp/kvferry_sd_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string sd = absl::StrCat(dir, "/targets.json");
  // 200 requests at 10 a second: the run serves for 20 s at least, however
  // fast the machine, so the scrapes below see it working.
  ChildProcess child({KVFERRY_SERVE, "--json", "--progress=false", "--timeout_s=240",
                      "--prefill=1", "--decode=1", "--requests=200", "--rate=10",
                      "--prometheus_sd_file=" + sd});

  Json groups;
  ASSERT_TRUE(WaitFor([&] {
    std::ifstream in(sd);
    if (!in) return false;
    std::stringstream ss;
    ss << in.rdbuf();
    groups = Json::parse(ss.str(), nullptr, false);
    return groups.is_array();
  }, absl::Seconds(120))) << "no service-discovery file at " << sd;
  ASSERT_EQ(groups.size(), 2u) << groups.dump();
  std::string decode_target;
  for (const Json& g : groups) {
    ASSERT_EQ(g["labels"]["job"], "kvferry") << g.dump();
    ASSERT_EQ(g["targets"].size(), 1u) << g.dump();
    const std::string target = g["targets"][0];
    if (g["labels"]["role"] == "decode") decode_target = target;
    const std::string text = Scrape(target);
    ASSERT_FALSE(text.empty()) << target;
    const auto [code, out] = CheckMetrics(text);
    EXPECT_EQ(code, 0) << out;
    EXPECT_EQ(out, "") << target << ":\n" << text;
    EXPECT_GT(Sum(text, "kvferry_registered_bytes"), 0) << target;
  }
  ASSERT_FALSE(decode_target.empty()) << groups.dump();
  // Decode pulls every request's KV cache: its bytes grow while requests
  // flow, and no transfer fails.
  double first = -1;
  EXPECT_TRUE(WaitFor([&] {
    first = Sum(Scrape(decode_target), "kvferry_transferred_bytes_total");
    return first > 0;
  }, absl::Seconds(120)));
  EXPECT_TRUE(WaitFor([&] {
    return Sum(Scrape(decode_target), "kvferry_transferred_bytes_total") > first;
  }, absl::Seconds(120)));
  const std::string text = Scrape(decode_target);
  EXPECT_EQ(text.find("outcome=\"failed\""), std::string::npos) << text;

  std::string output;
  while (auto line = child.ReadLine(absl::Minutes(5))) absl::StrAppend(&output, *line, "\n");
  const int status = child.Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << output;
  unlink(sd.c_str());
  rmdir(dir);
}

}  // namespace
}  // namespace kvferry::test
