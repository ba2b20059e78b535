#include "kvferry/agent.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "src/agent_impl.h"
#include "src/pool_core.h"
#include "src/status_macros.h"
#include "src/ucx/status.h"

namespace kvferry {
namespace internal {
namespace {

// The kernel's boot id: equal on two agents exactly when they share a host
// (network namespaces included, which share memory).
std::string ReadHostId() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  return std::string(absl::StripAsciiWhitespace(id));
}

}  // namespace

void intrusive_ptr_add_ref(TransferCore* p) { p->refs_.fetch_add(1, std::memory_order_relaxed); }
void intrusive_ptr_release(TransferCore* p) {
  if (p->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete p;
}

PeerInfo Peer::Info() const {
  PeerInfo info;
  info.name = name;
  info.state = state;
  info.status = status;
  for (const RemotePool& p : pools) info.pools.push_back(p.desc.name);
  info.same_host = same_host;
  info.data_error_handling = data_peer_mode;
  return info;
}

absl::StatusOr<std::unique_ptr<AgentImpl>> AgentImpl::Create(AgentOptions options,
                                                             SourceLocation site) {
  if (options.name.empty() || options.name.size() > wire::kMaxNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AgentOptions.name must have 1..255 characters (got ", options.name.size(), ")"));
  }
  if (options.shared_secret.size() > wire::kMaxSecretBytes) {
    return absl::InvalidArgumentError(absl::StrCat("AgentOptions.shared_secret has ",
                                                   options.shared_secret.size(),
                                                   " bytes; the limit is ", wire::kMaxSecretBytes));
  }
  if (options.peer_timeout < absl::Milliseconds(100)) {
    return absl::InvalidArgumentError(absl::StrCat("AgentOptions.peer_timeout = ",
                                                   absl::FormatDuration(options.peer_timeout),
                                                   " is shorter than 100ms"));
  }
  auto ledger = LedgerPtr(new Ledger(options.name));
  Context::Options copts;
  copts.name = options.name;
  copts.config = options.ucx_config;
  copts.ledger = ledger;
  KVFERRY_ASSIGN_OR_RETURN(ContextPtr context, Context::Create(copts, site));
  KVFERRY_ASSIGN_OR_RETURN(WorkerPtr worker, Worker::Create(context, site));
  std::unique_ptr<AgentImpl> impl(new AgentImpl(std::move(options), std::move(ledger),
                                                std::move(context), std::move(worker),
                                                ReadHostId()));
  ucp_am_handler_param_t am = {};
  am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_ARG;
  am.id = kControlAmId;
  am.cb = &AgentImpl::OnControlMessage;
  am.arg = impl.get();
  ucs_status_t st = ucp_worker_set_am_recv_handler(impl->worker_->native_handle(), &am);
  if (st != UCS_OK) return UcsToStatus(st, "ucp_worker_set_am_recv_handler");
  if (impl->options_.progress_thread) {
    impl->progress_thread_ = std::thread([p = impl.get()] { p->ProgressThreadMain(); });
  }
  return impl;
}

AgentImpl::AgentImpl(AgentOptions options, LedgerPtr ledger, ContextPtr context,
                     WorkerPtr worker, std::string host_id)
    : options_(std::move(options)),
      ledger_(std::move(ledger)),
      host_id_(std::move(host_id)),
      link_(new AgentLink(this)),
      context_(std::move(context)),
      worker_(std::move(worker)) {}

AgentImpl::~AgentImpl() {
  {
    // From here on, Transfer handles no longer reach this agent.
    internal::MutexLock l(&link_->mu_);
    link_->agent_ = nullptr;
  }
  stop_.store(true, std::memory_order_release);
  worker_->Signal();
  if (progress_thread_.joinable()) progress_thread_.join();
  {
    internal::MutexLock l(&mu_);
    ShutdownLocked();
    pools_.clear();
  }
  worker_.reset();
  context_.reset();
  CheckSurvivors();
}

void AgentImpl::ShutdownLocked() {
  if (listener_ != nullptr) {
    ProgressLocked();  // collect requests that raced with shutdown
    for (ucp_conn_request_h r : conn_requests_) listener_->Reject(r);
    conn_requests_.clear();
    listener_.reset();
  }
  std::vector<PeerPtr> peers;
  for (const auto& [ep, peer] : peers_by_ep_) peers.push_back(peer);
  for (const PeerPtr& peer : peers) {
    if (peer->state == PeerState::kConnected) SendLocked(*peer, {.type = wire::MessageType::kBye});
    ClosePeerLocked(peer, PeerState::kClosed,
                    absl::CancelledError(absl::StrCat("agent '", options_.name, "' shut down")),
                    /*graceful=*/peer->state == PeerState::kConnected);
  }
  // Fence: nothing leaves before UCX is done with it.
  absl::Time warn_at = absl::Now() + absl::Seconds(10);
  while (!in_flight_.empty()) {
    ProgressLocked();
    if (absl::Now() > warn_at) {
      std::fprintf(stderr,
                   "kvferry: agent '%s' is waiting for %zu transfers whose operations UCX has "
                   "not completed; their blocks stay pinned until it does\n",
                   options_.name.c_str(), in_flight_.size());
      warn_at = absl::Now() + absl::Seconds(10);
    }
  }
  control_events_.clear();
  peers_by_ep_.clear();
  peers_by_name_.clear();
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
                                              bool exported, SourceLocation site) {
  internal::MutexLock l(&mu_);
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
  internal::MutexLock l(&mu_);
  auto it = pools_.find(name);
  return it == pools_.end() ? nullptr : it->second.get();
}

bool AgentImpl::OwnsPoolLocked(const PoolCore* pool) const {
  for (const auto& [name, p] : pools_) {
    if (p->core() == pool) return true;
  }
  return false;
}

int AgentImpl::Progress() {
  internal::MutexLock l(&mu_);
  return ProgressLocked();
}

int AgentImpl::ProgressLocked() {
  int n = 0;
  while (worker_->Progress() != 0) ++n;
  HandleConnRequestsLocked();
  HandleControlEventsLocked();
  CheckPeersLocked();
  AdvanceTransfersLocked();
  return n;
}

void AgentImpl::ProgressThreadMain() {
  int idle = 0;
  while (!stop_.load(std::memory_order_acquire)) {
    bool armed = false;
    {
      internal::MutexLock l(&mu_);
      if (ProgressLocked() > 0) {
        idle = 0;
      } else if (++idle > 64) {
        armed = worker_->Arm();
      }
    }
    if (armed) worker_->WaitFd(/*timeout_ms=*/1);
  }
}

// Runs inside ucp_worker_progress, with mu_ held by the progressing thread.
ucs_status_t AgentImpl::OnControlMessage(void* arg, const void* /*header*/,
                                         size_t /*header_length*/, void* data, size_t length,
                                         const ucp_am_recv_param_t* param) noexcept
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  auto* self = static_cast<AgentImpl*>(arg);
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0 ||
      (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0) {
    // kvferry always sends eager with a reply endpoint; anything else is not ours.
    return UCS_OK;
  }
  self->control_events_.push_back(
      {param->reply_ep, std::string(static_cast<const char*>(data), length)});
  return UCS_OK;
}

}  // namespace internal

absl::StatusOr<std::unique_ptr<Agent>> Agent::Create(AgentOptions options,
                                                     SourceLocation site) {
  KVFERRY_ASSIGN_OR_RETURN(auto impl, internal::AgentImpl::Create(std::move(options), site));
  return std::unique_ptr<Agent>(new Agent(std::move(impl)));
}

Agent::Agent(std::unique_ptr<internal::AgentImpl> impl) : impl_(std::move(impl)) {}
Agent::~Agent() = default;

const std::string& Agent::name() const { return impl_->options().name; }

absl::StatusOr<KvPool*> Agent::CreatePool(std::string name, const KvLayout& layout,
                                          bool exported, SourceLocation site) {
  return impl_->CreatePool(std::move(name), layout, exported, site);
}

KvPool* Agent::FindPool(absl::string_view name) const { return impl_->FindPool(name); }
int Agent::Progress() { return impl_->Progress(); }
Stats Agent::GetStats() const { return impl_->ledger()->Snapshot(); }
const Ledger& Agent::ledger() const { return *impl_->ledger(); }
const UcxSettings& Agent::ucx_settings() const { return impl_->context()->settings(); }
absl::StatusOr<MemoryReport> Agent::GetMemoryReport() const { return impl_->GetMemoryReport(); }

absl::StatusOr<uint16_t> Agent::Listen(const std::string& address, uint16_t port) {
  return impl_->Listen(address, port);
}
absl::StatusOr<PeerInfo> Agent::Connect(const std::string& address, uint16_t port,
                                        absl::Duration timeout) {
  return impl_->Connect(address, port, timeout);
}
absl::StatusOr<PeerInfo> Agent::GetPeer(const std::string& name) const {
  return impl_->GetPeer(name);
}
std::vector<PeerInfo> Agent::ListPeers() const { return impl_->ListPeers(); }
absl::StatusOr<PeerInfo> Agent::WaitForPeer(const std::string& name, absl::Duration timeout) {
  return impl_->WaitForPeer(name, timeout);
}
absl::Status Agent::Disconnect(const std::string& name) { return impl_->Disconnect(name); }

absl::StatusOr<Transfer> Agent::PostTransfer(const TransferSpec& spec,
                                             SourceLocation site) {
  KVFERRY_ASSIGN_OR_RETURN(internal::TransferCorePtr core, impl_->PostTransfer(spec, site));
  return Transfer(std::move(core));
}
std::vector<Notification> Agent::PollNotifications() {
  return impl_->PollNotifications(absl::ZeroDuration());
}
std::vector<Notification> Agent::WaitForNotifications(absl::Duration timeout) {
  return impl_->PollNotifications(timeout);
}

}  // namespace kvferry
