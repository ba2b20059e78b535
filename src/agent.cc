#include "kvferry/agent.h"

#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "src/agent_impl.h"
#include "src/pool_core.h"
#include "src/status_macros.h"

namespace kvferry {
namespace internal {

absl::StatusOr<std::unique_ptr<AgentImpl>> AgentImpl::Create(AgentOptions options,
                                                             std::source_location site) {
  if (options.name.empty() || options.name.size() > 255) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AgentOptions.name must have 1..255 characters (got ", options.name.size(), ")"));
  }
  auto ledger = LedgerPtr(new Ledger(options.name));
  Context::Options copts;
  copts.name = options.name;
  copts.config = options.ucx_config;
  copts.ledger = ledger;
  KVFERRY_ASSIGN_OR_RETURN(ContextPtr context, Context::Create(copts, site));
  KVFERRY_ASSIGN_OR_RETURN(WorkerPtr worker, Worker::Create(context, site));
  std::unique_ptr<AgentImpl> impl(
      new AgentImpl(std::move(options), std::move(ledger), std::move(context), std::move(worker)));
  if (impl->options_.progress_thread) {
    impl->progress_thread_ = std::thread([p = impl.get()] { p->ProgressThreadMain(); });
  }
  return impl;
}

AgentImpl::AgentImpl(AgentOptions options, LedgerPtr ledger, ContextPtr context,
                     WorkerPtr worker)
    : options_(std::move(options)),
      ledger_(std::move(ledger)),
      context_(std::move(context)),
      worker_(std::move(worker)) {}

AgentImpl::~AgentImpl() {
  stop_.store(true, std::memory_order_release);
  worker_->Signal();
  if (progress_thread_.joinable()) progress_thread_.join();
  {
    absl::MutexLock l(&mu_);
    pools_.clear();
  }
  worker_.reset();
  context_.reset();
  CheckSurvivors();
}

void AgentImpl::CheckSurvivors() const {
  Stats stats = ledger_->Snapshot();
  if (stats.TotalLive() == 0 || options_.leak_policy == LeakPolicy::kIgnore) return;
  std::string report = absl::StrCat(
      "kvferry: agent '", options_.name, "' destroyed while ", stats.TotalLive(),
      " objects it created are still alive:\n", ledger_->Report());
  std::fputs(report.c_str(), stderr);
  std::fflush(stderr);
  if (options_.leak_policy == LeakPolicy::kAbort) std::abort();
}

absl::StatusOr<KvPool*> AgentImpl::CreatePool(std::string name, const KvLayout& layout,
                                              bool exported, std::source_location site) {
  absl::MutexLock l(&mu_);
  if (pools_.contains(name)) {
    return absl::AlreadyExistsError(absl::StrCat("a pool named '", name, "' already exists"));
  }
  KVFERRY_ASSIGN_OR_RETURN(PoolCorePtr core,
                           PoolCore::Create(context_, name, layout, exported, site));
  auto pool = std::make_unique<KvPool>(std::move(core));
  KvPool* raw = pool.get();
  pools_.emplace(std::move(name), std::move(pool));
  return raw;
}

KvPool* AgentImpl::FindPool(absl::string_view name) const {
  absl::MutexLock l(&mu_);
  auto it = pools_.find(name);
  return it == pools_.end() ? nullptr : it->second.get();
}

int AgentImpl::Progress() {
  absl::MutexLock l(&mu_);
  return ProgressLocked();
}

int AgentImpl::ProgressLocked() {
  int n = 0;
  while (worker_->Progress() != 0) ++n;
  return n;
}

void AgentImpl::ProgressThreadMain() {
  int idle = 0;
  while (!stop_.load(std::memory_order_acquire)) {
    bool armed = false;
    {
      absl::MutexLock l(&mu_);
      if (ProgressLocked() > 0) {
        idle = 0;
      } else if (++idle > 64) {
        armed = worker_->Arm();
      }
    }
    if (armed) worker_->WaitFd(/*timeout_ms=*/1);
  }
}

}  // namespace internal

absl::StatusOr<std::unique_ptr<Agent>> Agent::Create(AgentOptions options,
                                                     std::source_location site) {
  KVFERRY_ASSIGN_OR_RETURN(auto impl, internal::AgentImpl::Create(std::move(options), site));
  return std::unique_ptr<Agent>(new Agent(std::move(impl)));
}

Agent::Agent(std::unique_ptr<internal::AgentImpl> impl) : impl_(std::move(impl)) {}
Agent::~Agent() = default;

const std::string& Agent::name() const { return impl_->options().name; }

absl::StatusOr<KvPool*> Agent::CreatePool(std::string name, const KvLayout& layout,
                                          bool exported, std::source_location site) {
  return impl_->CreatePool(std::move(name), layout, exported, site);
}

KvPool* Agent::FindPool(absl::string_view name) const { return impl_->FindPool(name); }
int Agent::Progress() { return impl_->Progress(); }
Stats Agent::GetStats() const { return impl_->ledger()->Snapshot(); }
const Ledger& Agent::ledger() const { return *impl_->ledger(); }
const UcxSettings& Agent::ucx_settings() const { return impl_->context()->settings(); }

}  // namespace kvferry
