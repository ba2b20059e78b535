// What prefill and decode workers share: the engine-owned KV cache, the block
// manager, the agent and its discovery, and the final report.
//
// Thread-compatible: a worker is one thread (plus its agent's progress
// thread, which kvferry synchronizes).
#ifndef KVFERRY_EXAMPLES_DISAGG_SERVING_WORKER_H_
#define KVFERRY_EXAMPLES_DISAGG_SERVING_WORKER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "examples/disagg_serving/protocol.h"
#include "kvferry/agent.h"
#include "kvferry/directory.h"
#include "kvferry/metrics_server.h"

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
  uint16_t port = 0;
  // GET /metrics of the agent (--metrics), on 127.0.0.1:metrics_port.
  std::unique_ptr<MetricsServer> metrics;
  uint16_t metrics_port = 0;
  // Each peer's data path as seen when it connected (PeerInfo::data_path).
  std::map<std::string, std::string> data_paths;

  // Creates the agent, registers the cache, listens, serves /metrics (with
  // --metrics), publishes (with --etcd) and tells the router "ready".
  absl::Status Start(const std::string& role_name);
  // Connects to each of the named peers: through the directory with --etcd,
  // else at the address the router gave.
  absl::Status ConnectPeers(const Json& peers);
  // Waits until every named peer has connected to this agent.
  absl::Status AwaitPeers(const Json& names);
  // Waits (bounded) until nothing per-request is alive, then sends the final
  // report: counters, live handles, pool, memory report.
  void Report(Json counters);
  // Stops serving /metrics, unpublishes, destroys the agent (a survivor aborts the process under
  // LeakPolicy::kAbort), frees the cache.
  void Stop();
};

// Entry points (return the process's exit code).
int RunPrefill();
int RunDecode();
int RunRouter(int argc, char** argv);

}  // namespace kvferry::serving

#endif  // KVFERRY_EXAMPLES_DISAGG_SERVING_WORKER_H_
