// kvferry-bench --compare (see bench_compare.h).
#include "bench/bench_compare.h"

#include <sys/wait.h>

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

// One layer, one plane, one chunk of `size` bytes per block: every
// descriptor is one operation of that size.
KvLayout LayoutFor(uint64_t size, uint64_t working_set) {
  const uint64_t heads = size > (uint64_t{1} << 21) ? size >> 21 : 1;
  return KvLayout{.num_layers = 1, .num_blocks = static_cast<uint32_t>(working_set / size),
                  .tokens_per_block = 16, .num_kv_heads = static_cast<uint32_t>(heads),
                  .head_dim = static_cast<uint32_t>(size / 32 / heads), .element_bytes = 2,
                  .separate_kv = false};
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
  RawResult r = RunRawInitiator(c, static_cast<uint16_t>(port), c.compare_batch, c.concurrency,
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
                "  working set %llu MiB per process, memory=%s, UCX_TLS=%s, %d ops per "
                "transfer/flush, %d in flight, %.1f s per figure, remote chunks mirrored\n",
                NumCpus(), CpuModel(), LoadAverage(),
                static_cast<unsigned long long>(base.working_set_bytes >> 20), base.memory,
                tls.empty() ? "(UCX default)" : tls, base.compare_batch, base.concurrency,
                base.compare_seconds);
  absl::FPrintF(out, "%9s %5s %-11s %9s %9s %9s %9s %8s %8s %8s\n", "size", "op", "data_path",
                "kvferry", "raw_ucx", "perftest", "memcpy", "vs_raw", "vs_perf", "vs_memcpy");
  nlohmann::json rows = nlohmann::json::array();
  for (uint64_t size : base.compare_sizes) {
    BenchConfig c = base;
    c.compare = false;
    c.layout = LayoutFor(size, base.working_set_bytes);
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
    const double memcpy_gbps = ColdMemcpyGBps(c.layout.total_bytes(), size, true, c.compare_seconds);
    for (TransferOp op : {TransferOp::kWrite, TransferOp::kRead}) {
      c.op = op;
      const RunResult r = SpawnRun(c);
      const double kv = r.seconds > 0 ? static_cast<double>(r.bytes) / r.seconds / 1e9 : 0;
      const bool write = op == TransferOp::kWrite;
      const double raw_gbps = write ? raw.write_gbps : raw.read_gbps;
      const double perf = PerftestGBps(c.perftest, write ? "ucp_put_bw" : "ucp_get", size, tls);
      absl::FPrintF(out, "%9d %5s %-11s %9.2f %9.2f %9.2f %9.2f %7.2fx %7.2fx %7.2fx\n", size,
                    c.OpName(), r.data_path, kv, raw_gbps, perf, memcpy_gbps, Ratio(kv, raw_gbps),
                    Ratio(kv, perf), Ratio(kv, memcpy_gbps));
      std::fflush(out);
      rows.push_back({{"size", size},
                      {"op", c.OpName()},
                      {"data_path", r.data_path},
                      {"kvferry_gb_per_s", kv},
                      {"raw_ucx_gb_per_s", raw_gbps},
                      {"perftest_gb_per_s", perf},
                      {"memcpy_gb_per_s", memcpy_gbps},
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
