#include "kvferry/agent.h"

#include <poll.h>
#include <pthread.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "src/agent_impl.h"
#include "src/end_reason_internal.h"
#include "src/log_internal.h"
#include "src/pool_core.h"
#include "src/status_macros.h"
#include "src/ucx/status.h"

namespace kvferry {

int DefaultKernelCopyThreads() {
  const unsigned cores = std::thread::hardware_concurrency();
  return cores == 0 ? 1 : static_cast<int>(std::min(4u, cores));
}
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

std::atomic<void (*)()> data_pass_test_hook{nullptr};

absl::Status WaitForRelease(AgentLink& link, OutcomeBase& outcome, absl::Duration timeout,
                            absl::FunctionRef<std::string()> pending) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!outcome.released()) {
    bool threaded = true;
    {
      AgentPin agent(&link);
      if (agent.get() != nullptr && !agent.get()->options().progress_thread) {
        threaded = false;
        agent.get()->Progress();
      }
    }
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat(pending(), " after ", absl::FormatDuration(timeout)));
    }
    outcome.AwaitReleased(threaded ? deadline - now : absl::ZeroDuration());
  }
  return outcome.status();
}

PeerInfo Peer::Info() const {
  PeerInfo info;
  info.name = name_;
  info.address = address;
  info.incarnation = incarnation_;
  info.state = state_;
  info.status = status_;
  for (const RemotePool& p : link_.pools()) info.pools.push_back(p.desc().name);
  info.same_host = link_.same_host();
  info.data_error_handling = link_.peer_mode();
  info.data_path = link_.path();
  return info;
}

std::string Peer::Describe() const {
  if (!name_.empty()) return absl::StrCat("'", name_, "' at ", address);
  return control_.handshake().DescribePeer();
}

void Peer::CloseConnection() { control_.Close(); }

absl::StatusOr<std::unique_ptr<AgentImpl>> AgentImpl::Create(AgentOptions options,
                                                             SourceLocation site) {
  constexpr size_t kMaxSecretBytes = 1024;
  if (absl::Status s = wire::ValidateName("AgentOptions.name", options.name); !s.ok()) return s;
  if (options.shared_secret.empty()) {
    if (const char* env = std::getenv("KVFERRY_SECRET")) options.shared_secret = env;
  }
  if (const char* env = std::getenv("KVFERRY_INSECURE"); env != nullptr && std::string(env) == "1") {
    options.allow_insecure = true;
  }
  if (options.shared_secret.size() > kMaxSecretBytes) {
    return absl::InvalidArgumentError(absl::StrCat("AgentOptions.shared_secret has ",
                                                   options.shared_secret.size(),
                                                   " bytes; the limit is ", kMaxSecretBytes));
  }
  if (options.handshake_timeout < absl::Milliseconds(10)) {
    return absl::InvalidArgumentError(absl::StrCat("AgentOptions.handshake_timeout = ",
                                                   absl::FormatDuration(options.handshake_timeout),
                                                   " is shorter than 10ms"));
  }
  if (options.max_pending_handshakes < 1) {
    return absl::InvalidArgumentError(absl::StrCat("AgentOptions.max_pending_handshakes = ",
                                                   options.max_pending_handshakes,
                                                   " must be at least 1"));
  }
  if (options.hello_timeout < absl::Milliseconds(10)) {
    return absl::InvalidArgumentError(absl::StrCat("AgentOptions.hello_timeout = ",
                                                   absl::FormatDuration(options.hello_timeout),
                                                   " is shorter than 10ms"));
  }
  if (options.max_pending_handshakes_per_source < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AgentOptions.max_pending_handshakes_per_source = ",
        options.max_pending_handshakes_per_source, " must be at least 1"));
  }
  if (options.peer_timeout < absl::Milliseconds(100)) {
    return absl::InvalidArgumentError(absl::StrCat("AgentOptions.peer_timeout = ",
                                                   absl::FormatDuration(options.peer_timeout),
                                                   " is shorter than 100ms"));
  }
  if (options.max_notification_bytes_per_peer < wire::kMaxPayloadBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AgentOptions.max_notification_bytes_per_peer = ",
        options.max_notification_bytes_per_peer, " is less than one notification's limit (",
        wire::kMaxPayloadBytes, " bytes)"));
  }
  if (options.max_notifications_per_peer < 1) {
    return absl::InvalidArgumentError("AgentOptions.max_notifications_per_peer = 0 must be at least 1");
  }
  if (options.ended_peer_notification_retention < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AgentOptions.ended_peer_notification_retention = ",
        absl::FormatDuration(options.ended_peer_notification_retention), " is negative"));
  }
  if (options.pool_memory != PoolMemorySource::kUcxAllocated &&
      options.pool_memory != PoolMemorySource::kAnonymousMmap) {
    return absl::InvalidArgumentError(absl::StrCat("AgentOptions.pool_memory = ",
                                                   static_cast<int>(options.pool_memory),
                                                   " is not a PoolMemorySource"));
  }
  if (options.kernel_copy_threads < 1 ||
      options.kernel_copy_threads > internal::KernelCopier::kMaxThreads) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AgentOptions.kernel_copy_threads = ", options.kernel_copy_threads,
        " is not between 1 and ", internal::KernelCopier::kMaxThreads));
  }
  KVFERRY_ASSIGN_OR_RETURN(std::unique_ptr<CompletionQueue> completions,
                           CompletionQueue::Create(options.max_queued_completions));
  LedgerPtr ledger = Access::MakeLedger(options.name);
  Context::Options copts;
  copts.name = options.name;
  copts.config = options.ucx_config;
  copts.ledger = ledger;
  copts.keepalive_interval = std::max(options.peer_timeout / 4, absl::Milliseconds(100));
  // sysv first: its segments are what UCX's shared-memory transports can map
  // in a peer; then plain anonymous memory (see UcxSettings::alloc_prio).
  if (options.pool_memory == PoolMemorySource::kUcxAllocated) copts.alloc_prio = "md:sysv,mmap";
  KVFERRY_ASSIGN_OR_RETURN(ContextPtr context, Context::Create(copts, site));
  KVFERRY_ASSIGN_OR_RETURN(WorkerPtr worker, Worker::Create(context, site));
  std::unique_ptr<AgentImpl> impl(new AgentImpl(std::move(options), std::move(ledger),
                                                std::move(context), std::move(worker),
                                                ReadHostId()));
  impl->completions_ = std::move(completions);
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
      incarnation_(static_cast<uint64_t>(absl::ToUnixNanos(absl::Now()))),
      link_(new AgentLink(this)),
      context_(std::move(context)),
      worker_(std::move(worker)),
      copier_(std::make_unique<KernelCopier>(
          [this] {
            return KernelCopyPath::Fresh(connections_serviced(), absl::Now(),
                                         options_.peer_timeout);
          },
          [this] { worker_->Signal(); }, options_.kernel_copy_threads)) {}

AgentImpl::~AgentImpl() {
  // From here on, Transfer handles no longer reach this agent (a handle
  // inside it, e.g. in Cancel, finishes first).
  link_->Detach();
  stop_.store(true, std::memory_order_release);
  worker_->Signal();
  if (progress_thread_.joinable()) progress_thread_.join();
  {
    ControlLock l(this);
    DataLock u(this);
    ShutdownLocked();
    pools_.clear();
  }
  copier_.reset();  // idle: every transfer ended above; it signals worker_
  worker_.reset();
  context_.reset();
  CheckSurvivors();
}

void AgentImpl::Log(LogSeverity severity, absl::string_view line) const {
  LogRecord record{severity, options_.name, std::string(line)};
  if (options_.log_sink) {
    options_.log_sink(record);
  } else {
    LogToProcessSink(record);
  }
}

void AgentImpl::LogRefusal(absl::string_view line) {
  constexpr int kPerSecond = 10;
  const absl::Time now = absl::Now();
  if (now - refusal_window_ >= absl::Seconds(1)) {
    if (refusals_suppressed_ > 0) {
      Log(LogSeverity::kWarning,
          absl::StrCat(refusals_suppressed_, " more refused connections not logged"));
    }
    refusal_window_ = now;
    refusals_logged_ = 0;
    refusals_suppressed_ = 0;
  }
  if (refusals_logged_ < kPerSecond) {
    ++refusals_logged_;
    Log(LogSeverity::kWarning, line);
  } else {
    ++refusals_suppressed_;
  }
}

void AgentImpl::ShutdownLocked() {
  shutting_down_ = true;
  listen_fd_.Reset();
  listen_tracked_.Reset();
  for (const PeerPtr& peer : peers_.Snapshot()) {
    if (peer->state() == PeerState::kConnected) {
      SendLocked(*peer, {.type = wire::MessageType::kBye});
    }
    ClosePeerLocked(
        peer, PeerState::kClosed,
        WithReason(absl::CancelledError(absl::StrCat("agent '", options_.name, "' shut down")),
                   EndReason::kAgentShutDown),
        /*graceful=*/peer->state() == PeerState::kConnected);
  }
  // Fence: nothing leaves before UCX is done with it.
  absl::Time warn_at = absl::Now() + absl::Seconds(10);
  while (!in_flight_.empty() || !closing_.empty()) {
    ProgressLocked();
    if (absl::Now() > warn_at) {
      Log(LogSeverity::kWarning,
          absl::StrCat("waiting for ", in_flight_.size(),
                       " transfers whose operations UCX has not completed (and ",
                       closing_.size(), " data endpoints closing); their blocks stay "
                       "pinned until it does"));
      warn_at = absl::Now() + absl::Seconds(10);
    }
  }
  // Every offer ended with its peer above; none can outlive the agent.
  ApplyOfferDecisionsLocked(offers_.EndAll(
      WithReason(absl::CancelledError(absl::StrCat("agent '", options_.name, "' shut down")),
                 EndReason::kAgentShutDown)));
  peers_.Clear();
}

void AgentImpl::CheckSurvivors() const {
  Stats stats = ledger_->Snapshot();
  if (stats.TotalLive() == 0 || options_.leak_policy == LeakPolicy::kIgnore) return;
  std::string report = ledger_->Report();
  if (!report.empty() && report.back() == '\n') report.pop_back();
  Log(options_.leak_policy == LeakPolicy::kAbort ? LogSeverity::kError : LogSeverity::kWarning,
      absl::StrCat("destroyed while ", stats.TotalLive(), " objects it created are still alive:\n",
                   report));
  if (options_.leak_policy == LeakPolicy::kAbort) std::abort();
}

absl::StatusOr<KvPool*> AgentImpl::CreatePool(std::string name, const KvLayout& layout,
                                              bool exported, SourceLocation site) {
  ControlLock l(this);
  DataLock u(this);
  if (pools_.contains(name)) {
    return absl::AlreadyExistsError(absl::StrCat("a pool named '", name, "' already exists"));
  }
  KVFERRY_ASSIGN_OR_RETURN(PoolCorePtr core,
                           PoolCore::Create(context_, name, layout, exported,
                                            options_.pool_memory, options_.populate_pools,
                                            site));
  return AddPoolLocked(std::move(core));
}

absl::StatusOr<KvPool*> AgentImpl::RegisterPool(std::string name, const KvLayout& layout,
                                                std::span<const KvRegion> regions,
                                                MemoryType memory_type, bool exported,
                                                SourceLocation site) {
  ControlLock l(this);
  DataLock u(this);
  if (pools_.contains(name)) {
    return absl::AlreadyExistsError(absl::StrCat("a pool named '", name, "' already exists"));
  }
  for (const auto& [other_name, other] : pools_) {
    for (const PoolRegion& theirs : Access::Pool(*other).regions()) {
      for (size_t i = 0; i < regions.size(); ++i) {
        const auto* mine = static_cast<const std::byte*>(regions[i].base);
        if (mine != nullptr && mine < theirs.base + theirs.length &&
            theirs.base < mine + regions[i].length) {
          return absl::InvalidArgumentError(absl::StrCat(
              "pool '", name, "': region ", i, " [0x", absl::Hex(mine), ", +", regions[i].length,
              ") overlaps pool '", other_name, "'"));
        }
      }
    }
  }
  KVFERRY_ASSIGN_OR_RETURN(PoolCorePtr core,
                           PoolCore::Register(context_, name, layout, regions, memory_type,
                                              exported, site));
  return AddPoolLocked(std::move(core));
}

KvPool* AgentImpl::AddPoolLocked(PoolCorePtr core) {
  std::string name = core->name();
  Access::OwnedPool pool = Access::MakePool(std::move(core));
  KvPool* raw = pool.get();
  pools_.emplace(name, std::move(pool));
  if (raw->exported()) {
    AnnouncePoolLocked(Access::Pool(*raw));
    // A POOL_ADDED the socket did not take at once waits for the progress
    // thread's POLLOUT: make it poll again (it may sleep until a timer).
    worker_->Signal();
  }
  return raw;
}

absl::Status AgentImpl::RemovePool(absl::string_view name, absl::Duration timeout) {
  KVFERRY_RETURN_IF_ERROR(wire::ValidateName("RemovePool: pool name", name));
  if (timeout < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("RemovePool('", name, "'): timeout ",
                                                   absl::FormatDuration(timeout),
                                                   " is negative"));
  }
  ControlLock l(this);
  auto found = pools_.find(name);
  if (found == pools_.end()) {
    return absl::NotFoundError(absl::StrCat("RemovePool: no pool named '", name, "'"));
  }
  // Held by this call until the end: the pool's KvPool may go meanwhile
  // only through this call (a second RemovePool is refused below).
  PoolCorePtr pool(&Access::Pool(*found->second));
  if (pool->removing()) {
    return absl::FailedPreconditionError(
        absl::StrCat("RemovePool: pool '", name, "' is already being removed"));
  }
  pool->SetRemoving(true);
  if (pool->exported()) {
    DataLock u(this);
    AnnouncePoolRemovedLocked(*pool);
    worker_->Signal();  // a POOL_REMOVED not sent at once waits for POLLOUT
  }
  const uint32_t blocks = pool->layout().num_blocks;
  // Every block back, and none named by a transfer posted by ids.
  auto all_back = [&pool, blocks] {
    return pool->free_blocks() == blocks && pool->busy_blocks() == 0;
  };
  // Blocks come back when a transfer or offer ends (under mu_, which wakes
  // the wait) or when the application drops a BlockSet (which does not):
  // hence the short slices.
  const absl::Time deadline = absl::Now() + timeout;
  while (!all_back() && absl::Now() < deadline) {
    AwaitLocked(all_back, std::min(deadline - absl::Now(), absl::Milliseconds(20)));
  }
  if (!all_back()) {
    const std::string why = absl::StrCat("pool '", name, "' was removed (RemovePool) after ",
                                         absl::FormatDuration(timeout), " while this used it");
    const std::vector<uint64_t> offers = offers_.OffersOn(*pool);
    for (uint64_t id : offers) {
      ApplyOfferDecisionsLocked(
          offers_.Revoke(id, OfferState::kRevoked,
                         WithReason(absl::FailedPreconditionError(why), EndReason::kPoolRemoved)));
    }
    const int transfers = CancelTransfersOnLocked(*pool, why);
    if (!offers.empty() || transfers > 0) {
      Log(LogSeverity::kWarning,
          absl::StrCat("RemovePool('", name, "'): ", transfers, " transfers and ", offers.size(),
                       " offers still used the pool after ", absl::FormatDuration(timeout),
                       "; cancelling and revoking them"));
    }
    auto fenced = [this, &pool]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, kAgentControl) {
      return TransfersOnLocked(*pool) == 0 && offers_.OffersOn(*pool).empty();
    };
    AwaitLocked(fenced, absl::InfiniteDuration());
    // Blocks a transfer or offer let go of are back by now; give the
    // application's own releases one more slice.
    AwaitLocked(all_back, absl::Milliseconds(20));
    if (!all_back()) {
      const uint32_t leased = blocks - pool->free_blocks();
      pool->SetRemoving(false);
      if (pool->exported()) {
        DataLock u(this);
        AnnouncePoolLocked(*pool);
        worker_->Signal();
      }
      return absl::FailedPreconditionError(absl::StrCat(
          "RemovePool: ", leased, " of ", blocks, " blocks of pool '", name,
          "' are still leased by BlockSets after ", absl::FormatDuration(timeout),
          "; release them and call again (the pool stays registered)"));
    }
  }
  DataLock u(this);
  // Found again: the map may have changed while the wait let go of mu_.
  auto it = pools_.find(name);
  Access::OwnedPool owned = std::move(it->second);
  pools_.erase(it);
  owned.reset();
  pool.reset();  // the last reference: deregistered (and freed) here
  return absl::OkStatus();
}

KvPool* AgentImpl::FindPool(absl::string_view name) const {
  ControlLock l(this);
  auto it = pools_.find(name);
  return it == pools_.end() ? nullptr : it->second.get();
}

std::vector<std::pair<std::string, KvLayout>> AgentImpl::ExportedPools() const {
  std::vector<std::pair<std::string, KvLayout>> out;
  {
    ControlLock l(this);
    for (const auto& [name, pool] : pools_) {
      if (pool->exported() && !Access::Pool(*pool).removing()) {
        out.emplace_back(name, pool->layout());
      }
    }
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  return out;
}

bool AgentImpl::OwnsPoolLocked(const PoolCore* pool) const {
  for (const auto& [name, p] : pools_) {
    if (&Access::Pool(*p) == pool) return true;
  }
  return false;
}

int AgentImpl::Progress() {
  ControlLock l(this);
  DataLock u(this);
  return ProgressLocked();
}

// Bounded, so that a long stream of UCX events (an emulated transfer moves
// its bytes through many) cannot starve the control plane: pings and
// handshakes go on while data moves.
constexpr int kMaxWorkerRounds = 256;

// A gap this long between two moments of a progress pass means the thread
// did not run meanwhile (the process was stopped, or starved).
constexpr absl::Duration kStallGap = absl::Milliseconds(100);

int AgentImpl::DataPassLocked(int rounds, absl::Time looked) {
  int n = DrainSubmissionsLocked();
  // Ends early after a stall, so that the control pass looks at the peers
  // before UCX does (see ProgressThreadMain).
  absl::Time last = std::min(looked, absl::Now());
  for (int i = 0; i < rounds; ++i) {
    const absl::Time now = absl::Now();
    if (now - last > kStallGap) break;
    if (worker_->Progress() == 0) break;
    ++n;
    last = absl::Now();
  }
  return n;
}

int AgentImpl::ProgressLocked() {
  // Submissions first: the transfers on in_flight_ are then all posted.
  return DataPassLocked(kMaxWorkerRounds) + ControlPassLocked();
}

int AgentImpl::ControlPassLocked() {
  int n = AcceptLocked();
  n += ServiceConnectionsLocked();
  CheckPeersLocked();
  n += AdvanceClosesLocked();
  AdvanceTransfersLocked();
  SendAllWaitingNotesLocked();
  CheckOffersLocked();
  return n;
}

void AgentImpl::WakeProgressThread() {
  // Pairs with the progress thread's store of sleeping_ before it looks at
  // the queue one last time: either it sees the submission or this sees it
  // sleeping.
  if (sleeping_.load(std::memory_order_seq_cst)) worker_->Signal();
}

int AgentImpl::IdleWaitLocked(std::vector<pollfd>* fds) const {
  fds->clear();
  fds->push_back({worker_->wake_fd(), POLLIN, 0});
  if (worker_->event_fd() >= 0) fds->push_back({worker_->event_fd(), POLLIN, 0});
  // A listener whose accept() failed stays readable (the connection waits
  // in the backlog): not polled until its pause ends (a timer below).
  const absl::Time now = absl::Now();
  const bool accept_paused = listen_fd_.valid() && now < accept_paused_until_;
  if (listen_fd_.valid() && !accept_paused) fds->push_back({listen_fd_.get(), POLLIN, 0});
  for (const PeerPtr& peer : peers_.All()) {
    if (peer->control().conn() == nullptr || !peer->control().conn()->open()) continue;
    short events = POLLIN;
    if (peer->control().reading_paused()) {
      // Its frames wait unread: only a close is watched for, until seen.
      if (peer->control().paused_hangup_deadline() != absl::InfiniteFuture()) continue;
      events = POLLRDHUP;
    }
    if (peer->control().conn()->wants_write()) events |= POLLOUT;
    fds->push_back({peer->control().conn()->fd(), events, 0});
  }
  // In-flight transfers, data-path wireups and endpoint closes are checked
  // every millisecond (a transport may complete without waking the event
  // fd). (Transfers held for their notification wait for their
  // connection's POLLOUT instead.)
  if (static_cast<int64_t>(in_flight_.size()) > notifications_held_ ||
      worker_->event_fd() < 0 || !closing_.empty()) {
    return 1;
  }
  // A peer on the emulated shared-memory path (am-emulated) reaches this
  // agent's memory through active messages that this worker answers; a
  // reply that found the peer's FIFO full waits in UCX for a progress call,
  // and no event says when it may go on (over tcp, the socket's event
  // does). So while such a peer is connected, progress at least every
  // 100 ms, as before the progress thread slept until its timers.
  bool emulated_peer = false;
  // Otherwise the nearest timer sets the wait: a ping due, a peer's
  // liveness or handshake deadline, an offer's deadline; and at least every
  // peer_timeout / 4, UCX's keepalive interval (src/ucx/context.h).
  absl::Time wake = now + std::max(options_.peer_timeout / 4, absl::Milliseconds(100));
  if (accept_paused) wake = std::min(wake, accept_paused_until_);
  for (const PeerPtr& peer : peers_.All()) {
    if (peer->state() == PeerState::kHandshaking) {
      // (Authenticated while handshaking: the client's data path is wiring up.)
      if (peer->control().handshake().stage() == Handshake::Stage::kAuthenticated) return 1;
      wake = std::min(wake, peer->control().handshake().deadline());
      continue;
    }
    if (peer->state() != PeerState::kConnected) continue;
    if (!peer->link().wireup().empty()) return 1;  // the listener's data path wiring up
    emulated_peer = emulated_peer || peer->link().serves_emulated();
    wake = std::min(wake, peer->control().last_ping() + options_.peer_timeout / 4);
    wake = std::min(wake, peer->control().reading_paused()
                              ? peer->control().paused_hangup_deadline()
                              : peer->control().last_heard() + options_.peer_timeout);
  }
  wake = NotificationWakeLocked(wake);  // retention timer; a paused peer polled for
  if (!offers_.empty()) wake = std::min(wake, NextOfferDeadlineLocked());
  if (emulated_peer) wake = std::min(wake, now + absl::Milliseconds(100));
  // Rounded up: a timer is never served before it is due, so no spin.
  const int64_t ms = absl::ToInt64Milliseconds(absl::Ceil(wake - now, absl::Milliseconds(1)));
  return static_cast<int>(std::clamp<int64_t>(ms, 1, 60 * 1000));
}

void AgentImpl::ProgressThreadMain() {
  // Idle passes to run after work before sleeping: a transfer's completion,
  // or UCX's own queued sends (emulated RMA replies), may not wake the
  // event fd.
  constexpr int kBusyPasses = 64;
  // While those idle passes spin with nothing in flight, the control pass
  // (which holds mu_, the lock every post takes) runs only every this many
  // of them: a post then rarely waits for it. The data pass still drains
  // each submission at once, and its work brings the control pass back.
  constexpr int kControlEvery = 8;
  bool quiet = false;  // the last control pass saw no transfer and no close in flight
  (void)pthread_setname_np(pthread_self(), kProgressThreadName);
  int idle = 0;
  std::vector<pollfd> fds;
  // After a sleep or a stall, the control pass comes before UCX's: a peer
  // that left meanwhile (its connection ended, or silent past peer_timeout)
  // is closed first, its data endpoint force-closed, and UCX then drops the
  // emulated puts it still had on the way to this worker. Answered instead,
  // a put of a peer whose connection is gone aborts the process in UCX 1.13
  // (ucp_put_handler: "unexpected error: Endpoint timeout").
  // A control pass in which the thread stalled does not count: `looked` is
  // when the last one began, so a stall inside it shows as a gap too.
  bool control_first = false;
  absl::Time looked = absl::Now();
  while (!stop_.load(std::memory_order_acquire)) {
    int n = 0;
    if (control_first || absl::Now() - looked > kStallGap) {
      ControlLock l(this);
      DataLock u(this);
      looked = absl::Now();
      n += ControlPassLocked();
      control_first = false;
    }
    {
      // The data pass: without mu_, so callers' PostTransfer and the
      // control pass of other threads never wait for UCX's copies.
      DataLock u(this);
      if (auto* hook = data_pass_test_hook.load(std::memory_order_acquire)) hook();
      n += DataPassLocked(kMaxWorkerRounds, looked);
    }
    if (n == 0 && quiet && idle > 0 && idle < kBusyPasses && idle % kControlEvery != 0) {
      ++idle;
      continue;
    }
    int timeout_ms = -1;
    {
      // The control pass, short: sockets, timers, fencing. A submission
      // queued since the data pass waits for the next one.
      ControlLock l(this);
      DataLock u(this);
      looked = absl::Now();
      n += ControlPassLocked();
      quiet = in_flight_.empty() && closing_.empty();
      if (n > 0) {
        idle = 0;
      } else if (++idle > kBusyPasses) {
        sleeping_.store(true, std::memory_order_seq_cst);
        bool queued;
        {
          internal::MutexLock q(&submit_mu_);
          queued = !submissions_.empty();
        }
        if (!queued && worker_->Arm()) {
          timeout_ms = IdleWaitLocked(&fds);
        } else {
          sleeping_.store(false, std::memory_order_relaxed);
        }
      }
    }
    if (timeout_ms >= 0) {
      (void)poll(fds.data(), fds.size(), timeout_ms);
      sleeping_.store(false, std::memory_order_relaxed);
      if (fds[0].revents != 0) worker_->ClearSignal();
      idle = 0;
      control_first = true;
    }
  }
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
uint64_t Agent::incarnation() const { return impl_->incarnation(); }
std::vector<std::pair<std::string, KvLayout>> Agent::ExportedPools() const {
  return impl_->ExportedPools();
}

absl::StatusOr<KvPool*> Agent::CreatePool(std::string name, const KvLayout& layout,
                                          bool exported, SourceLocation site) {
  return impl_->CreatePool(std::move(name), layout, exported, site);
}

absl::StatusOr<KvPool*> Agent::RegisterPool(std::string name, const KvLayout& layout,
                                            std::span<const KvRegion> regions, bool exported,
                                            MemoryType memory_type, SourceLocation site) {
  return impl_->RegisterPool(std::move(name), layout, regions, memory_type, exported, site);
}

KvPool* Agent::FindPool(absl::string_view name) const { return impl_->FindPool(name); }
absl::Status Agent::RemovePool(absl::string_view name, absl::Duration timeout) {
  return impl_->RemovePool(name, timeout);
}
absl::Status Agent::FenceBlocks(absl::string_view pool, std::span<const uint32_t> ids,
                                absl::Duration timeout) {
  return impl_->FenceBlocks(pool, ids, timeout);
}
int Agent::Progress() { return impl_->Progress(); }
Stats Agent::GetStats() const { return impl_->GetStats(); }
ListenerStats Agent::GetListenerStats() const { return impl_->GetListenerStats(); }
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

absl::StatusOr<kvferry::Offer> Agent::Offer(const BlockSet& blocks, const std::string& peer,
                                            absl::Duration ttl, SourceLocation site) {
  KVFERRY_ASSIGN_OR_RETURN(internal::OfferCorePtr core,
                           impl_->MakeOffer(blocks, peer, ttl, site));
  return kvferry::Offer(std::move(core));
}

absl::Status Agent::ReleaseOffer(const std::string& ticket) {
  return impl_->ReleaseOffer(ticket);
}

Transfer::Transfer() noexcept = default;
Transfer::Transfer(boost::intrusive_ptr<internal::TransferCore> core) noexcept
    : core_(std::move(core)) {}
Transfer::Transfer(Transfer&&) noexcept = default;
Transfer& Transfer::operator=(Transfer&&) noexcept = default;
Transfer::~Transfer() = default;

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
int Agent::completion_fd() const { return impl_->completion_fd(); }
Completions Agent::PollCompletions() { return impl_->PollCompletions(); }

}  // namespace kvferry
