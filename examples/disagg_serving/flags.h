// kvferry_serve's flags (defined in flags.cc, each with its default in its
// help text). Dashes and underscores are the same on the command line.
#ifndef KVFERRY_EXAMPLES_DISAGG_SERVING_FLAGS_H_
#define KVFERRY_EXAMPLES_DISAGG_SERVING_FLAGS_H_

#include <cstdint>
#include <string>

#include "absl/flags/declare.h"
#include "absl/status/status.h"

ABSL_DECLARE_FLAG(int32_t, prefill);
ABSL_DECLARE_FLAG(int32_t, decode);
ABSL_DECLARE_FLAG(int32_t, requests);
ABSL_DECLARE_FLAG(double, rate);
ABSL_DECLARE_FLAG(int32_t, prompt_min);
ABSL_DECLARE_FLAG(int32_t, prompt_max);
ABSL_DECLARE_FLAG(int32_t, output_min);
ABSL_DECLARE_FLAG(int32_t, output_max);
ABSL_DECLARE_FLAG(std::string, prompt_file);
ABSL_DECLARE_FLAG(int32_t, vocab);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(int32_t, layers);
ABSL_DECLARE_FLAG(int32_t, kv_heads);
ABSL_DECLARE_FLAG(int32_t, head_dim);
ABSL_DECLARE_FLAG(int32_t, element_bytes);
ABSL_DECLARE_FLAG(int32_t, tokens_per_block);
ABSL_DECLARE_FLAG(int32_t, blocks);
ABSL_DECLARE_FLAG(std::string, pool_memory);
ABSL_DECLARE_FLAG(bool, pipeline);
ABSL_DECLARE_FLAG(bool, push);
ABSL_DECLARE_FLAG(double, prefill_ms_per_layer);
ABSL_DECLARE_FLAG(int32_t, kill_decode_after);
ABSL_DECLARE_FLAG(int32_t, kill_prefill_after);
ABSL_DECLARE_FLAG(std::string, etcd);
ABSL_DECLARE_FLAG(std::string, cluster);
ABSL_DECLARE_FLAG(std::string, tls);
ABSL_DECLARE_FLAG(double, offer_ttl_s);
ABSL_DECLARE_FLAG(double, timeout_s);
ABSL_DECLARE_FLAG(int32_t, heartbeat_ms);
ABSL_DECLARE_FLAG(double, worker_timeout_s);
ABSL_DECLARE_FLAG(int32_t, max_retries);
ABSL_DECLARE_FLAG(int32_t, retry_backoff_ms);
ABSL_DECLARE_FLAG(bool, json);
ABSL_DECLARE_FLAG(bool, progress);
ABSL_DECLARE_FLAG(bool, metrics);
ABSL_DECLARE_FLAG(std::string, prometheus_sd_file);
ABSL_DECLARE_FLAG(bool, watchdog);
ABSL_DECLARE_FLAG(double, watchdog_period_s);
ABSL_DECLARE_FLAG(double, watchdog_window_s);
ABSL_DECLARE_FLAG(double, watchdog_max_rss_mib_per_min);
ABSL_DECLARE_FLAG(double, watchdog_max_unexplained_mib_per_min);
ABSL_DECLARE_FLAG(double, watchdog_max_unexplained_share);
ABSL_DECLARE_FLAG(int32_t, watchdog_min_unexplained_mib);
ABSL_DECLARE_FLAG(bool, watchdog_reset);
ABSL_DECLARE_FLAG(double, inject_leak_mib_per_s);
ABSL_DECLARE_FLAG(int32_t, inject_leak_max_mib);
// Internal: set by the router for the workers it starts.
ABSL_DECLARE_FLAG(std::string, role);
ABSL_DECLARE_FLAG(std::string, name);
ABSL_DECLARE_FLAG(int32_t, control_fd);

namespace kvferry::serving {
// Checks the values of the flags above; the error names the flag and value.
absl::Status ValidateFlags();
}  // namespace kvferry::serving

#endif  // KVFERRY_EXAMPLES_DISAGG_SERVING_FLAGS_H_
