// What prefill and decode workers share: the engine-owned KV cache, the block
// manager, the agent and its discovery, the watchdog and the graceful reset,
// and the final report.
//
// The graceful reset (--watchdog_reset), on the control channel:
//   router -> worker  "serving"    connected to its peers; from here on it
//                                  may drain (a drain waits for this)
//   worker -> router  "alarm"      each watchdog alarm: kind, reason, origins
//   worker -> router  "draining"   after an unexplained-memory alarm: send me
//                                  no new requests
//   router -> worker  "drain_ack"  no request is sent after this one; the
//                                  worker finishes those it has (or, after
//                                  60 s, hands them back as failed)
//   worker -> router  "resetting"  nothing in flight: its report and memory
//                                  before the reset; then it exits 0
// The router starts the worker again under the same name (a new agent
// incarnation), reconnects its peers, and sends it requests once they are.
//
// Thread-compatible: a worker is one thread (plus its agent's progress
// thread, which kvferry synchronizes, and the watchdog's thread, which only
// reaches the fields under alarm_mu).
#ifndef KVFERRY_EXAMPLES_DISAGG_SERVING_WORKER_H_
#define KVFERRY_EXAMPLES_DISAGG_SERVING_WORKER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "kvferry/internal/mutex.h"
#include "examples/disagg_serving/protocol.h"
#include "kvferry/agent.h"
#include "kvferry/directory.h"
#include "kvferry/metrics_server.h"
#include "kvferry/watchdog.h"

namespace kvferry::serving {

// The model shape from the flags.
KvLayout LayoutFromFlags();

// The KV cache as an engine allocates it: one mmap per layer and K/V plane,
// registered with the agent as one engine-owned pool (one KvRegion each).
// REQUIRES: outlives the agent it is registered with.
class EngineKvCache {
 public:
  static absl::StatusOr<std::unique_ptr<EngineKvCache>> Allocate(const KvLayout& layout);
  ~EngineKvCache();
  EngineKvCache(const EngineKvCache&) = delete;
  EngineKvCache& operator=(const EngineKvCache&) = delete;
  const std::vector<KvRegion>& regions() const { return regions_; }

 private:
  EngineKvCache() = default;
  std::vector<KvRegion> regions_;
};

// Per-request block lists on the worker's pool.
class BlockManager {
 public:
  explicit BlockManager(KvPool* pool) : pool_(pool) {}
  // Appends `count` blocks to request `job`'s list; returns the new BlockSet.
  absl::StatusOr<BlockSet*> Allocate(int64_t job, uint32_t count);
  std::vector<BlockSet>& Blocks(int64_t job) { return lists_[job]; }
  void Free(int64_t job) { lists_.erase(job); }
  void FreeAll() { lists_.clear(); }
  size_t requests() const { return lists_.size(); }

 private:
  KvPool* pool_;
  std::map<int64_t, std::vector<BlockSet>> lists_;
};

// The worker's agent, cache and pool, listening and reachable.
struct WorkerBase {
  std::string name;
  std::string role;
  KvLayout layout;
  std::unique_ptr<Channel> router;
  std::unique_ptr<EngineKvCache> cache;  // outlives the agent: declared first
  std::unique_ptr<Agent> agent;
  std::unique_ptr<Directory> directory;
  KvPool* pool = nullptr;
  std::unique_ptr<BlockManager> blocks;
  // What the watchdog's hook reports: declared before the watchdog, so that
  // its thread ends before they go.
  // kvferry's own mutex: Debian's abseil is not built for TSan, so an
  // absl::Mutex orders nothing a TSan build can see.
  internal::Mutex alarm_mu;
  std::vector<Json> alarms ABSL_GUARDED_BY(alarm_mu);  // not yet sent to the router
  bool reset_wanted ABSL_GUARDED_BY(alarm_mu) = false;
  // With --watchdog: samples the agent on a thread of its own. Declared
  // after the agent and before the metrics server, whose scrapes read it.
  std::unique_ptr<Watchdog> watchdog;
  uint16_t port = 0;
  // GET /metrics of the agent (--metrics), on 127.0.0.1:metrics_port.
  std::unique_ptr<MetricsServer> metrics;
  uint16_t metrics_port = 0;
  // Each peer's data path as seen when it connected (PeerInfo::data_path).
  std::map<std::string, std::string> data_paths;

  // The graceful reset's state on this side.
  enum class Drain { kServing, kDraining, kAcked };
  Drain drain = Drain::kServing;
  bool in_service = false;      // the router's "serving": drains may start
  Json drain_alarm;             // the alarm that started the drain
  absl::Time drain_acked_at;
  int new_jobs_after_ack = 0;   // requests the router sent after its drain_ack

  absl::Time last_heartbeat = absl::InfinitePast();
  // With --etcd: the directory's view of this worker's key, checked once a
  // second; a change is logged and sent to the router at once.
  absl::Time last_directory_check = absl::InfinitePast();
  std::string directory_error;  // empty while the key is under a live lease

  // The injected leak (--inject_leak_mib_per_s): mapped and touched, never freed.
  absl::Time leak_start;
  std::vector<std::pair<void*, size_t>> leaked;
  size_t leaked_bytes = 0;


  // Creates the agent, registers the cache, listens, serves /metrics (with
  // --metrics), publishes (with --etcd) and tells the router "ready".
  absl::Status Start(const std::string& role_name);
  // Connects to each of the named peers: through the directory with --etcd,
  // else at the address the router gave.
  absl::Status ConnectPeers(const Json& peers);
  // Waits until every named peer has connected to this agent.
  absl::Status AwaitPeers(const Json& names);
  // Handles the router's messages about the reset ("serving", "drain_ack"); counts a
  // request that arrives after it. True when `m` was consumed.
  bool HandleControl(const Json& m);
  // Sends the router a "heartbeat" when --heartbeat_ms passed since the
  // last one. Called from every loop that may run for long.
  void Heartbeat();
  // With --etcd, once a second: logs and tells the router ("directory") when
  // this worker's key stops (or starts again) being under a live lease.
  // Publishes this worker in the directory; while its name is still held
  // (kAlreadyExists), retries until a lease TTL (plus slack) has passed.
  absl::Status PublishOnceFree();
  void CheckDirectory();
  // Once per loop: sends a due heartbeat, checks the directory, grows the injected leak, sends the watchdog's alarms, and
  // starts draining after an unexplained-memory alarm. True once the drain
  // is acknowledged and `open_jobs` is 0: time to call ResetNow.
  bool Tick(size_t open_jobs);
  // Draining, acknowledged, and still holding requests 60 s later: the
  // worker hands them back (fails them; the router retries them elsewhere).
  bool DrainOverdue() const;
  // Sends "resetting" (the report, and the memory before the reset) and
  // stops; the process then exits 0 and the router starts it again.
  void ResetNow(Json counters);
  // Waits (bounded) until nothing per-request is alive, then sends the final
  // report: counters, live handles, pool, memory report.
  void Report(Json counters);
  // The report's body (after the bounded wait), with "type" `type`.
  Json BuildReport(const char* type, Json counters);
  // Stops serving /metrics and the watchdog, unpublishes, destroys the agent (a survivor aborts the process under
  // LeakPolicy::kAbort), frees the cache.
  void Stop();
};

// What `transfers` moved: {"bytes", "busy_us"}, busy being the time at least
// one of them was in flight (post to end); null when none ended.
Json TransferFigures(const std::vector<Transfer>& transfers);

// Entry points (return the process's exit code).
int RunPrefill();
int RunDecode();
int RunRouter(int argc, char** argv);

}  // namespace kvferry::serving

#endif  // KVFERRY_EXAMPLES_DISAGG_SERVING_WORKER_H_
