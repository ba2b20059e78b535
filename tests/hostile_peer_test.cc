// Hostile peers against a real listening agent. A raw TCP client
// (tests/hostile_client.h) sends garbage, truncated and bit-flipped handshake
// frames, oversized and foreign headers, pre-authentication messages, idle
// sockets by the thousand, wrong secrets and name takeovers. After each class
// of input the test asserts that the listener (this very process) is alive,
// that its counters are back at their baseline, that a well-behaved agent
// still connects and completes a verified WRITE, and that RSS is back near its
// start. A table of what was sent and what came back prints at the end.
//
// Each input goes on a fresh connection, and the client waits until the
// listener has closed it (no sleeps): the whole suite takes about 2 s in
// release and 4 s under ASan on two cores.
//
// Environment: KVFERRY_HOSTILE_SCALE (default 1) multiplies the input counts;
// KVFERRY_HOSTILE_SEED fixes the random inputs (default: a constant, so runs
// repeat); KVFERRY_HOSTILE_TRACE=1 logs each input that may reach UCX before
// it is sent; KVFERRY_HOSTILE_UCX=1 also runs the authenticated bit flips,
// which abort in UCX 1.13.1 (see AuthenticatedProofBitFlips).
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kvferry/agent.h"
#include "tests/hostile_client.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"

namespace kvferry {
namespace {

using testing::BlockChecksum;
using testing::ClientHandshake;
using testing::ExpectedChecksum;
using testing::FillBlock;
using testing::FrameHeader;
using testing::HostileClient;
using testing::IsOk;
using testing::ProofFrame;
using testing::WaitFor;
using ::testing::HasSubstr;
namespace wire = internal::wire;
using wire::MessageType;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

constexpr char kSecret[] = "hostile-peer-test-secret";
// RSS may grow this much over a class (allocator caches, UCX's lazily
// created state); sanitizer allocators keep a quarantine of freed memory.
constexpr int64_t kRssSlack = (kSanitized ? 512ll : 32ll) << 20;
constexpr absl::Duration kDeadline = absl::Seconds(30);

double Scale() {
  static const double scale = [] {
    const char* env = std::getenv("KVFERRY_HOSTILE_SCALE");
    return env == nullptr ? 1.0 : std::max(0.01, std::atof(env));
  }();
  return scale;
}
int Scaled(int n) { return std::max(1, static_cast<int>(n * Scale())); }

uint64_t BaseSeed() {
  if (const char* env = std::getenv("KVFERRY_HOSTILE_SEED")) return std::strtoull(env, nullptr, 0);
  return 0x6b7666657272;  // "kvferr"
}

// KVFERRY_HOSTILE_TRACE=1: each input that may reach UCX is logged before it
// is sent, so that an abort names it.
bool Trace() {
  static const bool trace = std::getenv("KVFERRY_HOSTILE_TRACE") != nullptr &&
                            std::string(std::getenv("KVFERRY_HOSTILE_TRACE")) == "1";
  return trace;
}

int64_t RssBytes() {
  std::ifstream in("/proc/self/statm");
  int64_t size = 0, resident = 0;
  in >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

void RaiseFdLimit(rlim_t wanted) {
  rlimit r = {};
  if (getrlimit(RLIMIT_NOFILE, &r) != 0 || r.rlim_cur >= wanted) return;
  r.rlim_cur = std::min(wanted, r.rlim_max);
  (void)setrlimit(RLIMIT_NOFILE, &r);
}

KvLayout Layout(uint32_t blocks) {
  // 4 layers, K and V, 4 KiB chunks: 32 KiB per block.
  return KvLayout{.num_layers = 4, .num_blocks = blocks, .tokens_per_block = 16,
                  .num_kv_heads = 2, .head_dim = 64, .element_bytes = 2};
}

// ---- The summary table ------------------------------------------------------

struct Row {
  std::string input_class;
  std::string transport;
  int inputs = 0;
  std::string outcome;
  double seconds = 0;
};

std::vector<Row>& Rows() {
  static auto* rows = new std::vector<Row>;
  return *rows;
}

class TableEnvironment : public ::testing::Environment {
 public:
  void TearDown() override {
    if (Rows().empty()) return;
    std::printf("\nhostile peer suite (scale %.2f, seed 0x%llx)\n", Scale(),
                static_cast<unsigned long long>(BaseSeed()));
    std::printf("%-44s %-5s %7s %7s  %s\n", "class", "tls", "inputs", "seconds", "outcome");
    for (const Row& r : Rows()) {
      std::printf("%-44s %-5s %7d %7.1f  %s\n", r.input_class.c_str(), r.transport.c_str(),
                  r.inputs, r.seconds, r.outcome.c_str());
    }
    std::fflush(stdout);
    Rows().clear();  // --gtest_repeat prints each round's own table
  }
};
[[maybe_unused]] ::testing::Environment* const kTable =
    ::testing::AddGlobalTestEnvironment(new TableEnvironment);

// What the server did with one connection: the messages it sent, in order
// ("REJECT(PERMISSION_DENIED)"), or "no reply"; always ends with the close.
class Tally {
 public:
  void Add(const std::string& outcome) { ++counts_[outcome]; }
  int count(const std::string& outcome) const {
    auto it = counts_.find(outcome);
    return it == counts_.end() ? 0 : it->second;
  }
  const std::map<std::string, int>& counts() const { return counts_; }
  std::string ToString() const {
    std::vector<std::string> parts;
    for (const auto& [what, n] : counts_) parts.push_back(absl::StrCat(what, " x", n));
    return absl::StrJoin(parts, ", ");
  }

 private:
  std::map<std::string, int> counts_;
};

std::string Describe(const std::vector<wire::Message>& got) {
  if (got.empty()) return "no reply";
  std::vector<std::string> parts;
  for (const wire::Message& m : got) {
    std::string part(wire::MessageTypeName(m.type));
    if (m.type == MessageType::kReject) {
      absl::StrAppend(&part, "(",
                      absl::StatusCodeToString(static_cast<absl::StatusCode>(m.code)), ")");
    }
    parts.push_back(std::move(part));
  }
  return absl::StrJoin(parts, "+");
}

std::string RandomBytes(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

struct Transport {
  const char* name;
  const char* tls;
};
void PrintTo(const Transport& t, std::ostream* os) { *os << t.name; }
constexpr Transport kTcp{"tcp", "tcp"};
constexpr Transport kShm{"shm", "posix,sysv,tcp"};

// ---- The fixture --------------------------------------------------------------

class HostilePeerTest : public ::testing::Test {
 protected:
  virtual Transport transport() const { return kTcp; }

  AgentOptions Options(const std::string& name, const std::string& secret = kSecret) const {
    AgentOptions o;
    o.name = name;
    o.leak_policy = LeakPolicy::kAbort;
    o.ucx_config = {{"TLS", transport().tls}};
    o.shared_secret = secret;
    return o;
  }

  void SetUp() override {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    rng_.seed(BaseSeed() ^ std::hash<std::string>()(
                               absl::StrCat(info->test_suite_name(), ".", info->name())));
    ASSERT_NO_FATAL_FAILURE(StartListener(Options("decode")));
  }

  void TearDown() override {
    listener_.reset();
    donor_.reset();
  }

  // (Re)creates the listener "decode" with a 64-block pool "kv", runs one
  // well-behaved round (so lazily created state is in the baseline), then
  // records the baseline counters and RSS.
  void StartListener(AgentOptions options) {
    listener_.reset();
    secret_ = options.shared_secret;
    auto listener = Agent::Create(std::move(options));
    ASSERT_THAT(listener, IsOk());
    listener_ = *std::move(listener);
    auto pool = listener_->CreatePool("kv", Layout(64));
    ASSERT_THAT(pool, IsOk());
    pool_ = *pool;
    auto port = listener_->Listen("127.0.0.1", 0);
    ASSERT_THAT(port, IsOk());
    port_ = *port;
    ASSERT_NO_FATAL_FAILURE(ExpectWellBehavedPeer());
    ASSERT_TRUE(WaitFor([&] { return Quiet(listener_->GetStats()); }, kDeadline))
        << listener_->ledger().Report();
    baseline_ = listener_->GetStats();
    rss_start_ = RssBytes();
  }

  static bool Quiet(const Stats& s) {
    return s.Live(ResourceKind::kConnection) == 0 && s.Live(ResourceKind::kPeer) == 0 &&
           s.Live(ResourceKind::kEndpoint) == 0 && s.Live(ResourceKind::kRemoteKey) == 0 &&
           s.Live(ResourceKind::kRequest) == 0 && s.Live(ResourceKind::kTransfer) == 0;
  }

  // A real agent's descriptor (worker address, pool "kv" with its rkey),
  // learned once per test from a donor agent that stays alive, renamed.
  wire::AgentDescriptor DonorDescriptor(const std::string& name) {
    if (!donor_) {
      auto donor = Agent::Create(Options("donor"));
      EXPECT_THAT(donor, IsOk());
      if (!donor.ok()) return {};
      donor_ = *std::move(donor);
      EXPECT_THAT(donor_->CreatePool("kv", Layout(64)), IsOk());
      auto captured = testing::CaptureDescriptor(*donor_, kSecret);
      EXPECT_THAT(captured, IsOk());
      if (captured.ok()) donor_descriptor_ = *std::move(captured);
      if (Trace()) {
        std::fprintf(stderr, "hostile_peer_test: donor worker address (%zu B) %s\n",
                     donor_descriptor_.worker_address.size(),
                     absl::BytesToHexString(donor_descriptor_.worker_address).c_str());
      }
    }
    wire::AgentDescriptor d = donor_descriptor_;
    d.name = name;
    return d;
  }

  // Writes 4 blocks from `from` into the listener's pool and checks them there.
  void WriteAndVerify(Agent& from, KvPool& from_pool, uint64_t seed) {
    const std::vector<uint32_t> remote = {
        static_cast<uint32_t>(seed % 64), static_cast<uint32_t>((seed + 13) % 64),
        static_cast<uint32_t>((seed + 29) % 64), static_cast<uint32_t>((seed + 47) % 64)};
    auto local = from_pool.Lease(static_cast<uint32_t>(remote.size()));
    ASSERT_THAT(local, IsOk());
    for (size_t i = 0; i < remote.size(); ++i) FillBlock(*local, i, seed, remote[i]);
    const std::string note = absl::StrCat("written by ", from.name(), " seed ", seed);
    auto t = from.PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &*local,
                                .remote_blocks = remote, .notification = note});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(kDeadline), IsOk());
    EXPECT_EQ(t->state(), TransferState::kDone);
    bool noted = false;
    const absl::Time deadline = absl::Now() + kDeadline;
    while (!noted && absl::Now() < deadline) {
      for (const Notification& n : listener_->WaitForNotifications(absl::Seconds(1))) {
        noted = noted || (n.peer == from.name() && n.payload == note);
      }
    }
    EXPECT_TRUE(noted) << "no notification '" << note << "'";
    auto check = pool_->LeaseIds(remote);
    ASSERT_THAT(check, IsOk());
    for (size_t i = 0; i < remote.size(); ++i) {
      EXPECT_EQ(BlockChecksum(*check, i), ExpectedChecksum(Layout(64), seed, remote[i]))
          << "block " << remote[i];
    }
  }

  // A fresh well-behaved agent connects, WRITEs and verifies, and leaves.
  void ExpectWellBehavedPeer() {
    const std::string name = absl::StrCat("good-", ++good_peers_);
    auto good = Agent::Create(Options(name, secret_));
    ASSERT_THAT(good, IsOk());
    auto pool = (*good)->CreatePool("kv", Layout(32));
    ASSERT_THAT(pool, IsOk());
    ASSERT_THAT((*good)->Connect("127.0.0.1", port_, kDeadline), IsOk());
    ASSERT_THAT(listener_->WaitForPeer(name, kDeadline), IsOk());
    ASSERT_NO_FATAL_FAILURE(WriteAndVerify(**good, **pool, good_peers_));
    good->reset();  // says BYE
    EXPECT_TRUE(WaitFor([&] {
      auto p = listener_->GetPeer(name);
      return p.ok() && p->state != PeerState::kConnected;
    }, kDeadline));
  }

  // The end of every class: the listener is alive (this process runs), its
  // counters return to the baseline, a well-behaved peer completes a verified
  // WRITE, the counters return again, and RSS is near its start. Records the
  // table row (seconds: from `started` to here, the checks included).
  void ExpectRecovered(const std::string& input_class, int inputs, const std::string& outcome,
                       absl::Time started) {
    EXPECT_TRUE(WaitFor([&] { return listener_->GetStats() == baseline_; }, kDeadline))
        << "now      " << listener_->GetStats().ToString() << "\nbaseline "
        << baseline_.ToString() << "\n" << listener_->ledger().Report();
    ExpectWellBehavedPeer();
    EXPECT_TRUE(WaitFor([&] { return listener_->GetStats() == baseline_; }, kDeadline))
        << "after the good peer: " << listener_->GetStats().ToString();
    const int64_t grown = RssBytes() - rss_start_;
    EXPECT_LT(grown, kRssSlack) << "RSS grew by " << (grown >> 20) << " MiB";
    const double seconds = absl::ToDoubleSeconds(absl::Now() - started);
    std::string verdict =
        HasFailure() ? "FAILED (see above)"
                     : absl::StrFormat("listener alive, counters at baseline, good WRITE verified, "
                                       "RSS %+.1f MiB",
                                       static_cast<double>(grown) / (1 << 20));
    Rows().push_back({input_class, transport().name, inputs,
                      absl::StrCat(outcome, " | ", verdict), seconds});
  }

  HostileClient Connect() {
    auto c = HostileClient::Connect(port_);
    EXPECT_THAT(c, IsOk());
    return c.ok() ? *std::move(c) : HostileClient();
  }

  // Waits for the server to close `c`; returns what it sent. A WELCOME is a
  // failure unless `authenticated`.
  std::string Finish(HostileClient& c, bool authenticated = false,
                     std::vector<wire::Message>* got_out = nullptr) {
    std::vector<wire::Message> got;
    HostileClient::Event e = c.ReadUntilClosed(&got, kDeadline);
    EXPECT_EQ(e, HostileClient::Event::kClosed)
        << (e == HostileClient::Event::kTimeout ? "the server kept the connection open"
                                                 : "the server sent a non-kvferry frame");
    for (const wire::Message& m : got) {
      if (!authenticated) {
        EXPECT_NE(m.type, MessageType::kWelcome) << "an unauthenticated peer was welcomed";
      }
      EXPECT_NE(m.type, MessageType::kProof);
    }
    std::string outcome = Describe(got);
    if (got_out != nullptr) *got_out = std::move(got);
    return outcome;
  }

  // One connection: sends `bytes`, half-closes (unless told not to) and waits
  // for the server to close.
  std::string SendOnce(absl::string_view bytes, bool half_close = true,
                       std::vector<wire::Message>* got = nullptr) {
    HostileClient c = Connect();
    if (!c.open()) return "connect failed";
    c.Send(bytes);
    if (half_close) c.ShutdownWrite();
    return Finish(c, /*authenticated=*/false, got);
  }

  // A connection that has completed HELLO / CHALLENGE as `name` under `secret`.
  struct Authenticating {
    HostileClient client;
    ClientHandshake handshake;
  };
  std::optional<Authenticating> Hello(const std::string& name, const std::string& secret,
                                      uint64_t incarnation = 1) {
    Authenticating a{Connect(), {}};
    if (!a.client.open()) return std::nullopt;
    auto h = testing::SayHello(a.client, name, incarnation, secret, kDeadline);
    EXPECT_THAT(h, IsOk());
    if (!h.ok()) return std::nullopt;
    EXPECT_EQ(h->server_proof_ok, secret == secret_) << "the server's proof under the "
                                                     << (secret == secret_ ? "right" : "wrong")
                                                     << " secret";
    a.handshake = *std::move(h);
    return a;
  }

  // `n` connections, each: HELLO, CHALLENGE, then a PROOF carrying the donor's
  // worker address and rkey (under the right secret if `authenticated`, else
  // a wrong one) with one bit flipped.
  void FlipProofs(int n, bool authenticated, Tally* tally) {
    const std::string secret = authenticated ? kSecret : "wrong-secret";
    for (int i = 0; i < n; ++i) {
      auto a = Hello(absl::StrCat("mallory-", i), secret);
      ASSERT_TRUE(a.has_value());
      const wire::AgentDescriptor d = DonorDescriptor(a->handshake.transcript.client_name);
      ASSERT_FALSE(d.pools.empty());
      std::string proof = ProofFrame(testing::ClientProof(a->handshake, secret), d);
      const size_t address_at = wire::kHeaderBytes + 4 + wire::kProofBytes + 4 + d.name.size() +
                                4 + d.host_id.size() + 4;
      const size_t rkey_at = proof.size() - d.pools.back().rkey.size();
      ASSERT_EQ(proof.substr(address_at, d.worker_address.size()), d.worker_address);
      size_t first = 0, count = proof.size();
      if (i % 3 == 1) {
        first = address_at;
        count = d.worker_address.size();
      } else if (i % 3 == 2) {
        first = rkey_at;
        count = d.pools.back().rkey.size();
      }
      const size_t bit = first * 8 + std::uniform_int_distribution<size_t>(0, count * 8 - 1)(rng_);
      proof[bit / 8] = static_cast<char>(proof[bit / 8] ^ (1 << (bit % 8)));
      if (Trace()) {
        std::fprintf(stderr,
                     "hostile_peer_test: %s PROOF %d flips bit %zu of frame byte %zu (%s byte %zu)\n",
                     authenticated ? "authenticated" : "wrong-proof", i, bit % 8, bit / 8,
                     i % 3 == 0 ? "frame" : i % 3 == 1 ? "worker address" : "rkey", bit / 8 - first);
      }
      a->client.Send(proof);
      a->client.ShutdownWrite();
      tally->Add(Finish(a->client, authenticated));
      if (!authenticated) {
        EXPECT_EQ(listener_->GetStats().Live(ResourceKind::kEndpoint), 0);
        EXPECT_EQ(listener_->GetStats().Live(ResourceKind::kRemoteKey), 0);
      }
    }
  }

  std::unique_ptr<Agent> listener_;
  KvPool* pool_ = nullptr;
  uint16_t port_ = 0;
  std::string secret_;
  Stats baseline_;
  int64_t rss_start_ = 0;
  int good_peers_ = 0;
  std::mt19937_64 rng_;
  std::unique_ptr<Agent> donor_;
  wire::AgentDescriptor donor_descriptor_;
};

// The classes whose inputs reach (or could reach) UCX, over TCP and shared memory.
class HostilePeerUcxTest : public HostilePeerTest,
                           public ::testing::WithParamInterface<Transport> {
 protected:
  Transport transport() const override { return GetParam(); }
};

INSTANTIATE_TEST_SUITE_P(Transports, HostilePeerUcxTest, ::testing::Values(kTcp, kShm),
                         [](const ::testing::TestParamInfo<Transport>& p) {
                           return std::string(p.param.name);
                         });

// ---- 1. Random garbage ---------------------------------------------------------

TEST_F(HostilePeerTest, RandomGarbage) {
  const absl::Time start = absl::Now();
  const int n = Scaled(200);
  Tally tally;
  for (int i = 0; i < n; ++i) {
    std::uniform_int_distribution<size_t> size(1, 4096);
    tally.Add(SendOnce(RandomBytes(rng_, size(rng_))));
  }
  EXPECT_EQ(tally.count("no reply"), n) << tally.ToString();
  ExpectRecovered("1 random garbage (1..4096 B)", n, tally.ToString(), start);
}

// ---- 2. Truncations ----------------------------------------------------------------

TEST_F(HostilePeerTest, TruncatedHello) {
  const absl::Time start = absl::Now();
  const std::string hello =
      wire::Encode(testing::HelloMessage("mallory", 1, std::string(wire::kNonceBytes, 'n')));
  Tally cut, relabeled;
  for (size_t len = 0; len < hello.size(); ++len) {
    // The prefix, then end of stream: the server waits for the rest, then
    // drops the connection without an answer.
    cut.Add(SendOnce(hello.substr(0, len)));
    // The prefix with its header's length rewritten to match: a whole frame
    // whose body is short. Refused as malformed.
    if (len >= wire::kHeaderBytes) {
      relabeled.Add(SendOnce(testing::FixFrameLength(hello.substr(0, len))));
    }
  }
  EXPECT_EQ(cut.count("no reply"), static_cast<int>(hello.size())) << cut.ToString();
  EXPECT_EQ(relabeled.count("REJECT(INVALID_ARGUMENT)"),
            static_cast<int>(hello.size() - wire::kHeaderBytes))
      << relabeled.ToString();
  const int inputs = static_cast<int>(2 * hello.size() - wire::kHeaderBytes);
  ExpectRecovered("2a every truncation of HELLO (+relabeled)", inputs,
                  absl::StrCat("cut: ", cut.ToString(), "; relabeled: ", relabeled.ToString()),
                  start);
}

TEST_F(HostilePeerTest, TruncatedAuthenticatedProof) {
  const absl::Time start = absl::Now();
  // Names of one length, so that every PROOF has the same size.
  auto name = [](int i) { return absl::StrFormat("mallory-%06d", i); };
  const wire::AgentDescriptor descriptor = DonorDescriptor(name(0));
  ASSERT_FALSE(descriptor.worker_address.empty());
  // Every cut point of a correctly authenticated PROOF; with a large worker
  // address, a sample of them (scaled), always including the first bytes.
  const size_t size = ProofFrame(std::string(wire::kProofBytes, 'p'), descriptor).size();
  std::vector<size_t> cuts;
  const size_t stride = std::max<size_t>(1, size / static_cast<size_t>(Scaled(static_cast<int>(size))));
  for (size_t len = 0; len < size; len += (len < 64 ? 1 : stride)) cuts.push_back(len);
  Tally cut, relabeled;
  int inputs = 0;
  for (size_t len : cuts) {
    for (bool relabel : {false, true}) {
      if (relabel && len < wire::kHeaderBytes) continue;
      auto a = Hello(name(inputs), kSecret);
      ASSERT_TRUE(a.has_value());
      ++inputs;
      std::string proof = ProofFrame(testing::ClientProof(a->handshake, kSecret),
                                     DonorDescriptor(a->handshake.transcript.client_name));
      ASSERT_EQ(proof.size(), size);
      proof.resize(len);
      if (relabel) proof = testing::FixFrameLength(std::move(proof));
      a->client.Send(proof);
      a->client.ShutdownWrite();
      (relabel ? relabeled : cut).Add(Finish(a->client));
    }
  }
  EXPECT_EQ(cut.count("no reply"), static_cast<int>(cuts.size())) << cut.ToString();
  EXPECT_EQ(relabeled.counts().size(), 1u) << relabeled.ToString();
  EXPECT_GT(relabeled.count("REJECT(INVALID_ARGUMENT)"), 0) << relabeled.ToString();
  ExpectRecovered(absl::StrCat("2b truncations of an authenticated PROOF (", size, " B)"),
                  inputs, absl::StrCat("cut: ", cut.ToString(), "; relabeled: ",
                                       relabeled.ToString()),
                  start);
}

// ---- 3. Single-bit flips -------------------------------------------------------

TEST_F(HostilePeerTest, HelloBitFlips) {
  const absl::Time start = absl::Now();
  const int n = Scaled(500);
  Tally tally;
  for (int i = 0; i < n; ++i) {
    std::string hello = wire::Encode(testing::HelloMessage(
        absl::StrCat("mallory-", i), static_cast<uint64_t>(i) + 1, RandomBytes(rng_, wire::kNonceBytes)));
    const size_t bit = std::uniform_int_distribution<size_t>(0, hello.size() * 8 - 1)(rng_);
    hello[bit / 8] = static_cast<char>(hello[bit / 8] ^ (1 << (bit % 8)));
    tally.Add(SendOnce(hello));
  }
  // A flip in the nonce or incarnation leaves a valid HELLO: the server
  // answers with its CHALLENGE and then sees the stream end.
  for (const auto& [what, count] : tally.counts()) {
    EXPECT_TRUE(what == "no reply" || what == "CHALLENGE" || what.starts_with("REJECT("))
        << what;
  }
  ExpectRecovered("3a single-bit flips of HELLO", n, tally.ToString(), start);
}

// A PROOF with a real worker address and rkey, one bit flipped: a third
// anywhere in the frame, a third in the worker address, a third in the rkey.
//
// Unauthenticated (the proof is under the wrong secret): whatever the flip,
// the listener refuses before any UCX call and never welcomes.
//
// Authenticated (the right secret), opt-in with KVFERRY_HOSTILE_UCX=1: the
// proof covers the handshake transcript, not the descriptor, so a flipped
// worker address or rkey reaches ucp_ep_create / ucp_ep_rkey_unpack. With
// UCX 1.13.1 this aborts the listener (an assertion in ucp_ep_close_nbx's
// force close, "ucp_request.c:684 ... got REQ message", when the flipped
// address's wireup REQ is still pending as the peer hangs up), so it is not
// part of the default run. KVFERRY_HOSTILE_TRACE=1 names each input first.
TEST_P(HostilePeerUcxTest, UnauthenticatedProofBitFlips) {
  const absl::Time start = absl::Now();
  const int n = Scaled(transport().name == std::string("tcp") ? 500 : 200);
  Tally tally;
  ASSERT_NO_FATAL_FAILURE(FlipProofs(n, /*authenticated=*/false, &tally));
  for (const auto& [what, count] : tally.counts()) {
    EXPECT_TRUE(what == "no reply" || what.starts_with("REJECT(")) << what;
  }
  ExpectRecovered("3b single-bit flips of a wrong-proof PROOF", n, tally.ToString(), start);
}

TEST_P(HostilePeerUcxTest, AuthenticatedProofBitFlips) {
  const char* opt_in = std::getenv("KVFERRY_HOSTILE_UCX");
  if (opt_in == nullptr || std::string(opt_in) != "1") {
    Rows().push_back({"3c single-bit flips of an authenticated PROOF", transport().name, 0,
                      "skipped: aborts the listener in UCX 1.13.1 (opt in: "
                      "KVFERRY_HOSTILE_UCX=1)", 0});
    GTEST_SKIP() << "aborts in UCX 1.13.1 (see the comment); KVFERRY_HOSTILE_UCX=1 runs it";
  }
  const absl::Time start = absl::Now();
  const int n = Scaled(transport().name == std::string("tcp") ? 500 : 200);
  Tally tally;
  ASSERT_NO_FATAL_FAILURE(FlipProofs(n, /*authenticated=*/true, &tally));
  ExpectRecovered("3c single-bit flips of an authenticated PROOF", n, tally.ToString(), start);
}

// ---- 4. Oversized and foreign frames --------------------------------------------

TEST_F(HostilePeerTest, OversizedAndForeignFrames) {
  const absl::Time start = absl::Now();
  const int reps = Scaled(10);
  const uint16_t hello = static_cast<uint16_t>(MessageType::kHello);
  const uint16_t proof = static_cast<uint16_t>(MessageType::kProof);
  const std::string valid_hello_body =
      wire::Encode(testing::HelloMessage("mallory", 1, std::string(wire::kNonceBytes, 'n')))
          .substr(wire::kHeaderBytes);
  struct Case {
    std::string name;
    std::string bytes;
    std::string expected;  // what the server sends before closing
    size_t stream_after = 0;  // then this many more bytes (until refused)
  };
  const uint32_t limit = static_cast<uint32_t>(wire::kMaxMessageBytes - wire::kHeaderBytes);
  std::vector<Case> cases = {
      {"2 MiB body announced", FrameHeader(hello, 2u << 20), "no reply"},
      {"2 MiB body announced and sent", FrameHeader(proof, 2u << 20), "no reply", 2u << 20},
      {"1 MiB + 1 frame announced", FrameHeader(proof, limit + 1) + std::string(1000, 'x'),
       "no reply"},
      {"4 GiB body announced", FrameHeader(proof, 0xffffffffu), "no reply"},
      {"1 MiB frame of garbage (at the limit)",
       FrameHeader(proof, limit) + std::string(limit, '\xa5'), "REJECT(INVALID_ARGUMENT)"},
      {"HTTP GET", "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", "no reply"},
      {"SSH banner", "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", "no reply"},
      {"TLS ClientHello", std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11) +
                              std::string(500, '\x42'), "no reply"},
      {"bad magic, valid HELLO body",
       FrameHeader(hello, static_cast<uint32_t>(valid_hello_body.size()), 0x5946564c) +
           valid_hello_body, "no reply"},
      {"wire version 1", FrameHeader(hello, static_cast<uint32_t>(valid_hello_body.size()),
                                     wire::kMagic, 1) + valid_hello_body,
       "REJECT(FAILED_PRECONDITION)"},
      {"wire version 0xffff", FrameHeader(hello, static_cast<uint32_t>(valid_hello_body.size()),
                                          wire::kMagic, 0xffff) + valid_hello_body,
       "REJECT(FAILED_PRECONDITION)"},
      {"type 0", FrameHeader(0, 0), "REJECT(INVALID_ARGUMENT)"},
      {"type 9", FrameHeader(9, 0), "REJECT(INVALID_ARGUMENT)"},
      {"type 0xffff with a body", FrameHeader(0xffff, 4) + "abcd", "REJECT(INVALID_ARGUMENT)"},
      {"11 bytes of a header", FrameHeader(hello, 8).substr(0, 11), "no reply"},
  };
  Tally tally;
  int inputs = 0;
  for (const Case& c : cases) {
    for (int r = 0; r < reps; ++r) {
      ++inputs;
      HostileClient client = Connect();
      ASSERT_TRUE(client.open());
      client.Send(c.bytes);
      size_t streamed = 0;
      const std::string chunk(64 << 10, '\x5a');
      while (streamed < c.stream_after && client.Send(chunk)) streamed += chunk.size();
      client.ShutdownWrite();
      const std::string outcome = Finish(client);
      EXPECT_EQ(outcome, c.expected) << c.name;
      tally.Add(absl::StrCat(c.name, ": ", outcome));
    }
  }
  std::string summary;
  for (const Case& c : cases) absl::StrAppend(&summary, summary.empty() ? "" : "; ", c.name, " -> ", c.expected);
  ExpectRecovered("4 oversized headers, bad magic/version/type", inputs, summary, start);
}

// ---- 5. Wrong proof, malformed UCX blobs ----------------------------------------

TEST_F(HostilePeerTest, WrongProofWithMalformedUcxBlobs) {
  const absl::Time start = absl::Now();
  const int n = Scaled(100);
  Tally tally;
  for (int i = 0; i < n; ++i) {
    const std::string name = absl::StrCat("mallory-", i);
    auto a = Hello(name, i % 2 == 0 ? kSecret : "not-the-secret");
    ASSERT_TRUE(a.has_value());
    wire::AgentDescriptor d{.name = name,
                            .host_id = "not-this-host",
                            .worker_address = RandomBytes(rng_, 1 + rng_() % 4096)};
    d.pools.push_back({.name = "kv", .layout = Layout(64), .base = 0x10000,
                       .length = Layout(64).total_bytes(),
                       .rkey = i % 3 == 0 ? std::string("\xff\xff") : RandomBytes(rng_, 1 + rng_() % 512)});
    // Half with a random proof, half with one under the wrong secret.
    const std::string proof = i % 2 == 0 ? RandomBytes(rng_, wire::kProofBytes)
                                         : testing::ClientProof(a->handshake, "not-the-secret");
    a->client.Send(ProofFrame(proof, d));
    std::vector<wire::Message> got;
    tally.Add(Finish(a->client, /*authenticated=*/false, &got));  // no half-close
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0].type, MessageType::kReject);
    EXPECT_EQ(got[0].code, static_cast<uint32_t>(absl::StatusCode::kPermissionDenied));
    EXPECT_THAT(got[0].text, HasSubstr("shared secret mismatch"));
    // Refused at the proof check, which comes before any UCX call: no
    // endpoint or rkey was ever made for it.
    EXPECT_EQ(listener_->GetStats().Live(ResourceKind::kEndpoint), 0);
    EXPECT_EQ(listener_->GetStats().Live(ResourceKind::kRemoteKey), 0);
  }
  ExpectRecovered("5 wrong proof + garbage worker address/rkey", n, tally.ToString(), start);
}

// ---- 6. A UCX sockaddr-style connection request -------------------------------

TEST_F(HostilePeerTest, UcxSockaddrStyleRequest) {
  const absl::Time start = absl::Now();
  const int n = Scaled(50);
  Tally tally;
  for (int i = 0; i < n; ++i) {
    HostileClient c = Connect();
    ASSERT_TRUE(c.open());
    if (i % 2 == 0) {
      // 63 bytes, then 1: arbitrary bytes where UCX's listener expected its
      // own connection request.
      c.Send(RandomBytes(rng_, 63));
      c.Send(RandomBytes(rng_, 1));
    } else {
      // The shape of uct_tcp_sockcm's private data: u64 length, u8 status,
      // payload.
      std::string req(9, '\0');
      const uint64_t length = 55;
      std::memcpy(req.data(), &length, 8);
      c.Send(req + RandomBytes(rng_, length));
    }
    c.ShutdownWrite();
    tally.Add(Finish(c));
  }
  EXPECT_EQ(tally.count("no reply"), n) << tally.ToString();
  ExpectRecovered("6 UCX sockaddr-style request (63+1 B)", n, tally.ToString(), start);
}

// ---- 7. A thousand idle sockets --------------------------------------------------

TEST_F(HostilePeerTest, IdleSocketFlood) {
  AgentOptions options = Options("decode");
  options.handshake_timeout = absl::Milliseconds(500);
  ASSERT_NO_FATAL_FAILURE(StartListener(options));
  const int max_pending = options.max_pending_handshakes;
  const int n = 1000;
  RaiseFdLimit(4 * n);
  const absl::Time start = absl::Now();
  // The well-behaved peer exists before the flood.
  auto good = Agent::Create(Options("good-flood"));
  ASSERT_THAT(good, IsOk());
  KvPool* good_pool = *(*good)->CreatePool("kv", Layout(32));
  int64_t most_in_handshake = 0;
  auto sample = [&] {
    const Stats s = listener_->GetStats();
    most_in_handshake = std::max({most_in_handshake, s.Live(ResourceKind::kConnection),
                                  s.Live(ResourceKind::kPeer)});
  };
  std::vector<HostileClient> idle;
  idle.reserve(n);
  for (int i = 0; i < n; ++i) {
    auto c = HostileClient::Connect(port_);
    ASSERT_THAT(c, IsOk()) << "socket " << i;
    idle.push_back(*std::move(c));
    sample();
  }
  // During the flood the well-behaved peer may be refused (no handshake slot).
  absl::Status during = (*good)->Connect("127.0.0.1", port_, absl::Seconds(5)).status();
  sample();
  // Every idle socket is closed by the server while this side holds it open:
  // at accept (no reply) when max_pending_handshakes are pending, otherwise at
  // handshake_timeout (REJECT(DEADLINE_EXCEEDED)).
  Tally tally;
  std::vector<std::vector<wire::Message>> got(n);
  std::vector<bool> closed(n, false);
  int open = n;
  absl::Duration last_close;
  const absl::Time deadline = absl::Now() + kDeadline;
  while (open > 0 && absl::Now() < deadline) {
    std::vector<pollfd> fds;
    std::vector<int> which;
    for (int i = 0; i < n; ++i) {
      if (closed[i]) continue;
      fds.push_back({idle[i].fd(), POLLIN, 0});
      which.push_back(i);
    }
    (void)poll(fds.data(), fds.size(), 100);
    sample();
    for (size_t k = 0; k < fds.size(); ++k) {
      if (fds[k].revents == 0) continue;
      const int i = which[k];
      if (idle[i].ReadUntilClosed(&got[i], absl::ZeroDuration()) ==
          HostileClient::Event::kClosed) {
        closed[i] = true;
        --open;
        last_close = absl::Now() - start;
        tally.Add(Describe(got[i]));
      }
    }
  }
  EXPECT_EQ(open, 0) << "sockets the listener never closed";
  EXPECT_LE(most_in_handshake, max_pending);
  EXPECT_GT(tally.count("no reply"), 0) << tally.ToString();
  EXPECT_GT(tally.count("REJECT(DEADLINE_EXCEEDED)"), 0) << tally.ToString();
  EXPECT_EQ(tally.count("no reply") + tally.count("REJECT(DEADLINE_EXCEEDED)"), n)
      << tally.ToString();
  idle.clear();
  // After the flood the well-behaved peer connects and transfers.
  if (!during.ok()) {
    ASSERT_THAT((*good)->Connect("127.0.0.1", port_, kDeadline), IsOk());
  }
  ASSERT_THAT(listener_->WaitForPeer("good-flood", kDeadline), IsOk());
  ASSERT_NO_FATAL_FAILURE(WriteAndVerify(**good, *good_pool, 77));
  good->reset();
  ExpectRecovered(
      "7 1000 idle sockets (max_pending 64, timeout 500ms)", n,
      absl::StrFormat("%s; at most %d in handshake; last closed after %s; good peer during "
                      "flood: %s",
                      tally.ToString(), most_in_handshake, absl::FormatDuration(last_close),
                      during.ok() ? "connected" : absl::StatusCodeToString(during.code())),
      start);
}

// ---- 8. PINGs instead of HELLO ---------------------------------------------------

TEST_F(HostilePeerTest, PingsBeforeHello) {
  const absl::Time start = absl::Now();
  const std::string ping = wire::Encode({.type = MessageType::kPing});
  const int n = Scaled(50);
  Tally tally;
  int inputs = 0;
  for (int i = 0; i < n; ++i, ++inputs) {
    std::vector<wire::Message> got;
    // No half-close: the server must close on its own, at the first PING.
    tally.Add(SendOnce(ping, /*half_close=*/false, &got));
    ASSERT_EQ(got.size(), 1u);
    EXPECT_THAT(got[0].text, HasSubstr("PING where HELLO was expected (before authentication)"));
  }
  // 100 PINGs in one write.
  for (int i = 0; i < n; ++i, ++inputs) {
    std::string many;
    for (int k = 0; k < 100; ++k) many += ping;
    tally.Add(SendOnce(many, /*half_close=*/false));
  }
  // One PING at a time until the server hangs up.
  int pings_sent = 0;
  {
    ++inputs;
    HostileClient c = Connect();
    ASSERT_TRUE(c.open());
    std::string frame;
    const absl::Time deadline = absl::Now() + kDeadline;
    while (absl::Now() < deadline && c.Send(ping)) {
      ++pings_sent;
      if (c.ReadFrame(&frame, absl::ZeroDuration()) == HostileClient::Event::kClosed) break;
    }
    Finish(c);
  }
  EXPECT_EQ(tally.count("REJECT(INVALID_ARGUMENT)"), 2 * n) << tally.ToString();
  ExpectRecovered("8 PINGs instead of HELLO", inputs,
                  absl::StrCat(tally.ToString(), "; streamed PINGs: closed after ", pings_sent,
                               " sent"),
                  start);
}

// ---- 9. Messages before authentication ---------------------------------------------

TEST_F(HostilePeerTest, MessagesBeforeAuthentication) {
  const absl::Time start = absl::Now();
  const wire::AgentDescriptor d = DonorDescriptor("mallory");
  const std::string nonce(wire::kNonceBytes, 'n');
  const std::vector<wire::Message> messages = {
      {.type = MessageType::kNotify, .text = "layer 3 is ready"},
      {.type = MessageType::kBye},
      {.type = MessageType::kReject, .code = 7, .text = "no"},
      {.type = MessageType::kWelcome, .agent = d},
      {.type = MessageType::kChallenge, .name = "decode", .incarnation = 1, .nonce = nonce,
       .proof = std::string(wire::kProofBytes, 'p')},
      {.type = MessageType::kProof, .proof = std::string(wire::kProofBytes, 'p'), .agent = d},
  };
  // The refusal is logged with the remote address (the first refusals of a
  // fresh listener, so the log's rate limit does not apply).
  {
    HostileClient c = Connect();
    ASSERT_TRUE(c.open());
    const std::string me = c.local_address();
    ::testing::internal::CaptureStderr();
    c.Send(wire::Encode(messages[0]));
    const std::string outcome = Finish(c);
    HostileClient r = Connect();
    const std::string them = r.local_address();
    r.Send(wire::Encode(messages[2]));
    const std::string reject_outcome = Finish(r);
    const std::string log = ::testing::internal::GetCapturedStderr();
    EXPECT_EQ(outcome, "REJECT(INVALID_ARGUMENT)");
    EXPECT_EQ(reject_outcome, "no reply");
    EXPECT_THAT(log, HasSubstr(absl::StrCat("refused a connection from ", me,
                                            " (unauthenticated): NOTIFY where HELLO was "
                                            "expected (before authentication)")));
    EXPECT_THAT(log, HasSubstr(absl::StrCat(them, " (unauthenticated) gave up the handshake")));
  }
  const int reps = Scaled(20);
  Tally tally;
  int inputs = 2;
  for (const wire::Message& m : messages) {
    const std::string type(wire::MessageTypeName(m.type));
    for (int r = 0; r < reps; ++r, ++inputs) {
      std::vector<wire::Message> got;
      const std::string outcome = SendOnce(wire::Encode(m), /*half_close=*/false, &got);
      tally.Add(absl::StrCat(type, ": ", outcome));
      if (m.type == MessageType::kReject) {
        EXPECT_EQ(outcome, "no reply");  // the peer gave up; nothing to answer
      } else {
        ASSERT_EQ(outcome, "REJECT(INVALID_ARGUMENT)") << type;
        EXPECT_THAT(got[0].text, HasSubstr(absl::StrCat(
                                     type, " where HELLO was expected (before authentication)")));
      }
      EXPECT_EQ(listener_->GetStats().Live(ResourceKind::kEndpoint), 0);
    }
  }
  // After a valid HELLO, anything but PROOF is refused just the same.
  for (const wire::Message& m : messages) {
    if (m.type == MessageType::kProof || m.type == MessageType::kReject) continue;
    const std::string type(wire::MessageTypeName(m.type));
    for (int r = 0; r < reps; ++r, ++inputs) {
      auto a = Hello(absl::StrCat("mallory-", inputs), kSecret);
      ASSERT_TRUE(a.has_value());
      a->client.Send(wire::Encode(m));
      std::vector<wire::Message> got;
      const std::string outcome = Finish(a->client, /*authenticated=*/false, &got);
      tally.Add(absl::StrCat("HELLO then ", type, ": CHALLENGE+", outcome));
      ASSERT_EQ(outcome, "REJECT(INVALID_ARGUMENT)") << type;
      EXPECT_THAT(got[0].text, HasSubstr(absl::StrCat(
                                   type, " where PROOF was expected (before authentication)")));
    }
  }
  {  // And a second HELLO.
    ++inputs;
    auto a = Hello("mallory-twice", kSecret);
    ASSERT_TRUE(a.has_value());
    a->client.Send(wire::Encode(testing::HelloMessage("mallory-twice", 2, nonce)));
    const std::string outcome = Finish(a->client);
    tally.Add(absl::StrCat("HELLO then HELLO: CHALLENGE+", outcome));
    EXPECT_EQ(outcome, "REJECT(INVALID_ARGUMENT)");
  }
  ExpectRecovered("9 NOTIFY/BYE/REJECT/WELCOME/CHALLENGE/PROOF pre-auth", inputs,
                  tally.ToString() + "; log names the remote address", start);
}

// A listener whose handshake_timeout is short: a client that drips a valid
// HELLO one byte at a time, slower than the timeout allows, is dropped at the
// deadline set when it was accepted (bytes arriving do not extend it).
TEST_F(HostilePeerTest, SlowDripHandshake) {
  AgentOptions options = Options("decode");
  options.handshake_timeout = absl::Milliseconds(300);
  ASSERT_NO_FATAL_FAILURE(StartListener(options));
  const absl::Time start = absl::Now();
  const std::string hello =
      wire::Encode(testing::HelloMessage("mallory", 1, std::string(wire::kNonceBytes, 'n')));
  const int n = Scaled(3);
  Tally tally;
  absl::Duration longest;
  for (int i = 0; i < n; ++i) {
    HostileClient c = Connect();
    ASSERT_TRUE(c.open());
    const absl::Time accepted = absl::Now();
    std::vector<wire::Message> got;
    HostileClient::Event e = HostileClient::Event::kTimeout;
    for (size_t k = 0; k < hello.size() && e == HostileClient::Event::kTimeout; ++k) {
      if (!c.Send(hello.substr(k, 1))) break;
      // The pace of the drip (not a wait for a condition): 20 ms a byte,
      // so the whole HELLO would take over a second.
      e = c.ReadUntilClosed(&got, absl::Milliseconds(20));
    }
    std::vector<wire::Message> rest;
    Finish(c, /*authenticated=*/false, &rest);
    got.insert(got.end(), rest.begin(), rest.end());
    tally.Add(Describe(got));
    longest = std::max(longest, absl::Now() - accepted);
  }
  EXPECT_EQ(tally.count("REJECT(DEADLINE_EXCEEDED)"), n) << tally.ToString();
  ExpectRecovered("7b HELLO dripped 1 B / 20 ms (timeout 300ms)", n,
                  absl::StrCat(tally.ToString(), "; dropped within ",
                               absl::FormatDuration(longest)),
                  start);
}

// An unauthenticated peer's REJECT text goes into the listener's log as it
// is: newlines and terminal escapes included, up to 64 KiB a line. Disabled
// until the listener escapes it (see the report of this suite); run with
// --gtest_also_run_disabled_tests.
TEST_F(HostilePeerTest, PeerTextIsEscapedInLog) {
  HostileClient c = Connect();
  ASSERT_TRUE(c.open());
  ::testing::internal::CaptureStderr();
  c.Send(wire::Encode({.type = MessageType::kReject, .code = 7,
                       .text = "bye\nkvferry: agent 'decode': forged line\x1b[2J"}));
  const std::string outcome = Finish(c);
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(outcome, "no reply");
  EXPECT_THAT(log, HasSubstr("gave up the handshake"));
  EXPECT_THAT(log, ::testing::Not(HasSubstr("\nkvferry: agent 'decode': forged line")));
  EXPECT_THAT(log, ::testing::Not(HasSubstr("\x1b")));
}

// ---- 10. Name takeover -------------------------------------------------------------

TEST_P(HostilePeerUcxTest, NameTakeover) {
  const absl::Time start = absl::Now();
  auto prefill = Agent::Create(Options("prefill"));
  ASSERT_THAT(prefill, IsOk());
  KvPool* prefill_pool = *(*prefill)->CreatePool("kv", Layout(32));
  ASSERT_THAT((*prefill)->Connect("127.0.0.1", port_, kDeadline), IsOk());
  ASSERT_THAT(listener_->WaitForPeer("prefill", kDeadline), IsOk());
  const PeerInfo real = *listener_->GetPeer("prefill");
  ASSERT_GT(real.incarnation, 1u);
  const int n = Scaled(30);
  Tally tally;
  for (int i = 0; i < n; ++i) {
    // The same incarnation as the real agent, one older, and the oldest.
    const uint64_t incarnation = i % 3 == 0 ? real.incarnation
                                 : i % 3 == 1 ? real.incarnation - 1
                                              : 1;
    auto a = Hello("prefill", kSecret, incarnation);
    ASSERT_TRUE(a.has_value());
    a->client.Send(
        ProofFrame(testing::ClientProof(a->handshake, kSecret), DonorDescriptor("prefill")));
    std::vector<wire::Message> got;
    const std::string outcome = Finish(a->client, /*authenticated=*/true, &got);
    tally.Add(absl::StrCat(i % 3 == 0 ? "same" : "older", " incarnation: ", outcome));
    ASSERT_EQ(outcome, "REJECT(ALREADY_EXISTS)");
    EXPECT_THAT(got[0].text, HasSubstr("'prefill' is already connected"));
    // The real agent keeps its connection and its transfers.
    auto still = listener_->GetPeer("prefill");
    ASSERT_THAT(still, IsOk());
    EXPECT_EQ(still->state, PeerState::kConnected);
    EXPECT_EQ(still->incarnation, real.incarnation);
    EXPECT_EQ(still->address, real.address);
    if (i % 10 == 0) {
      ASSERT_NO_FATAL_FAILURE(WriteAndVerify(**prefill, *prefill_pool, 100 + i));
    }
  }
  ASSERT_NO_FATAL_FAILURE(WriteAndVerify(**prefill, *prefill_pool, 99));
  EXPECT_EQ((*prefill)->GetPeer("decode")->state, PeerState::kConnected);
  prefill->reset();
  ExpectRecovered("10 name takeover (same/older incarnation)", n, tally.ToString(), start);
}

// ---- 11. Wrong secret --------------------------------------------------------------

TEST_F(HostilePeerTest, WrongSecret) {
  const absl::Time start = absl::Now();
  const int n = Scaled(20);
  Tally tally;
  for (int i = 0; i < n; ++i) {
    const std::string name = absl::StrCat("mallory-", i);
    auto a = Hello(name, "wrong-secret");  // checks the server's proof fails under it
    ASSERT_TRUE(a.has_value());
    // The CHALLENGE carries the server's name, incarnation, nonce and proof:
    // no descriptor.
    EXPECT_TRUE(a->handshake.challenge.agent.worker_address.empty());
    EXPECT_TRUE(a->handshake.challenge.agent.pools.empty());
    EXPECT_TRUE(wire::ProofMatches(kSecret, wire::ProofRole::kServer, a->handshake.transcript,
                                   a->handshake.challenge.proof));
    a->client.Send(
        ProofFrame(testing::ClientProof(a->handshake, "wrong-secret"), DonorDescriptor(name)));
    std::vector<wire::Message> got;
    const std::string outcome = Finish(a->client, /*authenticated=*/false, &got);
    tally.Add(absl::StrCat("CHALLENGE+", outcome));
    // CHALLENGE, then the REJECT, then the close: nothing else.
    ASSERT_EQ(got.size(), 1u) << outcome;
    EXPECT_EQ(got[0].type, MessageType::kReject);
    EXPECT_EQ(got[0].code, static_cast<uint32_t>(absl::StatusCode::kPermissionDenied));
    EXPECT_THAT(got[0].text, HasSubstr("shared secret mismatch"));
  }
  ExpectRecovered("11 wrong secret", n, tally.ToString(), start);
}

// ---- A listener without a secret -----------------------------------------------------

TEST_F(HostilePeerTest, InsecureLoopbackListener) {
  if (std::getenv("KVFERRY_SECRET") != nullptr) GTEST_SKIP() << "KVFERRY_SECRET is set";
  ASSERT_NO_FATAL_FAILURE(StartListener(Options("decode", /*secret=*/"")));
  const absl::Time start = absl::Now();
  Tally tally;
  int inputs = 0;
  for (int i = 0; i < Scaled(50); ++i, ++inputs) {
    tally.Add(absl::StrCat("garbage: ", SendOnce(RandomBytes(rng_, 1 + rng_() % 4096))));
  }
  for (int i = 0; i < Scaled(10); ++i, ++inputs) {
    tally.Add(absl::StrCat("NOTIFY first: ", SendOnce(wire::Encode({.type = MessageType::kNotify,
                                                                      .text = "x"}),
                                                       /*half_close=*/false)));
  }
  for (int i = 0; i < Scaled(10); ++i, ++inputs) {
    // A client that has a secret when the listener has none: refused.
    const std::string name = absl::StrCat("mallory-", inputs);
    auto a = Hello(name, "a-secret");
    ASSERT_TRUE(a.has_value());
    a->client.Send(ProofFrame(testing::ClientProof(a->handshake, "a-secret"),
                              DonorDescriptor(name)));
    const std::string outcome = Finish(a->client);
    EXPECT_EQ(outcome, "REJECT(PERMISSION_DENIED)");
    tally.Add(absl::StrCat("proof under a secret: CHALLENGE+", outcome));
  }
  EXPECT_EQ(tally.counts().size(), 3u) << tally.ToString();
  ExpectRecovered("insecure loopback listener (no secret)", inputs, tally.ToString(), start);
}

}  // namespace
}  // namespace kvferry
