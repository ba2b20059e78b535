// MemoryReport rendering: text, JSON and Prometheus exposition format.
#include "kvferry/memory_report.h"

#include <nlohmann/json.hpp>

#include <utility>

#include "absl/strings/str_cat.h"
#include "src/prometheus_text.h"
#include "absl/strings/str_format.h"

namespace kvferry {
namespace {

std::string Mib(uint64_t bytes) { return absl::StrFormat("%.1f MiB", bytes / 1048576.0); }
std::string SignedMib(int64_t bytes) {
  return absl::StrFormat("%.1f MiB", static_cast<double>(bytes) / 1048576.0);
}

std::string Label(absl::string_view v) { return internal::PrometheusLabelValue(v); }

}  // namespace

std::string MemoryReport::ToText() const {
  const ProcessMemory& p = process;
  std::string out = absl::StrCat("kvferry memory report for agent '", agent, "' at ",
                                 absl::FormatTime(taken), "\n");
  absl::StrAppend(&out, "  rss                 ", Mib(p.rss_bytes), "\n");
  absl::StrAppend(&out, "  anonymous resident  ", Mib(p.anonymous_bytes), " in ",
                  p.anonymous_mappings, " anonymous mappings (", Mib(p.anonymous_mapped_bytes),
                  " mapped) of ", p.mappings, "\n");
  absl::StrAppend(&out, "  heap (malloc)       ", Mib(p.heap_in_use_bytes), " in use, ",
                  Mib(p.heap_system_bytes), " held from the OS\n");
  absl::StrAppend(&out, "  registered (pools)  ", Mib(registered_bytes), "\n");
  for (const PoolMemory& pool : pools) {
    absl::StrAppend(&out, "    pool '", pool.name, "': ", Mib(pool.registered_bytes),
                    " registered, ", Mib(pool.resident_bytes), " resident, ",
                    pool.blocks_total - pool.blocks_free, "/", pool.blocks_total,
                    " blocks leased, ", pool.backing,
                    pool.shared_memory ? " (shared memory)" : "", "\n");
  }
  absl::StrAppend(&out, "  shared memory       ", Mib(p.shmem_rss_bytes), " resident; ",
                  p.ucx_segments, " UCX segments (", Mib(p.ucx_segment_bytes), " mapped)");
  if (p.pool_segments > 0) {
    absl::StrAppend(&out, " + ", p.pool_segments, " pool segments (",
                    Mib(p.pool_segment_bytes), " mapped)");
  }
  absl::StrAppend(&out, "\n");
  absl::StrAppend(&out, "  unexplained         ", Mib(unexplained_bytes),
                  "  (anonymous - heap - resident anonymous pools");
  if (unexplained_signed_bytes < 0) {
    absl::StrAppend(&out, " = ", SignedMib(unexplained_signed_bytes), ", floored at 0");
  }
  absl::StrAppend(&out, ")\n");
  absl::StrAppend(&out, "  live objects        ", live.ToString(), "\n");
  absl::StrAppend(&out, "  listener            ", listener.ToString(), "\n");
  absl::StrAppend(&out, "  ucx                 ", ucx.ToString(), "\n");
  return out;
}

std::string MemoryReport::ToJson() const {
  nlohmann::json j;
  j["agent"] = agent;
  j["taken_unix_ms"] = absl::ToUnixMillis(taken);
  j["process"] = {{"rss_bytes", process.rss_bytes},
                  {"anonymous_bytes", process.anonymous_bytes},
                  {"shmem_rss_bytes", process.shmem_rss_bytes},
                  {"mappings", process.mappings},
                  {"anonymous_mappings", process.anonymous_mappings},
                  {"anonymous_mapped_bytes", process.anonymous_mapped_bytes},
                  {"ucx_segments", process.ucx_segments},
                  {"ucx_segment_bytes", process.ucx_segment_bytes},
                  {"pool_segments", process.pool_segments},
                  {"pool_segment_bytes", process.pool_segment_bytes},
                  {"heap_system_bytes", process.heap_system_bytes},
                  {"heap_in_use_bytes", process.heap_in_use_bytes}};
  j["pools"] = nlohmann::json::array();
  for (const PoolMemory& p : pools) {
    j["pools"].push_back({{"name", p.name},
                          {"registered_bytes", p.registered_bytes},
                          {"resident_bytes", p.resident_bytes},
                          {"backing", p.backing},
                          {"shared_memory", p.shared_memory},
                          {"blocks_total", p.blocks_total},
                          {"blocks_free", p.blocks_free}});
  }
  j["registered_bytes"] = registered_bytes;
  j["unexplained_bytes"] = unexplained_bytes;
  j["unexplained_signed_bytes"] = unexplained_signed_bytes;
  nlohmann::json objects;
  for (int i = 0; i < kNumResourceKinds; ++i) {
    objects[std::string(ResourceKindName(static_cast<ResourceKind>(i)))] = live.live[i];
  }
  j["live_objects"] = objects;
  j["ucx"] = {{"version", ucx.ucx_version},
              {"mmap_hook_mode", ucx.mmap_hook_mode},
              {"mmap_hook_from_env", ucx.mmap_hook_from_env},
              {"rcache", ucx.rcache},
              {"memtype_cache", ucx.memtype_cache},
              {"shm_error_handling", ucx.shm_error_handling},
              {"alloc_prio", ucx.alloc_prio}};
  return j.dump(2);
}

std::string ListenerStats::ToString() const {
  return absl::StrCat("accepted=", accepted, " refused_at_accept=", refused_at_accept,
                      " evicted=", evicted, " hello_timeouts=", hello_timeouts,
                      " accept_failures=", accept_failures,
                      " accept_failure_episodes=", accept_failure_episodes,
                      " accept_paused=", accept_paused ? 1 : 0);
}

std::string MemoryReport::ToPrometheus() const {
  std::string out;
  const std::string agent_label = absl::StrCat("agent=\"", Label(agent), "\"");
  auto gauge = [&](const char* name, const char* help, auto value) {
    absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " gauge\n", name, "{",
                    agent_label, "} ", value, "\n");
  };
  gauge("kvferry_rss_bytes", "Resident set size of the process.", process.rss_bytes);
  gauge("kvferry_anonymous_bytes", "Resident anonymous memory of the process.",
        process.anonymous_bytes);
  gauge("kvferry_anonymous_mappings", "Anonymous mappings in /proc/self/maps.",
        process.anonymous_mappings);
  gauge("kvferry_mappings", "Mappings in /proc/self/maps.", process.mappings);
  gauge("kvferry_shmem_resident_bytes", "Resident shared memory (proportional share).",
        process.shmem_rss_bytes);
  gauge("kvferry_ucx_segments",
        "UCX shared-memory segments mapped, not counting the agent's own pools.",
        process.ucx_segments);
  gauge("kvferry_pool_segments", "Mappings of the agent's pools that are shared-memory segments.",
        process.pool_segments);
  gauge("kvferry_ucx_segment_bytes", "Virtual size of the UCX shared-memory segments mapped.",
        process.ucx_segment_bytes);
  gauge("kvferry_pool_segment_bytes", "Virtual size of the agent's pools' shared-memory segments.",
        process.pool_segment_bytes);
  gauge("kvferry_anonymous_mapped_bytes", "Virtual size of the anonymous mappings.",
        process.anonymous_mapped_bytes);
  gauge("kvferry_registered_bytes", "Bytes registered with UCX, all pools.", registered_bytes);
  gauge("kvferry_heap_in_use_bytes", "Bytes malloc has handed out.", process.heap_in_use_bytes);
  gauge("kvferry_heap_system_bytes", "Bytes malloc holds from the OS.",
        process.heap_system_bytes);
  gauge("kvferry_unexplained_bytes",
        "Resident anonymous memory not explained by malloc or registered pools.",
        unexplained_bytes);
  gauge("kvferry_unexplained_signed_bytes",
        "Anonymous resident memory minus malloc's and the pools' share, not floored at 0 "
        "(negative while they exceed it); its growth is what the watchdog fits.",
        unexplained_signed_bytes);
  auto per_pool = [&](const char* name, const char* help, uint64_t PoolMemory::*field) {
    absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " gauge\n");
    for (const PoolMemory& p : pools) {
      absl::StrAppend(&out, name, "{", agent_label, ",pool=\"", Label(p.name), "\"} ", p.*field,
                      "\n");
    }
  };
  per_pool("kvferry_pool_registered_bytes", "Bytes registered with UCX per pool.",
           &PoolMemory::registered_bytes);
  per_pool("kvferry_pool_resident_bytes", "Resident bytes of each pool.",
           &PoolMemory::resident_bytes);
  absl::StrAppend(&out,
                  "# HELP kvferry_pool_info Where each pool's memory lives (value is always "
                  "1).\n"
                  "# TYPE kvferry_pool_info gauge\n");
  for (const PoolMemory& p : pools) {
    absl::StrAppend(&out, "kvferry_pool_info{", agent_label, ",pool=\"", Label(p.name),
                    "\",backing=\"", Label(p.backing), "\",shared_memory=\"",
                    p.shared_memory ? "true" : "false", "\"} 1\n");
  }
  absl::StrAppend(&out,
                  "# HELP kvferry_pool_blocks Blocks per pool by state.\n"
                  "# TYPE kvferry_pool_blocks gauge\n");
  for (const PoolMemory& p : pools) {
    absl::StrAppend(&out, "kvferry_pool_blocks{", agent_label, ",pool=\"", Label(p.name),
                    "\",state=\"free\"} ", p.blocks_free, "\n");
    absl::StrAppend(&out, "kvferry_pool_blocks{", agent_label, ",pool=\"", Label(p.name),
                    "\",state=\"leased\"} ", p.blocks_total - p.blocks_free, "\n");
  }
  absl::StrAppend(&out,
                  "# HELP kvferry_live_objects Live kvferry objects by kind.\n"
                  "# TYPE kvferry_live_objects gauge\n");
  for (int i = 0; i < kNumResourceKinds; ++i) {
    absl::StrAppend(&out, "kvferry_live_objects{", agent_label, ",kind=\"",
                    ResourceKindName(static_cast<ResourceKind>(i)), "\"} ", live.live[i], "\n");
  }
  auto counter = [&](const char* name, const char* help, uint64_t value) {
    absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " counter\n", name, "{",
                    agent_label, "} ", value, "\n");
  };
  counter("kvferry_listener_accepted_total", "Connections the listener accepted.",
          listener.accepted);
  counter("kvferry_listener_refused_at_accept_total",
          "Connections closed at accept: no handshake slot and none to evict.",
          listener.refused_at_accept);
  counter("kvferry_listener_evicted_total",
          "Unauthenticated connections closed to make room for newer ones.", listener.evicted);
  counter("kvferry_listener_hello_timeouts_total",
          "Connections dropped for no HELLO within hello_timeout.", listener.hello_timeouts);
  counter("kvferry_listener_accept_failures_total",
          "accept() calls that failed (out of file descriptors, or kernel memory).",
          listener.accept_failures);
  counter("kvferry_listener_accept_failure_episodes_total",
          "Runs of failed accept() calls (each logged once).", listener.accept_failure_episodes);
  gauge("kvferry_listener_accept_paused",
        "1 from a failed accept() until accepting works again.",
        listener.accept_paused ? 1 : 0);
  const Stats::QueueStats& q = live.queues;
  // The queues peers feed (docs/limits.md).
  gauge("kvferry_notifications_queued", "Received notifications not yet polled.",
        q.notifications_queued);
  gauge("kvferry_notification_bytes_queued", "Bytes of received notifications not yet polled.",
        q.notification_bytes_queued);
  gauge("kvferry_peers_paused",
        "Peers whose control connection is not read: their notifications are at the bound.",
        q.peers_paused);
  gauge("kvferry_notifications_held",
        "Transfers done but held in flight: their peer does not read its connection.",
        q.notifications_held);
  counter("kvferry_notification_pauses_total",
          "Times a peer's reading was paused at the notification bound.", q.notification_pauses);
  counter("kvferry_notification_holds_total",
          "Times a transfer's notification was held for a peer that does not read.",
          q.notification_holds);
  counter("kvferry_notifications_dropped_total",
          "Notifications of ended peers freed unpolled after the retention.",
          q.notifications_dropped);
  absl::StrAppend(&out, work.ToPrometheus(agent));
  absl::StrAppend(&out,
                  "# HELP kvferry_ucx_info UCX memory settings in force (value is always 1).\n"
                  "# TYPE kvferry_ucx_info gauge\n",
                  "kvferry_ucx_info{", agent_label, ",version=\"", Label(ucx.ucx_version),
                  "\",mmap_hook_mode=\"", Label(ucx.mmap_hook_mode), "\",rcache=\"",
                  Label(ucx.rcache), "\",memtype_cache=\"", Label(ucx.memtype_cache),
                  "\"} 1\n");
  return out;
}

}  // namespace kvferry
