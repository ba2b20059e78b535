// kvferry-bench --compare (see bench_compare.h).
#include "bench/bench_compare.h"

#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_agent.h"
#include "bench/bench_roles.h"
#include "bench/bench_util.h"
#include "tests/child_process.h"

namespace kvferry::bench {
namespace {

// A model-shaped layout whose chunk (one layer and plane of one block) is
// `size` bytes: `layers` layers with K and V planes, so that a transfer of
// B blocks is B x layers x 2 scattered chunks, as an engine's whole-request
// transfer is.
KvLayout LayoutFor(uint64_t size, uint64_t working_set, uint32_t layers) {
  const uint64_t heads = size > (uint64_t{1} << 21) ? size >> 21 : 1;
  return KvLayout{.num_layers = layers,
                  .num_blocks = static_cast<uint32_t>(working_set / (size * 2 * layers)),
                  .tokens_per_block = 16, .num_kv_heads = static_cast<uint32_t>(heads),
                  .head_dim = static_cast<uint32_t>(size / 32 / heads), .element_bytes = 2,
                  .separate_kv = true};
}

// The most layers (up to `wanted`) for which the working set still holds
// `concurrency + 1` transfers of `batch` blocks; 0 when not even one fits.
uint32_t LayersThatFit(uint64_t size, uint64_t working_set, int batch, int concurrency,
                       uint32_t wanted) {
  const uint64_t per_layer = size * 2 * static_cast<uint64_t>(batch) *
                             (static_cast<uint64_t>(concurrency) + 1);
  return static_cast<uint32_t>(std::min<uint64_t>(wanted, working_set / per_layer));
}

double Ratio(double a, double b) { return b > 0 ? a / b : 0; }

RawResult RawRun(const BenchConfig& c) {
  kvferry::test::ChildProcess target(ChildCommand(c, "raw-target", {"--control_port=0"}));
  std::optional<std::string> line = target.ReadUntil("READY", absl::Seconds(120));
  std::vector<std::string> f = absl::StrSplit(line.value_or(""), ' ');
  uint32_t port = 0;
  if (f.size() != 3 || !absl::SimpleAtoi(f[2], &port)) {
    Die("raw target did not start: " + line.value_or("no output"));
  }
  // The same chunks per flush as kvferry moves per transfer, over every
  // chunk of the working set.
  const int ops = c.compare_batch * static_cast<int>(c.layout.num_layers * c.layout.num_planes());
  RawResult r = RunRawInitiator(c, static_cast<uint16_t>(port), ops, c.concurrency,
                                c.compare_seconds);
  target.Wait();
  return r;
}

}  // namespace

int RunCompare(const BenchConfig& base) {
  const std::string tls = base.tls.empty() ? std::string(getenv("UCX_TLS") ? getenv("UCX_TLS") : "")
                                           : base.tls;
  std::FILE* out = base.json ? stderr : stdout;
  absl::FPrintF(out,
                "kvferry-bench --compare: %d CPUs, %s, load average %s\n"
                "  working set %llu MiB per process, memory=%s, UCX_TLS=%s, %d blocks per "
                "transfer (x layers x K,V chunks; raw UCX: per flush), %d in flight, %.1f s per "
                "figure, remote blocks mirrored (no chunk coalesces)\n",
                NumCpus(), CpuModel(), LoadAverage(),
                static_cast<unsigned long long>(base.working_set_bytes >> 20), base.memory,
                tls.empty() ? "(UCX default)" : tls, base.compare_batch, base.concurrency,
                base.compare_seconds);
  absl::FPrintF(out, "%9s %6s %5s %-11s %9s %9s %9s %9s %8s %8s %8s %6s\n", "size", "layers",
                "op", "data_path", "kvferry", "raw_ucx", "perftest", "memcpy", "vs_raw", "vs_perf",
                "vs_memcpy", "drift");
  nlohmann::json rows = nlohmann::json::array();
  for (uint64_t size : base.compare_sizes) {
    BenchConfig c = base;
    c.compare = false;
    const uint32_t layers = LayersThatFit(size, base.working_set_bytes, c.compare_batch,
                                          c.concurrency, c.compare_layers);
    if (layers == 0) {
      Die(absl::StrCat("--compare: ", size, " B x 2 planes x ", c.compare_batch, " blocks x ",
                       c.concurrency, " in flight exceeds the working set"));
    }
    c.layout = LayoutFor(size, base.working_set_bytes, layers);
    if (absl::Status st = c.layout.Validate(); !st.ok()) Die("layout: " + st.ToString());
    c.scattered = true;
    c.per_layer = false;
    c.offers = false;
    c.verify = false;
    c.prompt = PromptDistribution{};
    c.prompt.a = c.prompt.max_tokens = 16u * static_cast<uint32_t>(c.compare_batch);
    c.duration_s = c.compare_seconds;
    c.sample_s = 1e9;
    c.progress_s = 0;
    c.churn_s = 0;
    if (uint64_t{c.MaxBlocksPerRequest()} * (c.concurrency + 1u) > c.layout.num_blocks) {
      Die(absl::StrCat("--compare: ", size, " B x ", c.compare_batch, " x ", c.concurrency,
                       " exceeds the working set"));
    }
    const RawResult raw = RawRun(c);
    // memcpy right before and right after each kvferry figure, their mean
    // the baseline: on a shared machine the load moves within seconds.
    double memcpy_before =
        ColdMemcpyGBps(c.layout.total_bytes(), size, true, c.compare_seconds);
    for (TransferOp op : {TransferOp::kWrite, TransferOp::kRead}) {
      c.op = op;
      const RunResult r = SpawnRun(c);
      const double memcpy_after =
          ColdMemcpyGBps(c.layout.total_bytes(), size, true, c.compare_seconds);
      const double memcpy_gbps = (memcpy_before + memcpy_after) / 2;
      const double memcpy_spread =
          memcpy_gbps > 0 ? std::abs(memcpy_before - memcpy_after) / memcpy_gbps : 0;
      memcpy_before = memcpy_after;
      const double kv = r.seconds > 0 ? static_cast<double>(r.bytes) / r.seconds / 1e9 : 0;
      const bool write = op == TransferOp::kWrite;
      const double raw_gbps = write ? raw.write_gbps : raw.read_gbps;
      const double perf = PerftestGBps(c.perftest, write ? "ucp_put_bw" : "ucp_get", size, tls);
      absl::FPrintF(out, "%9d %6d %5s %-11s %9.2f %9.2f %9.2f %9.2f %7.2fx %7.2fx %7.2fx %5.0f%%\n",
                    size, layers, c.OpName(), r.data_path, kv, raw_gbps, perf, memcpy_gbps,
                    Ratio(kv, raw_gbps), Ratio(kv, perf), Ratio(kv, memcpy_gbps),
                    memcpy_spread * 100);
      std::fflush(out);
      rows.push_back({{"size", size},
                      {"layers", layers},
                      {"planes", 2},
                      {"blocks_per_transfer", c.compare_batch},
                      {"in_flight", c.concurrency},
                      {"op", c.OpName()},
                      {"data_path", r.data_path},
                      {"kvferry_gb_per_s", kv},
                      {"raw_ucx_gb_per_s", raw_gbps},
                      {"perftest_gb_per_s", perf},
                      {"memcpy_gb_per_s", memcpy_gbps},
                      {"memcpy_drift", memcpy_spread},
                      {"vs_raw_ucx", Ratio(kv, raw_gbps)},
                      {"vs_perftest", Ratio(kv, perf)},
                      {"vs_memcpy", Ratio(kv, memcpy_gbps)},
                      {"ok", r.failures.empty()}});
    }
  }
  absl::FPrintF(out, "load average at the end %s\n", LoadAverage());
  if (base.json) {
    nlohmann::json j = {{"tool", "kvferry-bench --compare"},
                        {"machine", {{"nproc", NumCpus()}, {"cpu", CpuModel()},
                                     {"load_average", LoadAverage()}}},
                        {"tls", tls},
                        {"memory", base.memory},
                        {"working_set_bytes", base.working_set_bytes},
                        {"rows", rows}};
    std::printf("%s\n", j.dump(2).c_str());
  }
  return 0;
}

}  // namespace kvferry::bench
