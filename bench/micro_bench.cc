// Micro-benchmarks of kvferry's per-request bookkeeping (Google Benchmark):
// retaining and releasing a shared handle, leasing and returning blocks,
// encoding and decoding a peer's descriptor, and the ledger's cost per
// counted object. The PostTransfer cost has its own benchmark
// (bench/post_bench.cc). And the ceiling of the shm-kernel-copy path:
// process_vm_writev / process_vm_readv into another process over a cold
// working set, beside memcpy over the same sizes and working set.
#include <benchmark/benchmark.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <string>

#include <boost/smart_ptr/intrusive_ptr.hpp>

#include "kvferry/agent.h"
#include "src/access.h"
#include "src/pool_core.h"
#include "src/tracked.h"
#include "src/wire/message.h"

namespace {

using kvferry::internal::Access;

struct Fixture {
  std::unique_ptr<kvferry::Agent> agent;
  kvferry::KvPool* pool = nullptr;
};

// An agent without a progress thread and a small pool (nothing moves).
Fixture& Shared() {
  static Fixture* f = [] {
    auto* fx = new Fixture;
    kvferry::AgentOptions o;
    o.progress_thread = false;
    o.leak_policy = kvferry::LeakPolicy::kIgnore;
    o.pool_memory = kvferry::PoolMemorySource::kAnonymousMmap;
    auto agent = kvferry::Agent::Create(o);
    if (!agent.ok()) return fx;
    fx->agent = *std::move(agent);
    kvferry::KvLayout layout{.num_layers = 4, .num_blocks = 4096, .tokens_per_block = 16,
                             .num_kv_heads = 1, .head_dim = 64, .element_bytes = 2};
    auto pool = fx->agent->CreatePool("kv", layout);
    if (pool.ok()) fx->pool = *pool;
    return fx;
  }();
  return *f;
}

// A pool's shared state, as every BlockSet and transfer holds it: one
// intrusive reference taken and dropped (two atomic operations).
void BM_PoolRetainRelease(benchmark::State& state) {
  Fixture& f = Shared();
  if (f.pool == nullptr) return state.SkipWithError("no pool");
  kvferry::internal::PoolCore* core = &Access::Pool(*f.pool);
  for (auto _ : state) {
    boost::intrusive_ptr<kvferry::internal::PoolCore> ref(core);
    benchmark::DoNotOptimize(ref);
  }
}
BENCHMARK(BM_PoolRetainRelease);

// The same for the ledger every counted object holds.
void BM_LedgerRetainRelease(benchmark::State& state) {
  Fixture& f = Shared();
  if (f.agent == nullptr) return state.SkipWithError("no agent");
  for (auto _ : state) {
    kvferry::LedgerPtr ref = Access::Retain(f.agent->ledger());
    benchmark::DoNotOptimize(ref);
  }
}
BENCHMARK(BM_LedgerRetainRelease);

// Lease `count` free blocks and return them (BlockSet destroyed).
void BM_LeaseReturn(benchmark::State& state) {
  Fixture& f = Shared();
  if (f.pool == nullptr) return state.SkipWithError("no pool");
  const auto count = static_cast<uint32_t>(state.range(0));
  for (auto _ : state) {
    auto blocks = f.pool->Lease(count);
    benchmark::DoNotOptimize(blocks);
  }
  state.SetItemsProcessed(state.iterations() * count);
}
BENCHMARK(BM_LeaseReturn)->Arg(1)->Arg(16)->Arg(256);

// LeaseIds of a request's ids (what an engine whose scheduler picks ids does).
void BM_LeaseIdsReturn(benchmark::State& state) {
  Fixture& f = Shared();
  if (f.pool == nullptr) return state.SkipWithError("no pool");
  std::vector<uint32_t> ids(static_cast<size_t>(state.range(0)));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<uint32_t>(100 + 2 * i);
  for (auto _ : state) {
    auto blocks = f.pool->LeaseIds(ids);
    benchmark::DoNotOptimize(blocks);
  }
  state.SetItemsProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_LeaseIdsReturn)->Arg(16)->Arg(256);

// A peer's descriptor as the handshake carries it: `pools` pools of a
// 32-layer K/V layout registered per layer and plane (64 regions each, with
// 64-byte remote keys).
kvferry::internal::wire::Message Welcome(int pools) {
  namespace wire = kvferry::internal::wire;
  wire::Message m;
  m.type = wire::MessageType::kWelcome;
  m.agent.name = "bench-prefill";
  m.agent.host_id = std::string(36, 'h');
  m.agent.worker_address = std::string(300, 'a');
  kvferry::KvLayout layout{.num_layers = 32, .num_blocks = 1024, .tokens_per_block = 16,
                           .num_kv_heads = 8, .head_dim = 128, .element_bytes = 2};
  for (int p = 0; p < pools; ++p) {
    wire::PoolDescriptor pd;
    pd.name = "kv" + std::to_string(p);
    pd.layout = layout;
    for (uint32_t r = 0; r < layout.num_layers * 2; ++r) {
      pd.regions.push_back({.base = (uint64_t{1} << 32) + r * layout.plane_bytes(),
                            .length = layout.plane_bytes(),
                            .rkey = std::string(64, static_cast<char>('k' + r % 8))});
    }
    m.agent.pools.push_back(std::move(pd));
  }
  return m;
}

void BM_DescriptorEncode(benchmark::State& state) {
  const auto m = Welcome(static_cast<int>(state.range(0)));
  size_t bytes = 0;
  for (auto _ : state) {
    std::string out = kvferry::internal::wire::Encode(m);
    bytes = out.size();
    benchmark::DoNotOptimize(out);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
}
BENCHMARK(BM_DescriptorEncode)->Arg(1)->Arg(8);

void BM_DescriptorDecode(benchmark::State& state) {
  const std::string bytes = kvferry::internal::wire::Encode(Welcome(static_cast<int>(state.range(0))));
  for (auto _ : state) {
    auto m = kvferry::internal::wire::Decode(bytes);
    if (!m.ok()) return state.SkipWithError(m.status().ToString().c_str());
    benchmark::DoNotOptimize(m);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes.size()));
}
BENCHMARK(BM_DescriptorDecode)->Arg(1)->Arg(8);

// The ledger's cost per counted object (what every BlockSet, Transfer and UCX
// handle pays at creation and destruction). Off: an empty Tracked (no ledger).
// On: counted in a ledger; the creation site is recorded too when the
// library was built with KVFERRY_LEDGER (the label says which).
void BM_TrackedLedgerOff(benchmark::State& state) {
  for (auto _ : state) {
    kvferry::internal::Tracked t;
    benchmark::DoNotOptimize(t);
  }
}
BENCHMARK(BM_TrackedLedgerOff);

void BM_TrackedLedgerOn(benchmark::State& state) {
  Fixture& f = Shared();
  if (f.agent == nullptr) return state.SkipWithError("no agent");
  kvferry::LedgerPtr ledger = Access::Retain(f.agent->ledger());
  state.SetLabel(kvferry::Ledger::SitesEnabled() ? "counters+sites (KVFERRY_LEDGER)"
                                                 : "counters only (built without KVFERRY_LEDGER)");
  for (auto _ : state) {
    kvferry::internal::Tracked t(ledger, kvferry::ResourceKind::kBlockSet,
                                 kvferry::SourceLocation::current());
    benchmark::DoNotOptimize(t);
  }
}
BENCHMARK(BM_TrackedLedgerOn);

// --- The kernel copy's ceiling -----------------------------------------------

constexpr size_t kColdBytes = size_t{256} << 20;  // larger than any CPU cache here

// A child process holding kColdBytes of touched anonymous memory, and the
// same amount here (source and destination of memcpy). Made once.
struct ColdPeer {
  pid_t pid = -1;
  char* remote = nullptr;  // in the child
  char* local = nullptr;
  char* local_other = nullptr;
  int release_fd = -1;
};

ColdPeer& Cold() {
  static ColdPeer* c = [] {
    auto* peer = new ColdPeer;
    int to_child[2], from_child[2];
    if (pipe(to_child) != 0 || pipe(from_child) != 0) return peer;
    const pid_t pid = fork();
    if (pid == 0) {
      close(to_child[1]);  // so the parent's exit ends the read below
      close(from_child[0]);
      void* mem = mmap(nullptr, kColdBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
      if (mem != MAP_FAILED) std::memset(mem, 2, kColdBytes);
      char* addr = mem == MAP_FAILED ? nullptr : static_cast<char*>(mem);
      (void)!write(from_child[1], &addr, sizeof(addr));
      char byte;
      (void)!read(to_child[0], &byte, 1);  // until the parent exits
      _exit(0);
    }
    close(to_child[0]);
    close(from_child[1]);
    if (pid < 0 || read(from_child[0], &peer->remote, sizeof(peer->remote)) !=
                       static_cast<ssize_t>(sizeof(peer->remote))) {
      return peer;
    }
    close(from_child[0]);
    peer->pid = pid;
    peer->release_fd = to_child[1];
    for (char** p : {&peer->local, &peer->local_other}) {
      void* mem = mmap(nullptr, kColdBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
      if (mem == MAP_FAILED) return peer;
      std::memset(mem, 1, kColdBytes);
      *p = static_cast<char*>(mem);
    }
    return peer;
  }();
  return *c;
}

// range(0): bytes per call; range(1): 1 WRITE (process_vm_writev), 0 READ.
// Each call moves the next chunk of the working set, wrapping around.
void BM_KernelCopyCold(benchmark::State& state) {
  ColdPeer& c = Cold();
  if (c.remote == nullptr || c.local_other == nullptr) {
    state.SkipWithError("no child process with a working set");
    return;
  }
  const size_t size = static_cast<size_t>(state.range(0));
  const bool write = state.range(1) == 1;
  size_t off = 0;
  for (auto _ : state) {
    iovec local{c.local + off, size};
    iovec remote{c.remote + off, size};
    const ssize_t n = write ? process_vm_writev(c.pid, &local, 1, &remote, 1, 0)
                            : process_vm_readv(c.pid, &local, 1, &remote, 1, 0);
    if (n != static_cast<ssize_t>(size)) {
      state.SkipWithError(std::strerror(errno));
      return;
    }
    off = off + 2 * size > kColdBytes ? 0 : off + size;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * size));
}
BENCHMARK(BM_KernelCopyCold)
    ->ArgsProduct({{64 << 10, 256 << 10, 1 << 20, 4 << 20}, {1, 0}})
    ->ArgNames({"bytes", "write"});

void BM_MemcpyCold(benchmark::State& state) {
  ColdPeer& c = Cold();
  if (c.local_other == nullptr) {
    state.SkipWithError("no working set");
    return;
  }
  const size_t size = static_cast<size_t>(state.range(0));
  size_t off = 0;
  for (auto _ : state) {
    std::memcpy(c.local_other + off, c.local + off, size);
    benchmark::ClobberMemory();
    off = off + 2 * size > kColdBytes ? 0 : off + size;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * size));
}
BENCHMARK(BM_MemcpyCold)->Arg(64 << 10)->Arg(256 << 10)->Arg(1 << 20)->Arg(4 << 20)
    ->ArgNames({"bytes"});

}  // namespace

BENCHMARK_MAIN();
