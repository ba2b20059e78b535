// post_bench: what Agent::PostTransfer costs the caller, and what an idle
// connected agent costs the machine.
//
// BM_PostTransfer/<progress_thread>: two agents in this process connected
// over loopback (UCX shared memory: posix,sysv), 512 descriptors of 64-byte
// chunks per transfer (local ids ascend, remote ids descend: nothing
// coalesces). Only the PostTransfer call is timed (manual time); the
// transfer is then waited for outside the timing. Counters: ns_per_desc
// (mean call / 512), p50_us and p90_us of the call.
//
// BM_IdleConnected: the same two agents connected, with nothing to do, for
// POST_BENCH_IDLE_SECONDS (default 5) seconds. Counters: cpu_pct (process
// CPU time, getrusage, as % of one core) and wakeups_per_s (context
// switches of every thread of the process, /proc/self/task/*/status, per
// second; the sleeping main thread contributes about one).
//
// BM_IdleConnectedProcesses: one agent here and one in a child process
// (this binary re-executed with POST_BENCH_IDLE_CHILD=1), connected over
// loopback with kvferry pools on both sides, settled for
// POST_BENCH_IDLE_SETTLE_SECONDS (default 5), then idle for
// POST_BENCH_IDLE_SECONDS. Counters per process: here_cpu_pct and
// child_cpu_pct (% of one core, from /proc/<pid>/stat, every thread),
// here_wakeups_per_s and child_wakeups_per_s (context switches of every
// thread but the measuring main thread and the child's waiting one).
//
// POST_BENCH_MIN_SECONDS sets how long each post measurement runs (2 s).
#include <dirent.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#include "kvferry/agent.h"

namespace {

using kvferry::Agent;
using kvferry::AgentOptions;
using kvferry::BlockSet;
using kvferry::KvLayout;
using kvferry::KvPool;
using kvferry::TransferOp;

constexpr uint32_t kDescriptors = 512;
constexpr uint32_t kBlocks = 4096;

// One layer, one plane, 64-byte chunks.
KvLayout Layout() {
  return KvLayout{.num_layers = 1, .num_blocks = kBlocks, .tokens_per_block = 1,
                  .num_kv_heads = 1, .head_dim = 32, .element_bytes = 2,
                  .separate_kv = false};
}

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "post_bench: %s\n", what.c_str());
  std::exit(2);
}

struct Pair {
  std::unique_ptr<Agent> target;  // destroyed last
  std::unique_ptr<Agent> source;
  KvPool* pool = nullptr;

  explicit Pair(bool progress_thread) {
    auto make = [&](const std::string& name) {
      AgentOptions o;
      o.name = name;
      o.progress_thread = progress_thread;
      o.ucx_config = {{"TLS", "posix,sysv"}};
      auto agent = Agent::Create(o);
      if (!agent.ok()) Die(agent.status().ToString());
      return *std::move(agent);
    };
    target = make("post-target");
    source = make("post-source");
    auto tp = target->CreatePool("kv", Layout());
    auto sp = source->CreatePool("kv", Layout());
    if (!tp.ok() || !sp.ok()) Die("CreatePool failed");
    pool = *sp;
    auto port = target->Listen("127.0.0.1", 0);
    if (!port.ok()) Die(port.status().ToString());
    // Without progress threads the target is driven from here while the
    // source connects.
    std::thread drive;
    std::atomic<bool> done{false};
    if (!progress_thread) {
      drive = std::thread([&] {
        while (!done.load()) target->Progress();
      });
    }
    auto peer = source->Connect("127.0.0.1", *port);
    if (!peer.ok()) Die(peer.status().ToString());
    auto back = target->WaitForPeer("post-source");
    done.store(true);
    if (drive.joinable()) drive.join();
    if (!back.ok()) Die(back.status().ToString());
  }
  ~Pair() {
    source.reset();
    target.reset();
  }
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(p * static_cast<double>(v.size() - 1));
  return v[i];
}

void BM_PostTransfer(benchmark::State& state) {
  const bool threaded = state.range(0) != 0;
  Pair pair(threaded);
  // Without a progress thread nobody drives the target; shm puts need no
  // target progress, but keep it honest.
  std::atomic<bool> stop{false};
  std::thread drive;
  if (!threaded) {
    drive = std::thread([&] {
      while (!stop.load()) {
        pair.target->Progress();
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    });
  }
  std::vector<uint32_t> local(kDescriptors), remote(kDescriptors);
  std::vector<double> calls_us;
  uint32_t round = 0;
  for (auto _ : state) {
    const uint32_t base = (round++ % (kBlocks / kDescriptors)) * kDescriptors;
    for (uint32_t j = 0; j < kDescriptors; ++j) {
      local[j] = base + j;
      remote[j] = kBlocks - 1 - (base + j);
    }
    auto lease = pair.pool->LeaseIds(local);
    if (!lease.ok()) Die(lease.status().ToString());
    kvferry::TransferSpec spec{.op = TransferOp::kWrite, .peer = "post-target",
                               .local = &*lease, .remote_blocks = remote};
    const auto start = std::chrono::steady_clock::now();
    auto t = pair.source->PostTransfer(spec);
    const auto end = std::chrono::steady_clock::now();
    if (!t.ok()) Die(t.status().ToString());
    const double s = std::chrono::duration<double>(end - start).count();
    state.SetIterationTime(s);
    calls_us.push_back(s * 1e6);
    if (absl::Status st = t->Wait(absl::Seconds(30)); !st.ok()) Die(st.ToString());
  }
  stop.store(true);
  if (drive.joinable()) drive.join();
  double sum = 0;
  for (double c : calls_us) sum += c;
  state.counters["ns_per_desc"] =
      calls_us.empty() ? 0 : sum / static_cast<double>(calls_us.size()) * 1e3 / kDescriptors;
  state.counters["p50_us"] = Percentile(calls_us, 0.5);
  state.counters["p90_us"] = Percentile(calls_us, 0.9);
  state.counters["p90_over_p50"] = Percentile(calls_us, 0.9) / Percentile(calls_us, 0.5);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * kDescriptors);
}
// 2 s each unless POST_BENCH_MIN_SECONDS says otherwise (the smoke test's
// short run).
double PostMinSeconds() {
  const char* env = std::getenv("POST_BENCH_MIN_SECONDS");
  return env != nullptr ? std::atof(env) : 2.0;
}
BENCHMARK(BM_PostTransfer)->ArgName("progress_thread")->Arg(1)->Arg(0)->UseManualTime()
    ->Unit(benchmark::kMicrosecond)->MinTime(PostMinSeconds());

// BM_PostByIds/<descriptors>/<progress_thread> and
// BM_PostPrepared/<descriptors>/<progress_thread>: the same pair of agents;
// each transfer names <descriptors> blocks (local ids ascend, remote ids
// descend), by ids (TransferSpec::local_pool, local_blocks, remote_ids) or
// by indices into two lists prepared once over the whole pools
// (Agent::Prepare, PostPrepared). Same timing and counters as
// BM_PostTransfer, per <descriptors>.
enum class PostForm { kIds, kPrepared };

void PostMany(benchmark::State& state, PostForm form) {
  const uint32_t n = static_cast<uint32_t>(state.range(0));
  const bool threaded = state.range(1) != 0;
  Pair pair(threaded);
  std::atomic<bool> stop{false};
  std::thread drive;
  if (!threaded) {
    drive = std::thread([&] {
      while (!stop.load()) {
        pair.target->Progress();
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    });
  }
  std::vector<uint32_t> all(kBlocks);
  for (uint32_t i = 0; i < kBlocks; ++i) all[i] = i;
  kvferry::PreparedList local_list, remote_list;
  if (form == PostForm::kPrepared) {
    auto l = pair.source->Prepare({.pool = "kv", .blocks = all});
    auto r = pair.source->Prepare({.peer = "post-target", .pool = "kv", .blocks = all});
    if (!l.ok()) Die(l.status().ToString());
    if (!r.ok()) Die(r.status().ToString());
    local_list = *std::move(l);
    remote_list = *std::move(r);
  }
  std::vector<uint32_t> local(n), remote(n);
  std::vector<double> calls_us;
  uint32_t round = 0;
  for (auto _ : state) {
    const uint32_t base = (round++ % (kBlocks / n)) * n;
    for (uint32_t j = 0; j < n; ++j) {
      local[j] = base + j;
      remote[j] = kBlocks - 1 - (base + j);
    }
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<kvferry::Transfer> t =
        form == PostForm::kPrepared
            ? pair.source->PostPrepared(local_list, local, remote_list, remote,
                                        {.op = TransferOp::kWrite})
            : pair.source->PostTransfer({.op = TransferOp::kWrite, .peer = "post-target",
                                         .local_pool = "kv", .local_blocks = local,
                                         .remote_ids = remote});
    const auto end = std::chrono::steady_clock::now();
    if (!t.ok()) Die(t.status().ToString());
    const double s = std::chrono::duration<double>(end - start).count();
    state.SetIterationTime(s);
    calls_us.push_back(s * 1e6);
    if (absl::Status st = t->Wait(absl::Seconds(30)); !st.ok()) Die(st.ToString());
  }
  stop.store(true);
  if (drive.joinable()) drive.join();
  double sum = 0;
  for (double c : calls_us) sum += c;
  state.counters["ns_per_desc"] =
      calls_us.empty() ? 0 : sum / static_cast<double>(calls_us.size()) * 1e3 / n;
  state.counters["p50_ns_per_desc"] = Percentile(calls_us, 0.5) * 1e3 / n;
  state.counters["p50_us"] = Percentile(calls_us, 0.5);
  state.counters["p90_us"] = Percentile(calls_us, 0.9);
  state.counters["p90_over_p50"] = Percentile(calls_us, 0.9) / Percentile(calls_us, 0.5);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * n);
}
void BM_PostByIds(benchmark::State& state) { PostMany(state, PostForm::kIds); }
void BM_PostPrepared(benchmark::State& state) { PostMany(state, PostForm::kPrepared); }
BENCHMARK(BM_PostByIds)->ArgNames({"descriptors", "progress_thread"})
    ->ArgsProduct({{64, 1024}, {1, 0}})->UseManualTime()->Unit(benchmark::kMicrosecond)
    ->MinTime(PostMinSeconds());
BENCHMARK(BM_PostPrepared)->ArgNames({"descriptors", "progress_thread"})
    ->ArgsProduct({{64, 1024}, {1, 0}})->UseManualTime()->Unit(benchmark::kMicrosecond)
    ->MinTime(PostMinSeconds());

// Context switches (voluntary + involuntary) of every live thread of
// process `pid` ("self" for this one), but thread `skip_tid` if given.
uint64_t ContextSwitches(const std::string& pid = "self", long skip_tid = -1) {
  uint64_t total = 0;
  const std::string tasks = "/proc/" + pid + "/task";
  DIR* dir = opendir(tasks.c_str());
  if (dir == nullptr) return 0;
  while (dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    if (std::atol(e->d_name) == skip_tid) continue;
    std::ifstream in(tasks + "/" + e->d_name + "/status");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("voluntary_ctxt_switches:", 0) == 0 ||
          line.rfind("nonvoluntary_ctxt_switches:", 0) == 0) {
        total += std::strtoull(line.substr(line.find(':') + 1).c_str(), nullptr, 10);
      }
    }
  }
  closedir(dir);
  return total;
}

double CpuSeconds() {
  rusage ru = {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

void BM_IdleConnected(benchmark::State& state) {
  double seconds = 5;
  if (const char* env = std::getenv("POST_BENCH_IDLE_SECONDS")) seconds = std::atof(env);
  Pair pair(/*progress_thread=*/true);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // handshake tail settles
  double cpu = 0, wakeups = 0, wall = 0;
  for (auto _ : state) {
    const double cpu0 = CpuSeconds();
    const uint64_t sw0 = ContextSwitches();
    const auto t0 = std::chrono::steady_clock::now();
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    cpu = CpuSeconds() - cpu0;
    wakeups = static_cast<double>(ContextSwitches() - sw0);
  }
  state.counters["cpu_pct"] = 100.0 * cpu / wall;
  state.counters["wakeups_per_s"] = wakeups / wall;
  state.counters["wakeups_per_s_per_agent"] = wakeups / wall / 2;
}
BENCHMARK(BM_IdleConnected)->Iterations(1)->Unit(benchmark::kSecond);

double EnvSeconds(const char* name, double fallback) {
  const char* env = std::getenv(name);
  return env != nullptr ? std::atof(env) : fallback;
}

// Time on CPU of every live thread of process `pid`, in seconds
// (/proc/<pid>/task/*/schedstat: nanoseconds, unlike stat's clock ticks,
// which are too coarse for an idle process).
double ProcessCpuSeconds(pid_t pid) {
  const std::string tasks = "/proc/" + std::to_string(pid) + "/task";
  DIR* dir = opendir(tasks.c_str());
  if (dir == nullptr) return 0;
  double total = 0;
  while (dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream in(tasks + "/" + e->d_name + "/schedstat");
    uint64_t ns = 0;
    if (in >> ns) total += static_cast<double>(ns) * 1e-9;
  }
  closedir(dir);
  return total;
}

// The pools of BM_IdleConnectedProcesses: a model's shape (32 layers, K and
// V, 16-token blocks of 8 heads of 128 fp16 elements: 32 KiB chunks), with
// POST_BENCH_IDLE_BLOCKS blocks (default 16: 32 MiB).
KvLayout IdleLayout() {
  const char* env = std::getenv("POST_BENCH_IDLE_BLOCKS");
  return KvLayout{.num_layers = 32,
                  .num_blocks = env != nullptr ? static_cast<uint32_t>(std::atoi(env)) : 16u,
                  .tokens_per_block = 16, .num_kv_heads = 8, .head_dim = 128,
                  .element_bytes = 2, .separate_kv = true};
}

// The child of BM_IdleConnectedProcesses: an agent with a kvferry pool that
// listens on loopback, writes its port to stdout, and lives until its stdin
// closes.
int IdleChildMain() {
  AgentOptions o;
  o.name = "idle-child";
  auto agent = Agent::Create(o);
  if (!agent.ok()) Die(agent.status().ToString());
  if (!(*agent)->CreatePool("kv", IdleLayout()).ok()) Die("CreatePool failed");
  auto port = (*agent)->Listen("127.0.0.1", 0);
  if (!port.ok()) Die(port.status().ToString());
  std::printf("%u\n", static_cast<unsigned>(*port));
  std::fflush(stdout);
  char c;
  while (read(STDIN_FILENO, &c, 1) > 0) {
  }
  return 0;
}

void BM_IdleConnectedProcesses(benchmark::State& state) {
  const double seconds = EnvSeconds("POST_BENCH_IDLE_SECONDS", 5);
  const double settle = EnvSeconds("POST_BENCH_IDLE_SETTLE_SECONDS", 5);
  int to_child[2], from_child[2];
  if (pipe2(to_child, O_CLOEXEC) != 0 || pipe2(from_child, O_CLOEXEC) != 0) Die("pipe");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, to_child[0], STDIN_FILENO);
  posix_spawn_file_actions_adddup2(&actions, from_child[1], STDOUT_FILENO);
  std::string self = "/proc/self/exe";
  char* argv[] = {self.data(), nullptr};
  std::vector<std::string> env_strings = {"POST_BENCH_IDLE_CHILD=1"};
  for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
  std::vector<char*> envp;
  for (std::string& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t child = -1;
  if (posix_spawn(&child, self.c_str(), &actions, nullptr, argv, envp.data()) != 0) Die("spawn");
  posix_spawn_file_actions_destroy(&actions);
  close(to_child[0]);
  close(from_child[1]);
  std::string line;
  char c;
  while (read(from_child[0], &c, 1) == 1 && c != '\n') line.push_back(c);
  const int port = std::atoi(line.c_str());
  if (port <= 0) Die("child gave no port");
  {
    AgentOptions o;
    o.name = "idle-parent";
    auto agent = Agent::Create(o);
    if (!agent.ok()) Die(agent.status().ToString());
    if (!(*agent)->CreatePool("kv", IdleLayout()).ok()) Die("CreatePool failed");
    auto peer = (*agent)->Connect("127.0.0.1", static_cast<uint16_t>(port));
    if (!peer.ok()) Die(peer.status().ToString());
    std::this_thread::sleep_for(std::chrono::duration<double>(settle));
    const long main_tid = static_cast<long>(gettid());
    double here_cpu = 0, child_cpu = 0, here_sw = 0, child_sw = 0, wall = 0;
    for (auto _ : state) {
      const double h0 = ProcessCpuSeconds(getpid()), c0 = ProcessCpuSeconds(child);
      const uint64_t hs0 = ContextSwitches("self", main_tid);
      const uint64_t cs0 = ContextSwitches(std::to_string(child), child);
      const auto t0 = std::chrono::steady_clock::now();
      std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
      wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      here_cpu = ProcessCpuSeconds(getpid()) - h0;
      child_cpu = ProcessCpuSeconds(child) - c0;
      here_sw = static_cast<double>(ContextSwitches("self", main_tid) - hs0);
      child_sw = static_cast<double>(ContextSwitches(std::to_string(child), child) - cs0);
    }
    state.counters["here_cpu_pct"] = 100.0 * here_cpu / wall;
    state.counters["child_cpu_pct"] = 100.0 * child_cpu / wall;
    state.counters["here_wakeups_per_s"] = here_sw / wall;
    state.counters["child_wakeups_per_s"] = child_sw / wall;
  }
  close(to_child[1]);
  int status = 0;
  waitpid(child, &status, 0);
  close(from_child[0]);
}
BENCHMARK(BM_IdleConnectedProcesses)->Iterations(1)->Unit(benchmark::kSecond);

}  // namespace

int main(int argc, char** argv) {
  if (std::getenv("POST_BENCH_IDLE_CHILD") != nullptr) return IdleChildMain();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
