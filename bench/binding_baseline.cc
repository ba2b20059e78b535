// kvferry_binding_baseline: the C++ side of bench/python_bench.py, the
// same measurements made without Python so the script can put the
// binding's figures next to them in one run.
//
// Two agents in this process ("base-a" and "base-b", shared secret
// "bench", progress threads on, UCX left to its defaults as
// kvferry.Agent leaves it), connected over loopback, with the pools of
// python_bench.py, one plane each (a block is one chunk, one descriptor):
// "kv" (1 layer, 256 blocks of 32 KiB) and "big" (1 layer, 64 blocks of
// 256 KiB) on both sides.
//
// It reads commands from stdin, one a line, and answers each with one line
// of JSON on stdout, so the script can interleave them with its own rounds:
//   post64 <seconds>   {"post_64_us": mean call, "post_64_cpu_us": this
//                       thread's CPU time in it, "post_64_calls": n}
//       b posts a READ of 64 blocks of "kv" that do not coalesce (local
//       0,2,..,126 leased once; remote 1,3,..,127), only the
//       PostTransfer call timed; each transfer is waited for outside it.
//       An optional third number spins that many microseconds between a
//       transfer's end and the next post (what a caller's own work there
//       does to the post).
//   loop256k <seconds> {"loop_256k_gbps": ..., "loop_256k_transfers": n,
//                       "data_path": ...}
//       b READs one 256 KiB block of "big" (remote id n % 64) into a
//       leased local block, posted and waited for, over and over.
//   poll <calls>       {"poll_notifications_empty_us": mean call}
//       PollNotifications with nothing pending.
// It prints {"ready": true} once connected and exits at end of input.
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "kvferry/agent.h"

namespace {

using kvferry::Agent;
using kvferry::AgentOptions;
using kvferry::BlockSet;
using kvferry::KvLayout;
using kvferry::KvPool;
using kvferry::Transfer;
using kvferry::TransferOp;
using kvferry::TransferSpec;
using Clock = std::chrono::steady_clock;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "kvferry_binding_baseline: %s\n", what.c_str());
  std::exit(2);
}

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) Die(absl::StrFormat("%s: %s", what, s.ToString()));
}

// 32 KiB chunks.
KvLayout SmallLayout() {
  return KvLayout{.num_layers = 1, .num_blocks = 256, .tokens_per_block = 16,
                  .num_kv_heads = 8, .head_dim = 128, .element_bytes = 2,
                  .separate_kv = false};
}

// 256 KiB chunks.
KvLayout BigLayout() {
  return KvLayout{.num_layers = 1, .num_blocks = 64, .tokens_per_block = 64,
                  .num_kv_heads = 16, .head_dim = 128, .element_bytes = 2,
                  .separate_kv = false};
}

std::unique_ptr<Agent> MakeAgent(const std::string& name) {
  AgentOptions o;
  o.name = name;
  o.shared_secret = "bench";
  o.progress_thread = true;
  o.leak_policy = kvferry::LeakPolicy::kLog;
  auto agent = Agent::Create(o);
  Check(agent.status(), "Agent::Create");
  return *std::move(agent);
}

// This thread's CPU time, in seconds.
double ThreadCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Bench {
  std::unique_ptr<Agent> a;  // the target; destroyed last
  std::unique_ptr<Agent> b;
  KvPool* small = nullptr;  // b's pools
  KvPool* big = nullptr;

  Bench() {
    a = MakeAgent("base-a");
    b = MakeAgent("base-b");
    Check(a->CreatePool("kv", SmallLayout()).status(), "CreatePool kv");
    Check(a->CreatePool("big", BigLayout()).status(), "CreatePool big");
    auto s = b->CreatePool("kv", SmallLayout());
    Check(s.status(), "CreatePool kv");
    small = *s;
    auto g = b->CreatePool("big", BigLayout());
    Check(g.status(), "CreatePool big");
    big = *g;
    auto port = a->Listen("127.0.0.1", 0);
    Check(port.status(), "Listen");
    Check(b->Connect("127.0.0.1", *port, absl::Seconds(30)).status(), "Connect");
    Check(a->WaitForPeer("base-b", absl::Seconds(30)).status(), "WaitForPeer");
  }
  ~Bench() {
    b.reset();
    a.reset();
  }

  std::string Post64(double seconds, double gap_us) {
    std::vector<uint32_t> local, remote;
    for (uint32_t i = 0; i < 64; ++i) {
      local.push_back(2 * i);
      remote.push_back(2 * i + 1);
    }
    auto lease = small->LeaseIds(local);
    Check(lease.status(), "LeaseIds");
    double posts = 0, cpu = 0;
    uint64_t n = 0;
    const auto end = Clock::now() + std::chrono::duration<double>(seconds);
    while (Clock::now() < end) {
      TransferSpec spec{.op = TransferOp::kRead, .peer = "base-a"};
      spec.local = &*lease;
      spec.remote_ids = remote;
      const double c0 = ThreadCpuSeconds();
      const auto t0 = Clock::now();
      absl::StatusOr<Transfer> t = b->PostTransfer(spec);
      posts += Since(t0);
      cpu += ThreadCpuSeconds() - c0;
      ++n;
      Check(t.status(), "PostTransfer");
      Check(t->Wait(absl::Seconds(30)), "Wait");
      const auto gap_end = Clock::now() + std::chrono::duration<double, std::micro>(gap_us);
      while (Clock::now() < gap_end) {
      }
    }
    return absl::StrFormat(R"({"post_64_us": %.4f, "post_64_cpu_us": %.4f, "post_64_calls": %d})",
                           posts / n * 1e6, cpu / n * 1e6, n);
  }

  std::string Loop256k(double seconds) {
    const std::vector<uint32_t> zero = {0};
    auto lease = big->LeaseIds(zero);
    Check(lease.status(), "LeaseIds");
    const uint64_t chunk = big->layout().chunk_bytes();
    const uint32_t blocks = big->layout().num_blocks;
    uint64_t moved = 0, n = 0;
    uint32_t remote[1];
    const auto t0 = Clock::now();
    const auto end = t0 + std::chrono::duration<double>(seconds);
    while (Clock::now() < end) {
      remote[0] = static_cast<uint32_t>(n % blocks);
      TransferSpec spec{.op = TransferOp::kRead, .peer = "base-a", .remote_pool = "big"};
      spec.local = &*lease;
      spec.remote_ids = remote;
      absl::StatusOr<Transfer> t = b->PostTransfer(spec);
      Check(t.status(), "PostTransfer");
      Check(t->Wait(absl::Seconds(30)), "Wait");
      moved += chunk;
      ++n;
    }
    const double wall = Since(t0);
    auto peer = b->GetPeer("base-a");
    Check(peer.status(), "GetPeer");
    return absl::StrFormat(
        R"({"loop_256k_gbps": %.4f, "loop_256k_transfers": %d, "data_path": "%s"})",
        static_cast<double>(moved) / wall / 1e9, n, peer->data_path);
  }

  std::string Poll(uint64_t calls) {
    uint64_t got = 0;
    const auto t0 = Clock::now();
    for (uint64_t i = 0; i < calls; ++i) got += b->PollNotifications().size();
    const double s = Since(t0);
    if (got != 0) Die("notifications arrived during the empty poll");
    return absl::StrFormat(R"({"poll_notifications_empty_us": %.4f})",
                           s / static_cast<double>(calls) * 1e6);
  }
};

}  // namespace

int main() {
  Bench bench;
  std::cout << R"({"ready": true})" << std::endl;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    double arg = 0, gap_us = 0;
    if (!(in >> cmd >> arg) || arg <= 0) Die("bad command line '" + line + "'");
    in >> gap_us;  // optional
    std::string out;
    if (cmd == "post64") {
      out = bench.Post64(arg, gap_us);
    } else if (cmd == "loop256k") {
      out = bench.Loop256k(arg);
    } else if (cmd == "poll") {
      out = bench.Poll(static_cast<uint64_t>(arg));
    } else {
      Die("unknown command '" + cmd + "'");
    }
    std::cout << out << std::endl;
  }
  return 0;
}
