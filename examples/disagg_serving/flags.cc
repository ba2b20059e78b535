#include "examples/disagg_serving/flags.h"

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"

ABSL_FLAG(int32_t, prefill, 1, "prefill workers (1..16)");
ABSL_FLAG(int32_t, decode, 1, "decode workers (1..16)");
ABSL_FLAG(int32_t, requests, 32, "requests to generate (ignored with --prompt_file)");
ABSL_FLAG(double, rate, 20, "request arrivals per second (Poisson); 0 sends all at once");
ABSL_FLAG(int32_t, prompt_min, 64, "shortest generated prompt, in tokens");
ABSL_FLAG(int32_t, prompt_max, 512, "longest generated prompt, in tokens (uniform in between)");
ABSL_FLAG(int32_t, output_min, 8, "fewest output tokens per request");
ABSL_FLAG(int32_t, output_max, 32, "most output tokens per request (uniform in between)");
ABSL_FLAG(std::string, prompt_file, "",
          "file of prompts, one per line: token ids separated by spaces or commas, "
          "optionally in [ ]; empty lines and lines starting with # are skipped. "
          "Default empty: generated load");
ABSL_FLAG(int32_t, vocab, 32000, "vocabulary size: token ids are below it");
ABSL_FLAG(uint64_t, seed, 1, "seed of the generated load");
ABSL_FLAG(int32_t, layers, 8, "model shape: transformer layers");
ABSL_FLAG(int32_t, kv_heads, 4, "model shape: KV heads");
ABSL_FLAG(int32_t, head_dim, 64, "model shape: head dimension");
ABSL_FLAG(int32_t, element_bytes, 2, "model shape: bytes per element (1, 2, 4 or 8)");
ABSL_FLAG(int32_t, tokens_per_block, 16, "KV cache block size, in tokens");
ABSL_FLAG(int32_t, blocks, 512, "KV cache blocks per worker");
ABSL_FLAG(std::string, pool_memory, "engine",
          "who allocates each worker's KV cache: engine (the worker mmaps one region per layer "
          "and K/V and registers them, Agent::RegisterPool; on one host kvferry's kernel copy "
          "moves it) or ucx (kvferry's CreatePool: UCX shared memory, shm-direct on one host)");
ABSL_FLAG(bool, pipeline, true,
          "decode pulls layer L as soon as prefill computed it (--nopipeline: after the last layer)");
ABSL_FLAG(bool, push, false,
          "prefill WRITEs into blocks decode offered, instead of decode READing prefill's offer");
ABSL_FLAG(double, prefill_ms_per_layer, 0.5,
          "simulated compute time of one prefill layer per 512 prompt tokens, on top of "
          "writing the KV cache");
ABSL_FLAG(int32_t, kill_decode_after, 0,
          "SIGKILL one decode worker once this many requests completed (0: never); "
          "needs --decode >= 2");
ABSL_FLAG(int32_t, kill_prefill_after, 0,
          "SIGKILL one prefill worker once this many requests completed (0: never); "
          "needs --prefill >= 2");
ABSL_FLAG(std::string, etcd, "",
          "etcd endpoints (comma-separated, e.g. http://127.0.0.1:2379): workers publish "
          "themselves in kvferry's directory and find each other by name. Default empty: the "
          "router hands out addresses");
ABSL_FLAG(std::string, cluster, "",
          "directory namespace with --etcd (default: kvferry-serve-<router pid>)");
ABSL_FLAG(std::string, tls, "posix,sysv,tcp", "UCX transports (UCX_TLS) for every worker");
ABSL_FLAG(double, offer_ttl_s, 60, "lifetime of an offer before it expires, seconds");
ABSL_FLAG(double, timeout_s, 300, "give up (and fail) after this many seconds");
ABSL_FLAG(int32_t, heartbeat_ms, 200,
          "each worker tells the router it is alive this often, in milliseconds (default 200)");
ABSL_FLAG(double, worker_timeout_s, 10,
          "a worker the router has not heard from (no heartbeat, no message) for this many "
          "seconds is killed (SIGKILL) and its requests go to the others; a worker silent for "
          "a few heartbeats gets no new requests meanwhile (default 10)");
ABSL_FLAG(int32_t, max_retries, 3,
          "a request whose attempt fails on a live worker (an offer expired, a transfer failed) "
          "is retried at most this many times, after 1, 2, 4... times --retry_backoff_ms; then it "
          "fails with the last attempt's reason (default 3). A worker's death does not count");
ABSL_FLAG(int32_t, retry_backoff_ms, 100,
          "the first retry's delay in milliseconds; each further retry doubles it (default 100)");
ABSL_FLAG(bool, json, false, "print the final summary as JSON (one line on stdout)");
ABSL_FLAG(bool, progress, true, "print live progress on stderr");
ABSL_FLAG(bool, metrics, true,
          "each worker serves GET /metrics (Prometheus text) on 127.0.0.1 at a port the "
          "kernel picks");
ABSL_FLAG(std::string, prometheus_sd_file, "",
          "once the workers are ready, write their /metrics targets to this file "
          "(Prometheus file-based service discovery, JSON); empty: none");
ABSL_FLAG(bool, watchdog, true,
          "each prefill and decode worker runs a kvferry Watchdog on its agent (alarms on its "
          "/metrics and in the summary); --nowatchdog: none");
ABSL_FLAG(double, watchdog_period_s, 10, "seconds between the watchdog's memory samples");
ABSL_FLAG(double, watchdog_window_s, 300,
          "seconds of samples the watchdog fits its growth slopes over (at least two periods)");
ABSL_FLAG(double, watchdog_max_rss_mib_per_min, 10,
          "the watchdog alarms when RSS grows faster than this (MiB per minute); an RSS alarm "
          "is reported, not acted on (a KV cache warming up grows RSS too)");
ABSL_FLAG(double, watchdog_max_unexplained_mib_per_min, 10,
          "the watchdog alarms when unexplained memory (anonymous memory below malloc that no "
          "pool accounts for) grows faster than this (MiB per minute)");
ABSL_FLAG(double, watchdog_max_unexplained_share, 0.5,
          "the watchdog alarms when unexplained memory exceeds this share of RSS, once it is "
          "over --watchdog_min_unexplained_mib");
ABSL_FLAG(int32_t, watchdog_min_unexplained_mib, 64,
          "unexplained memory below this many MiB never trips the share alarm");
namespace {
// A sanitizer's allocator replaces malloc: its heap (and ASan's quarantine)
// reads as unexplained memory, so unexplained-memory alarms there say
// nothing about a leak and resetting on them is off unless asked for.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kResetByDefault = false;
#else
constexpr bool kResetByDefault = true;
#endif
}  // namespace

ABSL_FLAG(bool, watchdog_reset, kResetByDefault,
          "on an unexplained-memory alarm the worker drains (the router sends it no new "
          "requests; it finishes the ones it has), reports its memory, exits, and the router "
          "starts it again under the same name (a new agent incarnation; its peers reconnect); "
          "default true, false in ASan/TSan builds (their allocator's heap reads as "
          "unexplained memory)");
ABSL_FLAG(double, inject_leak_mib_per_s, 0,
          "testing the reset: the first incarnation of decode worker 0 maps and touches this "
          "many MiB of anonymous memory per second outside malloc, as the incident's leak did "
          "(0: no leak)");
ABSL_FLAG(int32_t, inject_leak_max_mib, 1024, "the injected leak stops at this many MiB");
ABSL_FLAG(std::string, role, "router", "internal: router, prefill or decode");
ABSL_FLAG(std::string, name, "", "internal: a worker's agent name");
ABSL_FLAG(int32_t, control_fd, -1, "internal: a worker's channel to the router");

namespace kvferry::serving {
namespace {
absl::Status Range(const char* flag, int64_t value, int64_t lo, int64_t hi) {
  if (value >= lo && value <= hi) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("--", flag, "=", value, " is out of range [", lo, ", ", hi, "]"));
}
}  // namespace

absl::Status ValidateFlags() {
  const std::string role = absl::GetFlag(FLAGS_role);
  if (role != "router" && role != "prefill" && role != "decode") {
    return absl::InvalidArgumentError(
        absl::StrCat("--role=", role, " is not one of router, prefill, decode"));
  }
  for (absl::Status s : {
           Range("prefill", absl::GetFlag(FLAGS_prefill), 1, 16),
           Range("decode", absl::GetFlag(FLAGS_decode), 1, 16),
           Range("requests", absl::GetFlag(FLAGS_requests), 1, 1000000),
           Range("prompt_min", absl::GetFlag(FLAGS_prompt_min), 1, 1 << 20),
           Range("prompt_max", absl::GetFlag(FLAGS_prompt_max), absl::GetFlag(FLAGS_prompt_min),
                 1 << 20),
           Range("output_min", absl::GetFlag(FLAGS_output_min), 1, 1 << 20),
           Range("output_max", absl::GetFlag(FLAGS_output_max), absl::GetFlag(FLAGS_output_min),
                 1 << 20),
           Range("vocab", absl::GetFlag(FLAGS_vocab), 2, int64_t{1} << 31),
           Range("layers", absl::GetFlag(FLAGS_layers), 1, 1024),
           Range("kv_heads", absl::GetFlag(FLAGS_kv_heads), 1, 4096),
           Range("head_dim", absl::GetFlag(FLAGS_head_dim), 1, 65536),
           Range("tokens_per_block", absl::GetFlag(FLAGS_tokens_per_block), 1, 65536),
           Range("blocks", absl::GetFlag(FLAGS_blocks), 1, 1 << 24),
           Range("kill_decode_after", absl::GetFlag(FLAGS_kill_decode_after), 0, 1 << 30),
           Range("kill_prefill_after", absl::GetFlag(FLAGS_kill_prefill_after), 0, 1 << 30),
           Range("heartbeat_ms", absl::GetFlag(FLAGS_heartbeat_ms), 1, 60000),
           Range("max_retries", absl::GetFlag(FLAGS_max_retries), 0, 1000),
           Range("retry_backoff_ms", absl::GetFlag(FLAGS_retry_backoff_ms), 0, 600000),
           Range("inject_leak_max_mib", absl::GetFlag(FLAGS_inject_leak_max_mib), 1, 1 << 20),
           Range("watchdog_min_unexplained_mib", absl::GetFlag(FLAGS_watchdog_min_unexplained_mib), 0,
                 1 << 30),
       }) {
    if (!s.ok()) return s;
  }
  const std::string memory = absl::GetFlag(FLAGS_pool_memory);
  if (memory != "engine" && memory != "ucx") {
    return absl::InvalidArgumentError(
        absl::StrCat("--pool_memory=", memory, " is not engine or ucx"));
  }
  const int eb = absl::GetFlag(FLAGS_element_bytes);
  if (eb != 1 && eb != 2 && eb != 4 && eb != 8) {
    return absl::InvalidArgumentError(absl::StrCat("--element_bytes=", eb, " is not 1, 2, 4 or 8"));
  }
  if ((int64_t{absl::GetFlag(FLAGS_head_dim)} * eb) % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--head_dim=", absl::GetFlag(FLAGS_head_dim), " times --element_bytes=", eb,
        " must be a multiple of 8 bytes"));
  }
  if (!(absl::GetFlag(FLAGS_rate) >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat("--rate=", absl::GetFlag(FLAGS_rate), " is negative"));
  }
  if (!(absl::GetFlag(FLAGS_prefill_ms_per_layer) >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--prefill_ms_per_layer=", absl::GetFlag(FLAGS_prefill_ms_per_layer), " is negative"));
  }
  if (!(absl::GetFlag(FLAGS_offer_ttl_s) > 0 && absl::GetFlag(FLAGS_offer_ttl_s) <= 86400)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--offer_ttl_s=", absl::GetFlag(FLAGS_offer_ttl_s), " is not in (0, 86400]"));
  }
  if (!(absl::GetFlag(FLAGS_timeout_s) > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--timeout_s=", absl::GetFlag(FLAGS_timeout_s), " is not positive"));
  }
  if (!(absl::GetFlag(FLAGS_worker_timeout_s) * 1000 >= 2 * absl::GetFlag(FLAGS_heartbeat_ms) &&
        absl::GetFlag(FLAGS_worker_timeout_s) <= 86400)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--worker_timeout_s=", absl::GetFlag(FLAGS_worker_timeout_s),
        " must span at least two heartbeats (--heartbeat_ms=", absl::GetFlag(FLAGS_heartbeat_ms),
        ") and at most a day"));
  }
  const double period = absl::GetFlag(FLAGS_watchdog_period_s);
  if (!(period > 0 && period <= 86400)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--watchdog_period_s=", period, " is not in (0, 86400]"));
  }
  if (!(absl::GetFlag(FLAGS_watchdog_window_s) >= 2 * period &&
        absl::GetFlag(FLAGS_watchdog_window_s) <= 7 * 86400)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--watchdog_window_s=", absl::GetFlag(FLAGS_watchdog_window_s),
        " must span at least two periods (--watchdog_period_s=", period, ") and at most 7 days"));
  }
  for (auto [flag, value] : {
           std::pair{"watchdog_max_rss_mib_per_min", absl::GetFlag(FLAGS_watchdog_max_rss_mib_per_min)},
           std::pair{"watchdog_max_unexplained_mib_per_min",
                     absl::GetFlag(FLAGS_watchdog_max_unexplained_mib_per_min)}}) {
    if (!(value > 0)) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", value, " is not positive"));
    }
  }
  if (!(absl::GetFlag(FLAGS_watchdog_max_unexplained_share) > 0 &&
        absl::GetFlag(FLAGS_watchdog_max_unexplained_share) <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--watchdog_max_unexplained_share=",
                     absl::GetFlag(FLAGS_watchdog_max_unexplained_share), " is not in (0, 1]"));
  }
  if (!(absl::GetFlag(FLAGS_inject_leak_mib_per_s) >= 0 &&
        absl::GetFlag(FLAGS_inject_leak_mib_per_s) <= 65536)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--inject_leak_mib_per_s=", absl::GetFlag(FLAGS_inject_leak_mib_per_s),
        " is not in [0, 65536]"));
  }
  if (absl::GetFlag(FLAGS_kill_decode_after) > 0 && absl::GetFlag(FLAGS_decode) < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kill_decode_after=", absl::GetFlag(FLAGS_kill_decode_after),
        " needs a surviving decode worker: --decode=", absl::GetFlag(FLAGS_decode), " is < 2"));
  }
  if (absl::GetFlag(FLAGS_kill_prefill_after) > 0 && absl::GetFlag(FLAGS_prefill) < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kill_prefill_after=", absl::GetFlag(FLAGS_kill_prefill_after),
        " needs a surviving prefill worker: --prefill=", absl::GetFlag(FLAGS_prefill), " is < 2"));
  }
  return absl::OkStatus();
}

}  // namespace kvferry::serving
