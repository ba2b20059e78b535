// kvferry_test_peer: the other process in kvferry's multi-process tests.
// Speaks a line protocol on stdout ("PORT n", "READY", "OK tag",
// "BAD tag why", "SENT i") and stops when stdin closes.
//
//   --role=decode          listen; verify blocks named by CHECK notifications;
//                          a REMOVE notification removes pool "kv"
//                          ("REMOVED status"), REGISTER registers it again on
//                          new engine memory ("REGISTERED status")
//   --role=prefill-serve   listen; hold 32 blocks filled for --seed (peers READ);
//                          with --offer_to=NAME, offer them to NAME once it
//                          connects ("TICKET hex")
//   --role=prefill-push    connect to --connect=ip:port; WRITE --count batches
//                          (0: until killed), each announced by CHECK
//   --role=decode-by-name  listen and publish; connect to --peer-name through
//                          the directory, READ its 32 blocks and check them
//                          for --seed ("READ OK name" or "BAD why")
//   --role=taker           takes offers, one command per stdin line:
//                          CONNECT port (to 127.0.0.1: "CONNECTED name");
//                          CONNECTED? name ("CONNECTED? yes|no": whether it
//                          is connected to that peer now);
//                          LISTEN (on 127.0.0.1: "LISTENING port");
//                          READ hex-ticket indices|- seed ids (READ the
//                          offer's blocks at those indices, or all, and check
//                          them against ids filled for seed: "READ OK");
//                          POST hex-ticket n (READ n blocks, not waited for:
//                          "POSTED"); STATE (of that transfer: "STATE
//                          inflight|done|failed|cancelled status");
//                          RELEASE hex-ticket ("RELEASE status");
//                          NOTE name n (n notifications to that peer:
//                          "NOTED k status").
//                          Lists are comma-separated.
// Common: --name, --tls (UCX_TLS), --listen=ip, --secret, --seed, --batch,
// --pool_memory=ucx|anon, --kernel_copy=1|0, --peer_timeout=SECONDS (the
// agent's peer_timeout; default 30, generous: the tests that are about
// liveness give the short one to the side that must detect the failure).
// --blocks (pool size; decode 64, else 32), --ctl_pool=1 (a pool "ctl" too),
// --heads=N and --first_head=F (pool "kv" of N KV heads per rank; with
// prefill-serve, filled with heads [F, F + N) of the whole cache).
// Directory (listening roles): with --etcd=endpoints, publish the agent in
// cluster --cluster with lease TTL --ttl seconds ("PUBLISHED").
#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <cstdlib>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kvferry/agent.h"
#include "kvferry/directory.h"
#include "tests/kv_pattern.h"
#include "tests/tp_pattern.h"

namespace {

using kvferry::test::BlockChecksum;
using kvferry::test::ExpectedChecksum;
using kvferry::test::FillBlock;
using kvferry::test::Layout;

std::string Flag(int argc, char** argv, const std::string& name, const std::string& fallback) {
  std::string prefix = "--" + name + "=";
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind(prefix, 0) == 0) return arg.substr(prefix.size());
  }
  return fallback;
}

int Die(const std::string& what, const absl::Status& status) {
  std::printf("ERROR %s: %s\n", what.c_str(), status.ToString().c_str());
  std::fflush(stdout);
  return 2;
}

void Say(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

std::atomic<bool> g_stdin_closed{false};
// Complete stdin lines (the taker role's commands). Never destroyed: the
// detached stdin reader may still notify while the process exits.
struct StdinLines {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> lines;
};
StdinLines& g_stdin = *new StdinLines;
std::mutex& g_lines_mu = g_stdin.mu;
std::condition_variable& g_lines_cv = g_stdin.cv;
std::deque<std::string>& g_lines = g_stdin.lines;

void WatchStdin() {
  char buf[4096];
  std::string partial;
  ssize_t n = 0;
  while ((n = read(STDIN_FILENO, buf, sizeof(buf))) > 0) {
    partial.append(buf, static_cast<size_t>(n));
    size_t nl = 0;
    while ((nl = partial.find('\n')) != std::string::npos) {
      std::lock_guard<std::mutex> l(g_lines_mu);
      g_lines.push_back(partial.substr(0, nl));
      partial.erase(0, nl + 1);
      g_lines_cv.notify_all();
    }
  }
  std::lock_guard<std::mutex> l(g_lines_mu);
  g_stdin_closed = true;
  g_lines_cv.notify_all();
}

// The next stdin line, or nothing once stdin closed.
std::optional<std::string> NextLine() {
  std::unique_lock<std::mutex> l(g_lines_mu);
  g_lines_cv.wait(l, [] { return !g_lines.empty() || g_stdin_closed; });
  if (g_lines.empty()) return std::nullopt;
  std::string line = std::move(g_lines.front());
  g_lines.pop_front();
  return line;
}

std::vector<uint32_t> ParseList(const std::string& csv) {
  std::vector<uint32_t> out;
  if (csv == "-") return out;
  for (absl::string_view word : absl::StrSplit(csv, ',', absl::SkipEmpty())) {
    uint32_t v = 0;
    (void)absl::SimpleAtoi(word, &v);
    out.push_back(v);
  }
  return out;
}

const char* StateWord(kvferry::TransferState state) {
  switch (state) {
    case kvferry::TransferState::kInFlight: return "inflight";
    case kvferry::TransferState::kDone: return "done";
    case kvferry::TransferState::kFailed: return "failed";
    case kvferry::TransferState::kCancelled: return "cancelled";
    case kvferry::TransferState::kEmpty: return "empty";
  }
  return "unknown";
}

}  // namespace

int main(int argc, char** argv) {
  const std::string role = Flag(argc, argv, "role", "");
  kvferry::AgentOptions options;
  options.name = Flag(argc, argv, "name", role);
  options.leak_policy = kvferry::LeakPolicy::kAbort;
  int64_t peer_timeout_s = 30;
  if (!absl::SimpleAtoi(Flag(argc, argv, "peer_timeout", "30"), &peer_timeout_s) ||
      peer_timeout_s <= 0) {
    return Die("--peer_timeout",
               absl::InvalidArgumentError("want a positive number of seconds, got '" +
                                          Flag(argc, argv, "peer_timeout", "") + "'"));
  }
  options.peer_timeout = absl::Seconds(peer_timeout_s);
  options.shared_secret = Flag(argc, argv, "secret", "");
  std::string tls = Flag(argc, argv, "tls", "");
  if (!tls.empty()) options.ucx_config = {{"TLS", tls}};
  const std::string memory = Flag(argc, argv, "pool_memory", "ucx");
  if (memory == "anon") {
    options.pool_memory = kvferry::PoolMemorySource::kAnonymousMmap;
  } else if (memory != "ucx") {
    return Die("--pool_memory", absl::InvalidArgumentError("want ucx or anon, got '" + memory + "'"));
  }
  options.kernel_copy = Flag(argc, argv, "kernel_copy", "1") == "1";
  uint64_t seed = 0;
  (void)absl::SimpleAtoi(Flag(argc, argv, "seed", "1"), &seed);
  uint32_t batch = 8;
  (void)absl::SimpleAtoi(Flag(argc, argv, "batch", "8"), &batch);
  std::thread(WatchStdin).detach();

  // Engine memory of pools registered by REGISTER: declared before the
  // agent, so it outlives it.
  struct AlignedDelete {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{4096}); }
  };
  std::vector<std::unique_ptr<std::byte[], AlignedDelete>> engine_memory;
  auto agent = kvferry::Agent::Create(options);
  if (!agent.ok()) return Die("Agent::Create", agent.status());
  const bool decode = role == "decode";
  uint32_t pool_blocks = decode ? 64 : 32;
  (void)absl::SimpleAtoi(Flag(argc, argv, "blocks", std::to_string(pool_blocks)), &pool_blocks);
  // --heads=N: pool "kv" holds N KV heads per block (tests/tp_pattern.h),
  // and prefill-serve fills heads [--first_head, +N) of the whole cache.
  uint32_t heads = 0, first_head = 0;
  (void)absl::SimpleAtoi(Flag(argc, argv, "heads", "0"), &heads);
  (void)absl::SimpleAtoi(Flag(argc, argv, "first_head", "0"), &first_head);
  const kvferry::KvLayout pool_layout =
      heads == 0 ? Layout(pool_blocks) : kvferry::test::HeadLayout(pool_blocks, heads);
  auto pool = (*agent)->CreatePool("kv", pool_layout);
  if (!pool.ok()) return Die("CreatePool", pool.status());
  // --ctl_pool=1: a second pool "ctl" (4 blocks), so that a peer can
  // still send notifications after "kv" was removed.
  if (Flag(argc, argv, "ctl_pool", "0") == "1") {
    if (auto ctl = (*agent)->CreatePool("ctl", Layout(4)); !ctl.ok()) {
      return Die("CreatePool ctl", ctl.status());
    }
  }

  // Listening roles publish themselves when given etcd endpoints.
  std::unique_ptr<kvferry::Directory> directory;
  const std::string etcd = Flag(argc, argv, "etcd", "");
  auto publish = [&](uint16_t port) -> absl::Status {
    if (etcd.empty()) return absl::OkStatus();
    kvferry::DirectoryOptions d;
    d.endpoints = absl::StrSplit(etcd, ',');
    d.cluster = Flag(argc, argv, "cluster", "default");
    int64_t ttl = 10;
    (void)absl::SimpleAtoi(Flag(argc, argv, "ttl", "10"), &ttl);
    d.lease_ttl = absl::Seconds(ttl);
    auto created = kvferry::Directory::Create(d);
    if (!created.ok()) return created.status();
    directory = *std::move(created);
    absl::Status s = directory->Publish(**agent, Flag(argc, argv, "listen", "127.0.0.1"), port,
                                        role);
    if (s.ok()) Say("PUBLISHED");
    return s;
  };

  if (role == "decode-by-name") {
    auto port = (*agent)->Listen(Flag(argc, argv, "listen", "127.0.0.1"), 0);
    if (!port.ok()) return Die("Listen", port.status());
    Say("PORT " + std::to_string(*port));
    if (absl::Status s = publish(*port); !s.ok()) return Die("Publish", s);
    if (directory == nullptr) return Die("--etcd", absl::InvalidArgumentError("needs --etcd"));
    auto peer = directory->Connect(**agent, Flag(argc, argv, "peer-name", ""));
    if (!peer.ok()) return Die("Directory::Connect", peer.status());
    auto local = (*pool)->Lease(32);
    if (!local.ok()) return Die("Lease", local.status());
    std::vector<uint32_t> remote(32);
    for (uint32_t i = 0; i < 32; ++i) remote[i] = 31 - i;
    auto t = (*agent)->PostTransfer({.op = kvferry::TransferOp::kRead, .peer = peer->name,
                                     .local = &*local, .remote_blocks = remote});
    if (!t.ok()) return Die("PostTransfer", t.status());
    if (absl::Status s = t->Wait(absl::Seconds(30)); !s.ok()) return Die("Wait", s);
    std::string bad;
    for (size_t i = 0; i < remote.size(); ++i) {
      if (BlockChecksum(*local, i) != ExpectedChecksum(local->layout(), seed, remote[i])) {
        bad += " block " + std::to_string(remote[i]);
      }
    }
    Say(bad.empty() ? "READ OK " + peer->name : "BAD" + bad);
    while (!g_stdin_closed) absl::SleepFor(absl::Milliseconds(20));
    return 0;
  }

  if (role == "decode" || role == "prefill-serve") {
    kvferry::BlockSet held;
    if (role == "prefill-serve") {
      held = *(*pool)->Lease(32);
      for (size_t i = 0; i < held.size(); ++i) {
        if (heads == 0) {
          FillBlock(held, i, seed, held.ids()[i]);
          continue;
        }
        for (uint32_t layer = 0; layer < pool_layout.num_layers; ++layer) {
          for (uint32_t plane = 0; plane < pool_layout.num_planes(); ++plane) {
            kvferry::test::FillHeads(held.Chunk(i, layer, plane).data(), pool_layout, first_head,
                                     seed, held.ids()[i], layer, plane);
          }
        }
      }
    }
    auto port = (*agent)->Listen(Flag(argc, argv, "listen", "127.0.0.1"), 0);
    if (!port.ok()) return Die("Listen", port.status());
    Say("PORT " + std::to_string(*port));
    if (Flag(argc, argv, "metadata", "0") == "1") {
      // Agent::LocalMetadata, hex: "METADATA <hex>".
      auto metadata = (*agent)->LocalMetadata();
      if (!metadata.ok()) return Die("LocalMetadata", metadata.status());
      Say("METADATA " + absl::BytesToHexString(*metadata));
    }
    const bool echo_notes = Flag(argc, argv, "echo_notes", "0") == "1";
    if (absl::Status s = publish(*port); !s.ok()) return Die("Publish", s);
    // --offer_to=NAME (prefill-serve): once NAME connects, offer it the held
    // blocks for a minute and print the ticket.
    std::optional<kvferry::Offer> offer;
    if (const std::string to = Flag(argc, argv, "offer_to", ""); !to.empty()) {
      if (auto peer = (*agent)->WaitForPeer(to, absl::Seconds(60)); !peer.ok()) {
        return Die("WaitForPeer", peer.status());
      }
      auto made = (*agent)->Offer(held, to, absl::Seconds(60));
      if (!made.ok()) return Die("Offer", made.status());
      offer = *std::move(made);
      Say("TICKET " + absl::BytesToHexString(offer->ticket()));
    }
    while (!g_stdin_closed) {
      for (const kvferry::Notification& n :
           (*agent)->WaitForNotifications(absl::Milliseconds(50))) {
        // --echo_notes=1: every notification, in arrival order, as
        // "NOTE <sender> <payload>".
        if (echo_notes) Say("NOTE " + n.peer + " " + n.payload);
        // "CHECK <seed> <id> <id> ..."
        std::vector<std::string> words = absl::StrSplit(n.payload, ' ', absl::SkipEmpty());
        if (role == "decode" && words.size() == 1 && words[0] == "REMOVE") {
          // Agent::RemovePool of "kv": "REMOVED <status>".
          held.Reset();
          Say("REMOVED " + (*agent)->RemovePool("kv").ToString());
          continue;
        }
        if (role == "decode" && words.size() == 1 && words[0] == "REGISTER") {
          // "kv" again, as engine memory this time (new memory, kept until
          // exit): "REGISTERED <status>".
          const kvferry::KvLayout layout = Layout(pool_blocks);
          engine_memory.emplace_back(new (std::align_val_t{4096}) std::byte[layout.total_bytes()]);
          const kvferry::KvRegion region{engine_memory.back().get(), layout.total_bytes()};
          auto made = (*agent)->RegisterPool("kv", layout, {&region, 1});
          Say("REGISTERED " + made.status().ToString());
          continue;
        }
        if (words.size() < 3 || words[0] != "CHECK") continue;
        uint64_t s = 0;
        (void)absl::SimpleAtoi(words[1], &s);
        std::vector<uint32_t> ids;
        for (size_t i = 2; i < words.size(); ++i) {
          uint32_t id = 0;
          (void)absl::SimpleAtoi(words[i], &id);
          ids.push_back(id);
        }
        kvferry::KvPool* kv = (*agent)->FindPool("kv");  // re-registered after a REMOVE
        if (kv == nullptr) {
          Say("BAD " + words[1] + " no pool 'kv'");
          continue;
        }
        auto blocks = kv->LeaseIds(ids);
        if (!blocks.ok()) {
          Say("BAD " + words[1] + " " + blocks.status().ToString());
          continue;
        }
        std::string bad;
        for (size_t i = 0; i < ids.size(); ++i) {
          if (BlockChecksum(*blocks, i) != ExpectedChecksum(blocks->layout(), s, ids[i])) {
            bad += " block " + std::to_string(ids[i]);
          }
        }
        Say(bad.empty() ? "OK " + words[1] : "BAD " + words[1] + bad);
      }
    }
    return 0;
  }

  if (role == "taker") {
    std::optional<kvferry::Transfer> posted;
    kvferry::BlockSet posted_into;
    while (std::optional<std::string> line = NextLine()) {
      std::vector<std::string> w = absl::StrSplit(*line, ' ', absl::SkipEmpty());
      if (w.empty()) continue;
      if (w[0] == "CONNECT" && w.size() == 2) {
        uint32_t port = 0;
        (void)absl::SimpleAtoi(w[1], &port);
        auto peer = (*agent)->Connect("127.0.0.1", static_cast<uint16_t>(port));
        Say(peer.ok() ? "CONNECTED " + peer->name : "CONNECT " + peer.status().ToString());
      } else if (w[0] == "CONNECTED?" && w.size() == 2) {
        auto peer = (*agent)->GetPeer(w[1]);
        Say(peer.ok() && peer->state == kvferry::PeerState::kConnected ? "CONNECTED? yes"
                                                                        : "CONNECTED? no");
      } else if (w[0] == "LISTEN") {
        auto port = (*agent)->Listen("127.0.0.1", 0);
        Say(port.ok() ? "LISTENING " + std::to_string(*port)
                      : "LISTEN " + port.status().ToString());
      } else if (w[0] == "READ" && w.size() == 5) {
        const std::string ticket = absl::HexStringToBytes(w[1]);
        const std::vector<uint32_t> indices = ParseList(w[2]);
        uint64_t s = 0;
        (void)absl::SimpleAtoi(w[3], &s);
        const std::vector<uint32_t> ids = ParseList(w[4]);
        auto local = (*pool)->Lease(static_cast<uint32_t>(ids.size()));
        if (!local.ok()) {
          Say("READ " + local.status().ToString());
          continue;
        }
        auto t = (*agent)->PostTransfer({.op = kvferry::TransferOp::kRead, .local = &*local,
                                         .offer_ticket = ticket, .offer_blocks = indices});
        absl::Status done = t.ok() ? t->Wait(absl::Seconds(60)) : t.status();
        if (!done.ok()) {
          Say("READ " + done.ToString());
          continue;
        }
        std::string bad;
        for (size_t i = 0; i < ids.size(); ++i) {
          if (BlockChecksum(*local, i) != ExpectedChecksum(local->layout(), s, ids[i])) {
            bad += " block " + std::to_string(ids[i]);
          }
        }
        Say(bad.empty() ? "READ OK" : "READ BAD" + bad);
      } else if (w[0] == "POST" && w.size() == 3) {
        const std::string ticket = absl::HexStringToBytes(w[1]);
        uint32_t count = 0;
        (void)absl::SimpleAtoi(w[2], &count);
        auto local = (*pool)->Lease(count);
        if (!local.ok()) {
          Say("POST " + local.status().ToString());
          continue;
        }
        posted_into = *std::move(local);
        auto t = (*agent)->PostTransfer(
            {.op = kvferry::TransferOp::kRead, .local = &posted_into, .offer_ticket = ticket});
        if (!t.ok()) {
          Say("POST " + t.status().ToString());
          continue;
        }
        posted = *std::move(t);
        Say("POSTED");
      } else if (w[0] == "STATE" && posted) {
        Say(std::string("STATE ") + StateWord(posted->state()) + " " +
            posted->status().ToString());
      } else if (w[0] == "NOTE" && w.size() == 3) {
        // NOTE peer n: n notifications "note <i>" to that peer ("NOTED k
        // status": how many were accepted, and the first refusal or OK).
        uint32_t count = 0;
        (void)absl::SimpleAtoi(w[2], &count);
        uint32_t sent = 0;
        absl::Status s;
        for (; sent < count; ++sent) {
          s = (*agent)->SendNotification(w[1], "note " + std::to_string(sent));
          if (!s.ok()) break;
        }
        Say("NOTED " + std::to_string(sent) + " " + s.ToString());
      } else if (w[0] == "RELEASE" && w.size() == 2) {
        const std::string ticket = absl::HexStringToBytes(w[1]);
        Say("RELEASE " + (*agent)->ReleaseOffer(ticket).ToString());
      } else {
        Say("UNKNOWN " + *line);
      }
    }
    return 0;
  }

  if (role == "prefill-push") {
    std::vector<std::string> target = absl::StrSplit(Flag(argc, argv, "connect", ""), ':');
    uint32_t port = 0;
    if (target.size() != 2 || !absl::SimpleAtoi(target[1], &port)) {
      return Die("--connect", absl::InvalidArgumentError("want --connect=ip:port"));
    }
    auto peer = (*agent)->Connect(target[0], static_cast<uint16_t>(port));
    if (!peer.ok()) return Die("Connect", peer.status());
    Say("READY " + peer->name);
    uint64_t count = 0;
    (void)absl::SimpleAtoi(Flag(argc, argv, "count", "0"), &count);
    for (uint64_t i = 0; (count == 0 || i < count) && !g_stdin_closed; ++i) {
      auto local = (*pool)->Lease(batch);
      if (!local.ok()) return Die("Lease", local.status());
      std::vector<uint32_t> remote;
      for (uint32_t j = 0; j < batch; ++j) remote.push_back((i * batch + j) % 64);
      for (size_t j = 0; j < remote.size(); ++j) FillBlock(*local, j, seed + i, remote[j]);
      std::string note = "CHECK " + std::to_string(seed + i) + " " + absl::StrJoin(remote, " ");
      auto t = (*agent)->PostTransfer({.op = kvferry::TransferOp::kWrite, .peer = peer->name,
                                       .local = &*local, .remote_blocks = remote,
                                       .notification = note});
      if (!t.ok()) return Die("PostTransfer", t.status());
      if (absl::Status s = t->Wait(absl::Seconds(30)); !s.ok()) return Die("Wait", s);
      Say("SENT " + std::to_string(i));
      // Let the checker lease the blocks before they are overwritten.
      absl::SleepFor(absl::Milliseconds(2));
    }
    return 0;
  }
  return Die("--role", absl::InvalidArgumentError("unknown role '" + role + "'"));
}
