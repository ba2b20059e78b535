// Agent: kvferry's entry point (the role of NIXL's agent). Owns a UCX
// context and worker, the KV pools registered on them, and (with the transfer
// API) its peers and in-flight transfers.
//
// Thread safety: thread-safe. Every UCX call on the worker happens under the
// agent's mutex; an optional progress thread drives the worker.
//
// Destruction: closes peers, waits until no transfer can touch memory, then
// releases pools, worker and context. Objects it created that are still alive
// afterwards (a BlockSet, a Transfer handle) are survivors: the agent reports
// each with its creation site and applies AgentOptions::leak_policy. They stay
// valid (they hold their own references), so a kLog policy is safe.
#ifndef KVFERRY_AGENT_H_
#define KVFERRY_AGENT_H_

#include <cstdint>
#include <memory>
#include <source_location>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvferry/kv_layout.h"
#include "kvferry/kv_pool.h"
#include "kvferry/ledger.h"
#include "kvferry/ucx_settings.h"

namespace kvferry {

struct AgentOptions {
  // Name announced to peers; 1..255 characters. Default "kvferry".
  std::string name = "kvferry";
  // What destruction does with survivors. Default: DefaultLeakPolicy()
  // (abort without NDEBUG, log with it).
  LeakPolicy leak_policy = DefaultLeakPolicy();
  // Extra UCX settings as (name, value) without the UCX_ prefix, applied with
  // ucp_config_modify on top of the environment, e.g. {"TLS", "tcp"}.
  // Default: none. kvferry itself sets RCACHE_ENABLE=n and MEMTYPE_CACHE=n
  // unless the user sets them here or in the environment.
  std::vector<std::pair<std::string, std::string>> ucx_config;
  // Run a thread that drives the worker, so transfers advance without the
  // caller calling Progress(). Default true.
  bool progress_thread = true;
};

namespace internal {
class AgentImpl;
}

class Agent {
 public:
  static absl::StatusOr<std::unique_ptr<Agent>> Create(
      AgentOptions options, std::source_location site = std::source_location::current());
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  const std::string& name() const;

  // Allocates and registers a pool. kInvalidArgument for a bad layout or name,
  // kAlreadyExists for a name in use, kResourceExhausted when memory or
  // registration fails. The pointer stays valid until the Agent is destroyed.
  // `exported` pools are offered to peers; others are local only.
  absl::StatusOr<KvPool*> CreatePool(std::string name, const KvLayout& layout,
                                     bool exported = true,
                                     std::source_location site = std::source_location::current());
  // nullptr when no pool has that name.
  KvPool* FindPool(absl::string_view name) const;

  // Drives the UCX worker once; returns the number of events progressed.
  int Progress();

  // Live counters of everything this agent created.
  Stats GetStats() const;
  // The ledger (counters and, with KVFERRY_LEDGER, creation sites).
  const Ledger& ledger() const;
  // UCX memory settings in force (hook mode, caches).
  const UcxSettings& ucx_settings() const;

  internal::AgentImpl* impl() const { return impl_.get(); }

 private:
  explicit Agent(std::unique_ptr<internal::AgentImpl> impl);
  std::unique_ptr<internal::AgentImpl> impl_;
};

}  // namespace kvferry

#endif  // KVFERRY_AGENT_H_
