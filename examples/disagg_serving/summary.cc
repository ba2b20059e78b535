// The router's final summary: as JSON (--json) and as text.
#include <signal.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "examples/disagg_serving/flags.h"
#include "examples/disagg_serving/router.h"

namespace kvferry::serving {
namespace {

Json Percentiles(std::vector<double> v) {
  if (v.empty()) return {{"p50", 0}, {"p99", 0}, {"mean", 0}};
  std::sort(v.begin(), v.end());
  auto at = [&](double p) {
    return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5))];
  };
  double sum = 0;
  for (double x : v) sum += x;
  return {{"p50", at(0.5)}, {"p99", at(0.99)}, {"mean", sum / static_cast<double>(v.size())}};
}

}  // namespace

Json Router::Summary() const {
  std::vector<double> ttft, q, p, t, d;
  for (const Request& r : requests_) {
    if (!r.done) continue;
    ttft.push_back(r.ttft), q.push_back(r.queue), p.push_back(r.prefill);
    t.push_back(r.transfer), d.push_back(r.decode_start);
  }
  const double secs =
      first_dispatch_us_ ? static_cast<double>(end_us_ - first_dispatch_us_) / 1e6 : 0;
  bool clean = true;
  Json procs = Json::array();
  for (const WorkerProc& w : workers_) {
    Json j = {{"name", w.name}, {"role", w.role}, {"pid", w.pid}, {"killed", w.killed},
              {"unresponsive", w.unresponsive}, {"dispatched", w.dispatched},
              {"exit", w.reaped && WIFEXITED(w.wait_status) ? WEXITSTATUS(w.wait_status) : -1},
              {"signal", w.reaped && WIFSIGNALED(w.wait_status) ? WTERMSIG(w.wait_status) : 0}};
    bool ok = true;
    if (!w.killed && !w.unresponsive) {  // those were killed: no report to check
      ok = !w.report.is_null() && j["exit"] == 0 && w.report["per_request_live"] == 0 &&
           w.report["pool"]["blocks_free"] == w.report["pool"]["blocks_total"];
      clean &= ok;
    }
    j["clean"] = ok;
    if (!w.report.is_null()) {
      for (const char* k : {"counters", "live", "per_request_live", "pool", "peers", "memory"}) {
        j[k] = w.report[k];
      }
    }
    procs.push_back(std::move(j));
  }
  const bool all_done = completed_ == static_cast<int>(requests_.size());
  // Every reset came back: its new incarnation connected and served again.
  bool resets_back = true;
  Json resets = Json::array();
  for (const Json& r : resets_) {
    Json j = r;
    j.erase("drain_start_us");
    j["back"] = r.contains("back_ms");
    resets_back &= j["back"].get<bool>();
    auto figure = [](const Json& m, const char* key) -> Json {
      return m.is_object() && m.contains(key) ? m[key] : Json(nullptr);
    };
    const Json& before = r.contains("before") ? r["before"] : Json();
    const Json& bm = before.is_object() ? before["memory"] : Json();
    const Json& after = r.contains("after") ? r["after"] : Json();
    j["memory_before"] = {
        {"rss_bytes",
         bm.is_object() && bm.contains("process") ? figure(bm["process"], "rss_bytes") : Json(nullptr)},
        {"unexplained_bytes", figure(bm, "unexplained_bytes")},
        {"leaked_bytes", figure(before, "leaked_bytes")}};
    j["memory_after"] = {{"rss_bytes", figure(after, "rss_bytes")},
                         {"unexplained_bytes", figure(after, "unexplained_bytes")}};
    if (before.is_object()) {
      j["before"] = {{"counters", before["counters"]},
                     {"per_request_live", before["per_request_live"]},
                     {"pool", before["pool"]},
                     {"incarnation", figure(before, "incarnation")},
                     {"pid", figure(before, "pid")}};
    }
    j["incarnation_after"] = figure(after, "incarnation");
    j.erase("after");
    resets.push_back(std::move(j));
  }
  // What a serving benchmark reports, over the completed requests.
  std::vector<double> e2e, tpot, itl, verify, kv_ms, kv_gbps;
  uint64_t prompt_tokens = 0, output_tokens = 0;
  for (const Request& r : requests_) {
    if (!r.done) continue;
    prompt_tokens += r.tokens.size();
    output_tokens += r.output_len;
    e2e.push_back(r.e2e);
    if (r.output_len > 1) tpot.push_back(r.tpot);
    itl.insert(itl.end(), r.itl.begin(), r.itl.end());
    verify.push_back(r.verify);
    if (r.kv_ms >= 0) {
      kv_ms.push_back(r.kv_ms);
      if (r.kv_ms > 0) kv_gbps.push_back(static_cast<double>(r.kv_bytes) / 1e6 / r.kv_ms);
    }
  }
  auto per_s = [&](double n) { return secs > 0 ? n / secs : 0.0; };
  Json bench = {
      {"duration_s", secs},
      {"completed", completed_},
      {"failed", failed_},
      {"prompt_tokens", prompt_tokens},
      {"output_tokens", output_tokens},
      {"request_throughput", per_s(completed_)},
      {"output_token_throughput", per_s(static_cast<double>(output_tokens))},
      {"total_token_throughput", per_s(static_cast<double>(prompt_tokens + output_tokens))},
      {"ttft_ms", Percentiles(ttft)},
      {"tpot_ms", Percentiles(tpot)},
      {"itl_ms", Percentiles(itl)},
      {"e2e_ms", Percentiles(e2e)},
      {"kv_transfer_ms", Percentiles(kv_ms)},
      {"kv_transfer_gb_per_s", Percentiles(kv_gbps)},
      {"verify_ms", Percentiles(verify)}};
  Json failures = Json::array();
  for (const Request& r : requests_) {
    if (r.failed) failures.push_back({{"request", r.id}, {"attempts", r.attempts}, {"reason", r.failure}});
  }
  Json s = {
      {"ok", error_.empty() && all_done && failed_ == 0 && correct_ == completed_ && clean &&
                 resets_back},
      {"error", error_},
      {"config",
       {{"prefill", absl::GetFlag(FLAGS_prefill)},
        {"decode", absl::GetFlag(FLAGS_decode)},
        {"load", absl::GetFlag(FLAGS_prompt_file).empty() ? "generated" : "prompt_file"},
        {"rate", absl::GetFlag(FLAGS_rate)},
        {"layout", layout_.ToString()},
        {"block_bytes", layout_.block_bytes()},
        {"mode", absl::GetFlag(FLAGS_push) ? "push" : "pull"},
        {"pipeline", absl::GetFlag(FLAGS_pipeline)},
        {"pool_memory", absl::GetFlag(FLAGS_pool_memory)},
        {"discovery", absl::GetFlag(FLAGS_etcd).empty() ? "embedded" : "etcd"}}},
      {"requests", requests_.size()},
      {"completed", completed_},
      {"correct", correct_},
      {"wrong", completed_ - correct_},
      {"failed_over", failed_over_},
      {"failed", failed_},
      {"failures", std::move(failures)},
      {"retries", retries_},
      {"interrupted_by", signal_ == 0 ? "" : signal_ == SIGINT ? "SIGINT" : "SIGTERM"},
      {"kills", kills_},
      {"prefill_outcomes", prefill_outcomes_},
      {"seconds", secs},
      {"bytes_moved", bytes_moved_},
      // Bytes moved over the run's length: set by the arrivals, not the path.
      {"gb_per_s", secs > 0 ? static_cast<double>(bytes_moved_) / 1e9 / secs : 0},
      {"bench", std::move(bench)},
      {"ttft_ms", Percentiles(ttft)},
      {"queue_ms", Percentiles(q)},
      {"prefill_ms", Percentiles(p)},
      {"transfer_ms", Percentiles(t)},
      {"decode_start_ms", Percentiles(d)},
      {"all_clean", clean},
      {"alarms", alarms_},
      {"directory_events", directory_events_},
      {"resets", resets},
      {"processes", procs}};
  return s;
}

void Router::PrintSummary(const Json& s) const {
  const Json& c = s["config"];
  std::printf("\nkvferry_serve: %dP%dD, %s, %s load, %s\n", c["prefill"].get<int>(),
              c["decode"].get<int>(),
              absl::StrCat(c["mode"].get<std::string>(),
                           c["pipeline"].get<bool>() ? ", pipelined per layer" : ", whole cache",
                           ", ", c["discovery"].get<std::string>(), " discovery, ",
                           c["pool_memory"] == "engine" ? "engine-owned" : "UCX-allocated",
                           " KV cache")
                  .c_str(),
              c["load"].get<std::string>().c_str(), c["layout"].get<std::string>().c_str());
  std::printf(
      "requests   %d of %zu completed, %d outputs correct, %d wrong, %d failed, %d failed over, "
      "%d retried\n",
      s["completed"].get<int>(), s["requests"].get<size_t>(), s["correct"].get<int>(),
      s["wrong"].get<int>(), s["failed"].get<int>(), s["failed_over"].get<int>(),
      s["retries"].get<int>());
  for (const Json& f : s["failures"]) {
    std::printf("failed     request %lld: %s\n", static_cast<long long>(f["request"].get<int64_t>()),
                f["reason"].get<std::string>().c_str());
  }
  std::string spread;
  for (const Json& p : s["processes"]) {
    absl::StrAppend(&spread, spread.empty() ? "" : ", ", p["name"].get<std::string>(), " ",
                    p["dispatched"].get<int>());
  }
  std::printf("scheduled  %s\n", spread.c_str());
  for (const Json& k : s["kills"]) std::printf("killed     %s\n", k.get<std::string>().c_str());
  std::string outcomes;
  for (const auto& [k, v] : s["prefill_outcomes"].items()) {
    absl::StrAppend(&outcomes, outcomes.empty() ? "" : ", ", k, " ", v.get<int64_t>());
  }
  std::printf("offers     %s\n", outcomes.c_str());
  const Json& bn = s["bench"];
  std::printf("throughput %.2f requests/s, %.1f output tokens/s, %.1f tokens/s in all, over %.2f s\n",
              bn["request_throughput"].get<double>(), bn["output_token_throughput"].get<double>(),
              bn["total_token_throughput"].get<double>(), bn["duration_s"].get<double>());
  std::printf("tokens     %llu prompt, %llu generated\n",
              static_cast<unsigned long long>(bn["prompt_tokens"].get<uint64_t>()),
              static_cast<unsigned long long>(bn["output_tokens"].get<uint64_t>()));
  auto line = [&](const char* label, const Json& p, const char* unit, const char* note) {
    std::printf("%-10s mean %8.2f  p50 %8.2f  p99 %8.2f %s%s\n", label, p["mean"].get<double>(),
                p["p50"].get<double>(), p["p99"].get<double>(), unit, note);
  };
  line("TTFT", bn["ttft_ms"], "ms", "  (arrival to first token; verification left out)");
  line("TPOT", bn["tpot_ms"], "ms", "  (per output token after the first)");
  line("ITL", bn["itl_ms"], "ms", "  (between consecutive tokens)");
  line("E2E", bn["e2e_ms"], "ms", "  (arrival to last token)");
  line("KV move", bn["kv_transfer_ms"], "ms", "  (per request: its READs/WRITEs in flight)");
  line("KV GB/s", bn["kv_transfer_gb_per_s"], "GB/s", "  (per request: bytes over that time)");
  line("verify", bn["verify_ms"], "ms", "  (decode checking every received byte)");
  std::printf("moved      %.3f GB of KV cache in all (%.3f GB/s over the run: the arrival rate, "
              "not the path's speed)\n",
              s["bytes_moved"].get<double>() / 1e9, s["gb_per_s"].get<double>());
  std::printf("TTFT split  p50 (p99) ms:");
  for (const char* k : {"queue_ms", "prefill_ms", "transfer_ms", "decode_start_ms"}) {
    std::printf(" %s %.2f (%.2f)", std::string(k).substr(0, std::string(k).size() - 3).c_str(),
                s[k]["p50"].get<double>(), s[k]["p99"].get<double>());
  }
  std::printf("\n");
  for (const Json& a : s["alarms"]) {
    std::string where;
    for (const Json& o : a["origins"]) {
      const double grown = o["grown_bytes"].get<double>();
      absl::StrAppend(&where, where.empty() ? ", grew in " : ", ", o["origin"].get<std::string>(),
                      std::abs(grown) < 1048576 ? absl::StrFormat(" %+.0f KiB", grown / 1024)
                                                : absl::StrFormat(" %+.1f MiB", grown / 1048576));
    }
    std::printf("alarm      %s: %s (%s)%s: rss %.1f MiB/min, unexplained %.1f MiB/min%s\n",
                a["name"].get<std::string>().c_str(), a["kind"].get<std::string>().c_str(),
                a["reason"].get<std::string>().c_str(), a["repeat"].get<bool>() ? " again" : "",
                a["rss_mib_per_min"].get<double>(), a["unexplained_mib_per_min"].get<double>(),
                where.c_str());
  }
  for (const Json& r : s["resets"]) {
    auto mib = [](const Json& v) { return v.is_number() ? v.get<double>() / 1048576.0 : -1.0; };
    const Json& b = r["memory_before"];
    const Json& a = r["memory_after"];
    std::printf(
        "reset      %s after %d completed: drained %s requests, pid %s -> %s, back after %s ms; "
        "rss %.1f -> %.1f MiB, unexplained %.1f -> %.1f MiB%s\n",
        r["name"].get<std::string>().c_str(), r["completed_at_alarm"].get<int>(),
        r["in_flight_at_alarm"].dump().c_str(), r["pid_before"].dump().c_str(),
        r.contains("pid_after") ? r["pid_after"].dump().c_str() : "?",
        r.contains("back_ms") ? absl::StrFormat("%.0f", r["back_ms"].get<double>()).c_str() : "(never)",
        mib(b["rss_bytes"]), mib(a["rss_bytes"]), mib(b["unexplained_bytes"]),
        mib(a["unexplained_bytes"]), r["back"].get<bool>() ? "" : "  NOT BACK");
  }
  std::printf("\n%-9s %-8s %-8s %-6s %-10s %-22s %8s %8s %8s  %s\n", "process", "role", "exit",
              "live", "pool free", "counters", "rss MiB", "reg MiB", "unexpl", "data path");
  for (const Json& p : s["processes"]) {
    std::string exit = p["signal"].get<int>() == 9 ? "SIGKILL"
                       : p["signal"].get<int>() ? absl::StrCat("signal ", p["signal"].get<int>())
                                                : absl::StrCat(p["exit"].get<int>());
    if (!p.contains("live")) {
      std::printf("%-9s %-8s %-8s %s\n", p["name"].get<std::string>().c_str(),
                  p["role"].get<std::string>().c_str(), exit.c_str(),
                  p["killed"].get<bool>()         ? "(killed on purpose: no report)"
                  : p["unresponsive"].get<bool>() ? "(unresponsive, killed: no report)"
                                                  : "(no report)");
      continue;
    }
    std::string counters;
    for (const auto& [k, v] : p["counters"].items()) {
      if (k == "bytes_received") continue;
      absl::StrAppend(&counters, counters.empty() ? "" : " ", k, "=", v.dump());
    }
    std::string path;
    for (const Json& peer : p["peers"]) {
      if (path.find(peer["data_path"].get<std::string>()) == std::string::npos) {
        absl::StrAppend(&path, path.empty() ? "" : ",", peer["data_path"].get<std::string>());
      }
    }
    const Json& m = p["memory"];
    auto mib = [&](const Json& v) { return v.is_number() ? v.get<double>() / 1048576.0 : 0.0; };
    const Json& proc = m.is_object() && m.contains("process") ? m["process"] : Json();
    std::printf("%-9s %-8s %-8s %-6lld %-10s %-22s %8.1f %8.1f %8.1f  %s\n",
                p["name"].get<std::string>().c_str(), p["role"].get<std::string>().c_str(),
                exit.c_str(), static_cast<long long>(p["per_request_live"].get<int64_t>()),
                absl::StrCat(p["pool"]["blocks_free"].get<int64_t>(), "/",
                             p["pool"]["blocks_total"].get<int64_t>())
                    .c_str(),
                counters.c_str(), proc.is_object() ? mib(proc["rss_bytes"]) : 0.0,
                m.is_object() ? mib(m["registered_bytes"]) : 0.0,
                m.is_object() ? mib(m["unexplained_bytes"]) : 0.0, path.c_str());
  }
  std::printf("\nleaks      %s\n",
              s["all_clean"].get<bool>()
                  ? "none: every surviving worker returned all its blocks, held no per-request "
                    "handle (block sets, transfers, offers, requests) and exited 0 after its "
                    "agent found no survivors"
                  : "FOUND: see the processes above");
  if (!s["error"].get<std::string>().empty()) {
    std::printf("error      %s\n", s["error"].get<std::string>().c_str());
  }
  std::printf("result     %s\n", s["ok"].get<bool>() ? "OK" : "FAILED");
}

}  // namespace kvferry::serving
