// What the tests share, in namespace kvferry::test (not "testing", which
// would hide gtest's ::testing inside kvferry): IsOk()/StatusIs() matchers
// (Debian's abseil has no status_matchers.h), WaitFor, LogCapture, a
// listening agent (StartListeningAgent), the layouts and block patterns
// (tests/kv_pattern.h), the peer timeouts, a HookGate for the library's test
// hooks, HttpGet, and the in-process transports (tests/transports.h).
#ifndef KVFERRY_TESTS_TEST_UTIL_H_
#define KVFERRY_TESTS_TEST_UTIL_H_

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "kvferry/agent.h"
#include "kvferry/kv_layout.h"
#include "kvferry/log.h"
#include "src/status_macros.h"
#include "tests/kv_pattern.h"
#include "tests/transports.h"

namespace kvferry::test {

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

MATCHER(IsOk, "is OK") {
  const absl::Status& s = GetStatus(arg);
  if (!s.ok()) *result_listener << "status: " << s.ToString();
  return s.ok();
}

MATCHER_P2(StatusIs, code, substring,
           "has code " + absl::StatusCodeToString(code) + " and a message containing \"" +
               std::string(substring) + "\"") {
  const absl::Status& s = GetStatus(arg);
  *result_listener << "status: " << s.ToString();
  return s.code() == code && s.message().find(substring) != absl::string_view::npos;
}

// Polls `condition` every millisecond until it holds or `timeout` passes;
// returns its last value. Tests wait for the very condition they assert, with
// a deadline generous enough for a busy machine and sanitizer builds.
template <typename Condition>
bool WaitFor(Condition condition, absl::Duration timeout = absl::Seconds(30)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() >= deadline) return condition();
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

// How many threads of this process are named `comm` (/proc/self/task/*/comm).
inline int ThreadsNamed(const std::string& comm) {
  int n = 0;
  DIR* dir = opendir("/proc/self/task");
  if (dir == nullptr) return -1;
  while (dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream in(std::string("/proc/self/task/") + e->d_name + "/comm");
    std::string name;
    if (std::getline(in, name) && name == comm) ++n;
  }
  closedir(dir);
  return n;
}

// A log sink for tests: keeps every record; thread-safe (agents call sinks
// from their progress threads). Must outlive the agents that use sink().
class LogCapture {
 public:
  LogSink sink() {
    return [this](const LogRecord& r) {
      std::lock_guard<std::mutex> l(mu_);
      records_.push_back(r);
    };
  }
  std::vector<LogRecord> records() const {
    std::lock_guard<std::mutex> l(mu_);
    return records_;
  }
  // The records whose message contains `needle`.
  std::vector<LogRecord> Matching(const std::string& needle) const {
    std::vector<LogRecord> out;
    for (const LogRecord& r : records()) {
      if (r.message.find(needle) != std::string::npos) out.push_back(r);
    }
    return out;
  }

 private:
  mutable std::mutex mu_;
  std::vector<LogRecord> records_;
};

// AgentOptions::peer_timeout of the agents in multi-process tests (and of
// kvferry_test_peer, --peer_timeout). Only a test about liveness (a killed or
// stopped peer must be detected) takes the short one; every other test takes
// the generous one, so that a progress thread starved for seconds on a busy
// machine (sanitizers, two cores, kill loops) never fails a healthy peer.
inline constexpr absl::Duration kLivenessPeerTimeout = absl::Seconds(3);
inline constexpr absl::Duration kPeerTimeout = absl::Seconds(30);

// Two agents, "decode" and "prefill" (TestAgentOptions over the transport
// of the test parameter). SetUp creates them, has the test make their pools
// (MakePools), lets decode listen and prefill connect, and waits until decode
// sees prefill too. TearDown destroys prefill, then decode.
class AgentPairTest : public ::testing::TestWithParam<Transport> {
 protected:
  AgentOptions Options(const std::string& name) { return TestAgentOptions(name, GetParam()); }
  // Sets decode_pool_ and prefill_pool_.
  virtual void MakePools() = 0;

  void SetUp() override {
    auto decode = Agent::Create(Options("decode"));
    ASSERT_THAT(decode, IsOk());
    decode_ = *std::move(decode);
    auto prefill = Agent::Create(Options("prefill"));
    ASSERT_THAT(prefill, IsOk());
    prefill_ = *std::move(prefill);
    ASSERT_NO_FATAL_FAILURE(MakePools());
    auto port = decode_->Listen("127.0.0.1", 0);
    ASSERT_THAT(port, IsOk());
    port_ = *port;
    auto peer = prefill_->Connect("127.0.0.1", port_);
    ASSERT_THAT(peer, IsOk());
    EXPECT_EQ(peer->name, "decode");
    ASSERT_THAT(decode_->WaitForPeer("prefill"), IsOk());
  }
  void TearDown() override {
    prefill_.reset();
    decode_.reset();
  }

  std::unique_ptr<Agent> decode_;
  std::unique_ptr<Agent> prefill_;
  KvPool* decode_pool_ = nullptr;
  KvPool* prefill_pool_ = nullptr;
  uint16_t port_ = 0;
};

// An agent listening on 127.0.0.1, with one pool "kv" (StartListeningAgent).
struct ListeningAgent {
  std::unique_ptr<Agent> agent;
  KvPool* pool = nullptr;
  uint16_t port = 0;
};

// Creates an agent from `options` (logging into `log` when given, which must
// outlive it), its pool "kv" of `layout`, and has it listen on 127.0.0.1 at a
// port the kernel picks. The error of the first step that fails.
inline absl::StatusOr<ListeningAgent> StartListeningAgent(AgentOptions options,
                                                          const KvLayout& layout,
                                                          LogCapture* log = nullptr) {
  if (log != nullptr) options.log_sink = log->sink();
  ListeningAgent listening;
  KVFERRY_ASSIGN_OR_RETURN(listening.agent, Agent::Create(std::move(options)));
  KVFERRY_ASSIGN_OR_RETURN(listening.pool, listening.agent->CreatePool("kv", layout));
  KVFERRY_ASSIGN_OR_RETURN(listening.port, listening.agent->Listen("127.0.0.1", 0));
  return listening;
}

// Holds whichever thread calls a library test hook (a `void (*)()` slot such
// as internal::data_pass_test_hook) until Open(). Installs itself in the slot
// on construction; Open() and the destructor let the thread go and clear the
// slot. One gate at a time per process.
class HookGate {
 public:
  explicit HookGate(std::atomic<void (*)()>* hook) : hook_(hook) {
    current_.store(this);
    hook_->store(&Hold);
  }
  ~HookGate() {
    Open();
    current_.store(nullptr);
  }
  HookGate(const HookGate&) = delete;
  HookGate& operator=(const HookGate&) = delete;

  // Whether a thread reached the hook within `timeout`.
  bool WaitEntered(absl::Duration timeout) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, absl::ToChronoNanoseconds(timeout), [this] { return entered_; });
  }
  void Open() {
    hook_->store(nullptr);
    {
      std::lock_guard<std::mutex> l(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }

 private:
  static void Hold() {
    HookGate* gate = current_.load();
    if (gate == nullptr) return;
    std::unique_lock<std::mutex> l(gate->mu_);
    gate->entered_ = true;
    gate->cv_.notify_all();
    gate->cv_.wait(l, [gate] { return gate->open_; });
  }

  static inline std::atomic<HookGate*> current_{nullptr};
  std::atomic<void (*)()>* const hook_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool entered_ = false;
  bool open_ = false;
};

// A plain HTTP/1.0 GET of `path` from host:port (an IPv4 address): the whole
// response, headers included, or "" when the connection fails.
inline std::string HttpGet(uint16_t port, const std::string& path,
                           const std::string& host = "127.0.0.1") {
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) return "";
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "";
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return "";
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
  (void)!::write(fd, req.data(), req.size());
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = ::read(fd, buf, sizeof(buf))) > 0;) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}
// The body of HttpGet's response, or "" without one.
inline std::string HttpGetBody(uint16_t port, const std::string& path,
                               const std::string& host = "127.0.0.1") {
  const std::string response = HttpGet(port, path, host);
  const size_t body = response.find("\r\n\r\n");
  return body == std::string::npos ? "" : response.substr(body + 4);
}

// A small valid layout: 4 layers, K and V, 512-byte chunks.
inline KvLayout SmallLayout(uint32_t blocks = 16) {
  return KvLayout{.num_layers = 4, .num_blocks = blocks, .tokens_per_block = 16,
                  .num_kv_heads = 2, .head_dim = 8, .element_bytes = 2, .separate_kv = true};
}

}  // namespace kvferry::test

#endif  // KVFERRY_TESTS_TEST_UTIL_H_
