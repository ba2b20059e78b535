// AgentImpl: the state behind kvferry::Agent.
//
// Locking: mu_ serializes every use of the UCX worker and guards the pools,
// peers and transfers. UCX callbacks run inside ucp_worker_progress, with mu_
// held by the progressing thread; they only record events, which are handled
// after progress returns.
#ifndef KVFERRY_SRC_AGENT_IMPL_H_
#define KVFERRY_SRC_AGENT_IMPL_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "kvferry/agent.h"
#include "src/ucx/worker.h"

namespace kvferry::internal {

class AgentImpl {
 public:
  static absl::StatusOr<std::unique_ptr<AgentImpl>> Create(AgentOptions options,
                                                           std::source_location site);
  ~AgentImpl();

  const AgentOptions& options() const { return options_; }
  const LedgerPtr& ledger() const { return ledger_; }
  const ContextPtr& context() const { return context_; }
  const WorkerPtr& worker() const { return worker_; }

  absl::StatusOr<KvPool*> CreatePool(std::string name, const KvLayout& layout, bool exported,
                                     std::source_location site) ABSL_LOCKS_EXCLUDED(mu_);
  KvPool* FindPool(absl::string_view name) const ABSL_LOCKS_EXCLUDED(mu_);
  int Progress() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  AgentImpl(AgentOptions options, LedgerPtr ledger, ContextPtr context, WorkerPtr worker);
  int ProgressLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ProgressThreadMain() ABSL_LOCKS_EXCLUDED(mu_);
  void CheckSurvivors() const;

  // Constant after construction.
  const AgentOptions options_;
  const LedgerPtr ledger_;
  // Released in the destructor, in order: worker, then context.
  ContextPtr context_;
  WorkerPtr worker_;

  // Self-synchronized.
  std::atomic<bool> stop_{false};
  std::thread progress_thread_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<KvPool>> pools_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_AGENT_IMPL_H_
