// kvferry_soak: the memory soak gate. Two agents in one process move KV
// blocks continuously over shared memory (WRITE with notifications and READ,
// several batches in flight) while the process's memory is sampled. Fails
// (exit 1) when the RSS slope or the growth of unexplained memory passes its
// threshold, or when any live counter or pool does not return to baseline.
// Prints a JSON summary on stdout; progress on stderr.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <random>

#include <nlohmann/json.hpp>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "bench/bench_util.h"
#include "absl/strings/str_format.h"
#include "kvferry/agent.h"
#include "kvferry/watchdog.h"

ABSL_FLAG(int, seconds, 120, "How long to move data, after the warm-up.");
ABSL_FLAG(int, warmup_seconds, 10, "Transfers before sampling starts (UCX fills its pools).");
ABSL_FLAG(int, sample_ms, 1000, "Memory sampling period.");
ABSL_FLAG(double, max_rss_slope_mib_per_min, 8.0,
          "Fail when RSS grows faster than this (least-squares slope over the run).");
ABSL_FLAG(double, max_unexplained_growth_mib, 16.0,
          "Fail when unexplained memory grows by more than this over the run (fitted).");
ABSL_FLAG(std::string, tls, "posix,sysv,tcp", "UCX_TLS for both agents.");
ABSL_FLAG(int, batch, 16, "Blocks per transfer.");
ABSL_FLAG(int, in_flight, 4, "Transfers kept in flight.");

namespace {

using kvferry::Agent;
using kvferry::AgentOptions;
using kvferry::BlockSet;
using kvferry::KvLayout;
using kvferry::Transfer;

int Fail(const std::string& why) {
  std::fprintf(stderr, "soak: FAILED: %s\n", why.c_str());
  return 1;
}

std::unique_ptr<Agent> MakeAgent(const std::string& name) {
  AgentOptions o;
  o.name = name;
  o.leak_policy = kvferry::LeakPolicy::kLog;
  o.ucx_config = {{"TLS", absl::GetFlag(FLAGS_tls)}};
  auto agent = Agent::Create(o);
  if (!agent.ok()) {
    std::fprintf(stderr, "soak: Agent::Create(%s): %s\n", name.c_str(),
                 agent.status().ToString().c_str());
    std::exit(2);
  }
  return *std::move(agent);
}

}  // namespace

int main(int argc, char** argv) {
  // Lists this file's flags under --help (absl matches flags to the program
  // by file name, and kvferry_soak's main is not in kvferry_soak.cc).
  kvferry::bench::InstallBenchHelp(
      "kvferry memory soak gate: continuous shared-memory transfers between two agents,\n"
      "failing on RSS or unexplained-memory growth. Example: kvferry_soak --seconds=120");
  absl::ParseCommandLine(argc, argv);
  const int batch = absl::GetFlag(FLAGS_batch);
  if (batch <= 0 || batch > 128 || absl::GetFlag(FLAGS_in_flight) <= 0 ||
      absl::GetFlag(FLAGS_seconds) <= 0 || absl::GetFlag(FLAGS_sample_ms) <= 0) {
    std::fprintf(stderr, "soak: --batch must be 1..128; --in_flight, --seconds and --sample_ms > 0\n");
    return 2;
  }
  // 8 layers, K and V, 16 KiB chunks: 256 KiB per block, 64 MiB per pool.
  const KvLayout layout{.num_layers = 8, .num_blocks = 256, .tokens_per_block = 16,
                        .num_kv_heads = 8, .head_dim = 64, .element_bytes = 2};
  auto decode = MakeAgent("soak-decode");
  auto prefill = MakeAgent("soak-prefill");
  kvferry::KvPool* dpool = *decode->CreatePool("kv", layout);
  kvferry::KvPool* ppool = *prefill->CreatePool("kv", layout);
  // Touch every page first, as a serving engine's cache soon is: first-touch
  // growth of the pools is explained memory, not a leak, and would blur the slope.
  for (kvferry::KvPool* pool : {dpool, ppool}) std::memset(pool->base(), 1, pool->size_bytes());
  auto port = decode->Listen("127.0.0.1", 0);
  if (!port.ok()) return Fail(port.status().ToString());
  if (auto p = prefill->Connect("127.0.0.1", *port); !p.ok()) return Fail(p.status().ToString());
  if (auto p = decode->WaitForPeer("soak-prefill"); !p.ok()) return Fail(p.status().ToString());
  // Connected and idle: what every counter must return to.
  const kvferry::Stats dbase = decode->GetStats();
  const kvferry::Stats pbase = prefill->GetStats();

  std::mt19937 rng(42);
  std::deque<Transfer> flying;
  uint64_t transfers = 0, bytes = 0, notifications = 0;
  auto pump = [&]() -> absl::Status {
    while (static_cast<int>(flying.size()) >= absl::GetFlag(FLAGS_in_flight)) {
      if (absl::Status s = flying.front().Wait(absl::Seconds(30)); !s.ok()) return s;
      flying.pop_front();
    }
    const bool write = (transfers % 2) == 0;
    Agent& self = write ? *prefill : *decode;
    kvferry::KvPool* pool = write ? ppool : dpool;
    auto local = pool->Lease(static_cast<uint32_t>(batch));
    if (!local.ok()) return local.status();
    std::vector<uint32_t> remote(batch);
    const uint32_t start = rng() % (layout.num_blocks - batch);
    for (int i = 0; i < batch; ++i) remote[i] = start + i;
    auto t = self.PostTransfer({.op = write ? kvferry::TransferOp::kWrite : kvferry::TransferOp::kRead,
                                .peer = write ? "soak-decode" : "soak-prefill",
                                .local = &*local, .remote_blocks = remote,
                                .notification = write ? "w" : ""});
    if (!t.ok()) return t.status();
    flying.push_back(*std::move(t));
    ++transfers;
    bytes += layout.block_bytes() * batch;
    notifications += decode->PollNotifications().size();
    return absl::OkStatus();
  };

  const absl::Time warm_end = absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_warmup_seconds));
  while (absl::Now() < warm_end) {
    if (absl::Status s = pump(); !s.ok()) return Fail(s.ToString());
  }
  std::deque<std::pair<absl::Time, double>> rss, unexplained;
  std::vector<kvferry::MemoryReport> reports;
  const absl::Time start = absl::Now();
  const absl::Time end = start + absl::Seconds(absl::GetFlag(FLAGS_seconds));
  absl::Time next_sample = start;
  absl::Time next_progress = start + absl::Seconds(10);
  while (true) {
    const absl::Time now = absl::Now();
    if (now >= next_sample) {
      auto r = prefill->GetMemoryReport();
      if (!r.ok()) return Fail(r.status().ToString());
      rss.emplace_back(r->taken, static_cast<double>(r->process.rss_bytes));
      unexplained.emplace_back(r->taken, static_cast<double>(r->unexplained_signed_bytes));
      reports.push_back(*std::move(r));
      next_sample += absl::Milliseconds(absl::GetFlag(FLAGS_sample_ms));
    }
    if (now >= end) break;
    if (now >= next_progress) {
      std::fprintf(stderr, "soak: %.0f/%d s, %llu transfers, %.2f GB moved, rss %.1f MiB, "
                   "unexplained %.1f MiB\n",
                   absl::ToDoubleSeconds(now - start), absl::GetFlag(FLAGS_seconds),
                   static_cast<unsigned long long>(transfers), bytes / 1e9,
                   rss.back().second / 1048576, unexplained.back().second / 1048576);
      next_progress += absl::Seconds(10);
    }
    if (absl::Status s = pump(); !s.ok()) return Fail(s.ToString());
  }
  for (Transfer& t : flying) {
    if (absl::Status s = t.Wait(absl::Seconds(30)); !s.ok()) return Fail(s.ToString());
  }
  flying.clear();
  notifications += decode->WaitForNotifications(absl::Milliseconds(200)).size();

  const double elapsed_min = absl::ToDoubleMinutes(rss.back().first - rss.front().first);
  const double rss_slope = kvferry::Watchdog::Slope(rss) * 60 / 1048576;  // MiB/min
  const double unexplained_growth =
      kvferry::Watchdog::Slope(unexplained) * 60 / 1048576 * elapsed_min;  // MiB, fitted
  const bool stats_ok = decode->GetStats() == dbase && prefill->GetStats() == pbase &&
                        dpool->free_blocks() == layout.num_blocks &&
                        ppool->free_blocks() == layout.num_blocks;

  nlohmann::json out;
  out["seconds"] = absl::ToDoubleSeconds(rss.back().first - rss.front().first);
  out["transfers"] = transfers;
  out["bytes_moved"] = bytes;
  out["notifications"] = notifications;
  out["samples"] = rss.size();
  out["rss_first_mib"] = rss.front().second / 1048576;
  out["rss_last_mib"] = rss.back().second / 1048576;
  out["rss_slope_mib_per_min"] = rss_slope;
  out["unexplained_first_mib"] = unexplained.front().second / 1048576;
  out["unexplained_last_mib"] = unexplained.back().second / 1048576;
  out["unexplained_growth_mib"] = unexplained_growth;
  out["max_rss_slope_mib_per_min"] = absl::GetFlag(FLAGS_max_rss_slope_mib_per_min);
  out["max_unexplained_growth_mib"] = absl::GetFlag(FLAGS_max_unexplained_growth_mib);
  out["counters_at_baseline"] = stats_ok;
  out["ucx"] = reports.back().ucx.ToString();
  std::printf("%s\n", out.dump(2).c_str());
  std::fprintf(stderr, "%s", reports.back().ToText().c_str());

  if (!stats_ok) {
    return Fail("counters not at baseline:\n" + decode->ledger().Report() +
                prefill->ledger().Report());
  }
  if (rss_slope > absl::GetFlag(FLAGS_max_rss_slope_mib_per_min)) {
    return Fail(absl::StrFormat("RSS slope %.2f MiB/min > %.2f", rss_slope,
                                absl::GetFlag(FLAGS_max_rss_slope_mib_per_min)));
  }
  if (unexplained_growth > absl::GetFlag(FLAGS_max_unexplained_growth_mib)) {
    return Fail(absl::StrFormat("unexplained memory grew %.2f MiB > %.2f", unexplained_growth,
                                absl::GetFlag(FLAGS_max_unexplained_growth_mib)));
  }
  std::fprintf(stderr, "soak: PASSED\n");
  return 0;
}
