// Directory against real etcd (tests/etcd_process.h): publish, resolve and
// connect by name across processes, lease expiry after kill -9, a
// three-member etcd cluster losing its leader, etcd down entirely and back
// (with and without its data), name collisions, forged entries, bad data.
// Skipped when the etcd binary is absent.
#include "kvferry/directory.h"

#include <signal.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvferry/agent.h"
#include "src/directory/record.h"
#include "tests/child_process.h"
#include "tests/etcd_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

using ::testing::HasSubstr;

constexpr const char* kPeerBinary = KVFERRY_TEST_PEER;
constexpr absl::Duration kLong = absl::Seconds(60);

#define REQUIRE_ETCD(cluster)                                                       \
  do {                                                                              \
    if (!(cluster).available()) GTEST_SKIP() << "etcd is not installed (apt-get "   \
                                                "install etcd-server)";             \
    ASSERT_TRUE((cluster).ok()) << "etcd did not become healthy:\n"                 \
                                << (cluster).LogTail(0);                            \
  } while (0)

// A unique cluster name per test, so entries never leak between tests.
std::string ClusterName() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return absl::StrCat("t-", info->name(), "-", getpid());
}

DirectoryOptions Options(const EtcdCluster& etcd, absl::Duration ttl = absl::Seconds(10)) {
  DirectoryOptions o;
  o.endpoints = etcd.Endpoints();
  o.cluster = ClusterName();
  o.lease_ttl = ttl;
  return o;
}

AgentOptions AgentOpts(const std::string& name, const std::string& secret = "") {
  AgentOptions o;
  o.name = name;
  o.leak_policy = LeakPolicy::kAbort;
  o.peer_timeout = kPeerTimeout;  // no test here is about agent liveness
  o.shared_secret = secret;
  return o;
}

// An agent listening on loopback with one exported pool.
struct TestAgent {
  std::unique_ptr<Agent> agent;
  KvPool* pool = nullptr;
  uint16_t port = 0;
  static TestAgent Make(const std::string& name, const std::string& secret = "") {
    TestAgent t;
    t.agent = *Agent::Create(AgentOpts(name, secret));
    t.pool = *t.agent->CreatePool("kv", Layout(32));
    t.port = *t.agent->Listen("127.0.0.1", 0);
    return t;
  }
};

// Collects watch events from the callback, thread-safe.
class EventLog {
 public:
  Directory::WatchCallback Callback() {
    return [this](const DirectoryEvent& e) {
      std::lock_guard<std::mutex> l(mu_);
      events_.push_back(e);
    };
  }
  bool Saw(DirectoryEvent::Type type, const std::string& name) {
    std::lock_guard<std::mutex> l(mu_);
    for (const DirectoryEvent& e : events_) {
      if (e.type == type && e.name == name) return true;
    }
    return false;
  }
  // The type of the latest event for `name`, if any.
  std::optional<DirectoryEvent::Type> Last(const std::string& name) {
    std::lock_guard<std::mutex> l(mu_);
    for (auto it = events_.rbegin(); it != events_.rend(); ++it) {
      if (it->name == name) return it->type;
    }
    return std::nullopt;
  }
  std::string Dump() {
    std::lock_guard<std::mutex> l(mu_);
    std::string out;
    for (const DirectoryEvent& e : events_) {
      absl::StrAppend(&out, DirectoryEventTypeName(e.type), " ", e.name, " @", e.revision, "\n");
    }
    return out;
  }

 private:
  std::mutex mu_;
  std::vector<DirectoryEvent> events_;
};

bool Resolves(const Directory& d, const std::string& name) { return d.Resolve(name).ok(); }

// Follows, through etcd, the lease that keeps one published key alive: each
// Sample() reads the whole seconds it has left, and a rise is a renewal by
// the publisher's keepalive (every ttl / 3). The lease followed is the one
// the key had at the first sample, so a lease that lapsed and was replaced
// counts as a lapse, not a renewal.
class LeaseWatch {
 public:
  LeaseWatch(const EtcdCluster& etcd, std::string key) : etcd_(&etcd), key_(std::move(key)) {}
  // False (see why()) once the lease lapsed or the key has none.
  bool Sample() {
    if (!lease_) lease_ = etcd_->LeaseOf(key_);
    if (!lease_) {
      why_ = "no lease behind " + key_;
      return false;
    }
    std::optional<int64_t> left = etcd_->LeaseSecondsLeft(*lease_);
    if (!left) return true;  // no member answered this time: nothing learned
    if (*left <= 0) {
      why_ = absl::StrCat("lease ", *lease_, " of ", key_, " lapsed after ", renewals_,
                          " renewals");
      return false;
    }
    if (last_ >= 0 && *left > last_) ++renewals_;
    last_ = *left;
    return true;
  }
  int renewals() const { return renewals_; }
  const std::string& why() const { return why_; }

 private:
  const EtcdCluster* etcd_;
  std::string key_;
  std::optional<std::string> lease_;
  int64_t last_ = -1;
  int renewals_ = 0;
  std::string why_;
};

// Writes (a write) of 8 blocks from `from` into peer `to`, verified there by
// reading back... the simplest proof that a connection still moves data.
absl::Status MoveBlocks(TestAgent& from, const std::string& to, uint64_t seed) {
  absl::StatusOr<BlockSet> local = from.pool->Lease(8);
  if (!local.ok()) return local.status();
  std::vector<uint32_t> remote;
  for (uint32_t j = 0; j < 8; ++j) remote.push_back(j);
  for (size_t j = 0; j < 8; ++j) FillBlock(*local, j, seed, remote[j]);
  absl::StatusOr<Transfer> t = from.agent->PostTransfer(
      {.op = TransferOp::kWrite, .peer = to, .local = &*local, .remote_blocks = remote});
  if (!t.ok()) return t.status();
  return t->Wait(absl::Seconds(30));
}

// --- Without etcd ----------------------------------------------------------

TEST(DirectoryOptionsTest, RefusesBadOptions) {
  DirectoryOptions o;
  o.endpoints = {"127.0.0.1:2379"};
  o.cluster = "a/b";
  EXPECT_THAT(Directory::Create(o), StatusIs(absl::StatusCode::kInvalidArgument, "cluster"));
  o.cluster = "ok";
  o.endpoints = {"https://127.0.0.1:2379"};
  EXPECT_THAT(Directory::Create(o), StatusIs(absl::StatusCode::kInvalidArgument, "https"));
  o.endpoints = {"127.0.0.1"};
  EXPECT_THAT(Directory::Create(o), StatusIs(absl::StatusCode::kInvalidArgument, "host:port"));
  o.endpoints = {"127.0.0.1:2379"};
  o.lease_ttl = absl::Milliseconds(10);
  EXPECT_THAT(Directory::Create(o), StatusIs(absl::StatusCode::kInvalidArgument, "lease_ttl"));
  o.lease_ttl = absl::Seconds(5);
  EXPECT_THAT(Directory::Create(o), IsOk());
  EXPECT_EQ((*Directory::Create(o))->KeyOf("x"), "/kvferry/ok/agents/x");
}

TEST(DirectoryOptionsTest, EndpointsFromEnvironment) {
  DirectoryOptions o;
  unsetenv("KVFERRY_ETCD_ENDPOINTS");
  EXPECT_THAT(Directory::Create(o),
              StatusIs(absl::StatusCode::kInvalidArgument, "KVFERRY_ETCD_ENDPOINTS"));
  setenv("KVFERRY_ETCD_ENDPOINTS", "127.0.0.1:1, http://127.0.0.1:2", 1);
  auto d = Directory::Create(o);
  unsetenv("KVFERRY_ETCD_ENDPOINTS");
  ASSERT_THAT(d, IsOk());
  EXPECT_EQ((*d)->options().endpoints.size(), 2u);
}

TEST(DirectoryOptionsTest, NoEtcdIsUnavailableNamingEndpoints) {
  DirectoryOptions o;
  const int port = FreeLoopbackPort();
  o.endpoints = {absl::StrCat("127.0.0.1:", port)};
  o.retry_deadline = absl::Milliseconds(300);
  auto d = *Directory::Create(o);
  EXPECT_THAT(d->Resolve("x"), StatusIs(absl::StatusCode::kUnavailable,
                                        absl::StrCat("http://127.0.0.1:", port)));
  auto agent = *Agent::Create(AgentOpts("nobody"));
  EXPECT_THAT(d->Publish(*agent, "127.0.0.1", 1),
              StatusIs(absl::StatusCode::kUnavailable, absl::StrCat("127.0.0.1:", port)));
  EXPECT_THAT(d->Publish(*agent, "0.0.0.0", 1),
              StatusIs(absl::StatusCode::kInvalidArgument, "not an address peers"));
}

TEST(DirectoryRecordTest, RoundTripAndValidation) {
  AgentRecord r{.name = "a", .address = "10.0.0.1", .port = 7, .incarnation = 42,
                .role = "decode", .pools = {{"kv", Layout(8)}}};
  auto back = internal::DecodeRecord("/k/a", "a", internal::EncodeRecord(r));
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(back->address, "10.0.0.1");
  EXPECT_EQ(back->incarnation, 42u);
  EXPECT_EQ(back->pools, r.pools);
  EXPECT_THAT(internal::DecodeRecord("/k/b", "b", internal::EncodeRecord(r)),
              StatusIs(absl::StatusCode::kDataLoss, "names the agent 'a'"));
}

// Random mutations of a valid value: every outcome is a value or kDataLoss.
TEST(DirectoryRecordTest, MutatedValuesNeverCrash) {
  AgentRecord r{.name = "a", .address = "10.0.0.1", .port = 7, .incarnation = 42,
                .role = "decode", .pools = {{"kv", Layout(8)}, {"kv2", Layout(16)}}};
  const std::string valid = internal::EncodeRecord(r);
  uint64_t state = 0x9e3779b97f4a7c15ull;
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  int decoded = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string v = valid;
    const int edits = 1 + static_cast<int>(next() % 4);
    for (int k = 0; k < edits; ++k) {
      const size_t at = next() % v.size();
      switch (next() % 4) {
        case 0: v[at] = static_cast<char>(next()); break;
        case 1: v.erase(at, 1 + next() % 8); break;
        case 2: v.insert(at, std::string(1 + next() % 8, "{}[]\":,0-9e"[next() % 12])); break;
        default: v.resize(at); break;
      }
      if (v.empty()) v = "x";
    }
    auto out = internal::DecodeRecord("/k/a", "a", v);
    if (out.ok()) {
      ++decoded;
      EXPECT_THAT(out->pools.size(), ::testing::Le(internal::kMaxRecordPools));
    } else {
      EXPECT_EQ(out.status().code(), absl::StatusCode::kDataLoss) << out.status();
    }
  }
  std::printf("%d of 20000 mutated values still decoded\n", decoded);
}

// A server on an etcd endpoint that is not etcd: non-JSON, wrong shapes,
// oversized answers, silence. Clear errors, bounded waits.
TEST(DirectoryOptionsTest, BadAnswersFromAnEndpoint) {
  httplib::Server server;
  std::atomic<int> mode{0};
  server.Post(R"(/v3/.*)", [&mode](const httplib::Request&, httplib::Response& res) {
    switch (mode.load()) {
      case 0: res.set_content("<html>not etcd</html>", "text/html"); break;
      case 1: res.set_content(R"({"kvs":[{"key":"!!!","value":"@@@"}]})", "application/json"); break;
      case 2: res.set_content(std::string(17 << 20, ' '), "application/json"); break;
      case 3: res.set_content(R"({"kvs":"nope","header":{"revision":[]}})", "application/json"); break;
      case 4: res.status = 500; res.set_content("\x01\x02 boom", "text/plain"); break;
      default: absl::SleepFor(absl::Seconds(4)); break;
    }
  });
  const int port = server.bind_to_any_port("127.0.0.1");
  ASSERT_GT(port, 0);
  std::thread serving([&] { server.listen_after_bind(); });
  ASSERT_TRUE(WaitFor([&] { return server.is_running(); }));
  DirectoryOptions o;
  o.endpoints = {absl::StrCat("127.0.0.1:", port)};
  o.request_timeout = absl::Seconds(1);
  o.retry_deadline = absl::Milliseconds(500);
  auto d = *Directory::Create(o);
  mode = 0;
  EXPECT_THAT(d->Resolve("a"), StatusIs(absl::StatusCode::kDataLoss, "not a JSON object"));
  mode = 1;
  EXPECT_THAT(d->Resolve("a"), StatusIs(absl::StatusCode::kDataLoss, "not base64"));
  mode = 2;
  EXPECT_THAT(d->Resolve("a"), StatusIs(absl::StatusCode::kDataLoss, "answer over"));
  mode = 3;
  EXPECT_THAT(d->Resolve("a"), StatusIs(absl::StatusCode::kDataLoss, "kv list"));
  EXPECT_THAT(d->List(), StatusIs(absl::StatusCode::kDataLoss, ""));
  mode = 4;
  auto r = d->Resolve("a");
  EXPECT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("HTTP 500"));
  EXPECT_THAT(r.status().message(), HasSubstr("\\x01"));
  mode = 5;
  const absl::Time start = absl::Now();
  EXPECT_THAT(d->Resolve("a"), StatusIs(absl::StatusCode::kUnavailable, "no answer"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  server.stop();
  serving.join();
}

// --- Against etcd ----------------------------------------------------------

TEST(DirectoryTest, PublishResolveConnectAndCleanShutdown) {
  EtcdCluster etcd;
  REQUIRE_ETCD(etcd);
  TestAgent alice = TestAgent::Make("alice");
  TestAgent bob = TestAgent::Make("bob");
  auto da = *Directory::Create(Options(etcd));
  auto db = *Directory::Create(Options(etcd));
  ASSERT_THAT(da->Publish(*alice.agent, "127.0.0.1", alice.port, "prefill"), IsOk());
  ASSERT_THAT(db->Publish(*bob.agent, "127.0.0.1", bob.port, "decode"), IsOk());

  auto record = db->Resolve("alice");
  ASSERT_THAT(record, IsOk());
  EXPECT_EQ(record->port, alice.port);
  EXPECT_EQ(record->role, "prefill");
  EXPECT_EQ(record->incarnation, alice.agent->incarnation());
  ASSERT_EQ(record->pools.size(), 1u);
  EXPECT_EQ(record->pools[0].name, "kv");
  EXPECT_EQ(record->pools[0].layout, Layout(32));
  auto all = da->List();
  ASSERT_THAT(all, IsOk());
  EXPECT_EQ(all->size(), 2u);

  auto peer = db->Connect(*bob.agent, "alice");
  ASSERT_THAT(peer, IsOk());
  EXPECT_EQ(peer->incarnation, alice.agent->incarnation());
  EXPECT_THAT(MoveBlocks(bob, "alice", 5), IsOk());
  EXPECT_THAT(db->Resolve("carol"), StatusIs(absl::StatusCode::kNotFound, "no agent 'carol'"));

  // A clean shutdown deletes the key at once: no waiting for the TTL.
  da.reset();
  EXPECT_THAT(db->Resolve("alice"), StatusIs(absl::StatusCode::kNotFound, "alice"));
  ASSERT_THAT(db->Unpublish("bob"), IsOk());
  EXPECT_THAT(db->Resolve("bob"), StatusIs(absl::StatusCode::kNotFound, "bob"));
  EXPECT_THAT(db->Unpublish("bob"), StatusIs(absl::StatusCode::kNotFound, "not published"));
}

TEST(DirectoryTest, SecondLiveAgentWithTheSameNameIsRefused) {
  EtcdCluster etcd;
  REQUIRE_ETCD(etcd);
  TestAgent first = TestAgent::Make("same");
  TestAgent second = TestAgent::Make("same");
  auto d1 = *Directory::Create(Options(etcd));
  auto d2 = *Directory::Create(Options(etcd));
  ASSERT_THAT(d1->Publish(*first.agent, "127.0.0.1", first.port), IsOk());
  absl::Status refused = d2->Publish(*second.agent, "127.0.0.1", second.port);
  EXPECT_THAT(refused, StatusIs(absl::StatusCode::kAlreadyExists, "is taken"));
  EXPECT_THAT(refused.message(), HasSubstr(absl::StrCat(first.port)));
  // Not overwritten.
  EXPECT_EQ(d2->Resolve("same")->port, first.port);
  // Once the first is gone, the name is free.
  d1.reset();
  EXPECT_THAT(d2->Publish(*second.agent, "127.0.0.1", second.port), IsOk());
  EXPECT_EQ(d2->Resolve("same")->port, second.port);
  // Publishing again from the owner updates its entry (e.g. a new pool).
  ASSERT_THAT(second.agent->CreatePool("kv2", Layout(16)), IsOk());
  ASSERT_THAT(d2->Publish(*second.agent, "127.0.0.1", second.port), IsOk());
  EXPECT_EQ(d2->Resolve("same")->pools.size(), 2u);
}

// etcd is a phone book, not a trust anchor: an entry that points at an agent
// with another secret, or at an agent with another name, fails the handshake.
TEST(DirectoryTest, ForgedEntriesFailAuthentication) {
  EtcdCluster etcd;
  REQUIRE_ETCD(etcd);
  TestAgent client = TestAgent::Make("client", "secret-1");
  TestAgent carol = TestAgent::Make("carol", "secret-1");
  TestAgent mallory = TestAgent::Make("bob", "other-secret");
  auto d = *Directory::Create(Options(etcd));
  auto forge = [&](const std::string& name, uint16_t port) {
    AgentRecord r{.name = name, .address = "127.0.0.1", .port = port, .incarnation = 1};
    return etcd.PutRaw(d->KeyOf(name), internal::EncodeRecord(r));
  };
  // "bob" at an agent that calls itself bob but does not know the secret.
  ASSERT_TRUE(forge("bob", mallory.port));
  EXPECT_THAT(d->Connect(*client.agent, "bob"),
              StatusIs(absl::StatusCode::kUnauthenticated, "shared secret mismatch"));
  // "dave" at carol, who knows the secret but is not dave.
  ASSERT_TRUE(forge("dave", carol.port));
  auto wrong = d->Connect(*client.agent, "dave");
  EXPECT_THAT(wrong, StatusIs(absl::StatusCode::kPermissionDenied, "authenticated as 'carol'"));
  EXPECT_THAT(wrong.status().message(), HasSubstr("stale or forged"));
  // Nothing stays connected from either attempt.
  EXPECT_TRUE(WaitFor([&] { return client.agent->ListPeers().empty(); }, kLong));
  // The real carol, by her own name, is fine.
  ASSERT_TRUE(forge("carol", carol.port));
  EXPECT_THAT(d->Connect(*client.agent, "carol"), IsOk());
}

TEST(DirectoryTest, BadDataIsAClearErrorNeverACrash) {
  EtcdCluster etcd;
  REQUIRE_ETCD(etcd);
  TestAgent good = TestAgent::Make("good");
  // Declared before the watching Directory, so it outlives the watch thread.
  EventLog log;
  auto d = *Directory::Create(Options(etcd));
  ASSERT_THAT(d->Watch(log.Callback()), IsOk());
  ASSERT_THAT(d->Publish(*good.agent, "127.0.0.1", good.port), IsOk());
  AgentRecord valid{.name = "x", .address = "127.0.0.1", .port = 9, .incarnation = 1};
  std::string v = internal::EncodeRecord(valid);
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = v;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  const std::map<std::string, std::pair<std::string, std::string>> cases = {
      {"garbage", {"\x01\xff not json {{", "not a valid agent entry"}},
      {"array", {"[1,2,3]", "not a JSON object"}},
      {"version", {with("\"kvferry_directory\":1", "\"kvferry_directory\":99"), "version 99"}},
      {"noversion", {"{\"name\":\"noversion\"}", "no kvferry_directory version"}},
      {"huge", {std::string(1 << 20, 'x'), "exceeds"}},
      {"port", {with("\"port\":9", "\"port\":70000"), "port"}},
      {"porttype", {with("\"port\":9", "\"port\":\"9\""), "port"}},
      {"address", {with("127.0.0.1", "not-an-ip"), "not an IP literal"}},
      {"layout", {with("\"pools\":[]",
                       "\"pools\":[{\"name\":\"kv\",\"layout\":{\"num_layers\":0}}]"),
                  "not a valid agent entry"}},
      {"deep", {std::string(60000, '['), "not a valid agent entry"}},
  };
  for (const auto& [name, value_and_error] : cases) {
    std::string value = value_and_error.first;
    // A well-formed value must name the key's agent to be otherwise valid.
    if (value.find("\"name\":\"x\"") != std::string::npos) {
      value.replace(value.find("\"name\":\"x\""), 10, absl::StrCat("\"name\":\"", name, "\""));
    }
    ASSERT_TRUE(etcd.PutRaw(d->KeyOf(name), value)) << name;
    auto r = d->Resolve(name);
    EXPECT_THAT(r, StatusIs(absl::StatusCode::kDataLoss, value_and_error.second)) << name;
    EXPECT_THAT(r.status().message(), HasSubstr(d->KeyOf(name))) << name;
    EXPECT_THAT(d->Connect(*good.agent, name), StatusIs(absl::StatusCode::kDataLoss, name));
  }
  // Another agent's value under this name.
  ASSERT_TRUE(etcd.PutRaw(d->KeyOf("imposter"), v));
  EXPECT_THAT(d->Resolve("imposter"),
              StatusIs(absl::StatusCode::kDataLoss, "names the agent 'x'"));
  // A bad name never reaches etcd.
  EXPECT_THAT(d->Resolve("a/b"), StatusIs(absl::StatusCode::kInvalidArgument, "agent name"));
  EXPECT_THAT(d->Resolve(""), StatusIs(absl::StatusCode::kInvalidArgument, "agent name"));
  // List and the watch skip what they cannot read and keep the rest.
  auto all = d->List();
  ASSERT_THAT(all, IsOk());
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ((*all)[0].name, "good");
  ASSERT_TRUE(etcd.PutRaw(d->KeyOf("late"), internal::EncodeRecord(
                                                {.name = "late", .address = "127.0.0.1",
                                                 .port = 10, .incarnation = 3})));
  EXPECT_TRUE(WaitFor([&] { return log.Saw(DirectoryEvent::Type::kJoined, "late"); }, kLong))
      << log.Dump();
  EXPECT_TRUE(log.Saw(DirectoryEvent::Type::kJoined, "good"));
  EXPECT_FALSE(log.Saw(DirectoryEvent::Type::kJoined, "garbage"));
}

// Agents in separate processes find each other by name only.
TEST(DirectoryProcessTest, AgentsFindEachOtherByName) {
  EtcdCluster etcd;
  REQUIRE_ETCD(etcd);
  const std::string endpoints = absl::StrJoin(etcd.Endpoints(), ",");
  const std::string cluster = ClusterName();
  ChildProcess prefill({kPeerBinary, "--role=prefill-serve", "--name=prefill-a", "--seed=7",
                        "--etcd=" + endpoints, "--cluster=" + cluster});
  ASSERT_EQ(prefill.ReadUntil("PUBLISHED", kLong).value_or("timeout"), "PUBLISHED");
  ChildProcess decode({kPeerBinary, "--role=decode-by-name", "--name=decode-b", "--seed=7",
                       "--peer-name=prefill-a", "--etcd=" + endpoints, "--cluster=" + cluster});
  EXPECT_EQ(decode.ReadUntil("READ", kLong).value_or("timeout"), "READ OK prefill-a");

  // This process, by name too, to both.
  DirectoryOptions o = Options(etcd);
  o.cluster = cluster;
  auto d = *Directory::Create(o);
  auto self = *Agent::Create(AgentOpts("tester"));
  KvPool* pool = *self->CreatePool("kv", Layout(32));
  auto peer = d->Connect(*self, "prefill-a");
  ASSERT_THAT(peer, IsOk());
  BlockSet local = *pool->Lease(32);
  std::vector<uint32_t> remote(32);
  for (uint32_t i = 0; i < 32; ++i) remote[i] = i;
  auto t = self->PostTransfer(
      {.op = TransferOp::kRead, .peer = "prefill-a", .local = &local, .remote_blocks = remote});
  ASSERT_THAT(t, IsOk());
  ASSERT_THAT(t->Wait(absl::Seconds(30)), IsOk());
  for (size_t i = 0; i < 32; ++i) {
    EXPECT_EQ(BlockChecksum(local, i), ExpectedChecksum(Layout(32), 7, remote[i])) << i;
  }
  EXPECT_THAT(d->Connect(*self, "decode-b"), IsOk());
  auto listed = d->List();
  ASSERT_THAT(listed, IsOk());
  std::set<std::string> names;
  for (const AgentRecord& r : *listed) names.insert(r.name + "/" + r.role);
  EXPECT_EQ(names, (std::set<std::string>{"decode-b/decode-by-name", "prefill-a/prefill-serve"}));
  prefill.CloseStdin();
  decode.CloseStdin();
  EXPECT_EQ(prefill.Wait(), 0);
  EXPECT_EQ(decode.Wait(), 0);
  // Both exited cleanly: their keys went with them.
  EXPECT_THAT(d->Resolve("prefill-a"), StatusIs(absl::StatusCode::kNotFound, "prefill-a"));
  EXPECT_THAT(d->Resolve("decode-b"), StatusIs(absl::StatusCode::kNotFound, "decode-b"));
}

// kill -9 of an agent: its key is gone within the lease TTL, and a watcher
// sees it leave.
TEST(DirectoryProcessTest, KilledAgentLeavesWithinTheTtl) {
  EtcdCluster etcd;
  REQUIRE_ETCD(etcd);
  const std::string cluster = ClusterName();
  // Short enough that the expiry below is quick, long enough that a
  // keepalive (every 2 s) may be late by 4 s on a busy machine.
  constexpr int kTtlSeconds = 6;
  ChildProcess child({kPeerBinary, "--role=prefill-serve", "--name=doomed",
                      "--etcd=" + absl::StrJoin(etcd.Endpoints(), ","), "--cluster=" + cluster,
                      absl::StrCat("--ttl=", kTtlSeconds)});
  ASSERT_EQ(child.ReadUntil("PUBLISHED", kLong).value_or("timeout"), "PUBLISHED");
  DirectoryOptions o = Options(etcd);
  o.cluster = cluster;
  // Declared before the watching Directory, so it outlives the watch thread.
  EventLog log;
  auto d = *Directory::Create(o);
  ASSERT_THAT(d->Watch(log.Callback()), IsOk());
  ASSERT_TRUE(WaitFor([&] { return log.Saw(DirectoryEvent::Type::kJoined, "doomed"); }, kLong));
  // Alive for longer than its TTL: the keepalive works. The entry resolves
  // at every look, its lease never lapses, and etcd sees it renewed at least
  // twice; the loop waits for those (and the TTL to pass), up to kLong.
  LeaseWatch lease(etcd, d->KeyOf("doomed"));
  const absl::Time alive_since = absl::Now();
  const absl::Time give_up = alive_since + kLong;
  while (lease.renewals() < 2 || absl::Now() - alive_since <= absl::Seconds(kTtlSeconds)) {
    ASSERT_TRUE(Resolves(*d, "doomed"));
    ASSERT_TRUE(lease.Sample()) << lease.why();
    ASSERT_LT(absl::Now(), give_up) << "renewed " << lease.renewals() << " times";
    absl::SleepFor(absl::Milliseconds(250));
  }
  child.Kill(SIGKILL);
  child.Wait();
  const absl::Time killed = absl::Now();
  ASSERT_TRUE(WaitFor([&] { return !Resolves(*d, "doomed"); }, kLong));
  const absl::Duration gone_after = absl::Now() - killed;
  ASSERT_TRUE(WaitFor([&] { return log.Saw(DirectoryEvent::Type::kLeft, "doomed"); }, kLong))
      << log.Dump();
  // Within the TTL, plus etcd's expiry sweep and a busy machine's slack.
  EXPECT_LT(gone_after, absl::Seconds(kTtlSeconds + 5));
  std::printf("killed agent's key gone %s after kill -9 (TTL %ds)\n",
              absl::FormatDuration(gone_after).c_str(), kTtlSeconds);
  // With a callback, nothing piles up in the polled queue.
  EXPECT_TRUE(d->PollEvents().empty());
}

// Three etcd members; the leader is killed while agents register, resolve
// and watch. Nothing is lost; clients move to a live member.
TEST(DirectoryClusterTest, LeaderKilledWhileAgentsRegisterResolveAndWatch) {
  EtcdCluster etcd(3);
  REQUIRE_ETCD(etcd);
  int leader = -1;
  ASSERT_TRUE(WaitFor([&] { return (leader = etcd.Leader()) >= 0; }, kLong));
  // The leader first in every client's list: the member they use is the one
  // that dies.
  // Leases of 10 s, renewed every 10/3 s: a keepalive may be late by more
  // than 6 s (an election on a busy machine) before an entry lapses.
  DirectoryOptions o = Options(etcd, absl::Seconds(10));
  o.endpoints.clear();
  for (int i = 0; i < 3; ++i) o.endpoints.push_back(etcd.Endpoint((leader + i) % 3));
  o.retry_deadline = absl::Seconds(20);  // across an election on a busy machine
  // Declared before the watching Directory, so it outlives the watch thread.
  EventLog log;
  auto watcher = *Directory::Create(o);
  ASSERT_THAT(watcher->Watch(log.Callback()), IsOk());

  constexpr int kAgents = 6;
  std::vector<TestAgent> agents;
  std::vector<std::unique_ptr<Directory>> dirs;
  for (int i = 0; i < kAgents; ++i) {
    agents.push_back(TestAgent::Make(absl::StrCat("agent-", i)));
    dirs.push_back(*Directory::Create(o));
  }
  TestAgent client = TestAgent::Make("client");
  for (int i = 0; i < kAgents / 2; ++i) {
    ASSERT_THAT(dirs[i]->Publish(*agents[i].agent, "127.0.0.1", agents[i].port), IsOk());
  }
  ASSERT_TRUE(WaitFor([&] { return log.Saw(DirectoryEvent::Type::kJoined, "agent-2"); }, kLong));

  // Kill the leader while a thread keeps resolving.
  std::atomic<bool> done{false};
  std::atomic<int> resolved{0};
  std::thread resolver([&] {
    while (!done) {
      if (watcher->Resolve("agent-0").ok()) ++resolved;
    }
  });
  etcd.Kill(leader);
  for (int i = kAgents / 2; i < kAgents; ++i) {
    ASSERT_THAT(dirs[i]->Publish(*agents[i].agent, "127.0.0.1", agents[i].port), IsOk())
        << "publish agent-" << i << " after the leader died";
  }
  for (int i = 0; i < kAgents; ++i) {
    auto peer = watcher->Connect(*client.agent, absl::StrCat("agent-", i));
    EXPECT_THAT(peer, IsOk()) << i;
  }
  const int resolved_before = resolved;
  EXPECT_TRUE(WaitFor([&] { return resolved > resolved_before + 5; }, kLong));
  done = true;
  resolver.join();
  // The watch moved too: every agent seen joining, none leaving.
  for (int i = 0; i < kAgents; ++i) {
    EXPECT_TRUE(WaitFor([&] {
      return log.Saw(DirectoryEvent::Type::kJoined, absl::StrCat("agent-", i));
    }, kLong)) << i << "\n" << log.Dump();
  }
  // The leases are renewed through the surviving members: etcd sees every
  // agent's lease renewed three times after the leader died, none lapses,
  // and every entry resolves at every look (waited for, up to kLong).
  std::vector<LeaseWatch> leases;
  for (int i = 0; i < kAgents; ++i) {
    leases.emplace_back(etcd, watcher->KeyOf(absl::StrCat("agent-", i)));
  }
  auto renewals = [&] {
    std::string out;
    for (const LeaseWatch& l : leases) absl::StrAppend(&out, l.renewals(), " ");
    return out;
  };
  const absl::Time give_up = absl::Now() + kLong;
  while (std::any_of(leases.begin(), leases.end(),
                     [](const LeaseWatch& l) { return l.renewals() < 3; })) {
    for (int i = 0; i < kAgents; ++i) {
      ASSERT_TRUE(Resolves(*watcher, absl::StrCat("agent-", i))) << i;
      ASSERT_TRUE(leases[i].Sample()) << leases[i].why();
    }
    ASSERT_LT(absl::Now(), give_up) << "renewals per agent: " << renewals();
    absl::SleepFor(absl::Milliseconds(250));
  }
  EXPECT_FALSE(log.Saw(DirectoryEvent::Type::kLeft, "agent-0")) << log.Dump();
  for (auto& d : dirs) {
    for (const auto& [name, status] : d->Publications()) EXPECT_THAT(status, IsOk()) << name;
  }
  // And leaving still works (and is seen) with two members.
  dirs[0].reset();
  EXPECT_TRUE(WaitFor([&] { return log.Saw(DirectoryEvent::Type::kLeft, "agent-0"); }, kLong));
  std::printf("resolved agent-0 %d times across the leader's death\n", resolved.load());
}

// etcd down entirely: established peers keep transferring, new resolutions
// fail with kUnavailable naming the endpoints; when etcd comes back (with its
// data, then without it) the entries are there again.
TEST(DirectoryClusterTest, EtcdDownAndBack) {
  EtcdCluster etcd;
  REQUIRE_ETCD(etcd);
  DirectoryOptions o = Options(etcd, absl::Seconds(3));
  o.retry_deadline = absl::Seconds(1);
  TestAgent a = TestAgent::Make("a");
  TestAgent b = TestAgent::Make("b");
  auto da = *Directory::Create(o);
  auto db = *Directory::Create(o);
  // Declared before the watching Directory, so it outlives the watch thread.
  EventLog log;
  auto watcher = *Directory::Create(o);
  ASSERT_THAT(watcher->Watch(log.Callback()), IsOk());
  ASSERT_THAT(da->Publish(*a.agent, "127.0.0.1", a.port), IsOk());
  ASSERT_THAT(db->Publish(*b.agent, "127.0.0.1", b.port), IsOk());
  ASSERT_THAT(da->Connect(*a.agent, "b"), IsOk());
  TestAgent e = TestAgent::Make("e");
  auto de = *Directory::Create(o);
  ASSERT_THAT(de->Publish(*e.agent, "127.0.0.1", e.port), IsOk());
  ASSERT_TRUE(WaitFor([&] { return log.Saw(DirectoryEvent::Type::kJoined, "b"); }, kLong));

  etcd.Kill(0);
  // A directory destroyed meanwhile does not hang on etcd (its entry
  // expires with the lease instead).
  const absl::Time destroying = absl::Now();
  de.reset();
  EXPECT_LT(absl::Now() - destroying, absl::Seconds(15));
  // Peers already connected do not need etcd.
  for (uint64_t seed = 1; seed <= 5; ++seed) ASSERT_THAT(MoveBlocks(a, "b", seed), IsOk());
  auto r = da->Resolve("b");
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kUnavailable, etcd.Endpoint(0)));
  std::printf("resolve with etcd down: %s\n", r.status().ToString().c_str());
  TestAgent c = TestAgent::Make("c");
  EXPECT_THAT(da->Connect(*c.agent, "b"), StatusIs(absl::StatusCode::kUnavailable, "etcd"));
  // The keepalive notices.
  EXPECT_TRUE(WaitFor([&] { return !da->Publications()[0].second.ok(); }, kLong));
  EXPECT_THAT(da->Publications()[0].second, StatusIs(absl::StatusCode::kUnavailable, "lease"));
  // Longer than the TTL with etcd down.
  absl::SleepFor(absl::Seconds(4));
  ASSERT_THAT(MoveBlocks(a, "b", 9), IsOk());

  // Back with its data: the leases live again (etcd renews them on a new
  // leader), the entries resolve, the keepalive reports OK.
  etcd.Restart(0);
  ASSERT_TRUE(etcd.WaitHealthy(kLong)) << etcd.LogTail(0);
  EXPECT_TRUE(WaitFor([&] { return Resolves(*da, "b") && Resolves(*da, "a"); }, kLong));
  EXPECT_TRUE(WaitFor([&] {
    return da->Publications()[0].second.ok() && db->Publications()[0].second.ok();
  }, kLong));
  EXPECT_THAT(da->Connect(*c.agent, "b"), IsOk());

  // Back without its data (a member rebuilt from scratch): the keepalive
  // finds its lease gone, grants a new one and publishes again; the watcher
  // sees the revision go back, lists again and reports what it finds: the
  // entries gone while etcd is empty (if it looks before they are back),
  // then back.
  etcd.Restart(0, /*wipe=*/true);
  ASSERT_TRUE(etcd.WaitHealthy(kLong)) << etcd.LogTail(0);
  EXPECT_TRUE(WaitFor([&] { return Resolves(*da, "a") && Resolves(*da, "b"); }, kLong))
      << etcd.LogTail(0);
  EXPECT_TRUE(WaitFor([&] {
    return watcher->WatchedAgents().size() == 2 &&
           log.Last("a") == DirectoryEvent::Type::kJoined &&
           log.Last("b") == DirectoryEvent::Type::kJoined;
  }, kLong)) << log.Dump();
  // The restored entries still expire with their owners.
  db.reset();
  EXPECT_TRUE(WaitFor([&] { return !Resolves(*da, "b"); }, kLong));
  EXPECT_TRUE(WaitFor([&] { return log.Saw(DirectoryEvent::Type::kLeft, "b"); }, kLong))
      << log.Dump();
}

// With etcd's authentication on, a directory with the right user works; a
// wrong password or none is a clear error.
TEST(DirectoryTest, EtcdAuthentication) {
  // Tokens expire after 2 idle seconds, so the directory must renew its own.
  EtcdCluster etcd(1, {"--auth-token-ttl", "2"});
  REQUIRE_ETCD(etcd);
  ASSERT_TRUE(etcd.Post(0, "/v3/auth/role/add", R"({"name":"root"})"));
  ASSERT_TRUE(etcd.Post(0, "/v3/auth/user/add", R"({"name":"root","password":"pw"})"));
  ASSERT_TRUE(etcd.Post(0, "/v3/auth/user/grant", R"({"user":"root","role":"root"})"));
  ASSERT_TRUE(etcd.Post(0, "/v3/auth/enable", "{}"));
  TestAgent a = TestAgent::Make("a");
  DirectoryOptions o = Options(etcd);
  o.username = "root";
  o.password = "pw";
  auto d = *Directory::Create(o);
  ASSERT_THAT(d->Publish(*a.agent, "127.0.0.1", a.port), IsOk());
  EXPECT_THAT(d->Resolve("a"), IsOk());
  ASSERT_THAT(d->Watch(), IsOk());
  EXPECT_TRUE(WaitFor([&] { return d->WatchedAgents().size() == 1; }, kLong));
  // A directory idle past the token's TTL authenticates again by itself.
  auto idle = *Directory::Create(o);
  ASSERT_THAT(idle->Resolve("a"), IsOk());
  const absl::Time idle_until = absl::Now() + absl::Seconds(4);
  while (absl::Now() < idle_until) absl::SleepFor(absl::Milliseconds(100));
  EXPECT_THAT(idle->Resolve("a"), IsOk());
  o.password = "wrong";
  EXPECT_THAT((*Directory::Create(o))->Resolve("a"),
              StatusIs(absl::StatusCode::kInvalidArgument, "authentication as 'root'"));
  o.username.clear();
  auto anonymous = (*Directory::Create(o))->Resolve("a");
  EXPECT_FALSE(anonymous.ok());
  std::printf("without credentials: %s\n", anonymous.status().ToString().c_str());
}

// The watch resumes from its revision: a second watch started at
// WatchRevision() + 1 of the first sees exactly what came after.
TEST(DirectoryTest, WatchResumesFromARevision) {
  EtcdCluster etcd;
  REQUIRE_ETCD(etcd);
  auto d = *Directory::Create(Options(etcd));
  ASSERT_THAT(d->Watch(), IsOk());
  TestAgent x = TestAgent::Make("x");
  auto dx = *Directory::Create(Options(etcd));
  ASSERT_THAT(dx->Publish(*x.agent, "127.0.0.1", x.port), IsOk());
  ASSERT_TRUE(WaitFor([&] { return d->WatchedAgents().size() == 1; }, kLong));
  const int64_t seen = d->WatchRevision();
  EXPECT_GT(seen, 0);
  d->Unwatch();
  dx.reset();  // leaves while nobody watches
  TestAgent y = TestAgent::Make("y");
  auto dy = *Directory::Create(Options(etcd));
  ASSERT_THAT(dy->Publish(*y.agent, "127.0.0.1", y.port), IsOk());
  (void)d->PollEvents();
  ASSERT_THAT(d->Watch(nullptr, seen + 1), IsOk());
  std::vector<DirectoryEvent> events;
  ASSERT_TRUE(WaitFor([&] {
    for (DirectoryEvent& e : d->PollEvents()) events.push_back(std::move(e));
    return events.size() >= 2;
  }, kLong));
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].type, DirectoryEvent::Type::kLeft);
  EXPECT_EQ(events[0].name, "x");
  EXPECT_EQ(events[1].type, DirectoryEvent::Type::kJoined);
  EXPECT_EQ(events[1].name, "y");
  EXPECT_GT(events[0].revision, seen);
  EXPECT_THAT(d->Watch(), StatusIs(absl::StatusCode::kFailedPrecondition, "already watching"));
}

// A revision that etcd compacted away cannot be resumed: the watch lists the
// entries again instead, and its view matches etcd.
TEST(DirectoryTest, WatchListsAgainAfterCompaction) {
  EtcdCluster etcd;
  REQUIRE_ETCD(etcd);
  auto d = *Directory::Create(Options(etcd));
  TestAgent x = TestAgent::Make("x");
  auto dx = *Directory::Create(Options(etcd));
  ASSERT_THAT(dx->Publish(*x.agent, "127.0.0.1", x.port), IsOk());
  const int64_t after_x = dx->Resolve("x")->mod_revision;
  TestAgent y = TestAgent::Make("y");
  auto dy = *Directory::Create(Options(etcd));
  ASSERT_THAT(dy->Publish(*y.agent, "127.0.0.1", y.port), IsOk());
  dx.reset();
  // Compact everything up to now.
  auto status = etcd.Post(0, "/v3/kv/range", R"({"key":"AA==","limit":1})");
  ASSERT_TRUE(status);
  const std::string revision =
      nlohmann::json::parse(*status)["header"]["revision"].get<std::string>();
  ASSERT_TRUE(etcd.Post(0, "/v3/kv/compaction", absl::StrCat(R"({"revision":")", revision,
                                                              R"(","physical":true})")));
  ASSERT_THAT(d->Watch(nullptr, after_x), IsOk());
  std::vector<DirectoryEvent> events;
  ASSERT_TRUE(WaitFor([&] {
    for (DirectoryEvent& e : d->PollEvents()) events.push_back(std::move(e));
    return !events.empty() && d->WatchRevision() > after_x;
  }, kLong));
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, DirectoryEvent::Type::kJoined);
  EXPECT_EQ(events[0].name, "y");
  auto view = d->WatchedAgents();
  ASSERT_EQ(view.size(), 1u);
  EXPECT_EQ(view[0].name, "y");
}

}  // namespace
}  // namespace kvferry::test
