// Hostile peers against a real listening agent. A raw TCP client
// (tests/hostile_client.h) sends garbage, truncated and bit-flipped handshake
// frames, oversized and foreign headers, pre-authentication messages, idle
// sockets by the thousand, wrong secrets and name takeovers; an on-path proxy
// rewrites a real agent's PROOF or the WELCOME it gets; an authenticated raw
// client injects, replays, reorders and reflects frames after the handshake.
// After each class of input the test asserts that the listener (this very
// process) is alive, that its counters are back at their baseline, that a
// well-behaved agent still connects and completes a verified WRITE, and that
// RSS is back near its start. A table of what was sent and what came back
// prints at the end.
//
// Frames after the CHALLENGE are sealed (src/wire/auth.h), so most classes
// exist twice where it matters: as an attacker who does not know the secret
// (its alterations must fail the seal check, REJECT(UNAUTHENTICATED) during
// the handshake, a dropped peer after it) and as a peer that knows the secret
// and seals what it sends (the parser and the state machine behind the seal).
//
// Each input goes on a fresh connection, and the client waits until the
// listener has closed it (no sleeps): the whole suite takes about 4 s in
// release and 11 s under ASan on two cores.
//
// Environment: KVFERRY_HOSTILE_SCALE (default 1) multiplies the input counts;
// KVFERRY_HOSTILE_SEED fixes the random inputs (default: a constant, so runs
// repeat); KVFERRY_HOSTILE_TRACE=1 logs each input that may reach UCX before
// it is sent; KVFERRY_HOSTILE_UCX=1 also runs the authenticated bit flips,
// which abort in UCX 1.13.1 (see AuthenticatedProofBitFlips).
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kvferry/agent.h"
#include "tests/child_process.h"
#include "tests/hostile_client.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

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
    std::printf("%-58s %-5s %7s %7s  %s\n", "class", "tls", "inputs", "seconds", "outcome");
    for (const Row& r : Rows()) {
      std::printf("%-58s %-5s %7d %7.1f  %s\n", r.input_class.c_str(), r.transport.c_str(),
                  r.inputs, r.seconds, r.outcome.c_str());
    }
    std::fflush(stdout);
    Rows().clear();  // --gtest_repeat prints each round's own table
  }
};
[[maybe_unused]] ::testing::Environment* const kTable =
    ::testing::AddGlobalTestEnvironment(new TableEnvironment);

// What the server did with one connection: the messages it sent, in order
// ("REJECT(UNAUTHENTICATED)"), or "no reply"; always ends with the close.
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

// ---- Watching for UCX calls ---------------------------------------------------

// The most endpoints and remote keys `agent` held at any one time while this
// object lived: a thread samples the live counters every 100 us. An input
// refused before any UCX call leaves both at the listener's baseline; one that
// reaches UCX shows at least for the time its endpoint takes to close.
class PeakSampler {
 public:
  explicit PeakSampler(const Agent& agent) : agent_(agent) {
    Sample();
    thread_ = std::thread([this] {
      while (!stop_.load()) {
        Sample();
        absl::SleepFor(absl::Microseconds(100));
      }
    });
  }
  ~PeakSampler() { Stop(); }
  void Stop() {
    if (!thread_.joinable()) return;
    stop_ = true;
    thread_.join();
    Sample();
  }
  int64_t endpoints() const { return endpoints_.load(); }
  int64_t remote_keys() const { return remote_keys_.load(); }

 private:
  void Sample() {
    const Stats s = agent_.GetStats();
    endpoints_ = std::max(endpoints_.load(), s.Live(ResourceKind::kEndpoint));
    remote_keys_ = std::max(remote_keys_.load(), s.Live(ResourceKind::kRemoteKey));
  }
  const Agent& agent_;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> endpoints_{0};
  std::atomic<int64_t> remote_keys_{0};
  std::thread thread_;
};

// ---- An on-path attacker ------------------------------------------------------

// A TCP proxy on 127.0.0.1 in front of the listener, each connection served
// on a thread of its own. Each whole frame goes, in order, through the tamper
// function for its direction that was set when the connection was accepted,
// which may rewrite it. Frames are signed, not encrypted, so the proxy can
// read a PROOF's or WELCOME's descriptor as any on-path attacker can.
class TamperingProxy {
 public:
  // `index` counts the frames of one direction on one connection from 0
  // (the client's HELLO, the server's CHALLENGE).
  using Tamper = std::function<void(int index, std::string* frame)>;

  explicit TamperingProxy(uint16_t upstream) : upstream_(upstream) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in at = {};
    at.sin_family = AF_INET;
    at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(at);
    if (listen_fd_ < 0 ||
        ::bind(listen_fd_, reinterpret_cast<const sockaddr*>(&at), sizeof(at)) != 0 ||
        ::listen(listen_fd_, 16) != 0 ||
        ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&at), &len) != 0) {
      return;
    }
    port_ = ntohs(at.sin_port);
    thread_ = std::thread([this] { Run(); });
  }
  ~TamperingProxy() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    for (std::thread& t : serving_) t.join();
    if (listen_fd_ >= 0) ::close(listen_fd_);
  }
  TamperingProxy(const TamperingProxy&) = delete;
  TamperingProxy& operator=(const TamperingProxy&) = delete;

  // 0 if the proxy could not listen.
  uint16_t port() const { return port_; }
  // For the connections accepted from now on (they may outlive the caller's
  // scope: capture by value); nullptr forwards that direction untouched.
  void set_tamper(Tamper to_server, Tamper to_client = nullptr) {
    std::lock_guard<std::mutex> l(mu_);
    to_server_ = std::move(to_server);
    to_client_ = std::move(to_client);
  }

 private:
  // One direction of one connection.
  struct Pump {
    int from;
    HostileClient* to;
    Tamper tamper;
    std::string pending;  // bytes short of a whole frame
    bool raw = false;     // not kvferry frames: forwarded as they come
    int index = 0;
    bool done = false;

    // Reads what `from` holds and forwards it; at end of stream, half-closes
    // `to`.
    void Run(std::vector<char>& buf) {
      const ssize_t n = ::recv(from, buf.data(), buf.size(), 0);
      if (n < 0 && errno == EINTR) return;
      if (n <= 0) {
        to->Send(pending);
        pending.clear();
        to->ShutdownWrite();
        done = true;
        return;
      }
      pending.append(buf.data(), static_cast<size_t>(n));
      while (!raw) {
        absl::StatusOr<size_t> length = wire::FrameLength(pending);
        if (!length.ok()) {
          raw = true;
          break;
        }
        if (*length == 0 || *length > pending.size()) return;
        std::string frame = pending.substr(0, *length);
        pending.erase(0, *length);
        if (tamper) tamper(index, &frame);
        ++index;
        to->Send(frame);
      }
      to->Send(pending);
      pending.clear();
    }
  };

  void Run() {
    while (!stop_.load()) {
      pollfd p = {listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) != 1) continue;
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      int one = 1;
      (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      Tamper to_server, to_client;
      {
        std::lock_guard<std::mutex> l(mu_);
        to_server = to_server_;
        to_client = to_client_;
      }
      serving_.emplace_back([this, fd, to_server = std::move(to_server),
                             to_client = std::move(to_client)] {
        HostileClient client(fd);
        auto server = HostileClient::Connect(upstream_);
        if (!server.ok()) return;
        Pump up{.from = client.fd(), .to = &*server, .tamper = to_server};
        Pump down{.from = server->fd(), .to = &client, .tamper = to_client};
        std::vector<char> buf(64 << 10);
        while (!stop_.load() && !(up.done && down.done)) {
          pollfd fds[2] = {{up.from, static_cast<short>(up.done ? 0 : POLLIN), 0},
                           {down.from, static_cast<short>(down.done ? 0 : POLLIN), 0}};
          if (::poll(fds, 2, 20) <= 0) continue;
          if (fds[0].revents != 0 && !up.done) up.Run(buf);
          if (fds[1].revents != 0 && !down.done) down.Run(buf);
        }
      });
    }
  }

  const uint16_t upstream_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::mutex mu_;
  Tamper to_server_;
  Tamper to_client_;
  std::atomic<bool> stop_{false};
  std::vector<std::thread> serving_;  // used by thread_ only
  std::thread thread_;
};

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
    auto listening = test::StartListeningAgent(std::move(options), Layout(64));
    ASSERT_THAT(listening, IsOk());
    listener_ = std::move(listening->agent);
    pool_ = listening->pool;
    port_ = listening->port;
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
      auto captured = CaptureDescriptor(*donor_, kSecret);
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

  // Waits until the listener no longer lists `name` as connected (it ended,
  // or never finished its handshake); false at kDeadline.
  bool AwaitPeerNotConnected(const std::string& name) {
    return WaitFor([&] {
      auto p = listener_->GetPeer(name);
      return p.ok() && p->state != PeerState::kConnected;
    }, kDeadline);
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
    EXPECT_TRUE(AwaitPeerNotConnected(name));
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

  // Waits for the server to close `c`; returns what it sent (opened under
  // `session` once the handshake has reached the CHALLENGE; PINGs left out).
  // A WELCOME is a failure unless `authenticated`.
  std::string Finish(HostileClient& c, bool authenticated = false,
                     std::vector<wire::Message>* got_out = nullptr,
                     SealedSession* session = nullptr) {
    std::vector<wire::Message> got;
    HostileClient::Event e = c.ReadUntilClosed(&got, kDeadline, session);
    EXPECT_EQ(e, HostileClient::Event::kClosed)
        << (e == HostileClient::Event::kTimeout   ? "the server kept the connection open"
            : e == HostileClient::Event::kBadSeal ? "the server sent a frame that fails its seal"
                                                  : "the server sent a non-kvferry frame");
    // The server pings an authenticated peer every peer_timeout / 4.
    std::erase_if(got, [](const wire::Message& m) { return m.type == MessageType::kPing; });
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
    auto h = SayHello(a.client, name, incarnation, secret, kDeadline);
    EXPECT_THAT(h, IsOk());
    if (!h.ok()) return std::nullopt;
    EXPECT_EQ(h->server_proof_ok, secret == secret_) << "the server's proof under the "
                                                     << (secret == secret_ ? "right" : "wrong")
                                                     << " secret";
    a.handshake = *std::move(h);
    return a;
  }

  // A connection that has completed the whole handshake as `name` (HELLO,
  // CHALLENGE, a sealed PROOF with the donor's descriptor, the sealed
  // WELCOME): an authenticated peer of the listener, with its session.
  std::optional<Authenticating> Authenticated(const std::string& name, uint64_t incarnation = 1) {
    Authenticating a{Connect(), {}};
    if (!a.client.open()) return std::nullopt;
    auto h = Authenticate(a.client, name, incarnation, kSecret, DonorDescriptor(name),
                                   kDeadline);
    EXPECT_THAT(h, IsOk());
    if (!h.ok()) return std::nullopt;
    a.handshake = *std::move(h);
    auto p = listener_->GetPeer(name);  // connected before it sent the WELCOME
    EXPECT_TRUE(p.ok() && p->state == PeerState::kConnected) << name;
    return a;
  }

  enum class Flip {
    kWrongSecret,    // 3b: proof and seal under a wrong secret, flipped after sealing
    kBeforeSealing,  // 3c: right secret, flipped, then sealed (a malicious peer)
    kAfterSealing,   // 3d: right secret, sealed, then flipped (an on-path attacker)
  };

  // `n` connections, each: HELLO, CHALLENGE, then a PROOF carrying the donor's
  // worker address and rkey with one bit flipped: a third anywhere in the
  // frame (after sealing: anywhere but the magic and the length field, which
  // are framing, class 4), a third in the worker address, a third in the rkey.
  // Returns the REJECT reasons in `texts`.
  void FlipProofs(int n, Flip flip, Tally* tally, std::vector<std::string>* texts = nullptr) {
    const bool knows_secret = flip != Flip::kWrongSecret;
    const std::string secret = knows_secret ? kSecret : "wrong-secret";
    for (int i = 0; i < n; ++i) {
      auto a = Hello(absl::StrCat("mallory-", i), secret);
      ASSERT_TRUE(a.has_value());
      const wire::AgentDescriptor d = DonorDescriptor(a->handshake.transcript.client_name);
      ASSERT_FALSE(d.pools.empty());
      std::string proof = ProofFrame(ClientProof(a->handshake, secret), d);
      const size_t address_at = wire::kHeaderBytes + 4 + wire::kProofBytes + 4 + d.name.size() +
                                4 + d.host_id.size() + 4;
      const size_t rkey_at = proof.size() - d.pools.back().regions.back().rkey.size();
      ASSERT_EQ(proof.substr(address_at, d.worker_address.size()), d.worker_address);
      // Under a wrong secret the client seals under its own (wrong) keys.
      if (flip != Flip::kBeforeSealing) proof = a->handshake.session.Seal(std::move(proof));
      size_t bit = 0;
      if (i % 3 == 0 && flip == Flip::kAfterSealing) {
        // Bytes 4..7 (version, type) and 12.. (body, tag).
        const size_t pos =
            std::uniform_int_distribution<size_t>(0, (proof.size() - 8) * 8 - 1)(rng_);
        const size_t byte = pos / 8 < 4 ? pos / 8 + 4 : pos / 8 + 8;
        bit = byte * 8 + pos % 8;
      } else {
        size_t first = 0, count = proof.size();
        if (i % 3 == 1) {
          first = address_at;
          count = d.worker_address.size();
        } else if (i % 3 == 2) {
          first = rkey_at;
          count = d.pools.back().regions.back().rkey.size();
        }
        bit = first * 8 + std::uniform_int_distribution<size_t>(0, count * 8 - 1)(rng_);
      }
      proof[bit / 8] = static_cast<char>(proof[bit / 8] ^ (1 << (bit % 8)));
      if (flip == Flip::kBeforeSealing) proof = a->handshake.session.Seal(std::move(proof));
      if (Trace()) {
        std::fprintf(stderr,
                     "hostile_peer_test: %s PROOF %d flips bit %zu of frame byte %zu (%s)\n",
                     flip == Flip::kWrongSecret    ? "wrong-secret"
                     : flip == Flip::kBeforeSealing ? "authenticated (flipped, then sealed)"
                                                    : "sealed, then flipped",
                     i, bit % 8, bit / 8,
                     i % 3 == 0 ? "frame" : i % 3 == 1 ? "worker address" : "rkey");
      }
      a->client.Send(proof);
      a->client.ShutdownWrite();
      std::vector<wire::Message> got;
      tally->Add(Finish(a->client, flip == Flip::kBeforeSealing, &got, &a->handshake.session));
      if (texts != nullptr) {
        for (const wire::Message& m : got) {
          if (m.type == MessageType::kReject) texts->push_back(m.text);
        }
      }
      if (flip != Flip::kBeforeSealing) {
        EXPECT_EQ(listener_->GetStats().Live(ResourceKind::kEndpoint),
                  baseline_.Live(ResourceKind::kEndpoint));
        EXPECT_EQ(listener_->GetStats().Live(ResourceKind::kRemoteKey),
                  baseline_.Live(ResourceKind::kRemoteKey));
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
                         TransportName);

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
      wire::Encode(HelloMessage("mallory", 1, std::string(wire::kNonceBytes, 'n')));
  Tally cut, relabeled;
  for (size_t len = 0; len < hello.size(); ++len) {
    // The prefix, then end of stream: the server waits for the rest, then
    // drops the connection without an answer.
    cut.Add(SendOnce(hello.substr(0, len)));
    // The prefix with its header's length rewritten to match: a whole frame
    // whose body is short. Refused as malformed.
    if (len >= wire::kHeaderBytes) {
      relabeled.Add(SendOnce(FixFrameLength(hello.substr(0, len))));
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

// Every cut point of a correctly sealed PROOF (with a large worker address, a
// sample of them, always including the first bytes), three ways:
//   cut        sent as it is: the server waits for the rest, then drops the
//              connection at end of stream without an answer;
//   relabeled  the header's length rewritten to match (an attacker who does
//              not know the secret truncates the frame): refused by the seal
//              check, UNAUTHENTICATED, before any parsing;
//   resealed   cut before sealing, then sealed (a peer that knows the secret
//              sends a short PROOF): passes the seal, refused by the parser.
TEST_F(HostilePeerTest, TruncatedAuthenticatedProof) {
  const absl::Time start = absl::Now();
  // Names of one length, so that every PROOF has the same size.
  auto name = [](int i) { return absl::StrFormat("mallory-%06d", i); };
  const wire::AgentDescriptor descriptor = DonorDescriptor(name(0));
  ASSERT_FALSE(descriptor.worker_address.empty());
  const size_t inner_size = ProofFrame(std::string(wire::kProofBytes, 'p'), descriptor).size();
  const size_t size = inner_size + wire::kTagBytes;
  std::vector<size_t> cuts;
  const size_t stride = std::max<size_t>(1, size / static_cast<size_t>(Scaled(static_cast<int>(size))));
  for (size_t len = 0; len < size; len += (len < 64 ? 1 : stride)) cuts.push_back(len);
  enum Way { kCut, kRelabeled, kResealed };
  Tally tally[3];
  int inputs = 0;
  for (size_t len : cuts) {
    for (Way way : {kCut, kRelabeled, kResealed}) {
      if (way != kCut && len < wire::kHeaderBytes) continue;
      if (way == kResealed && len >= inner_size) continue;
      auto a = Hello(name(inputs), kSecret);
      ASSERT_TRUE(a.has_value());
      ++inputs;
      std::string inner = ProofFrame(ClientProof(a->handshake, kSecret),
                                     DonorDescriptor(a->handshake.transcript.client_name));
      ASSERT_EQ(inner.size(), inner_size);
      std::string frame;
      if (way == kResealed) {
        inner.resize(len);
        frame = a->handshake.session.Seal(FixFrameLength(std::move(inner)));
      } else {
        frame = a->handshake.session.Seal(std::move(inner));
        ASSERT_EQ(frame.size(), size);
        frame.resize(len);
        if (way == kRelabeled) frame = FixFrameLength(std::move(frame));
      }
      a->client.Send(frame);
      a->client.ShutdownWrite();
      std::vector<wire::Message> got;
      const std::string outcome =
          Finish(a->client, /*authenticated=*/false, &got, &a->handshake.session);
      tally[way].Add(outcome);
      if (way == kRelabeled && outcome == "REJECT(UNAUTHENTICATED)") {
        EXPECT_THAT(got[0].text, HasSubstr("shared secret mismatch"));
        EXPECT_TRUE(absl::StrContains(got[0].text, "frame 0 failed its integrity check") ||
                    absl::StrContains(got[0].text, "too short to be sealed"))
            << got[0].text;
      }
    }
  }
  const int relabeled = static_cast<int>(cuts.size()) - static_cast<int>(std::count_if(
      cuts.begin(), cuts.end(), [](size_t len) { return len < wire::kHeaderBytes; }));
  const int resealed = static_cast<int>(std::count_if(cuts.begin(), cuts.end(), [&](size_t len) {
    return len >= wire::kHeaderBytes && len < inner_size;
  }));
  EXPECT_EQ(tally[kCut].count("no reply"), static_cast<int>(cuts.size())) << tally[kCut].ToString();
  EXPECT_EQ(tally[kRelabeled].count("REJECT(UNAUTHENTICATED)"), relabeled)
      << tally[kRelabeled].ToString();
  EXPECT_EQ(tally[kResealed].count("REJECT(INVALID_ARGUMENT)"), resealed)
      << tally[kResealed].ToString();
  EXPECT_EQ(listener_->GetStats().Live(ResourceKind::kEndpoint), 0);
  ExpectRecovered(absl::StrCat("2b truncations of a sealed PROOF (", size, " B)"), inputs,
                  absl::StrCat("cut: ", tally[kCut].ToString(),
                               "; relabeled: ", tally[kRelabeled].ToString(),
                               "; cut, then sealed: ", tally[kResealed].ToString()),
                  start);
}

// ---- 3. Single-bit flips -------------------------------------------------------

TEST_F(HostilePeerTest, HelloBitFlips) {
  const absl::Time start = absl::Now();
  const int n = Scaled(500);
  Tally tally;
  for (int i = 0; i < n; ++i) {
    std::string hello = wire::Encode(HelloMessage(
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
// 3b, wrong secret (proof and seal under it): whatever the flip, the listener
// refuses before any UCX call and never welcomes.
//
// 3c, a malicious authenticated peer (the right secret, the bit flipped
// before sealing), opt-in with KVFERRY_HOSTILE_UCX=1: the seal and the proof
// check out, so a flipped worker address or rkey reaches ucp_ep_create /
// ucp_ep_rkey_unpack. With UCX 1.13.1 this aborts the listener (an assertion
// in ucp_ep_close_nbx's force close, "ucp_request.c:684 ... got REQ message",
// when the flipped address's wireup REQ is still pending as the peer hangs
// up), so it is not part of the default run. KVFERRY_HOSTILE_TRACE=1 names
// each input first.
//
// 3d, an on-path attacker (a correctly sealed PROOF, the bit flipped after
// sealing): every one fails the seal check, REJECT(UNAUTHENTICATED), and
// nothing reaches UCX: the listener's endpoint and rkey counters never leave
// their baseline while the inputs run.
TEST_P(HostilePeerUcxTest, UnauthenticatedProofBitFlips) {
  const absl::Time start = absl::Now();
  const int n = Scaled(transport().name == std::string("tcp") ? 500 : 200);
  Tally tally;
  PeakSampler peak(*listener_);
  ASSERT_NO_FATAL_FAILURE(FlipProofs(n, Flip::kWrongSecret, &tally));
  peak.Stop();
  for (const auto& [what, count] : tally.counts()) {
    EXPECT_TRUE(what == "no reply" || what == "REJECT(UNAUTHENTICATED)") << what;
  }
  EXPECT_EQ(peak.endpoints(), baseline_.Live(ResourceKind::kEndpoint));
  EXPECT_EQ(peak.remote_keys(), baseline_.Live(ResourceKind::kRemoteKey));
  ExpectRecovered("3b single-bit flips of a wrong-secret PROOF", n,
                  absl::StrCat(tally.ToString(), "; peak endpoints ", peak.endpoints(),
                               ", rkeys ", peak.remote_keys()),
                  start);
}

TEST_P(HostilePeerUcxTest, AuthenticatedProofBitFlips) {
  const char* opt_in = std::getenv("KVFERRY_HOSTILE_UCX");
  if (opt_in == nullptr || std::string(opt_in) != "1") {
    Rows().push_back({"3c PROOF bit flips, then sealed (peer knows the secret)",
                      transport().name, 0,
                      "skipped: aborts the listener in UCX 1.13.1 (opt in: "
                      "KVFERRY_HOSTILE_UCX=1)", 0});
    GTEST_SKIP() << "aborts in UCX 1.13.1 (see the comment); KVFERRY_HOSTILE_UCX=1 runs it";
  }
  const absl::Time start = absl::Now();
  const int n = Scaled(transport().name == std::string("tcp") ? 500 : 200);
  Tally tally;
  ASSERT_NO_FATAL_FAILURE(FlipProofs(n, Flip::kBeforeSealing, &tally));
  ExpectRecovered("3c PROOF bit flips, then sealed (peer knows the secret)", n,
                  tally.ToString(), start);
}

TEST_P(HostilePeerUcxTest, SealedProofBitFlips) {
  const absl::Time start = absl::Now();
  const int n = Scaled(transport().name == std::string("tcp") ? 500 : 200);
  Tally tally;
  std::vector<std::string> texts;
  PeakSampler peak(*listener_);
  ASSERT_NO_FATAL_FAILURE(FlipProofs(n, Flip::kAfterSealing, &tally, &texts));
  peak.Stop();
  EXPECT_EQ(tally.count("REJECT(UNAUTHENTICATED)"), n) << tally.ToString();
  ASSERT_EQ(texts.size(), static_cast<size_t>(n));
  for (const std::string& text : texts) {
    EXPECT_THAT(text, HasSubstr("shared secret mismatch"));
    EXPECT_THAT(text, HasSubstr("frame 0 failed its integrity check"));
  }
  EXPECT_EQ(peak.endpoints(), baseline_.Live(ResourceKind::kEndpoint));
  EXPECT_EQ(peak.remote_keys(), baseline_.Live(ResourceKind::kRemoteKey));
  ExpectRecovered("3d bit flips of a sealed PROOF (on-path attacker)", n,
                  absl::StrCat(tally.ToString(), "; peak endpoints ", peak.endpoints(),
                               ", rkeys ", peak.remote_keys(), " (baseline)"),
                  start);
}

// ---- 4. Oversized and foreign frames --------------------------------------------

// The listener caps a frame (header included) at 4 KiB before the HELLO is
// handled, at 512 KiB until the peer has authenticated, then at 1 MiB; a
// bigger header closes the connection before its body is read. Each cap gets
// a frame one byte over it and, where a frame can be read whole, one at
// exactly the cap: garbage, so that it is refused by the stage after the
// framing (the parser, or the seal check for an unsealed one).
TEST_F(HostilePeerTest, OversizedAndForeignFrames) {
  const absl::Time start = absl::Now();
  const int reps = Scaled(10);
  const uint16_t hello = static_cast<uint16_t>(MessageType::kHello);
  const uint16_t proof = static_cast<uint16_t>(MessageType::kProof);
  const uint16_t notify = static_cast<uint16_t>(MessageType::kNotify);
  const std::string valid_hello_body =
      wire::Encode(HelloMessage("mallory", 1, std::string(wire::kNonceBytes, 'n')))
          .substr(wire::kHeaderBytes);
  constexpr size_t kHelloCap = wire::kMaxHelloFrameBytes;
  constexpr size_t kProofCap = wire::kMaxProofFrameBytes;
  constexpr size_t kCap = wire::kMaxMessageBytes;
  auto body_of = [](size_t frame_bytes) {
    return static_cast<uint32_t>(frame_bytes - wire::kHeaderBytes);
  };
  // A whole frame of `frame_bytes` (header included) with a garbage body.
  auto garbage = [&](uint16_t type, size_t frame_bytes) {
    return FrameHeader(type, body_of(frame_bytes)) +
           std::string(frame_bytes - wire::kHeaderBytes, '\xa5');
  };
  // The same, sealed as the client's next frame: `frame_bytes` with the tag.
  auto sealed_garbage = [&](ClientHandshake* h, uint16_t type, size_t frame_bytes) {
    return h->session.Seal(garbage(type, frame_bytes - wire::kTagBytes));
  };
  enum class Stage {
    kFirst,          // the first bytes on the connection (cap 4 KiB)
    kAfterHello,     // after HELLO and CHALLENGE, where the PROOF goes (cap 512 KiB)
    kAuthenticated,  // after the whole handshake (cap 1 MiB)
  };
  struct Case {
    std::string name;
    Stage stage;
    std::function<std::string(ClientHandshake*)> bytes;
    std::string expected;     // what the server sends (after CHALLENGE / WELCOME), then closes
    size_t stream_after = 0;  // then this many more bytes (until refused)
    std::string peer_status;  // kAuthenticated: in the dropped peer's status
  };
  auto fixed = [](std::string b) { return [b](ClientHandshake*) { return b; }; };
  const std::string limit_1m = absl::StrCat("the limit is ", kCap - wire::kHeaderBytes);
  std::vector<Case> cases = {
      // Before the HELLO: 4 KiB.
      {"2 MiB body announced", Stage::kFirst, fixed(FrameHeader(hello, 2u << 20)), "no reply"},
      {"2 MiB body announced and sent", Stage::kFirst, fixed(FrameHeader(proof, 2u << 20)),
       "no reply", 2u << 20},
      {"4 GiB body announced", Stage::kFirst, fixed(FrameHeader(proof, 0xffffffffu)), "no reply"},
      {"1 MiB + 1 frame announced", Stage::kFirst,
       fixed(FrameHeader(proof, body_of(kCap + 1)) + std::string(1000, 'x')), "no reply"},
      {"1 MiB frame of garbage sent (the post-auth cap)", Stage::kFirst,
       fixed(garbage(proof, kCap)), "no reply"},
      {"4 KiB + 1 frame announced", Stage::kFirst,
       fixed(FrameHeader(hello, body_of(kHelloCap + 1)) + std::string(1000, 'x')), "no reply"},
      {"4 KiB + 1 frame of garbage sent", Stage::kFirst, fixed(garbage(hello, kHelloCap + 1)),
       "no reply"},
      {"4 KiB frame of garbage (at the pre-HELLO cap)", Stage::kFirst,
       fixed(garbage(hello, kHelloCap)), "REJECT(INVALID_ARGUMENT)"},
      {"HTTP GET", Stage::kFirst,
       fixed("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"), "no reply"},
      {"SSH banner", Stage::kFirst, fixed("SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"), "no reply"},
      {"TLS ClientHello", Stage::kFirst,
       fixed(std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11) +
             std::string(500, '\x42')),
       "no reply"},
      {"bad magic, valid HELLO body", Stage::kFirst,
       fixed(FrameHeader(hello, static_cast<uint32_t>(valid_hello_body.size()), 0x5946564c) +
             valid_hello_body),
       "no reply"},
      {"wire version 1", Stage::kFirst,
       fixed(FrameHeader(hello, static_cast<uint32_t>(valid_hello_body.size()), wire::kMagic, 1) +
             valid_hello_body),
       "REJECT(FAILED_PRECONDITION)"},
      {"wire version 0xffff", Stage::kFirst,
       fixed(FrameHeader(hello, static_cast<uint32_t>(valid_hello_body.size()), wire::kMagic,
                         0xffff) +
             valid_hello_body),
       "REJECT(FAILED_PRECONDITION)"},
      {"type 0", Stage::kFirst, fixed(FrameHeader(0, 0)), "REJECT(INVALID_ARGUMENT)"},
      {"type 9", Stage::kFirst, fixed(FrameHeader(9, 0)), "REJECT(INVALID_ARGUMENT)"},
      {"type 0xffff with a body", Stage::kFirst, fixed(FrameHeader(0xffff, 4) + "abcd"),
       "REJECT(INVALID_ARGUMENT)"},
      {"11 bytes of a header", Stage::kFirst, fixed(FrameHeader(hello, 8).substr(0, 11)),
       "no reply"},
      // After the HELLO: 512 KiB, sealed.
      {"HELLO; sealed 4 KiB + 1 frame of garbage", Stage::kAfterHello,
       [&](ClientHandshake* h) { return sealed_garbage(h, proof, kHelloCap + 1); },
       "REJECT(INVALID_ARGUMENT)"},
      {"HELLO; sealed 512 KiB frame of garbage (at the PROOF cap)", Stage::kAfterHello,
       [&](ClientHandshake* h) { return sealed_garbage(h, proof, kProofCap); },
       "REJECT(INVALID_ARGUMENT)"},
      {"HELLO; unsealed 512 KiB frame (at the PROOF cap)", Stage::kAfterHello,
       fixed(garbage(proof, kProofCap)), "REJECT(UNAUTHENTICATED)"},
      {"HELLO; sealed 512 KiB + 1 frame sent", Stage::kAfterHello,
       [&](ClientHandshake* h) { return sealed_garbage(h, proof, kProofCap + 1); }, "no reply"},
      {"HELLO; 1 MiB + 1 frame announced", Stage::kAfterHello,
       fixed(FrameHeader(proof, body_of(kCap + 1))), "no reply"},
      // Authenticated: 1 MiB, sealed.
      {"authenticated; sealed 1 MiB frame of garbage (at the cap)", Stage::kAuthenticated,
       [&](ClientHandshake* h) { return sealed_garbage(h, notify, kCap); }, "no reply", 0,
       "sent a bad message"},
      {"authenticated; sealed 1 MiB + 1 frame sent", Stage::kAuthenticated,
       [&](ClientHandshake* h) { return sealed_garbage(h, notify, kCap + 1); }, "no reply", 0,
       limit_1m},
      {"authenticated; 4 GiB body announced", Stage::kAuthenticated,
       fixed(FrameHeader(notify, 0xffffffffu)), "no reply", 0, limit_1m},
  };
  Tally tally;
  int inputs = 0;
  for (const Case& c : cases) {
    for (int r = 0; r < reps; ++r) {
      ++inputs;
      const std::string name = absl::StrCat("mallory-", inputs);
      std::optional<Authenticating> a;
      if (c.stage == Stage::kFirst) {
        a.emplace(Authenticating{Connect(), {}});
      } else if (c.stage == Stage::kAfterHello) {
        a = Hello(name, kSecret);
      } else {
        a = Authenticated(name);
      }
      ASSERT_TRUE(a.has_value() && a->client.open()) << c.name;
      a->client.Send(c.bytes(&a->handshake));
      size_t streamed = 0;
      const std::string chunk(64 << 10, '\x5a');
      while (streamed < c.stream_after && a->client.Send(chunk)) streamed += chunk.size();
      a->client.ShutdownWrite();
      const std::string outcome =
          Finish(a->client, /*authenticated=*/false, nullptr,
                 c.stage == Stage::kFirst ? nullptr : &a->handshake.session);
      EXPECT_EQ(outcome, c.expected) << c.name;
      tally.Add(absl::StrCat(c.name, ": ", outcome));
      if (c.stage == Stage::kAuthenticated) {
        auto p = listener_->GetPeer(name);
        ASSERT_THAT(p, IsOk());
        EXPECT_EQ(p->state, PeerState::kFailed) << c.name;
        EXPECT_THAT(p->status.message(), HasSubstr(c.peer_status)) << c.name;
      }
    }
  }
  std::string summary;
  for (const Case& c : cases) {
    absl::StrAppend(&summary, summary.empty() ? "" : "; ", c.name, " -> ",
                    c.stage == Stage::kAfterHello ? "CHALLENGE+" : "",
                    c.stage == Stage::kAuthenticated ? "WELCOME+" : "", c.expected,
                    c.peer_status.empty() ? ""
                                          : absl::StrCat(" (peer failed: ", c.peer_status, ")"));
  }
  ExpectRecovered("4 oversized (4K/512K/1M caps), bad magic/version/type", inputs, summary,
                  start);
}

// ---- 5. Wrong proof, malformed UCX blobs ----------------------------------------

// Half the PROOFs carry a random proof, correctly sealed (the seal passes, the
// proof check refuses), half a proof under the wrong secret, sealed under it
// (the seal check refuses). Either way before any UCX call.
TEST_F(HostilePeerTest, WrongProofWithMalformedUcxBlobs) {
  const absl::Time start = absl::Now();
  const int n = Scaled(100);
  Tally tally;
  PeakSampler peak(*listener_);
  for (int i = 0; i < n; ++i) {
    const std::string name = absl::StrCat("mallory-", i);
    const bool random_proof = i % 2 == 0;
    auto a = Hello(name, random_proof ? kSecret : "not-the-secret");
    ASSERT_TRUE(a.has_value());
    wire::AgentDescriptor d{.name = name,
                            .host_id = "not-this-host",
                            .worker_address = RandomBytes(rng_, 1 + rng_() % 4096)};
    d.pools.push_back({.name = "kv", .layout = Layout(64),
                       .regions = {{.base = 0x10000, .length = Layout(64).total_bytes(),
                                    .rkey = i % 3 == 0 ? std::string("\xff\xff")
                                                       : RandomBytes(rng_, 1 + rng_() % 512)}}});
    const std::string proof = random_proof ? RandomBytes(rng_, wire::kProofBytes)
                                           : ClientProof(a->handshake, "not-the-secret");
    a->client.Send(SealedProofFrame(a->handshake, proof, d));
    std::vector<wire::Message> got;
    const std::string outcome =
        Finish(a->client, /*authenticated=*/false, &got, &a->handshake.session);  // no half-close
    tally.Add(absl::StrCat(random_proof ? "random proof, sealed: " : "wrong secret: ", outcome));
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0].type, MessageType::kReject);
    EXPECT_EQ(got[0].code, static_cast<uint32_t>(absl::StatusCode::kUnauthenticated));
    EXPECT_THAT(got[0].text, HasSubstr("shared secret mismatch"));
    // The random proof passed the seal and failed the proof check.
    EXPECT_EQ(absl::StrContains(got[0].text, "integrity check"), !random_proof) << got[0].text;
    // Refused at the seal or proof check, both before any UCX call: no
    // endpoint or rkey was ever made for it.
    EXPECT_EQ(listener_->GetStats().Live(ResourceKind::kEndpoint), 0);
    EXPECT_EQ(listener_->GetStats().Live(ResourceKind::kRemoteKey), 0);
  }
  peak.Stop();
  EXPECT_EQ(peak.endpoints(), 0);
  EXPECT_EQ(peak.remote_keys(), 0);
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
  // After a valid HELLO, anything but PROOF is refused just the same: sealed
  // (a peer that knows the secret) by the handshake's state machine, unsealed
  // by the seal check. An unsealed REJECT is the one frame accepted unsealed:
  // the peer gave up.
  for (const wire::Message& m : messages) {
    if (m.type == MessageType::kProof) continue;
    const std::string type(wire::MessageTypeName(m.type));
    for (bool sealed : {true, false}) {
      if (m.type == MessageType::kReject && sealed) continue;
      for (int r = 0; r < reps; ++r, ++inputs) {
        auto a = Hello(absl::StrCat("mallory-", inputs), kSecret);
        ASSERT_TRUE(a.has_value());
        a->client.Send(SealAs(a->handshake, wire::Encode(m),
                                       sealed ? SealMode::kCorrect : SealMode::kNone));
        std::vector<wire::Message> got;
        const std::string outcome =
            Finish(a->client, /*authenticated=*/false, &got, &a->handshake.session);
        tally.Add(absl::StrCat("HELLO then ", sealed ? "sealed " : "unsealed ", type,
                               ": CHALLENGE+", outcome));
        if (m.type == MessageType::kReject) {
          EXPECT_EQ(outcome, "no reply");
        } else if (sealed) {
          ASSERT_EQ(outcome, "REJECT(INVALID_ARGUMENT)") << type;
          EXPECT_THAT(got[0].text, HasSubstr(absl::StrCat(
                                       type, " where PROOF was expected (before authentication)")));
        } else {
          ASSERT_EQ(outcome, "REJECT(UNAUTHENTICATED)") << type;
          EXPECT_THAT(got[0].text, HasSubstr("shared secret mismatch"));
        }
      }
    }
  }
  for (bool sealed : {true, false}) {  // And a second HELLO.
    ++inputs;
    auto a = Hello("mallory-twice", kSecret);
    ASSERT_TRUE(a.has_value());
    a->client.Send(SealAs(
        a->handshake, wire::Encode(HelloMessage("mallory-twice", 2, nonce)),
        sealed ? SealMode::kCorrect : SealMode::kNone));
    const std::string outcome = Finish(a->client, false, nullptr, &a->handshake.session);
    tally.Add(absl::StrCat("HELLO then ", sealed ? "sealed " : "unsealed ",
                           "HELLO: CHALLENGE+", outcome));
    EXPECT_EQ(outcome, sealed ? "REJECT(INVALID_ARGUMENT)" : "REJECT(UNAUTHENTICATED)");
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
      wire::Encode(HelloMessage("mallory", 1, std::string(wire::kNonceBytes, 'n')));
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
    a->client.Send(SealedProofFrame(a->handshake, ClientProof(a->handshake, kSecret),
                                    DonorDescriptor("prefill")));
    std::vector<wire::Message> got;
    const std::string outcome =
        Finish(a->client, /*authenticated=*/true, &got, &a->handshake.session);
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

// A client with another secret: its PROOF sealed under the keys that secret
// gives (what a misconfigured agent sends), or unsealed (a client of the
// previous protocol). Refused by the seal check either way.
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
    const bool sealed = i % 2 == 0;
    a->client.Send(SealedProofFrame(a->handshake,
                                    ClientProof(a->handshake, "wrong-secret"),
                                    DonorDescriptor(name),
                                    sealed ? SealMode::kCorrect : SealMode::kNone));
    std::vector<wire::Message> got;
    const std::string outcome =
        Finish(a->client, /*authenticated=*/false, &got, &a->handshake.session);
    tally.Add(absl::StrCat(sealed ? "sealed under it: " : "unsealed: ", "CHALLENGE+", outcome));
    // CHALLENGE, then the REJECT, then the close: nothing else.
    ASSERT_EQ(got.size(), 1u) << outcome;
    EXPECT_EQ(got[0].type, MessageType::kReject);
    EXPECT_EQ(got[0].code, static_cast<uint32_t>(absl::StatusCode::kUnauthenticated));
    EXPECT_THAT(got[0].text, HasSubstr("shared secret mismatch"));
    EXPECT_THAT(got[0].text, HasSubstr("frame 0 failed its integrity check"));
  }
  ExpectRecovered("11 wrong secret (PROOF sealed under it / unsealed)", n, tally.ToString(),
                  start);
}

// ---- 12. An on-path attacker rewrites a descriptor --------------------------------

// What an on-path attacker would redirect in a descriptor.
constexpr const char* kDescriptorTargets[] = {"worker address", "rkey", "pool base", "host id"};

// A tamper function that rewrites one byte (XOR `flip`) of kDescriptorTargets[target]
// in the sealed PROOF or WELCOME that is frame `index` of its direction, and
// counts what it rewrote.
TamperingProxy::Tamper RewriteDescriptor(int index, int target, int flip,
                                         std::shared_ptr<std::atomic<int>> rewritten) {
  return [=](int i, std::string* frame) {
    if (i != index || frame->size() < wire::kHeaderBytes + wire::kTagBytes) return;
    // Sealing does not hide the descriptor: strip the tag and read it.
    const std::string inner =
        FixFrameLength(frame->substr(0, frame->size() - wire::kTagBytes));
    absl::StatusOr<wire::Message> m = wire::Decode(inner);
    if (!m.ok() || m->agent.pools.empty() ||
        (m->type != MessageType::kProof && m->type != MessageType::kWelcome)) {
      return;
    }
    const wire::AgentDescriptor& d = m->agent;
    const size_t descriptor_at =
        wire::kHeaderBytes + (m->type == MessageType::kProof ? 4 + wire::kProofBytes : 0);
    size_t at = std::string::npos;
    switch (target) {
      case 0:
        at = frame->find(d.worker_address, descriptor_at) + d.worker_address.size() / 2;
        break;
      case 1:  // the last field of the frame
        at = inner.size() - d.pools.back().regions.back().rkey.size() / 2 - 1;
        break;
      case 2: {
        char base[8];
        std::memcpy(base, &d.pools[0].regions[0].base, 8);
        at = frame->find(std::string(base, 8), descriptor_at) + 1;
        break;
      }
      case 3:
        if (d.host_id.empty()) return;
        at = frame->find(d.host_id, descriptor_at);
        break;
    }
    if (at >= inner.size()) return;
    (*frame)[at] = static_cast<char>((*frame)[at] ^ flip);
    ++*rewritten;
  };
}

// A real agent connects through TamperingProxy, which rewrites one byte of a
// descriptor (the worker address, the pool's rkey, the pool's base address or
// the host id: what an attacker would redirect):
//   a. in the agent's sealed PROOF: the listener refuses it at the seal check
//      (UNAUTHENTICATED) before any UCX call, and the agent's Connect fails
//      with UNAUTHENTICATED;
//   b. in the listener's sealed WELCOME: the agent refuses it at the seal
//      check before any UCX call (its Connect fails with UNAUTHENTICATED)
//      and the listener drops the peer it had welcomed.
// Through the same proxy, untouched, the agent connects and WRITEs before and
// after a (so the proxy is not what fails). Not after b: a refused WELCOME
// breaks the data path of this agent's later connections to the listener
// (DISABLED_ReconnectAfterRefusedWelcome); the well-behaved agent of
// ExpectRecovered is a fresh one.
TEST_F(HostilePeerTest, OnPathDescriptorRewrite) {
  const absl::Time start = absl::Now();
  TamperingProxy proxy(port_);
  ASSERT_NE(proxy.port(), 0);
  const std::string name = "prefill-12";
  auto client = Agent::Create(Options(name));
  ASSERT_THAT(client, IsOk());
  KvPool* client_pool = *(*client)->CreatePool("kv", Layout(32));
  auto connect_and_write = [&](uint64_t seed) {
    ASSERT_THAT((*client)->Connect("127.0.0.1", proxy.port(), kDeadline), IsOk());
    ASSERT_THAT(listener_->WaitForPeer(name, kDeadline), IsOk());
    ASSERT_NO_FATAL_FAILURE(WriteAndVerify(**client, *client_pool, seed));
    ASSERT_THAT((*client)->Disconnect("decode"), IsOk());
    EXPECT_TRUE(WaitFor([&] {
      auto p = listener_->GetPeer(name);
      return p.ok() && p->state == PeerState::kClosed;
    }, kDeadline));
  };
  ASSERT_NO_FATAL_FAILURE(connect_and_write(12));
  ASSERT_TRUE(WaitFor([&] {
    const Stats s = (*client)->GetStats();
    return s.Live(ResourceKind::kEndpoint) == 0 && s.Live(ResourceKind::kRemoteKey) == 0;
  }, kDeadline)) << (*client)->GetStats().ToString();
  // The listener's side of that connection is gone too (its data endpoint
  // closes in its progress passes after the BYE) before the peaks below.
  ASSERT_TRUE(WaitFor([&] {
    const Stats s = listener_->GetStats();
    return s.Live(ResourceKind::kEndpoint) == baseline_.Live(ResourceKind::kEndpoint) &&
           s.Live(ResourceKind::kRemoteKey) == baseline_.Live(ResourceKind::kRemoteKey);
  }, kDeadline)) << listener_->GetStats().ToString();

  const int n = Scaled(8);  // per direction
  Tally tally;
  PeakSampler listener_peak(*listener_);
  for (int i = 0; i < n; ++i) {  // a. the PROOF, toward the listener
    const int target = i % 4;
    auto rewritten = std::make_shared<std::atomic<int>>(0);
    proxy.set_tamper(RewriteDescriptor(/*index=*/1, target, 1 << (i / 4 % 8), rewritten));
    const absl::StatusOr<PeerInfo> got = (*client)->Connect("127.0.0.1", proxy.port(), kDeadline);
    EXPECT_EQ(rewritten->load(), 1) << kDescriptorTargets[target];
    ASSERT_THAT(got, StatusIs(absl::StatusCode::kUnauthenticated,
                              "frame 0 failed its integrity check"))
        << kDescriptorTargets[target];
    tally.Add(absl::StrCat("PROOF ", kDescriptorTargets[target], ": Connect ",
                           absl::StatusCodeToString(got.status().code())));
    auto p = listener_->GetPeer(name);  // still the one that said BYE
    ASSERT_THAT(p, IsOk());
    EXPECT_EQ(p->state, PeerState::kClosed);
  }
  listener_peak.Stop();
  EXPECT_EQ(listener_peak.endpoints(), baseline_.Live(ResourceKind::kEndpoint));
  EXPECT_EQ(listener_peak.remote_keys(), baseline_.Live(ResourceKind::kRemoteKey));
  proxy.set_tamper(nullptr);
  ASSERT_NO_FATAL_FAILURE(connect_and_write(13));
  ASSERT_TRUE(WaitFor([&] {
    return (*client)->GetStats().Live(ResourceKind::kEndpoint) == 0;
  }, kDeadline)) << (*client)->GetStats().ToString();

  PeakSampler client_peak(**client);
  // b. the WELCOME, toward the agent. The listener has already made its data
  // endpoint; when the agent refuses the WELCOME the listener force-closes it
  // while UCX's wireup of it may still be in flight, and UCX 1.13 then aborts
  // the process (ucp_request.c:684 "got REP message"; seen under load). Like
  // class 3c this runs only with KVFERRY_HOSTILE_UCX=1 until kvferry waits
  // for the listener's wireup too (see DISABLED_ReconnectAfterRefusedWelcome).
  const char* ucx_opt_in = std::getenv("KVFERRY_HOSTILE_UCX");
  const int welcome_rounds = ucx_opt_in != nullptr && std::string(ucx_opt_in) == "1" ? n : 0;
  if (welcome_rounds == 0) tally.Add("WELCOME rewrites: opt-in (KVFERRY_HOSTILE_UCX=1)");
  for (int i = 0; i < welcome_rounds; ++i) {  // b. the WELCOME, toward the agent
    const int target = i % 4;
    auto rewritten = std::make_shared<std::atomic<int>>(0);
    proxy.set_tamper(nullptr,
                     RewriteDescriptor(/*index=*/1, target, 1 << (i / 4 % 8), rewritten));
    const absl::StatusOr<PeerInfo> got = (*client)->Connect("127.0.0.1", proxy.port(), kDeadline);
    EXPECT_EQ(rewritten->load(), 1) << kDescriptorTargets[target];
    ASSERT_THAT(got, StatusIs(absl::StatusCode::kUnauthenticated,
                              "frame 0 failed its integrity check"))
        << kDescriptorTargets[target];
    // The listener had welcomed the agent; the agent's REJECT (unsealed, so
    // it fails the listener's seal check after the handshake) or its close
    // ends that peer.
    EXPECT_TRUE(WaitFor([&] {
      auto p = listener_->GetPeer(name);
      return p.ok() && p->state == PeerState::kFailed;
    }, kDeadline)) << kDescriptorTargets[target];
    tally.Add(absl::StrCat("WELCOME ", kDescriptorTargets[target], ": Connect ",
                           absl::StatusCodeToString(got.status().code()),
                           ", listener's peer failed"));
  }
  client_peak.Stop();
  EXPECT_EQ(client_peak.endpoints(), 0);
  EXPECT_EQ(client_peak.remote_keys(), 0);
  client->reset();
  ExpectRecovered("12 on-path rewrite of a PROOF / WELCOME descriptor", n + welcome_rounds,
                  absl::StrCat(tally.ToString(), "; peak endpoints: listener ",
                               listener_peak.endpoints(), " (baseline) during a, agent ",
                               client_peak.endpoints(), " during b; untouched through the "
                               "proxy: connected + WRITE verified, before and after a"),
                  start);
}

// After the listener has welcomed an agent (and made its data endpoint to it)
// but the agent did not take the WELCOME, the same two agents connect again,
// directly, and the agent WRITEs. Two ways the WELCOME is not taken: one bit
// of it altered on the way (the agent refuses it at the seal check), and the
// WELCOME held back past the agent's Connect timeout (no attacker needed: a
// slow listener or network and a short timeout). Equally, presumably, a
// WELCOME whose rkey does not unpack. Today that WRITE fails with "peer
// 'decode' failed: Connection reset by remote peer", and so does every later
// connection between these two agents (seen for 3 rounds; a pause of 3 s
// before reconnecting only moves the failure one round later). The likely
// cause is UCX's endpoint matching by connection sequence number: the
// listener's half-made endpoint advanced its sequence toward the agent's
// worker, the agent's did not, and each later endpoint of the agent pairs
// with the listener's previous, closed one. Under ASan, destroying the agent
// after the failed WRITE then aborted in UCX 1.13.1 (ucp_worker_destroy ->
// uct_tcp_ep_pending_purge, "ucp_request.c:684 ... got REQ message").
// Disabled until src/ handles it; run with --gtest_also_run_disabled_tests.
TEST_F(HostilePeerTest, DISABLED_ReconnectAfterRefusedWelcome) {
  TamperingProxy proxy(port_);
  ASSERT_NE(proxy.port(), 0);
  struct Trigger {
    std::string name;
    TamperingProxy::Tamper to_client;
    absl::Duration timeout;
    absl::StatusCode code;
  };
  const std::vector<Trigger> triggers = {
      {"WELCOME altered",
       RewriteDescriptor(/*index=*/1, /*target=*/0, 1, std::make_shared<std::atomic<int>>(0)),
       kDeadline, absl::StatusCode::kUnauthenticated},
      {"WELCOME after the Connect timeout",
       [](int index, std::string*) {
         if (index == 1) absl::SleepFor(absl::Milliseconds(1500));
       },
       absl::Milliseconds(300), absl::StatusCode::kDeadlineExceeded},
  };
  int k = 0;
  for (const Trigger& trigger : triggers) {
    SCOPED_TRACE(trigger.name);
    const std::string name = absl::StrCat("prefill-refused-", k++);
    auto client = Agent::Create(Options(name));
    ASSERT_THAT(client, IsOk());
    KvPool* client_pool = *(*client)->CreatePool("kv", Layout(32));
    proxy.set_tamper(nullptr, trigger.to_client);
    EXPECT_EQ((*client)->Connect("127.0.0.1", proxy.port(), trigger.timeout).status().code(),
              trigger.code);
    ASSERT_TRUE(WaitFor([&] {  // it had been welcomed there
      auto p = listener_->GetPeer(name);
      return p.ok() && p->state == PeerState::kFailed;
    }, kDeadline));
    [&] {
      for (int round = 0; round < 2; ++round) {
        SCOPED_TRACE(absl::StrCat("round ", round));
        ASSERT_THAT((*client)->Connect("127.0.0.1", port_, kDeadline), IsOk());
        ASSERT_THAT(listener_->WaitForPeer(name, kDeadline), IsOk());
        ASSERT_NO_FATAL_FAILURE(WriteAndVerify(**client, *client_pool, 40 + round));
        ASSERT_THAT((*client)->Disconnect("decode"), IsOk());
        ASSERT_TRUE(WaitFor([&] {
          auto p = listener_->GetPeer(name);
          return p.ok() && p->state == PeerState::kClosed;
        }, kDeadline));
      }
    }();
  }
}

// ---- 13. Injected, replayed, reordered frames after the handshake ---------------

// An authenticated raw client, after a correct handshake, sends a frame that
// it (or an on-path attacker) did not seal correctly. The listener drops the
// peer (kFailed, the seal check named in its status) and delivers nothing.
TEST_F(HostilePeerTest, InjectedFramesAfterHandshake) {
  const absl::Time start = absl::Now();
  (void)listener_->PollNotifications();
  const wire::Message notify{.type = MessageType::kNotify,
                             .text = "injected: layer 3 of request 42 is ready"};
  const wire::Message ping{.type = MessageType::kPing};
  struct Variant {
    std::string name;
    std::function<void(Authenticating&)> send;
  };
  const std::vector<Variant> variants = {
      {"unsealed NOTIFY",
       [&](Authenticating& a) { a.client.Send(wire::Encode(notify)); }},
      {"sealed PING sent twice (replay)",
       [&](Authenticating& a) {
         const std::string frame = a.handshake.session.Seal(ping);
         a.client.Send(frame);
         a.client.Send(frame);
       }},
      {"the PROOF replayed (frame 0)",
       [&](Authenticating& a) { a.client.Send(a.handshake.proof_frame); }},
      {"PING 1, then NOTIFY sealed as 1 again",
       [&](Authenticating& a) {
         a.client.Send(a.handshake.session.Seal(ping));
         a.client.Send(wire::SealFrame(a.handshake.session.send_key, 1, wire::Encode(notify)));
       }},
      {"NOTIFY sealed as 2 (1 skipped)",
       [&](Authenticating& a) {
         a.client.Send(wire::SealFrame(a.handshake.session.send_key, 2, wire::Encode(notify)));
       }},
      {"the server's WELCOME reflected",
       [&](Authenticating& a) { a.client.Send(a.handshake.welcome_frame); }},
      {"NOTIFY under the server's key",
       [&](Authenticating& a) {
         a.client.Send(SealAs(a.handshake, wire::Encode(notify), SealMode::kServerKey));
       }},
      {"NOTIFY with a bit flipped after sealing",
       [&](Authenticating& a) {
         std::string frame = a.handshake.session.Seal(notify);
         frame[wire::kHeaderBytes + 4 + 3] ^= 0x20;
         a.client.Send(frame);
       }},
  };
  const int reps = Scaled(4);
  Tally tally;
  int inputs = 0;
  // Each authenticated peer holds a data endpoint until it is dropped: the
  // sampler must see it (the control for the "no UCX call" checks elsewhere).
  PeakSampler peak(*listener_);
  for (const Variant& v : variants) {
    for (int r = 0; r < reps; ++r, ++inputs) {
      const std::string name = absl::StrCat("mallory-13-", inputs);
      auto a = Authenticated(name);
      ASSERT_TRUE(a.has_value()) << v.name;
      v.send(*a);
      // End of stream right behind it: the listener handles the frame first,
      // and a listener that wrongly accepted it still ends the peer at once
      // (for another reason, which the status check below catches) instead
      // of at its peer_timeout.
      a->client.ShutdownWrite();
      ASSERT_TRUE(AwaitPeerNotConnected(name)) << v.name << ": the peer is still connected";
      auto p = listener_->GetPeer(name);
      ASSERT_THAT(p, IsOk());
      EXPECT_EQ(p->state, PeerState::kFailed) << v.name;
      EXPECT_THAT(p->status, StatusIs(absl::StatusCode::kUnavailable, "failed its integrity check"))
          << v.name;
      // The listener closed the connection, sending nothing but (sealed) PINGs.
      std::vector<wire::Message> got;
      const std::string outcome =
          Finish(a->client, /*authenticated=*/true, &got, &a->handshake.session);
      EXPECT_EQ(outcome, "no reply") << v.name;
      const std::vector<Notification> delivered = listener_->PollNotifications();
      EXPECT_TRUE(delivered.empty()) << v.name << ": " << delivered.size() << " delivered";
      tally.Add(absl::StrCat(v.name, ": peer ", p->state == PeerState::kFailed ? "failed" : "?",
                             ", ", delivered.size(), " delivered"));
    }
  }
  peak.Stop();
  EXPECT_GT(peak.endpoints(), baseline_.Live(ResourceKind::kEndpoint));
  ExpectRecovered("13 injected/replayed/reordered frames after auth", inputs,
                  absl::StrCat(tally.ToString(), "; peak endpoints ", peak.endpoints(),
                               " (authenticated peers)"),
                  start);
}

// ---- 14. The positive control of 13 ---------------------------------------------

// The same authenticated raw client, sealing each frame with the next
// sequence number: every NOTIFY is delivered, in order (PINGs between them),
// and the peer stays connected; then it leaves with a sealed BYE, or the
// listener disconnects it and the raw client opens the listener's sealed BYE.
TEST_F(HostilePeerTest, SealedFramesAfterHandshakeAreDelivered) {
  const absl::Time start = absl::Now();
  (void)listener_->PollNotifications();
  const int n = Scaled(8);
  Tally tally;
  int delivered_total = 0;
  for (int i = 0; i < n; ++i) {
    const std::string name = absl::StrCat("raw-14-", i);
    auto a = Authenticated(name);
    ASSERT_TRUE(a.has_value());
    std::vector<std::string> sent;
    for (int k = 0; k <= i % 4; ++k) {
      if (k % 2 == 1) {
        ASSERT_TRUE(SendSealed(a->client, a->handshake, {.type = MessageType::kPing}));
      }
      sent.push_back(absl::StrCat("raw ", i, " note ", k));
      ASSERT_TRUE(SendSealed(a->client, a->handshake,
                                      {.type = MessageType::kNotify, .text = sent.back()}));
    }
    std::vector<std::string> delivered;
    const absl::Time deadline = absl::Now() + kDeadline;
    while (delivered.size() < sent.size() && absl::Now() < deadline) {
      for (const Notification& note : listener_->WaitForNotifications(absl::Seconds(1))) {
        EXPECT_EQ(note.peer, name);
        delivered.push_back(note.payload);
      }
    }
    EXPECT_EQ(delivered, sent);
    delivered_total += static_cast<int>(delivered.size());
    auto p = listener_->GetPeer(name);
    ASSERT_THAT(p, IsOk());
    EXPECT_EQ(p->state, PeerState::kConnected);
    std::vector<wire::Message> got;
    std::string how;
    if (i % 2 == 0) {
      how = "BYE from the raw client";
      ASSERT_TRUE(SendSealed(a->client, a->handshake, {.type = MessageType::kBye}));
    } else {
      how = "listener Disconnect, its sealed BYE opened";
      ASSERT_THAT(listener_->Disconnect(name), IsOk());
    }
    EXPECT_EQ(a->client.ReadUntilClosed(&got, kDeadline, &a->handshake.session),
              HostileClient::Event::kClosed);
    std::erase_if(got, [](const wire::Message& m) { return m.type == MessageType::kPing; });
    if (i % 2 == 1) {
      ASSERT_EQ(got.size(), 1u);
      EXPECT_EQ(got[0].type, MessageType::kBye);
    } else {
      EXPECT_TRUE(got.empty());
    }
    EXPECT_TRUE(WaitFor([&] {
      auto q = listener_->GetPeer(name);
      return q.ok() && q->state == PeerState::kClosed;
    }, kDeadline)) << how;
    tally.Add(absl::StrCat(how, ": all delivered, closed"));
  }
  ExpectRecovered("14 sealed NOTIFY/PING/BYE after auth (control of 13)", n,
                  absl::StrCat(tally.ToString(), "; ", delivered_total,
                               " notifications delivered in order"),
                  start);
}

// ---- 15. Offer and pool messages from an authenticated peer ------------------------

// A peer that completed the handshake may send the offer messages and
// POOL_ADDED at will. The listener has a real offer open to a good peer; raw
// authenticated clients (a) claim it done, revoked-confirmed and failed (it
// is not theirs: ignored), (b) revoke offers the listener never saw with the
// latest deadline there is (answered, remembered, bounded), (c) one more than
// the bound (the peer is failed, nothing else), (d) announce a pool already
// announced (the peer is failed). The good peer then consumes the offer.
TEST_F(HostilePeerTest, OfferAndPoolMessagesFromAnAuthenticatedPeer) {
  const absl::Time start = absl::Now();
  (void)listener_->PollNotifications();
  auto good = Agent::Create(Options("taker", secret_));
  ASSERT_THAT(good, IsOk());
  auto good_pool = (*good)->CreatePool("kv", Layout(32));
  ASSERT_THAT(good_pool, IsOk());
  ASSERT_THAT((*good)->Connect("127.0.0.1", port_, kDeadline), IsOk());
  ASSERT_THAT(listener_->WaitForPeer("taker", kDeadline), IsOk());
  auto lent = pool_->Lease(2);
  ASSERT_THAT(lent, IsOk());
  for (size_t i = 0; i < lent->size(); ++i) FillBlock(*lent, i, 15, lent->ids()[i]);
  auto offer = listener_->Offer(*lent, "taker", absl::Seconds(600));
  ASSERT_THAT(offer, IsOk());
  const uint64_t id = offer->id();
  Tally tally;
  int inputs = 0;

  // Frames are handled in order: a NOTIFY behind them, once delivered, says
  // the listener has handled everything before it.
  auto send_then_mark = [&](Authenticating& a, const std::string& name,
                            const std::vector<wire::Message>& frames) {
    for (const wire::Message& m : frames) {
      ASSERT_TRUE(SendSealed(a.client, a.handshake, m));
    }
    const std::string marker = absl::StrCat(name, " sent ", frames.size());
    ASSERT_TRUE(SendSealed(a.client, a.handshake,
                                    {.type = MessageType::kNotify, .text = marker}));
    bool seen = false;
    const absl::Time deadline = absl::Now() + kDeadline;
    while (!seen && absl::Now() < deadline) {
      for (const Notification& n : listener_->WaitForNotifications(absl::Seconds(1))) {
        seen = seen || (n.peer == name && n.payload == marker);
      }
    }
    ASSERT_TRUE(seen) << name << ": the listener did not get through " << frames.size()
                      << " frames";
  };

  {  // (a) Someone else's offer: done, confirmed, failed.
    const std::string name = "mallory-15a";
    auto a = Authenticated(name);
    ASSERT_TRUE(a.has_value());
    ASSERT_NO_FATAL_FAILURE(send_then_mark(
        *a, name,
        {{.type = MessageType::kOfferDone, .offer_id = id, .layer_begin = 0,
          .layer_end = Layout(64).num_layers},
         {.type = MessageType::kOfferRevoked, .offer_id = id},
         {.type = MessageType::kOfferDone, .code = 10, .text = "aborted", .offer_id = id,
          .layer_begin = 0, .layer_end = 1}}));
    inputs += 3;
    EXPECT_EQ(offer->state(), OfferState::kOpen);
    EXPECT_EQ(listener_->GetPeer(name)->state, PeerState::kConnected);
    a->client.ShutdownWrite();
    std::vector<wire::Message> got;
    Finish(a->client, /*authenticated=*/true, &got, &a->handshake.session);
    EXPECT_TRUE(got.empty()) << Describe(got);
    tally.Add("OFFER_DONE/OFFER_REVOKED for the taker's offer: ignored, offer open");
  }
  {  // (b) Revokes of offers never seen, with the farthest deadline.
    const std::string name = "mallory-15b";
    auto a = Authenticated(name);
    ASSERT_TRUE(a.has_value());
    const int n = Scaled(200);
    std::vector<wire::Message> revokes;
    for (int i = 0; i < n; ++i) {
      revokes.push_back({.type = MessageType::kOfferRevoke, .text = "revoked by mallory",
                         .offer_id = 1000 + static_cast<uint64_t>(i),
                         .ttl_ns = std::numeric_limits<int64_t>::max()});
    }
    revokes.push_back(revokes.front());  // a repeat is answered again, kept once
    ASSERT_NO_FATAL_FAILURE(send_then_mark(*a, name, revokes));
    inputs += n + 1;
    EXPECT_EQ(listener_->GetPeer(name)->state, PeerState::kConnected);
    a->client.ShutdownWrite();
    std::vector<wire::Message> got;
    Finish(a->client, /*authenticated=*/true, &got, &a->handshake.session);
    const auto confirmed = std::count_if(got.begin(), got.end(), [](const wire::Message& m) {
      return m.type == MessageType::kOfferRevoked;
    });
    EXPECT_EQ(confirmed, n + 1) << Describe(got);
    EXPECT_EQ(offer->state(), OfferState::kOpen);
    tally.Add(absl::StrCat(n + 1, " OFFER_REVOKE of unseen offers: ", confirmed,
                           " OFFER_REVOKED answered"));
  }
  {  // (c) One more unposted revoke than the bound.
    const std::string name = "mallory-15c";
    auto a = Authenticated(name);
    ASSERT_TRUE(a.has_value());
    const size_t n = wire::kMaxUnpostedRevokes + 1;
    for (size_t i = 0; i < n; ++i) {
      ASSERT_TRUE(SendSealed(
          a->client, a->handshake,
          {.type = MessageType::kOfferRevoke, .offer_id = i + 1,
           .ttl_ns = std::numeric_limits<int64_t>::max()}))
          << "revoke " << i;
    }
    inputs += static_cast<int>(n);
    a->client.ShutdownWrite();
    ASSERT_TRUE(AwaitPeerNotConnected(name)) << name << " is still connected";
    auto p = listener_->GetPeer(name);
    ASSERT_THAT(p, IsOk());
    EXPECT_EQ(p->state, PeerState::kFailed);
    EXPECT_THAT(p->status, StatusIs(absl::StatusCode::kResourceExhausted,
                                    absl::StrCat("revoked more than ",
                                                 wire::kMaxUnpostedRevokes)));
    std::vector<wire::Message> got;
    Finish(a->client, /*authenticated=*/true, &got, &a->handshake.session);
    tally.Add(absl::StrCat(n, " unposted OFFER_REVOKE: peer failed (RESOURCE_EXHAUSTED)"));
  }
  {  // (d) A pool announced twice.
    const std::string name = "mallory-15d";
    auto a = Authenticated(name);
    ASSERT_TRUE(a.has_value());
    wire::Message added{.type = MessageType::kPoolAdded};
    added.agent.pools = DonorDescriptor(name).pools;  // "kv", announced in the PROOF
    ASSERT_FALSE(added.agent.pools.empty());
    ASSERT_TRUE(SendSealed(a->client, a->handshake, added));
    inputs += 1;
    a->client.ShutdownWrite();
    ASSERT_TRUE(AwaitPeerNotConnected(name));
    auto p = listener_->GetPeer(name);
    ASSERT_THAT(p, IsOk());
    EXPECT_EQ(p->state, PeerState::kFailed);
    EXPECT_THAT(p->status, StatusIs(absl::StatusCode::kInvalidArgument,
                                    "pool 'kv' was already announced"));
    std::vector<wire::Message> got;
    Finish(a->client, /*authenticated=*/true, &got, &a->handshake.session);
    tally.Add("POOL_ADDED of an announced pool: peer failed (INVALID_ARGUMENT)");
  }
  // (e) POOL_REMOVED of a pool it never announced; (f) of its own pool
  // twice: the first is honest (the listener forgets "kv"), the second
  // breaks the protocol.
  for (const bool twice : {false, true}) {
    const std::string name = twice ? "mallory-15f" : "mallory-15e";
    const std::string pool = twice ? "kv" : "never-announced";
    auto a = Authenticated(name);
    ASSERT_TRUE(a.has_value());
    const wire::Message removed{.type = MessageType::kPoolRemoved, .name = pool};
    ASSERT_TRUE(SendSealed(a->client, a->handshake, removed));
    inputs += 1;
    if (twice) {
      ASSERT_TRUE(WaitFor([&] {
        auto p = listener_->GetPeer(name);
        return p.ok() && p->state == PeerState::kConnected && p->pools.empty();
      }, kDeadline)) << name << " still lists its pool after an honest POOL_REMOVED";
      ASSERT_TRUE(SendSealed(a->client, a->handshake, removed));
      inputs += 1;
    }
    a->client.ShutdownWrite();
    ASSERT_TRUE(AwaitPeerNotConnected(name));
    auto p = listener_->GetPeer(name);
    ASSERT_THAT(p, IsOk());
    EXPECT_EQ(p->state, PeerState::kFailed);
    EXPECT_THAT(p->status,
                StatusIs(absl::StatusCode::kInvalidArgument,
                         absl::StrCat("POOL_REMOVED for pool '", pool, "', which it has not "
                                      "announced")));
    std::vector<wire::Message> got;
    Finish(a->client, /*authenticated=*/true, &got, &a->handshake.session);
    tally.Add(twice ? "POOL_REMOVED of a pool already removed: peer failed (INVALID_ARGUMENT)"
                    : "POOL_REMOVED of an unknown pool: peer failed (INVALID_ARGUMENT)");
  }

  // The good peer takes its offer: untouched by all of the above.
  EXPECT_EQ(offer->state(), OfferState::kOpen);
  auto into = (*good_pool)->Lease(2);
  ASSERT_THAT(into, IsOk());
  {
    auto t = (*good)->PostTransfer(
        {.op = TransferOp::kRead, .local = &*into, .offer_ticket = offer->ticket()});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(kDeadline), IsOk());
  }
  ASSERT_THAT(offer->Wait(kDeadline), IsOk());
  EXPECT_EQ(offer->state(), OfferState::kConsumed);
  for (size_t i = 0; i < into->size(); ++i) {
    EXPECT_EQ(BlockChecksum(*into, i), ExpectedChecksum(Layout(64), 15, lent->ids()[i]))
        << "block " << i;
  }
  into->Reset();
  lent->Reset();
  good->reset();
  EXPECT_TRUE(AwaitPeerNotConnected("taker"));
  ExpectRecovered("15 offer and pool messages from an authenticated peer", inputs,
                  tally.ToString(), start);
}

// ---- A listener without a secret -----------------------------------------------------

// Class 16: the kernel-copy probe (src/kernel_copy.h) from authenticated
// peers on this host whose pools UCX would reach only by emulation. Each
// names a process that is not itself: another process (a sleeping child),
// a pid that no process has, address 0, pid 0 (no probe), this very
// process, a pid past any pid. None may get the kernel-copy path: each stays
// on UCX's am-emulated path (which still moves data), the refusals that come
// from the kernel are logged naming the pid, and the sleeping child is
// never written to (it lives on).
TEST_F(HostilePeerTest, KernelCopyProbeNamesAnotherProcess) {
  const absl::Time start = absl::Now();
  std::mutex log_mu;
  std::vector<std::string> log;
  AgentOptions o = Options("decode");
  o.ucx_config = {{"TLS", kShm.tls}};
  o.log_sink = [&](const LogRecord& r) {
    std::lock_guard<std::mutex> l(log_mu);
    log.push_back(r.message);
  };
  ASSERT_NO_FATAL_FAILURE(StartListener(o));
  // A donor on shared memory with anonymous pools: its descriptor (this
  // process's pid, a probe) is what each peer sends, altered.
  AgentOptions d = Options("donor-anon");
  d.ucx_config = {{"TLS", kShm.tls}};
  d.pool_memory = PoolMemorySource::kAnonymousMmap;
  auto donor = Agent::Create(d);
  ASSERT_THAT(donor, IsOk());
  auto donor_pool = (*donor)->CreatePool("kv", Layout(64));
  ASSERT_THAT(donor_pool, IsOk());
  auto captured = CaptureDescriptor(**donor, kSecret);
  ASSERT_THAT(captured, IsOk());
  ASSERT_EQ(captured->pid, static_cast<uint64_t>(getpid()));
  ASSERT_NE(captured->probe_address, 0u);

  ChildProcess sleeper({"sleep", "600"});
  ASSERT_TRUE(sleeper.started());
  pid_t gone = 0;
  {
    ChildProcess exited({"true"});
    ASSERT_TRUE(exited.started());
    gone = exited.pid();
    EXPECT_EQ(exited.Wait(), 0);  // reaped: no process has that pid now
  }
  struct Case {
    const char* what;
    uint64_t pid;
    uint64_t probe_address;
    const char* logged;  // in the refusal line; null: silent
  };
  const uint64_t sleeper_pid = static_cast<uint64_t>(sleeper.pid());
  const std::vector<Case> cases = {
      {"another process", sleeper_pid, captured->probe_address, "pid"},
      {"another process, address 0", sleeper_pid, 0, "pid"},
      {"a pid no process has", static_cast<uint64_t>(gone), captured->probe_address, "pid"},
      {"no probe (pid 0)", 0, 0, nullptr},
      {"this process", static_cast<uint64_t>(getpid()), captured->probe_address, nullptr},
      {"a pid past any pid", uint64_t{1} << 40, captured->probe_address, nullptr},
  };
  Tally tally;
  int inputs = 0;
  for (const Case& c : cases) {
    const std::string name = absl::StrCat("mallory-16-", inputs++);
    wire::AgentDescriptor desc = *captured;
    desc.pid = c.pid;
    desc.probe_address = c.probe_address;
    HostileClient client = Connect();
    ASSERT_TRUE(client.open());
    auto h = Authenticate(client, name, 1, kSecret, desc, kDeadline);
    ASSERT_THAT(h, IsOk()) << c.what;
    auto peer = listener_->GetPeer(name);
    ASSERT_THAT(peer, IsOk());
    EXPECT_EQ(peer->data_path, kDataPathAmEmulated) << c.what;
    // UCX's path still moves data (into the donor, whose worker it names).
    BlockSet src = *pool_->Lease(1);
    FillBlock(src, 0, 1600 + inputs, 7);
    auto t = listener_->PostTransfer({.op = TransferOp::kWrite, .peer = name, .local = &src,
                                      .remote_blocks = {7}});
    ASSERT_THAT(t, IsOk());
    EXPECT_THAT(t->Wait(kDeadline), IsOk()) << c.what;
    BlockSet check = *(*donor_pool)->LeaseIds(std::vector<uint32_t>{7});
    EXPECT_EQ(BlockChecksum(check, 0), ExpectedChecksum(Layout(64), 1600 + inputs, 7)) << c.what;
    bool refused_logged = false;
    {
      std::lock_guard<std::mutex> l(log_mu);
      for (const std::string& line : log) {
        if (absl::StrContains(line, absl::StrCat("no kernel copy to peer '", name, "'"))) {
          refused_logged = true;
          if (c.logged != nullptr) {
            EXPECT_THAT(line, HasSubstr(absl::StrCat("pid ", c.pid))) << c.what;
          }
        }
      }
    }
    EXPECT_EQ(refused_logged, c.logged != nullptr) << c.what;
    client.ShutdownWrite();
    Finish(client, /*authenticated=*/true, nullptr, &h->session);
    tally.Add(absl::StrCat(c.logged != nullptr ? "refused, logged" : "not tried",
                           ": am-emulated, WRITE verified"));
  }
  // The sleeping child was never stopped or killed by any of it.
  EXPECT_EQ(kill(sleeper.pid(), 0), 0);
  captured = absl::StatusOr<wire::AgentDescriptor>();
  donor->reset();
  ExpectRecovered("16 kernel-copy probe naming another process", inputs, tally.ToString(),
                  start);
}

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
    a->client.Send(SealedProofFrame(a->handshake, ClientProof(a->handshake, "a-secret"),
                                    DonorDescriptor(name)));
    const std::string outcome = Finish(a->client, false, nullptr, &a->handshake.session);
    EXPECT_EQ(outcome, "REJECT(UNAUTHENTICATED)");
    tally.Add(absl::StrCat("proof under a secret: CHALLENGE+", outcome));
  }
  EXPECT_EQ(tally.counts().size(), 3u) << tally.ToString();
  ExpectRecovered("insecure loopback listener (no secret)", inputs, tally.ToString(), start);
}

}  // namespace
}  // namespace kvferry::test
