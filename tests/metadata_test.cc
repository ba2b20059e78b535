// Agent::LocalMetadata and Agent::ConnectFromMetadata: metadata made by an
// agent in another process connects this one (the handshake still runs: a
// wrong secret is refused), and hostile bytes (every truncation, random
// garbage, wrong format or wire version, bad addresses, trailing bytes) are
// kInvalidArgument naming what is wrong, leaving no peer or connection.
#include <random>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "src/metadata.h"
#include "src/wire/message.h"
#include "tests/child_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<Agent> MakeAgent(const std::string& name, const std::string& secret = "") {
  AgentOptions o = TestAgentOptions(name, kTcp);
  o.peer_timeout = kPeerTimeout;
  o.shared_secret = secret;
  auto agent = Agent::Create(o);
  EXPECT_THAT(agent, IsOk());
  return agent.ok() ? *std::move(agent) : nullptr;
}

// Nothing of a refused attempt is left: no peer, no connection, no endpoint.
// (A refused connection closes within a progress pass or two: waited for.)
void ExpectNothingLeft(const Agent& agent) {
  EXPECT_TRUE(WaitFor([&] {
    const Stats s = agent.GetStats();
    return s.Live(ResourceKind::kConnection) == 0 && s.Live(ResourceKind::kEndpoint) == 0;
  })) << agent.GetStats().ToString();
  for (const PeerInfo& p : agent.ListPeers()) {
    EXPECT_NE(p.state, PeerState::kConnected) << p.name;
  }
}

TEST(MetadataTest, LocalMetadataSaysWhatAPeerNeeds) {
  auto agent = MakeAgent("meta");
  ASSERT_NE(agent, nullptr);
  EXPECT_THAT(agent->LocalMetadata(), StatusIs(absl::StatusCode::kFailedPrecondition,
                                               "does not listen"));
  auto port = agent->Listen("127.0.0.1", 0);
  ASSERT_THAT(port, IsOk());
  auto bytes = agent->LocalMetadata();
  ASSERT_THAT(bytes, IsOk());
  auto m = internal::ParseMetadata(*bytes);
  ASSERT_THAT(m, IsOk());
  EXPECT_EQ(m->name, "meta");
  EXPECT_EQ(m->incarnation, agent->incarnation());
  EXPECT_EQ(m->wire_version, internal::wire::kVersion);
  ASSERT_EQ(m->addresses.size(), 1u);
  EXPECT_EQ(m->addresses[0].first, "127.0.0.1");
  EXPECT_EQ(m->addresses[0].second, *port);
  // An advertised address replaces the bound one.
  auto advertised = agent->LocalMetadata("::1");
  ASSERT_THAT(advertised, IsOk());
  EXPECT_EQ(internal::ParseMetadata(*advertised)->addresses[0].first, "::1");
  EXPECT_THAT(agent->LocalMetadata("not-an-ip"),
              StatusIs(absl::StatusCode::kInvalidArgument, "not-an-ip"));
  EXPECT_THAT(agent->LocalMetadata("0.0.0.0"),
              StatusIs(absl::StatusCode::kInvalidArgument, "wildcard"));
  // Encoding what the parser accepted gives the same bytes.
  EXPECT_EQ(internal::EncodeMetadata(*m), *bytes);
}

TEST(MetadataTest, HostileBytesAreRefusedNamingWhatIsWrong) {
  auto listener = MakeAgent("target");
  ASSERT_NE(listener, nullptr);
  ASSERT_THAT(listener->Listen("127.0.0.1", 0), IsOk());
  const std::string good = *listener->LocalMetadata();
  auto agent = MakeAgent("client");
  ASSERT_NE(agent, nullptr);
  auto refused = [&](absl::string_view bytes, absl::string_view says) {
    auto got = agent->ConnectFromMetadata(bytes, absl::Seconds(5));
    EXPECT_THAT(got, StatusIs(absl::StatusCode::kInvalidArgument, std::string(says)))
        << absl::CHexEscape(bytes);
  };
  // Every truncation.
  for (size_t n = 0; n < good.size(); ++n) {
    refused(absl::string_view(good).substr(0, n), "truncated");
  }
  refused("", "the magic");
  refused("GET / HTTP/1.1\r\n\r\n", "not kvferry connection metadata");
  std::string bad = good;
  bad[4] = 9;
  refused(bad, "format 9");
  bad = good;
  bad[5] = static_cast<char>(internal::wire::kVersion + 1);
  refused(bad, absl::StrCat("wire version ", internal::wire::kVersion + 1));
  refused(good + "x", "1 bytes after its last field");
  auto make = [](std::vector<std::pair<std::string, uint16_t>> addresses,
                 std::string name = "target") {
    return internal::EncodeMetadata({.wire_version = internal::wire::kVersion,
                                     .name = std::move(name),
                                     .incarnation = 1,
                                     .addresses = std::move(addresses)});
  };
  refused(make({}), "lists 0 addresses");
  refused(make({{"127.0.0.1", 0}}), "port 0");
  refused(make({{"localhost", 80}}), "\"localhost\" is not an IP literal");
  refused(make({{"0.0.0.0", 80}}), "wildcard");
  refused(make({{"127.0.0.1", 80}}, ""), "names no agent");
  refused(make({{"127.0.0.1", 80}}, "client"), "names this agent");
  // Random garbage, and random bytes after a valid start: refused, never a crash.
  std::mt19937_64 rng(18);
  for (int i = 0; i < 2000; ++i) {
    std::string noise(rng() % 64, '\0');
    for (char& c : noise) c = static_cast<char>(rng());
    if (i % 2 == 1) noise = good.substr(0, 5 + rng() % (good.size() - 5)) + noise;
    auto got = agent->ConnectFromMetadata(noise, absl::Seconds(5));
    ASSERT_FALSE(got.ok());
    // A random port on 127.0.0.1 may even be reached; anything but a
    // connection is fine, and only a parse error may be kInvalidArgument.
  }
  ExpectNothingLeft(*agent);
  ExpectNothingLeft(*listener);
}

// The child prints its metadata; this agent connects from it and moves data.
TEST(MetadataProcessTest, ConnectsFromAnotherProcesssMetadata) {
  ChildProcess child({KVFERRY_TEST_PEER, "--role=prefill-serve", "--name=meta-peer",
                      "--tls=tcp", "--seed=9", "--metadata=1", "--secret=s3",
                      absl::StrCat("--peer_timeout=", absl::ToInt64Seconds(kPeerTimeout))});
  ASSERT_TRUE(child.started());
  ASSERT_NE(ParsePort(child.ReadUntil("PORT")), 0);
  auto line = child.ReadUntil("METADATA ");
  ASSERT_TRUE(line.has_value());
  ASSERT_EQ(line->rfind("METADATA ", 0), 0u) << *line;
  const std::string metadata = absl::HexStringToBytes(line->substr(9));
  auto m = internal::ParseMetadata(metadata);
  ASSERT_THAT(m, IsOk());

  // The handshake runs: the wrong secret is refused.
  auto wrong = MakeAgent("decode-wrong", "not-s3");
  ASSERT_NE(wrong, nullptr);
  EXPECT_THAT(wrong->ConnectFromMetadata(metadata),
              StatusIs(absl::StatusCode::kUnauthenticated, "shared secret mismatch"));
  ExpectNothingLeft(*wrong);

  auto agent = MakeAgent("decode", "s3");
  ASSERT_NE(agent, nullptr);
  KvPool* pool = *agent->CreatePool("kv", Layout(64));
  auto peer = agent->ConnectFromMetadata(metadata);
  ASSERT_THAT(peer, IsOk());
  EXPECT_EQ(peer->name, "meta-peer");
  EXPECT_EQ(peer->incarnation, m->incarnation);
  EXPECT_EQ(peer->state, PeerState::kConnected);
  BlockSet into = *pool->Lease(2);
  auto t = agent->PostTransfer({.op = TransferOp::kRead, .peer = peer->name, .local = &into,
                                .remote_blocks = {0, 1}});
  ASSERT_THAT(t, IsOk());
  EXPECT_THAT(t->Wait(absl::Seconds(60)), IsOk());
  // Connected already: as Connect, kAlreadyExists.
  EXPECT_THAT(agent->ConnectFromMetadata(metadata),
              StatusIs(absl::StatusCode::kAlreadyExists, ""));
}

}  // namespace
}  // namespace kvferry::test
