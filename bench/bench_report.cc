// kvferry-bench's output: the JSON document and the human table.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_format.h"
#include "bench/bench_roles.h"
#include "bench/bench_util.h"

namespace kvferry::bench {
namespace {

constexpr ResourceKind kTransient[] = {ResourceKind::kTransfer, ResourceKind::kTransferHandle,
                                       ResourceKind::kBlockSet, ResourceKind::kRequest,
                                       ResourceKind::kOffer};

}  // namespace

void LatencyHistogram::Add(double us) {
  const int b = us <= 1 ? 0 : static_cast<int>(std::log(us) / std::log(1.01)) + 1;
  ++buckets_[static_cast<size_t>(std::min(b, kBuckets - 1))];
  ++count_;
  max_ = std::max(max_, us);
}

double LatencyHistogram::Percentile(double p) const {
  if (count_ == 0) return 0;
  const auto want = static_cast<uint64_t>(std::ceil(p / 100.0 * static_cast<double>(count_)));
  uint64_t seen = 0;
  for (int b = 0; b < kBuckets; ++b) {
    seen += buckets_[static_cast<size_t>(b)];
    if (seen >= std::max<uint64_t>(want, 1)) return std::min(max_, std::pow(1.01, b));
  }
  return max_;
}

bool TransientCountersZero(const Stats& stats) {
  for (ResourceKind k : kTransient) {
    if (stats.Live(k) != 0) return false;
  }
  return true;
}

nlohmann::json StatsJson(const Stats& stats) {
  nlohmann::json j = nlohmann::json::object();
  for (int k = 0; k < kNumResourceKinds; ++k) {
    j[std::string(ResourceKindName(static_cast<ResourceKind>(k)))] = stats.live[k];
  }
  j["registered_bytes"] = stats.registered_bytes;
  return j;
}

nlohmann::json ResultJson(const BenchConfig& c, const RunResult& r) {
  const double gb = static_cast<double>(r.bytes) / 1e9;
  const double secs = std::max(r.seconds, 1e-9);
  const KvLayout& l = c.layout;
  const double first_gbps = r.first_pass_seconds > 0
                                ? static_cast<double>(r.first_pass_bytes) / r.first_pass_seconds / 1e9
                                : 0.0;
  nlohmann::json j = {
      {"tool", "kvferry-bench"},
      {"machine", {{"nproc", NumCpus()}, {"cpu", CpuModel()}, {"load_average", LoadAverage()}}},
      {"config",
       {{"preset", c.preset},
        {"layers", l.num_layers},
        {"kv_heads", l.num_kv_heads},
        {"head_dim", l.head_dim},
        {"element_bytes", l.element_bytes},
        {"tokens_per_block", l.tokens_per_block},
        {"planes", l.num_planes()},
        {"chunk_bytes", l.chunk_bytes()},
        {"block_bytes", l.block_bytes()},
        {"blocks_per_pool", l.num_blocks},
        {"working_set_bytes", l.total_bytes()},
        {"memory", c.memory},
        {"op", c.OpName()},
        {"offers", c.offers},
        {"per_layer", c.per_layer},
        {"scattered", c.scattered},
        {"concurrency", c.concurrency},
        {"requests", c.requests},
        {"duration_s", c.duration_s},
        {"churn_s", c.churn_s},
        {"verify", c.verify},
        {"tls", c.tls}}},
      {"data_path", r.data_path},
      {"requests", r.requests},
      {"bytes", r.bytes},
      {"seconds", r.seconds},
      {"gb_per_s", gb / secs},
      {"descriptors", r.descriptors},
      {"descriptors_per_s", static_cast<double>(r.descriptors) / secs},
      {"latency_us",
       {{"p50", r.latency_us.Percentile(50)},
        {"p90", r.latency_us.Percentile(90)},
        {"p99", r.latency_us.Percentile(99)},
        {"max", r.latency_us.max()},
        {"resolution", "1% buckets"}}},
      {"first_pass",
       {{"bytes", r.first_pass_bytes},
        {"seconds", r.first_pass_seconds},
        {"gb_per_s", first_gbps},
        {"vs_steady", gb > 0 && first_gbps > 0 ? first_gbps / (gb / secs) : 0.0}}},
      {"pool_create",
       {{"seconds", r.pool_seconds},
        {"ms_per_gib", r.pool_seconds * 1e3 / std::max(1e-9, static_cast<double>(l.total_bytes()) /
                                                                   (uint64_t{1} << 30))},
        {"populate", c.populate}}},
      {"cpu_seconds_per_gb", gb > 0 ? r.cpu_seconds / gb : 0.0},
      {"post",
       {{"calls", r.post_calls},
        {"us_per_call", r.post_calls ? r.post_seconds * 1e6 / static_cast<double>(r.post_calls) : 0.0},
        {"ns_per_descriptor",
         r.descriptors ? r.post_seconds * 1e9 / static_cast<double>(r.descriptors) : 0.0}}},
      {"rss",
       {{"start_bytes", r.rss_start},
        {"end_bytes", r.rss_end},
        {"slope_mb_per_min", Slope(r.rss_t_min, r.rss_mb)},
        {"samples", r.rss_mb.size()}}},
      {"verified_bytes", r.verified_bytes + r.passive.value("verified_bytes", uint64_t{0})},
      {"verify_errors", r.verify_errors + r.passive.value("verify_errors", uint64_t{0})},
      {"live_end", StatsJson(r.live_end)},
      {"transient_counters_zero", TransientCountersZero(r.live_end)},
      {"sessions", r.sessions},
      {"peer", r.passive},
      {"soak_samples", r.samples},
      {"failures", r.failures},
      {"ok", r.failures.empty()},
  };
  return j;
}

void PrintTable(const BenchConfig& c, const RunResult& r, std::FILE* out) {
  const nlohmann::json j = ResultJson(c, r);
  const KvLayout& l = c.layout;
  absl::FPrintF(out,
                "kvferry-bench: %s (%u layers x %u planes, chunk %llu B, block %llu B), %s, %s%s%s, "
                "memory=%s, data path %s, working set %.2f GiB per process\n",
                c.preset, l.num_layers, l.num_planes(),
                static_cast<unsigned long long>(l.chunk_bytes()),
                static_cast<unsigned long long>(l.block_bytes()), c.OpName(),
                c.per_layer ? "per-layer posts" : "one post per request",
                c.offers ? ", offers" : "", c.verify ? ", verify" : "", c.memory, r.data_path,
                static_cast<double>(l.total_bytes()) / (1 << 30));
  absl::FPrintF(out, "  machine: %d CPUs, %s, load average %s\n", NumCpus(), CpuModel(),
                LoadAverage());
  absl::FPrintF(out, "  %-26s %s\n", "requests", j["requests"].dump());
  absl::FPrintF(out, "  %-26s %.3f GB in %.3f s\n", "moved", static_cast<double>(r.bytes) / 1e9,
                r.seconds);
  absl::FPrintF(out, "  %-26s %.3f\n", "GB/s", j["gb_per_s"].get<double>());
  absl::FPrintF(out, "  %-26s %.0f\n", "descriptors/s", j["descriptors_per_s"].get<double>());
  if (r.first_pass_bytes > 0) {
    absl::FPrintF(out, "  %-26s %.3f GB/s (%.2fx steady state)\n", "first pass (warm-up)",
                  j["first_pass"]["gb_per_s"].get<double>(),
                  j["first_pass"]["vs_steady"].get<double>());
  }
  if (r.pool_seconds > 0) {
    absl::FPrintF(out, "  %-26s %.0f ms (%.0f ms per GiB, populate %s)\n", "CreatePool (poster)",
                  r.pool_seconds * 1e3, j["pool_create"]["ms_per_gib"].get<double>(),
                  c.populate ? "on" : "off");
  }
  const auto& lat = j["latency_us"];
  absl::FPrintF(out, "  %-26s p50 %.0f  p90 %.0f  p99 %.0f  max %.0f\n", "request latency (us)",
                lat["p50"].get<double>(), lat["p90"].get<double>(), lat["p99"].get<double>(),
                lat["max"].get<double>());
  absl::FPrintF(out, "  %-26s %.3f\n", "CPU s per GB (poster)", j["cpu_seconds_per_gb"].get<double>());
  absl::FPrintF(out, "  %-26s %.2f us per call, %.1f ns per descriptor (%llu calls)\n",
                "PostTransfer", j["post"]["us_per_call"].get<double>(),
                j["post"]["ns_per_descriptor"].get<double>(),
                static_cast<unsigned long long>(r.post_calls));
  absl::FPrintF(out, "  %-26s start %.1f MB, end %.1f MB, slope %.3f MB/min\n", "RSS (poster)",
                static_cast<double>(r.rss_start) / 1e6, static_cast<double>(r.rss_end) / 1e6,
                j["rss"]["slope_mb_per_min"].get<double>());
  absl::FPrintF(out, "  %-26s %s\n", "verified bytes", j["verified_bytes"].dump());
  absl::FPrintF(out, "  %-26s %s\n", "live at end (poster)", r.live_end.ToString());
  absl::FPrintF(out, "  %-26s %s\n", "result", r.failures.empty() ? "ok" : "FAILED");
  for (const std::string& f : r.failures) absl::FPrintF(out, "    %s\n", f);
}

}  // namespace kvferry::bench
