// kvferry_transfer_bench: WRITE and READ bandwidth between two processes on
// one host, for each pool memory source (AgentOptions::pool_memory) in the
// same run. The driver starts a copy of itself as the target (a second
// process with its own agent and pools, listening on loopback), connects,
// prints the data path UCX chose, and keeps --in_flight transfers of --batch
// operations each going for --seconds per (source, chunk size, op). Every
// operation moves exactly one chunk: local ids ascend while remote ids
// descend, so nothing coalesces. Both sides touch their pools first (warm),
// unless --cold: then one pass over pools nobody touched yet, first-touch
// page faults included (with shm-direct, each process's view of a segment
// faults on its own: the owner's and the peer's).
//
// Beside each figure, in the same run: single-core memcpy over buffers of the
// pool's size with the same access pattern (the physical limit of a one-copy
// move), and ucx_perftest put_bw / get at the same size and UCX_TLS (one
// cache-hot buffer: reported for reference, not a target).
//
//   kvferry_transfer_bench [--chunks=65536,1048576] [--seconds=2] [--cold]
//       [--pool_memory=anonymous-mmap,ucx-allocated,engine-owned]
//       [--perftest=/usr/bin/ucx_perftest]
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <deque>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "bench/bench_util.h"
#include "kvferry/agent.h"
#include "tests/child_process.h"

ABSL_FLAG(std::string, role, "driver", "driver, or target (started by the driver).");
ABSL_FLAG(std::string, pool_memory, "anonymous-mmap,ucx-allocated,engine-owned",
          "Pool memory sources to compare (driver), or the one to use (target): "
          "ucx-allocated and anonymous-mmap (CreatePool with that AgentOptions::pool_memory), "
          "engine-owned (the process allocates the memory, RegisterPool registers it).");
ABSL_FLAG(std::string, perftest, "/usr/bin/ucx_perftest",
          "ucx_perftest binary for the reference figures; empty to skip them.");
ABSL_FLAG(std::string, chunks, "65536,1048576", "Bytes per operation (one KV chunk).");
ABSL_FLAG(std::string, tls, "posix,sysv,tcp", "UCX_TLS for both processes.");
ABSL_FLAG(double, seconds, 2.0, "How long each measurement runs.");
ABSL_FLAG(int, batch, 16, "Operations (chunks) per transfer.");
ABSL_FLAG(int, in_flight, 4, "Transfers kept in flight.");
ABSL_FLAG(int, pool_mib, 64, "Size of each pool (one per chunk size), MiB.");
ABSL_FLAG(bool, cold, false,
          "Measure one pass over fresh pools that neither process touched before (first-touch "
          "page faults included; each op of a fresh connection), instead of --seconds of warm "
          "traffic.");

namespace {

using kvferry::Agent;
using kvferry::BlockSet;
using kvferry::KvLayout;
using kvferry::KvPool;
using kvferry::PoolMemorySource;
using kvferry::Transfer;
using kvferry::TransferOp;

[[noreturn]] void Die(const std::string& what) {
  std::printf("ERROR %s\n", what.c_str());
  std::fflush(stdout);
  std::exit(2);
}

PoolMemorySource ParseSource(const std::string& name) {
  if (name == "ucx-allocated") return PoolMemorySource::kUcxAllocated;
  if (name == "anonymous-mmap") return PoolMemorySource::kAnonymousMmap;
  if (name == "engine-owned") return PoolMemorySource::kEngineOwned;
  Die("unknown pool memory source '" + name +
      "' (ucx-allocated, anonymous-mmap or engine-owned)");
}

// Engine memory for --pool_memory=engine-owned: mapped here, never freed
// (the process ends with the run).
void* EngineMemory(uint64_t bytes) {
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) Die(absl::StrCat("mmap of ", bytes, " bytes failed"));
  return mem;
}

std::vector<uint64_t> Chunks() {
  std::vector<uint64_t> out;
  for (absl::string_view c : absl::StrSplit(absl::GetFlag(FLAGS_chunks), ',', absl::SkipEmpty())) {
    uint64_t v = 0;
    if (!absl::SimpleAtoi(c, &v) || v < 64 || v % 64 != 0 || v > (uint64_t{1} << 22)) {
      Die(absl::StrCat("bad chunk size '", c, "' (64 .. 4 MiB, a multiple of 64)"));
    }
    out.push_back(v);
  }
  return out;
}

// One layer, one plane, chunk = 16 tokens * heads * head_dim * 2 bytes.
KvLayout LayoutFor(uint64_t chunk) {
  const uint64_t pool = uint64_t{static_cast<uint64_t>(absl::GetFlag(FLAGS_pool_mib))} << 20;
  const uint64_t heads = chunk > (uint64_t{1} << 21) ? chunk >> 21 : 1;
  return KvLayout{.num_layers = 1, .num_blocks = static_cast<uint32_t>(pool / chunk),
                  .tokens_per_block = 16, .num_kv_heads = static_cast<uint32_t>(heads),
                  .head_dim = static_cast<uint32_t>(chunk / 32 / heads), .element_bytes = 2,
                  .separate_kv = false};
}

std::unique_ptr<Agent> MakeAgent(const std::string& name, PoolMemorySource source,
                                 std::vector<KvPool*>* pools) {
  kvferry::AgentOptions o;
  o.name = name;
  o.leak_policy = kvferry::LeakPolicy::kLog;
  o.ucx_config = {{"TLS", absl::GetFlag(FLAGS_tls)}};
  if (source != PoolMemorySource::kEngineOwned) o.pool_memory = source;
  auto agent = Agent::Create(o);
  if (!agent.ok()) Die(absl::StrCat("Agent::Create: ", agent.status().ToString()));
  for (uint64_t chunk : Chunks()) {
    const KvLayout layout = LayoutFor(chunk);
    std::vector<kvferry::KvRegion> regions = {{EngineMemory(layout.total_bytes()),
                                               layout.total_bytes()}};
    auto pool = source == PoolMemorySource::kEngineOwned
                    ? (*agent)->RegisterPool(absl::StrCat("c", chunk), layout, regions)
                    : (*agent)->CreatePool(absl::StrCat("c", chunk), layout);
    if (source != PoolMemorySource::kEngineOwned) munmap(regions[0].base, layout.total_bytes());
    if (!pool.ok()) Die(absl::StrCat("CreatePool: ", pool.status().ToString()));
    if (!absl::GetFlag(FLAGS_cold)) {
      std::memset((*pool)->base(), 1, (*pool)->size_bytes());  // warm: first touch is not measured
    }
    pools->push_back(*pool);
  }
  return *std::move(agent);
}

int Target() {
  std::vector<KvPool*> pools;
  auto agent = MakeAgent("bench-target", ParseSource(absl::GetFlag(FLAGS_pool_memory)), &pools);
  auto port = agent->Listen("127.0.0.1", 0);
  if (!port.ok()) Die(absl::StrCat("Listen: ", port.status().ToString()));
  std::printf("PORT %u\n", *port);
  std::fflush(stdout);
  char buf[64];
  while (fread(buf, 1, sizeof(buf), stdin) > 0) {
  }
  return 0;  // stdin closed: the driver is done
}

// GB/s of `op` on `pool` (chunk-sized operations) to the target's pool of
// the same name. Transfer k moves local blocks [k*batch, (k+1)*batch) to
// remote blocks counted down from the end (so no two operations coalesce),
// cycling over the pool for --seconds; with --cold, one pass over the pool.
double Measure(Agent& agent, KvPool& pool, TransferOp op, bool cold, uint64_t* ops_done) {
  const uint32_t batch = static_cast<uint32_t>(absl::GetFlag(FLAGS_batch));
  const size_t in_flight = static_cast<size_t>(absl::GetFlag(FLAGS_in_flight));
  const uint32_t groups = pool.layout().num_blocks / batch;
  if (groups < in_flight) Die("pool too small for batch * in_flight");
  auto post = [&](uint32_t k) {
    std::vector<uint32_t> ids, remote;
    for (uint32_t j = 0; j < batch; ++j) {
      ids.push_back(k * batch + j);
      remote.push_back(pool.layout().num_blocks - 1 - (k * batch + j));
    }
    auto local = pool.LeaseIds(ids);  // the transfer holds the lease
    if (!local.ok()) Die(absl::StrCat("LeaseIds: ", local.status().ToString()));
    auto t = agent.PostTransfer({.op = op, .peer = "bench-target", .local = &*local,
                                 .remote_blocks = remote});
    if (!t.ok()) Die(absl::StrCat("PostTransfer: ", t.status().ToString()));
    return *std::move(t);
  };
  std::deque<Transfer> pending;
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + std::chrono::duration<double>(absl::GetFlag(FLAGS_seconds));
  uint32_t next = 0;
  uint64_t ops = 0;
  auto more = [&] { return cold ? next < groups : std::chrono::steady_clock::now() < end; };
  while (pending.size() < in_flight && more()) pending.push_back(post(next++ % groups));
  while (!pending.empty()) {
    if (absl::Status st = pending.front().Wait(absl::Seconds(120)); !st.ok()) {
      Die(absl::StrCat("transfer: ", st.ToString()));
    }
    pending.pop_front();
    ops += batch;
    if (more()) pending.push_back(post(next++ % groups));
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  *ops_done = ops;
  return static_cast<double>(ops * pool.layout().chunk_bytes()) / secs / 1e9;
}

// Single-core memcpy GB/s between two buffers of the pool's size, chunk by
// chunk in the bench's pattern (ascending source, descending destination),
// for --seconds (warm) or one pass over untouched buffers (--cold).
double MemcpyGBps(uint64_t chunk) {
  const KvLayout layout = LayoutFor(chunk);
  const uint64_t bytes = layout.total_bytes();
  auto* src = static_cast<std::byte*>(EngineMemory(bytes));
  auto* dst = static_cast<std::byte*>(EngineMemory(bytes));
  const bool cold = absl::GetFlag(FLAGS_cold);
  if (!cold) {
    std::memset(src, 1, bytes);
    std::memset(dst, 2, bytes);
  }
  const uint32_t n = layout.num_blocks;
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + std::chrono::duration<double>(absl::GetFlag(FLAGS_seconds));
  uint64_t copies = 0;
  do {
    for (uint32_t i = 0; i < n; ++i) {
      std::memcpy(dst + (n - 1 - i) * chunk, src + i * chunk, chunk);
    }
    copies += n;
  } while (!cold && std::chrono::steady_clock::now() < end);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  munmap(src, bytes);
  munmap(dst, bytes);
  return static_cast<double>(copies * chunk) / secs / 1e9;
}

double PerftestGBps(const std::string& test, uint64_t chunk, const std::string& tls) {
  return kvferry::bench::PerftestGBps(absl::GetFlag(FLAGS_perftest), test, chunk, tls);
}

using kvferry::bench::LoadAverage;

int Driver(const char* self) {
  setenv("UCX_TLS", absl::GetFlag(FLAGS_tls).c_str(), 1);  // for ucx_perftest
  struct Baseline {
    double memcpy_gbps, put_gbps, get_gbps;
  };
  std::vector<Baseline> baselines;
  for (uint64_t chunk : Chunks()) {
    baselines.push_back({MemcpyGBps(chunk), PerftestGBps("ucp_put_bw", chunk, absl::GetFlag(FLAGS_tls)),
                         PerftestGBps("ucp_get", chunk, absl::GetFlag(FLAGS_tls))});
  }
  std::printf("kvferry_transfer_bench: two processes, UCX_TLS=%s, %d transfers x %d ops in "
              "flight, %s; load average %s\n",
              absl::GetFlag(FLAGS_tls).c_str(), absl::GetFlag(FLAGS_in_flight),
              absl::GetFlag(FLAGS_batch),
              absl::GetFlag(FLAGS_cold)
                  ? "cold: one pass over untouched pools"
                  : absl::StrFormat("warm: %.1f s each", absl::GetFlag(FLAGS_seconds)).c_str(),
              LoadAverage().c_str());
  std::printf("%-15s %-12s %9s %6s %10s %10s %8s %9s %10s\n", "pool_memory", "data_path",
              "chunk", "op", "GB/s", "ops", "memcpy", "perftest", "vs_memcpy");
  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_pool_memory), ',', absl::SkipEmpty())) {
    const std::string source_name(name);
    kvferry::test::ChildProcess target(
        {self, "--role=target", "--pool_memory=" + source_name,
         "--tls=" + absl::GetFlag(FLAGS_tls), "--chunks=" + absl::GetFlag(FLAGS_chunks),
         absl::StrCat("--pool_mib=", absl::GetFlag(FLAGS_pool_mib)),
         absl::StrCat("--cold=", absl::GetFlag(FLAGS_cold))});
    auto line = target.ReadUntil("PORT", absl::Seconds(60));
    uint32_t port = 0;
    if (!line || !absl::SimpleAtoi(line->substr(line->find(' ') + 1), &port)) {
      Die("target did not start: " + line.value_or("timeout"));
    }
    std::vector<KvPool*> pools;
    auto agent = MakeAgent("bench-driver", ParseSource(source_name), &pools);
    auto peer = agent->Connect("127.0.0.1", static_cast<uint16_t>(port));
    if (!peer.ok()) Die(absl::StrCat("Connect: ", peer.status().ToString()));
    for (size_t c = 0; c < pools.size(); ++c) {
      KvPool* pool = pools[c];
      const Baseline& base = baselines[c];
      for (TransferOp op : {TransferOp::kWrite, TransferOp::kRead}) {
        uint64_t ops = 0;
        const double gbps = Measure(*agent, *pool, op, absl::GetFlag(FLAGS_cold), &ops);
        const double perftest = op == TransferOp::kWrite ? base.put_gbps : base.get_gbps;
        std::printf("%-15s %-12s %9llu %6s %10.2f %10llu %8.2f %9.2f %9.2fx\n",
                    source_name.c_str(), peer->data_path.c_str(),
                    static_cast<unsigned long long>(pool->layout().chunk_bytes()),
                    op == TransferOp::kWrite ? "WRITE" : "READ", gbps,
                    static_cast<unsigned long long>(ops), base.memcpy_gbps, perftest,
                    base.memcpy_gbps > 0 ? gbps / base.memcpy_gbps : 0.0);
        std::fflush(stdout);
      }
    }
    agent.reset();
    target.CloseStdin();
    target.Wait();
  }
  std::printf("load average %s\n", LoadAverage().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  kvferry::bench::InstallBenchHelp(
      "WRITE/READ GB/s between two kvferry processes on one host, per pool memory source.\n"
      "Example: kvferry_transfer_bench --chunks=65536,1048576 --seconds=2");
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_batch) <= 0 || absl::GetFlag(FLAGS_in_flight) <= 0 ||
      absl::GetFlag(FLAGS_seconds) <= 0 || absl::GetFlag(FLAGS_pool_mib) <= 0) {
    Die("--batch, --in_flight, --seconds and --pool_mib must be positive");
  }
  if (absl::GetFlag(FLAGS_role) == "target") return Target();
  if (absl::GetFlag(FLAGS_role) != "driver") Die("--role is driver or target");
  return Driver("/proc/self/exe");
}
