#include "examples/disagg_serving/worker.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "examples/disagg_serving/flags.h"

namespace kvferry::serving {

KvLayout LayoutFromFlags() {
  return KvLayout{.num_layers = static_cast<uint32_t>(absl::GetFlag(FLAGS_layers)),
                  .num_blocks = static_cast<uint32_t>(absl::GetFlag(FLAGS_blocks)),
                  .tokens_per_block = static_cast<uint32_t>(absl::GetFlag(FLAGS_tokens_per_block)),
                  .num_kv_heads = static_cast<uint32_t>(absl::GetFlag(FLAGS_kv_heads)),
                  .head_dim = static_cast<uint32_t>(absl::GetFlag(FLAGS_head_dim)),
                  .element_bytes = static_cast<uint32_t>(absl::GetFlag(FLAGS_element_bytes))};
}

absl::StatusOr<std::unique_ptr<EngineKvCache>> EngineKvCache::Allocate(const KvLayout& layout) {
  if (absl::Status s = layout.Validate(); !s.ok()) return s;
  std::unique_ptr<EngineKvCache> cache(new EngineKvCache());
  for (uint32_t i = 0; i < layout.num_layers * layout.num_planes(); ++i) {
    void* p = mmap(nullptr, layout.plane_bytes(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      return absl::ResourceExhaustedError(
          absl::StrCat("mmap of ", layout.plane_bytes(), " bytes for KV region ", i, " failed"));
    }
    cache->regions_.push_back(KvRegion{p, layout.plane_bytes()});
  }
  return cache;
}

EngineKvCache::~EngineKvCache() {
  for (const KvRegion& r : regions_) munmap(r.base, r.length);
}

absl::StatusOr<BlockSet*> BlockManager::Allocate(int64_t job, uint32_t count) {
  absl::StatusOr<BlockSet> set = pool_->Lease(count);
  if (!set.ok()) return set.status();
  std::vector<BlockSet>& list = lists_[job];
  list.push_back(*std::move(set));
  return &list.back();
}

absl::Status WorkerBase::Start(const std::string& role_name) {
  role = role_name;
  name = absl::GetFlag(FLAGS_name);
  layout = LayoutFromFlags();
  router = std::make_unique<Channel>(absl::GetFlag(FLAGS_control_fd));
  const bool engine_memory = absl::GetFlag(FLAGS_pool_memory) == "engine";
  if (engine_memory) {
    auto c = EngineKvCache::Allocate(layout);
    if (!c.ok()) return c.status();
    cache = *std::move(c);
  }

  AgentOptions options;
  options.name = name;
  options.leak_policy = LeakPolicy::kAbort;  // a survivor fails the process: zero leaks, proven
  if (!absl::GetFlag(FLAGS_tls).empty()) options.ucx_config = {{"TLS", absl::GetFlag(FLAGS_tls)}};
  // The shared secret comes from KVFERRY_SECRET, which the router set.
  auto a = Agent::Create(options);
  if (!a.ok()) return a.status();
  agent = *std::move(a);
  auto p = engine_memory ? agent->RegisterPool("kv", layout, cache->regions())
                        : agent->CreatePool("kv", layout);
  if (!p.ok()) return p.status();
  pool = *p;
  blocks = std::make_unique<BlockManager>(pool);
  auto port_or = agent->Listen("127.0.0.1", 0);
  if (!port_or.ok()) return port_or.status();
  port = *port_or;
  if (absl::GetFlag(FLAGS_watchdog)) {
    WatchdogOptions wo;
    wo.period = absl::Seconds(absl::GetFlag(FLAGS_watchdog_period_s));
    wo.window = absl::Seconds(absl::GetFlag(FLAGS_watchdog_window_s));
    wo.max_rss_slope = absl::GetFlag(FLAGS_watchdog_max_rss_mib_per_min) * 1048576 / 60;
    wo.max_unexplained_slope =
        absl::GetFlag(FLAGS_watchdog_max_unexplained_mib_per_min) * 1048576 / 60;
    wo.max_unexplained_share = absl::GetFlag(FLAGS_watchdog_max_unexplained_share);
    wo.min_unexplained_bytes =
        static_cast<uint64_t>(absl::GetFlag(FLAGS_watchdog_min_unexplained_mib)) << 20;
    wo.run_thread = true;
    wo.on_alarm = [this](const WatchdogEvent& e) {
      Json origins = Json::array();
      for (const MappingOrigin& o : e.origins) {
        origins.push_back({{"origin", o.origin}, {"grown_bytes", o.grown_rss_bytes},
                           {"grown_mappings", o.grown_mappings}, {"rss_bytes", o.rss_bytes},
                           {"mappings", o.mappings}});
      }
      std::fprintf(stderr, "kvferry_serve[%s]: %s\n", name.c_str(), e.ToString().c_str());
      internal::MutexLock l(&alarm_mu);
      alarms.push_back({{"type", "alarm"},
                        {"name", name},
                        {"kind", e.kind()},
                        {"reason", WatchdogEvent::ReasonName(e.reason)},
                        {"repeat", e.repeat},
                        {"rss_mib_per_min", e.rss_slope * 60 / 1048576},
                        {"unexplained_mib_per_min", e.unexplained_slope * 60 / 1048576},
                        {"unexplained_bytes", e.report.unexplained_bytes},
                        {"rss_bytes", e.report.process.rss_bytes},
                        {"origins", std::move(origins)},
                        {"text", e.ToString()}});
      if (e.reason != WatchdogEvent::Reason::kRssSlope && absl::GetFlag(FLAGS_watchdog_reset)) {
        reset_wanted = true;
      }
    };
    auto dog = Watchdog::Create(agent.get(), std::move(wo));
    if (!dog.ok()) return dog.status();
    watchdog = *std::move(dog);
  }
  if (absl::GetFlag(FLAGS_metrics)) {
    auto m = MetricsServer::Start("127.0.0.1", 0, [this] {
      auto r = agent->GetMemoryReport();
      std::string out = r.ok() ? r->ToPrometheus() : std::string("# memory report unavailable\n");
      if (watchdog) out += watchdog->ToPrometheus();
      return out;
    });
    if (!m.ok()) return m.status();
    metrics = *std::move(m);
    metrics_port = metrics->port();
  }

  if (!absl::GetFlag(FLAGS_etcd).empty()) {
    DirectoryOptions d;
    d.endpoints = absl::StrSplit(absl::GetFlag(FLAGS_etcd), ',', absl::SkipEmpty());
    d.cluster = absl::GetFlag(FLAGS_cluster);
    auto dir = Directory::Create(d);
    if (!dir.ok()) return dir.status();
    directory = *std::move(dir);
    if (absl::Status s = PublishOnceFree(); !s.ok()) return s;
  }
  Json memory = nullptr;
  if (auto report = agent->GetMemoryReport(); report.ok()) {
    memory = {{"rss_bytes", report->process.rss_bytes},
              {"unexplained_bytes", report->unexplained_bytes},
              {"anonymous_bytes", report->process.anonymous_bytes},
              {"incarnation", agent->incarnation()}};
  }
  leak_start = absl::Now();
  router->Send({{"type", "ready"}, {"name", name}, {"role", role}, {"port", port},
                {"blocks", layout.num_blocks}, {"pid", getpid()},
                {"metrics_port", metrics_port}, {"memory", std::move(memory)}});
  return absl::OkStatus();
}

bool WorkerBase::HandleControl(const Json& m) {
  const std::string type = m["type"];
  if (type == "serving") {
    in_service = true;
    return true;
  }
  if (type == "drain_ack") {
    drain = Drain::kAcked;
    drain_acked_at = absl::Now();
    return true;
  }
  if (type == role && drain == Drain::kAcked) ++new_jobs_after_ack;
  return false;
}

void WorkerBase::Heartbeat() {
  const absl::Time now = absl::Now();
  if (now - last_heartbeat < absl::Milliseconds(absl::GetFlag(FLAGS_heartbeat_ms))) return;
  last_heartbeat = now;
  router->Send({{"type", "heartbeat"}});
}

absl::Status WorkerBase::PublishOnceFree() {
  // A worker of a run that was killed moments ago under the same --cluster
  // holds this name until its lease lapses: wait that long, no longer.
  const absl::Duration patience = directory->options().lease_ttl + absl::Seconds(5);
  const absl::Time deadline = absl::Now() + patience;
  bool said = false;
  while (true) {
    absl::Status s = directory->Publish(*agent, "127.0.0.1", port, role);
    if (!absl::IsAlreadyExists(s) || absl::Now() >= deadline) return s;
    if (!said) {
      std::fprintf(stderr, "kvferry_serve[%s]: etcd: %s; waiting up to %s for its lease to lapse\n",
                   name.c_str(), std::string(s.message()).c_str(),
                   absl::FormatDuration(patience).c_str());
      said = true;
    }
    absl::SleepFor(absl::Milliseconds(250));
  }
}

void WorkerBase::CheckDirectory() {
  if (!directory) return;
  const absl::Time now = absl::Now();
  if (now - last_directory_check < absl::Seconds(1)) return;
  last_directory_check = now;
  std::string error;
  for (const auto& [key, status] : directory->Publications()) {
    if (!status.ok()) error = absl::StrCat(key, ": ", status.ToString());
  }
  if (error == directory_error) return;
  directory_error = error;
  if (error.empty()) {
    std::fprintf(stderr, "kvferry_serve[%s]: etcd: published again\n", name.c_str());
  } else {
    std::fprintf(stderr, "kvferry_serve[%s]: etcd: LOST: %s\n", name.c_str(), error.c_str());
  }
  router->Send({{"type", "directory"}, {"name", name}, {"ok", error.empty()}, {"error", error}});
}

bool WorkerBase::Tick(size_t open_jobs) {
  Heartbeat();
  CheckDirectory();
  const double rate = absl::GetFlag(FLAGS_inject_leak_mib_per_s);
  if (rate > 0) {
    constexpr size_t kChunk = 1 << 20;
    const double due_mib = std::min<double>(absl::ToDoubleSeconds(absl::Now() - leak_start) * rate,
                                            absl::GetFlag(FLAGS_inject_leak_max_mib));
    while (static_cast<double>(leaked_bytes + kChunk) <= due_mib * 1048576) {
      // Below malloc, as the incident's leak was: an anonymous mapping, touched.
      void* p = mmap(nullptr, kChunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) break;
      std::memset(p, 0x5a, kChunk);
      leaked.emplace_back(p, kChunk);
      leaked_bytes += kChunk;
    }
  }
  std::vector<Json> pending;
  bool reset = false;
  {
    internal::MutexLock l(&alarm_mu);
    pending.swap(alarms);
    reset = reset_wanted;
  }
  for (const Json& a : pending) {
    // The first unexplained alarm is the one a drain names.
    if (drain_alarm.is_null() && a["kind"] == "unexplained") drain_alarm = a;
    router->Send(a);
  }
  if (reset && in_service && drain == Drain::kServing) {
    drain = Drain::kDraining;
    std::fprintf(stderr, "kvferry_serve[%s]: draining for a reset (%zu requests in flight)\n",
                 name.c_str(), open_jobs);
    router->Send({{"type", "draining"}, {"name", name}, {"alarm", drain_alarm},
                  {"in_flight", open_jobs}});
  }
  return drain == Drain::kAcked && open_jobs == 0;
}

bool WorkerBase::DrainOverdue() const {
  return drain == Drain::kAcked && absl::Now() - drain_acked_at > absl::Seconds(60);
}

void WorkerBase::ResetNow(Json counters) {
  if (watchdog) watchdog->Stop();
  Json r = BuildReport("resetting", std::move(counters));
  r["alarm"] = drain_alarm;
  r["new_jobs_after_ack"] = new_jobs_after_ack;
  r["leaked_bytes"] = leaked_bytes;
  r["pid"] = getpid();
  if (agent) r["incarnation"] = agent->incarnation();
  router->Send(r);
  router->Drain(absl::Seconds(10));
  Stop();
}

absl::Status WorkerBase::ConnectPeers(const Json& peers) {
  for (const Json& peer : peers) {
    const std::string peer_name = peer["name"];
    absl::StatusOr<PeerInfo> info =
        directory ? directory->Connect(*agent, peer_name, absl::Seconds(30))
                  : agent->Connect(peer["address"], peer["port"].get<uint16_t>(), absl::Seconds(30));
    if (absl::IsAlreadyExists(info.status())) {
      // Already connected to that incarnation: the router asked twice, when
      // this worker and that peer were reset at about the same time.
      info = agent->GetPeer(peer_name);
    }
    if (!info.ok()) return info.status();
    data_paths[peer_name] = info->data_path;
  }
  return absl::OkStatus();
}

absl::Status WorkerBase::AwaitPeers(const Json& names) {
  for (const Json& n : names) {
    auto info = agent->WaitForPeer(n.get<std::string>(), absl::Seconds(30));
    if (!info.ok()) return info.status();
    data_paths[info->name] = info->data_path;
  }
  return absl::OkStatus();
}

namespace {
int64_t PerRequestLive(const Stats& s) {
  return s.Live(ResourceKind::kBlockSet) + s.Live(ResourceKind::kTransfer) +
         s.Live(ResourceKind::kTransferHandle) + s.Live(ResourceKind::kOffer) +
         s.Live(ResourceKind::kRequest);
}
}  // namespace

void WorkerBase::Report(Json counters) {
  router->Send(BuildReport("report", std::move(counters)));
  router->Drain(absl::Seconds(10));
}

Json WorkerBase::BuildReport(const char* type, Json counters) {
  blocks->FreeAll();
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while ((PerRequestLive(agent->GetStats()) != 0 || pool->free_blocks() != layout.num_blocks) &&
         absl::Now() < deadline) {
    Heartbeat();
    absl::SleepFor(absl::Milliseconds(5));
  }
  const Stats stats = agent->GetStats();
  Json live = Json::object();
  for (int k = 0; k < kNumResourceKinds; ++k) {
    live[std::string(ResourceKindName(static_cast<ResourceKind>(k)))] = stats.live[k];
  }
  Json peers = Json::array();
  for (const auto& [peer_name, path] : data_paths) {
    auto info = agent->GetPeer(peer_name);
    const PeerState state = info.ok() ? info->state : PeerState::kClosed;
    peers.push_back({{"name", peer_name}, {"data_path", path},
                     {"state", state == PeerState::kConnected ? "connected"
                               : state == PeerState::kFailed  ? "failed"
                               : state == PeerState::kClosed  ? "closed"
                                                              : "handshaking"}});
  }
  Json memory = nullptr;
  if (auto report = agent->GetMemoryReport(); report.ok()) {
    memory = Json::parse(report->ToJson(), nullptr, false);
  }
  return {{"type", type},
          {"name", name},
          {"role", role},
          {"counters", std::move(counters)},
          {"live", std::move(live)},
          {"per_request_live", PerRequestLive(stats)},
          {"pool", {{"blocks_total", layout.num_blocks},
                    {"blocks_free", pool->free_blocks()},
                    {"memory_source", PoolMemorySourceName(pool->memory_source())}}},
          {"peers", std::move(peers)},
          {"memory", std::move(memory)}};
}

void WorkerBase::Stop() {
  metrics.reset();   // its scrapes read the agent (and the watchdog)
  watchdog.reset();  // its samples read the agent
  blocks.reset();
  directory.reset();  // deletes the published key
  agent.reset();      // aborts on survivors (LeakPolicy::kAbort)
  cache.reset();
}

}  // namespace kvferry::serving
