#include "kvferry/metrics_server.h"

#include <arpa/inet.h>
#include <sys/socket.h>
#include <unistd.h>

#include "kvferry/agent.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

using ::testing::HasSubstr;

// A plain HTTP/1.0 GET over a socket to 127.0.0.1:port.
std::string Get(uint16_t port, const std::string& path) {
  const std::string response = HttpGet(port, path);
  return response.empty() ? "connect failed" : response;
}

TEST(MetricsServerTest, ServesTheAgentsReport) {
  AgentOptions o;
  o.name = "scraped";
  o.leak_policy = LeakPolicy::kAbort;
  auto agent = *Agent::Create(o);
  ASSERT_THAT(agent->CreatePool("kv", SmallLayout()), IsOk());
  auto server = MetricsServer::Start("127.0.0.1", 0, [&agent] {
    auto r = agent->GetMemoryReport();
    return r.ok() ? r->ToPrometheus() : std::string("# unavailable\n");
  });
  ASSERT_THAT(server, IsOk());
  ASSERT_NE((*server)->port(), 0);
  std::string response = Get((*server)->port(), "/metrics");
  EXPECT_THAT(response, HasSubstr("200 OK"));
  EXPECT_THAT(response, HasSubstr("text/plain; version=0.0.4"));
  EXPECT_THAT(response, HasSubstr("# TYPE kvferry_rss_bytes gauge"));
  EXPECT_THAT(response, HasSubstr("kvferry_pool_registered_bytes{agent=\"scraped\",pool=\"kv\"}"));
  EXPECT_THAT(Get((*server)->port(), "/other"), HasSubstr("404"));
  (*server)->Stop();
  (*server)->Stop();
  EXPECT_EQ(Get((*server)->port(), "/metrics"), "connect failed");
}

TEST(MetricsServerTest, BadInput) {
  EXPECT_THAT(MetricsServer::Start("127.0.0.1", 0, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, "empty render callback"));
  auto first = MetricsServer::Start("127.0.0.1", 0, [] { return std::string(); });
  ASSERT_THAT(first, IsOk());
  EXPECT_THAT(MetricsServer::Start("127.0.0.1", (*first)->port(), [] { return std::string(); }),
              StatusIs(absl::StatusCode::kUnavailable, "cannot bind"));
}

}  // namespace
}  // namespace kvferry::test
