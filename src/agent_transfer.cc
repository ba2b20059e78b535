// AgentImpl: posting transfers, fencing them, notifications.
#include <algorithm>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "src/agent_impl.h"
#include "src/end_reason_internal.h"
#include "src/status_macros.h"
#include "src/transfer_plan.h"
#include "src/ucx/status.h"

namespace kvferry::internal {
namespace {

// A cancel fences the whole peer (fails it, force-closing its endpoints)
// only after its operations have had at least this long and this many
// progress passes to drain, whatever grace the caller asked for: fencing
// ends every other transfer to that peer.
constexpr absl::Duration kMinCancelDrain = absl::Seconds(1);
constexpr int kMinCancelPasses = 64;

// How long a cancelled transfer may drain before its peer is fenced: at
// least the grace asked for and kMinCancelDrain. A READ over an emulated
// path (UCX runs the get as active messages the peer answers) is given
// `peer_timeout` instead: fencing it force-closes the endpoint while the
// peer still has get replies queued to this agent, and UCX 1.13 then
// fast-forwards those replies on the peer's side with a send state it never
// initialized (ucp_request_send_state_ff), which crashes the peer's process.
// Such a READ ends once its replies drained (its blocks are still leased by
// the transfer meanwhile); a peer that stops answering is failed by its
// liveness check within the same `peer_timeout`.
absl::Duration CancelDrain(const TransferCore& t, absl::Duration grace,
                           absl::Duration peer_timeout)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl) {
  absl::Duration drain = std::max(grace, kMinCancelDrain);
  if (t.work.op == TransferOp::kRead && t.peer != nullptr && t.peer->link().path_emulated()) {
    drain = std::max(drain, peer_timeout);
  }
  return drain;
}

// Each remote block at most once. A bitmap up to the largest id (block ids
// are dense), a hash set past a million.
absl::Status CheckDistinct(std::span<const uint32_t> ids, absl::string_view side = "remote") {
  auto twice = [side](uint32_t id) {
    return absl::InvalidArgumentError(absl::StrCat(side, " block ", id, " listed twice"));
  };
  const uint32_t max = *std::max_element(ids.begin(), ids.end());
  if (max < (1u << 20)) {
    std::vector<bool> seen(size_t{max} + 1);
    for (uint32_t id : ids) {
      if (seen[id]) return twice(id);
      seen[id] = true;
    }
    return absl::OkStatus();
  }
  absl::flat_hash_set<uint32_t> seen;
  for (uint32_t id : ids) {
    if (!seen.insert(id).second) return twice(id);
  }
  return absl::OkStatus();
}

// TransferSpec.slice_*: head-sliced layouts, whole heads, inside each chunk.
absl::Status CheckSlice(const TransferSpec& spec, const KvLayout& here, const KvLayout& there,
                        const std::string& local_name, const std::string& remote_name) {
  if (absl::Status s = here.CheckHeadSliced(there); !s.ok()) {
    return absl::FailedPreconditionError(absl::StrCat("pool '", local_name, "' vs peer pool '",
                                                      remote_name, "': ", s.message()));
  }
  const uint64_t head = here.head_bytes();
  auto check = [&](const char* side, const char* field, uint64_t offset, uint64_t chunk,
                   const std::string& pool) -> absl::Status {
    if (offset % head != 0 || spec.slice_bytes % head != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TransferSpec.", field, " ", offset, " and slice_bytes ", spec.slice_bytes,
          " must be whole heads (multiples of ", head, " bytes)"));
    }
    if (offset > chunk || spec.slice_bytes > chunk - offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TransferSpec.", field, " ", offset, " + slice_bytes ", spec.slice_bytes,
          " is past the ", chunk, "-byte chunk of ", side, " pool '", pool, "'"));
    }
    return absl::OkStatus();
  };
  KVFERRY_RETURN_IF_ERROR(check("local", "local_slice_offset", spec.local_slice_offset,
                                here.chunk_bytes(), local_name));
  return check("peer", "remote_slice_offset", spec.remote_slice_offset, there.chunk_bytes(),
               remote_name);
}

}  // namespace

absl::StatusOr<PeerPtr> AgentImpl::PeerForWorkLocked(const std::string& name) const {
  PeerPtr peer = peers_.Find(name);
  if (peer == nullptr) {
    if (const PeerInfo* ended = peers_.FindEnded(name)) {
      return PeerGoneStatus(name, ended->state, ended->status);
    }
    return absl::NotFoundError(absl::StrCat("unknown peer '", name, "'"));
  }
  KVFERRY_RETURN_IF_ERROR(PeerTakesWorkLocked(*peer, name));
  return peer;
}

absl::Status AgentImpl::PeerTakesWorkLocked(const Peer& peer, const std::string& name) const {
  if (peer.state() != PeerState::kConnected) {
    return PeerGoneStatus(name, peer.state(), peer.status());
  }
  if (peer.closing()) {
    return WithReason(absl::FailedPreconditionError(absl::StrCat(
                          "peer '", name, "' is being disconnected by this agent")),
                      EndReason::kPeerDisconnected);
  }
  return absl::OkStatus();
}

absl::StatusOr<TransferCorePtr> AgentImpl::PostTransfer(const TransferSpec& given,
                                                        SourceLocation site) {
  // On an offer, the ticket names the peer, pool and blocks.
  std::optional<wire::Ticket> ticket;
  absl::string_view ticket_body, ticket_tag;
  TransferSpec from_ticket;
  if (!given.remote_blocks.empty() && !given.remote_ids.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TransferSpec.remote_blocks (", given.remote_blocks.size(), " ids) and remote_ids (",
        given.remote_ids.size(), " ids) are both set: name the remote blocks in one of them"));
  }
  if (!given.offer_ticket.empty()) {
    if (!given.remote_blocks.empty() || !given.remote_ids.empty() ||
        !given.remote_pool.empty()) {
      return absl::InvalidArgumentError(
          "a transfer on an offer takes its pool and blocks from the ticket: leave "
          "TransferSpec.remote_pool, remote_blocks and remote_ids empty");
    }
    absl::StatusOr<wire::Ticket> decoded =
        wire::DecodeTicket(given.offer_ticket, &ticket_body, &ticket_tag);
    if (!decoded.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("TransferSpec.offer_ticket: ", decoded.status().message()));
    }
    ticket = *std::move(decoded);
    if (!given.peer.empty() && given.peer != ticket->offerer) {
      return absl::InvalidArgumentError(absl::StrCat("the ticket is an offer of agent '",
                                                     ticket->offerer, "', not of peer '",
                                                     given.peer, "'"));
    }
    from_ticket = given;
    from_ticket.peer = ticket->offerer;
    from_ticket.remote_pool = ticket->pool;
    KVFERRY_ASSIGN_OR_RETURN(from_ticket.remote_blocks,
                             SelectOfferBlocks(*ticket, given.offer_blocks));
  } else if (!given.offer_blocks.empty()) {
    return absl::InvalidArgumentError(
        "TransferSpec.offer_blocks selects blocks of an offer: it needs offer_ticket");
  }
  const TransferSpec& spec = ticket ? from_ticket : given;
  const std::span<const uint32_t> remote_ids =
      ticket ? std::span<const uint32_t>(from_ticket.remote_blocks)
             : (given.remote_ids.empty() ? std::span<const uint32_t>(given.remote_blocks)
                                         : given.remote_ids);
  // The local side: a lease, or block ids of a pool of this agent (held by
  // reference from here, so that a concurrent RemovePool cannot free it
  // under this call; whether it is still this agent's is checked under mu_).
  const bool by_ids = !spec.local_pool.empty() || !spec.local_blocks.empty();
  if (spec.local != nullptr && by_ids) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TransferSpec.local (a BlockSet) and local_pool '", spec.local_pool, "' / local_blocks (",
        spec.local_blocks.size(), " ids) are both set: name the local blocks in one form"));
  }
  PoolCorePtr id_pool;
  if (by_ids) {
    if (spec.local_pool.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TransferSpec.local_blocks (", spec.local_blocks.size(),
          " ids) needs local_pool, the pool they are in"));
    }
    if (spec.local_blocks.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "empty batch: no local blocks (TransferSpec.local_blocks, pool '", spec.local_pool,
          "')"));
    }
    ControlLock l(this);
    auto found = pools_.find(spec.local_pool);
    if (found == pools_.end()) {
      return absl::NotFoundError(absl::StrCat("TransferSpec.local_pool: this agent has no pool '",
                                              spec.local_pool, "'"));
    }
    id_pool = PoolCorePtr(&Access::Pool(*found->second));
  } else if (spec.local == nullptr || spec.local->empty()) {
    return absl::InvalidArgumentError(
        "empty batch: no local blocks (TransferSpec.local, or local_pool and local_blocks)");
  }
  const LeaseCore* lease = by_ids ? nullptr : Access::Lease(*spec.local);
  const std::span<const uint32_t> local_ids =
      by_ids ? spec.local_blocks : std::span<const uint32_t>(lease->ids());
  if (remote_ids.empty()) {
    return absl::InvalidArgumentError("empty batch: no remote blocks");
  }
  if (local_ids.size() != remote_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat("batch pairs ", local_ids.size(),
                                                   " local blocks with ",
                                                   remote_ids.size(), " remote blocks"));
  }
  if (spec.notification.size() > wire::kMaxPayloadBytes) {
    return absl::InvalidArgumentError(absl::StrCat("notification of ", spec.notification.size(),
                                                   " bytes exceeds ", wire::kMaxPayloadBytes));
  }
  if (spec.slice_bytes == 0 && (spec.local_slice_offset != 0 || spec.remote_slice_offset != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TransferSpec.local_slice_offset ", spec.local_slice_offset, " / remote_slice_offset ",
        spec.remote_slice_offset, " without slice_bytes: set the slice's length"));
  }
  PoolCore& local_pool = by_ids ? *id_pool : lease->pool();
  const KvLayout& layout = local_pool.layout();
  const uint32_t layer_end =
      spec.layer_end == std::numeric_limits<uint32_t>::max() ? layout.num_layers : spec.layer_end;
  if (spec.layer_begin >= layer_end || layer_end > layout.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer range [", spec.layer_begin, ", ",
                                                   layer_end, ") is empty or past ",
                                                   layout.num_layers, " layers"));
  }
  if (by_ids) {
    for (uint32_t id : local_ids) {
      if (id >= layout.num_blocks) {
        return absl::OutOfRangeError(absl::StrCat("local block id ", id,
                                                  " is past the end of pool '",
                                                  local_pool.name(), "' (", layout.num_blocks,
                                                  " blocks)"));
      }
    }
    if (absl::Status s = CheckDistinct(local_ids, "local"); !s.ok()) return s;
  }
  if (absl::Status s = CheckDistinct(remote_ids); !s.ok()) return s;
  const std::string& remote_pool_name =
      spec.remote_pool.empty() ? local_pool.name() : spec.remote_pool;

  WakeAfterUnlock wake{this};  // before the lock: wakes after it
  ControlLock l(this);
  // Take in what the offering peer said last (a revoke, a goodbye, its
  // connection closing) before trusting its ticket, unless the progress
  // thread is inside UCX: a post never waits for the data pass. What the
  // offerer said meanwhile is then taken in by the next pass, and a ticket
  // it ended fails the transfer there (the offerer reuses nothing before
  // this agent confirms, which waits for the transfers on the offer).
  if (ticket) {
    if (PeerPtr offerer = peers_.Find(ticket->offerer); offerer && TryLockData()) {
      ServiceConnectionLocked(offerer);
      UnlockData();
    }
    AwaitTicketBindingLocked(*ticket);
  }
  if (!OwnsPoolLocked(&local_pool)) {
    if (by_ids) {  // removed since it was looked up
      return absl::NotFoundError(absl::StrCat("TransferSpec.local_pool: this agent has no pool '",
                                              spec.local_pool, "'"));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "the BlockSet's pool '", local_pool.name(), "' belongs to another agent"));
  }
  if (local_pool.removing()) return local_pool.RemovingError();
  KVFERRY_ASSIGN_OR_RETURN(PeerPtr peer, PeerForWorkLocked(spec.peer));
  // A ticket is checked (made by this peer for this agent on this
  // connection, unaltered, not ended) before anything in it is used.
  std::optional<TicketUse> use;
  if (ticket) {
    KVFERRY_ASSIGN_OR_RETURN(use, CheckTicketLocked(*ticket, ticket_body, ticket_tag, *peer,
                                                    spec.layer_begin, layer_end));
  }
  const RemotePool* remote = peer->FindPool(remote_pool_name);
  if (remote == nullptr) {
    return absl::NotFoundError(absl::StrCat("peer '", spec.peer, "' exports no pool '",
                                            remote_pool_name, "'"));
  }
  if (spec.slice_bytes == 0) {
    if (absl::Status s = layout.CheckCompatible(remote->desc().layout); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "pool '", local_pool.name(), "' vs peer pool '", remote_pool_name, "': ", s.message(),
          layout.CheckHeadSliced(remote->desc().layout).ok()
              ? " (a head-sliced peer: name the heads with TransferSpec.slice_bytes)"
              : ""));
    }
  } else {
    KVFERRY_RETURN_IF_ERROR(
        CheckSlice(spec, layout, remote->desc().layout, local_pool.name(), remote_pool_name));
  }
  for (uint32_t id : remote_ids) {
    if (id >= remote->desc().layout.num_blocks) {
      return absl::OutOfRangeError(absl::StrCat("remote block id ", id, " is past the end of peer '",
                                                spec.peer, "' pool '", remote_pool_name, "' (",
                                                remote->desc().layout.num_blocks, " blocks)"));
    }
  }

  if (use && ticket->num_layers != remote->desc().layout.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the ticket covers ", ticket->num_layers, " layers but peer pool '", remote_pool_name,
        "' has ", remote->desc().layout.num_layers));
  }

  // Bounds are proven: every copy lies inside both exported arenas.
  std::vector<CopyOp> ops =
      PlanCopies(layout, local_pool.regions().size(), remote->desc().layout,
                 remote->desc().regions.size(), local_ids, remote_ids,
                 spec.layer_begin, layer_end,
                 {.local_offset = spec.local_slice_offset,
                  .remote_offset = spec.remote_slice_offset,
                  .bytes = spec.slice_bytes});
  if (use) NoteTicketPostedLocked(*peer, *use, ticket->num_layers, spec.layer_begin, layer_end);
  TransferCorePtr core = EnqueueTransferLocked(
      {.op = spec.op,
       .peer = peer,
       .path = remote->path,
       .local_pool = local_pool,
       .lease = lease,
       .id_pool = by_ids ? id_pool : nullptr,
       .local_ids = local_ids,
       .notification = spec.notification,
       .layer_begin = spec.layer_begin,
       .layer_end = layer_end,
       .offer_id = use ? use->offer_id : 0,
       .site = site},
      std::move(ops));
  SubmitQueuedLocked(wake);
  return core;
}

void AgentImpl::SubmitQueuedLocked(WakeAfterUnlock& wake) {
  if (options_.progress_thread) {
    wake.armed = true;
    return;
  }
  DataLock u(this);
  DrainSubmissionsLocked();
}

TransferCorePtr AgentImpl::EnqueueTransferLocked(const Enqueue& e, std::vector<CopyOp> ops) {
  TransferCorePtr core(new TransferCore(link_, Tracked(ledger_, ResourceKind::kTransfer, e.site),
                                        Tracked(ledger_, ResourceKind::kTransferHandle, e.site)));
  core->set_id(next_transfer_id_.fetch_add(1, std::memory_order_relaxed));
  core->peer = e.peer;
  if (e.lease == nullptr) {
    core->id_pool = e.id_pool;
    core->id_blocks.assign(e.local_ids.begin(), e.local_ids.end());
  } else {
    core->lease = LeaseCorePtr(const_cast<LeaseCore*>(e.lease));
  }
  core->notification = e.notification;
  core->work = WorkMetrics::Begin(e.op, ops);
  core->set_telemetry({.bytes = core->work.bytes,
                       .posted = core->work.started,
                       .data_path = e.path->kind() == RemotePoolPath::Kind::kKernelCopy
                                        ? std::string(kDataPathKernelCopy)
                                        : e.peer->link().path()});
  core->layer_begin = e.layer_begin;
  core->layer_end = e.layer_end;
  core->path = e.path;
  core->offer_id = e.offer_id;

  // What posting needs, copied out of the state mu_ guards: the progress
  // thread posts it without mu_.
  Submission sub;
  sub.core = core;
  sub.path = e.path;
  sub.batch.op = e.op;
  sub.batch.peer_name = e.peer->name();
  sub.batch.ops = std::move(ops);
  sub.batch.site = e.site;
  const std::vector<PoolRegion>& here = e.local_pool.regions();
  sub.batch.local.reserve(here.size());
  for (const PoolRegion& r : here) {
    sub.batch.local.emplace_back(r.base, r.registration.native_handle());
  }
  intrusive_ptr_add_ref(core.get());  // the list's reference
  in_flight_.push_back(*core);
  e.local_pool.Pin(e.local_ids);  // unpinned when fenced (EndTransferLocked)
  e.peer->link().BeginTransfer();
  {
    internal::MutexLock q(&submit_mu_);
    submissions_.push_back(std::move(sub));
  }
  return core;
}

int AgentImpl::DrainSubmissionsLocked() {
  std::vector<Submission> batch;
  {
    internal::MutexLock q(&submit_mu_);
    if (submissions_.empty()) return 0;
    batch.swap(submissions_);
  }
  for (Submission& s : batch) s.path->Post(*s.core, s.batch, worker_, *copier_);
  const int n = static_cast<int>(batch.size());
  batch.clear();  // drops path references under ucx_mu_
  return n;
}

void AgentImpl::AdvanceTransfersLocked() {
  if (in_flight_.empty()) return;  // the common idle pass of the progress loop
  const absl::Time now = absl::Now();
  for (auto it = in_flight_.begin(); it != in_flight_.end();) {
    TransferCore& t = *it++;
    // Every pass that holds mu_ and ucx_mu_ drains the queue first, and
    // posts are queued under mu_: this is a safety net only.
    if (!t.posted) continue;
    Peer& peer = *t.peer;
    // Its path says whether the copies may still move; a UCX copy cannot
    // once the peer's data endpoint was closed and fenced, a kernel copy
    // ends when the copier says so (RemotePoolPath::Check).
    ucs_status_t st = t.path->Check(
        t, /*endpoint_fenced=*/peer.state() != PeerState::kConnected && peer.link().fenced());
    if (st == UCS_INPROGRESS) {
      if (t.cancel) ++t.cancel_passes;
      if (t.cancel && now > t.cancel_deadline && t.cancel_passes >= kMinCancelPasses &&
          peer.state() == PeerState::kConnected) {
        // The copies did not drain in time: close the endpoints so that every
        // operation completes (with an error) and nothing can move afterwards.
        // The peer's other transfers end with this status (kUnavailable).
        t.cancel_fenced_peer = true;
        ClosePeerLocked(
            t.peer, PeerState::kFailed,
            absl::CancelledError(absl::StrCat(
                "Cancel(grace=", absl::FormatDuration(t.cancel_grace), ") of a transfer to peer '",
                peer.name(), "' forced a fence of the peer: its operations had not drained after ",
                absl::FormatDuration(CancelDrain(t, t.cancel_grace, options_.peer_timeout)),
                " and ", t.cancel_passes, " progress passes")),
            /*graceful=*/false);
      }
      continue;
    }
    if (st == UCS_OK && t.state() == TransferState::kInFlight && !t.cancel &&
        !t.notification.empty() && peer.state() == PeerState::kConnected &&
        peer.control().conn() != nullptr &&
        peer.control().conn()->queued_bytes() >= kHoldNotificationsAt) {
      // Backpressure: the copies are done, the notification waits for the
      // peer to read what is queued (the pass after its socket drains).
      t.flush.Reset();
      if (!t.notify_held) {
        t.notify_held = true;
        ++notifications_held_;
        ++notification_holds_;
      }
      continue;
    }
    t.flush.Reset();
    absl::Status copied;
    if (t.state() != TransferState::kInFlight) {
      EndTransferLocked(t, t.state(), t.status());  // failed while posting
    } else if (!(copied = t.path->Outcome(t)).ok()) {
      // A copy that failed because its peer went is the peer's end (the
      // path may have said so already, from UCX's status).
      const EndReason reason = peer.state() != PeerState::kConnected
                                   ? PeerEndReason(peer.state(), peer.status())
                               : ReasonOf(copied) != EndReason::kNone ? ReasonOf(copied)
                                                                      : EndReason::kTransportError;
      EndTransferLocked(t, TransferState::kFailed, WithReason(std::move(copied), reason));
    } else if (t.cancel) {
      // cancel_reason is set only by RemovePool.
      EndTransferLocked(
          t, TransferState::kCancelled,
          WithReason(t.cancel_fenced_peer
                         ? absl::CancelledError(absl::StrCat(
                               "transfer cancelled; it had not drained within Cancel(grace=",
                               absl::FormatDuration(t.cancel_grace), "), so peer '", peer.name(),
                               "' was failed to fence it (the peer's other transfers ended too)"))
                         : absl::CancelledError(t.cancel_reason.empty() ? "transfer cancelled"
                                                                        : t.cancel_reason),
                     t.cancel_reason.empty() ? EndReason::kCancelled : EndReason::kPoolRemoved));
    } else if (shutting_down_ && peer.state() == PeerState::kClosed &&
               absl::IsCancelled(peer.status())) {
      // This agent's own shutdown closed the peer, not the peer's failure.
      EndTransferLocked(
          t, TransferState::kFailed,
          WithReason(absl::CancelledError(absl::StrCat("agent '", options_.name,
                                                       "' shut down before its transfer to peer '",
                                                       peer.name(), "' completed")),
                     EndReason::kAgentShutDown));
    } else if (peer.state() != PeerState::kConnected) {
      EndTransferLocked(t, TransferState::kFailed,
                        PeerGoneStatus(peer.name(), peer.state(), peer.status()));
    } else if (const std::string* why =
                   t.offer_id != 0 ? OfferRevokedLocked(peer, t.offer_id) : nullptr) {
      // The offer ended while the copies ran: the peer may reuse the blocks
      // once this is fenced (it is), so what arrived cannot be trusted.
      EndTransferLocked(t, TransferState::kFailed,
                        WithReason(absl::AbortedError(*why),
                                   OfferRevokedReasonLocked(peer, t.offer_id)));
    } else if (st != UCS_OK) {
      EndTransferLocked(t, TransferState::kFailed,
                        WithReason(UcsToStatus(st, "transfer flush"), UcsFailureReason(st)));
    } else {
      // The data is visible at the peer (flushed); only now may it hear so.
      if (!t.notification.empty()) {
        SendLocked(peer, {.type = wire::MessageType::kNotify, .text = std::move(t.notification)});
      }
      EndTransferLocked(t, TransferState::kDone, absl::OkStatus());
    }
  }
}

void AgentImpl::EndTransferLocked(TransferCore& core, TransferState state, absl::Status status) {
  core.End(state, std::move(status));  // UCX is done with the copies
  TransferTelemetry telemetry = core.MarkTelemetryEnded(absl::Now());
  in_flight_.erase(in_flight_.iterator_to(core));
  if (core.notify_held) {
    core.notify_held = false;
    --notifications_held_;
  }
  PeerPtr peer = std::move(core.peer);
  work_metrics_.TransferEnded(peer->name(), peer->link().path(), core.work, core.state(),
                              core.status());
  if (core.offer_id != 0) OfferTransferEndedLocked(*peer, core, state, core.status());
  peer->link().EndTransfer();
  // Its copies are fenced: the keys may go (here, under ucx_mu_, if the
  // peer's pools were replaced or dropped meanwhile).
  core.path.reset();
  peer.reset();  // before a waiter can see the transfer released
  core.Untrack();
  // Fenced: the blocks' in-flight counts drop, and a lease's blocks may go
  // back to the pool.
  if (core.lease != nullptr) {
    core.lease->pool().Unpin(core.lease->ids());
  } else if (core.id_pool != nullptr) {
    core.id_pool->Unpin(core.id_blocks);
    core.id_pool.reset();
  }
  core.lease.reset();
  // Before the release: whoever saw Wait return finds the end recorded.
  completions_->TransferEnded(core.id(), core.state(), core.status(), std::move(telemetry));
  core.MarkReleased();
  intrusive_ptr_release(&core);  // the list's reference; may destroy `core`
}

int AgentImpl::CancelTransfersOnLocked(const PoolCore& pool, const std::string& why) {
  int n = 0;
  for (TransferCore& t : in_flight_) {
    if (t.local_pool() != &pool) continue;
    ++n;
    if (t.cancel) continue;
    t.cancel = true;
    t.cancel_grace = absl::ZeroDuration();
    t.cancel_deadline =
        absl::Now() + CancelDrain(t, absl::ZeroDuration(), options_.peer_timeout);
    t.cancel_reason = why;
  }
  return n;
}

int AgentImpl::TransfersOnLocked(const PoolCore& pool) const {
  int n = 0;
  for (const TransferCore& t : in_flight_) {
    if (t.local_pool() == &pool) ++n;
  }
  return n;
}

void AgentImpl::Cancel(TransferCore* core, absl::Duration grace) {
  ControlLock l(this);
  if (core->released()) return;
  core->cancel = true;
  core->cancel_grace = grace;
  core->cancel_deadline = absl::Now() + CancelDrain(*core, grace, options_.peer_timeout);
  auto ended = [core] { return core->released(); };
  if (options_.progress_thread) {
    worker_->Signal();
    mu_.Await(ended);
  } else {
    while (!ended()) {
      DataLock u(this);
      ProgressLocked();
    }
  }
}

void AgentImpl::TakeNotifications(std::vector<Notification>* out) {
  bool wake = false;
  {
    internal::MutexLock l(&notify_mu_);
    if (notifications_.empty()) return;
    out->reserve(out->size() + notifications_.size());
    for (QueuedNotification& q : notifications_) out->push_back(std::move(q.note));
    notifications_.clear();
    notifications_.shrink_to_fit();
    queued_by_peer_.clear();
    queued_notification_bytes_ = 0;
    next_notification_drop_ = absl::InfiniteFuture();
    wake = std::exchange(wake_on_poll_, false);
    completions_->SetNotificationsReady(false);
  }
  // A peer held back at its bound may be read again.
  if (wake) WakeProgressThread();
}

std::vector<Notification> AgentImpl::PollNotifications(absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  std::vector<Notification> out;
  if (!options_.progress_thread) {
    do {
      Progress();
      TakeNotifications(&out);
    } while (out.empty() && absl::Now() < deadline);
    return out;
  }
  {
    internal::MutexLock l(&notify_mu_);
    auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(notify_mu_) {
      return !notifications_.empty();
    };
    notify_mu_.AwaitWithDeadline(ready, deadline);
  }
  TakeNotifications(&out);
  return out;
}

Completions AgentImpl::PollCompletions() {
  if (!options_.progress_thread) Progress();
  Completions out;
  TakeNotifications(&out.notifications);
  completions_->Take(&out);
  return out;
}

bool AgentImpl::NotificationRoomLocked(const Peer& peer) const {
  internal::MutexLock l(&notify_mu_);
  auto it = queued_by_peer_.find(peer.id());
  if (it == queued_by_peer_.end() || it->second.count == 0) return true;  // one always fits
  // Room for one more of the largest a peer may send: the bound holds
  // before the frame is read.
  return it->second.count < options_.max_notifications_per_peer &&
         it->second.bytes + wire::kMaxPayloadBytes <= options_.max_notification_bytes_per_peer;
}

void AgentImpl::QueueNotificationLocked(const Peer& peer, std::string payload) {
  work_metrics_.NotificationReceived(payload.size());
  internal::MutexLock l(&notify_mu_);
  PeerNotifications& q = queued_by_peer_[peer.id()];
  if (q.name.empty()) q.name = peer.name();
  ++q.count;
  q.bytes += payload.size();
  queued_notification_bytes_ += payload.size();
  notifications_.push_back({peer.id(), {peer.name(), std::move(payload)}});
  completions_->SetNotificationsReady(true);
}

void AgentImpl::OrphanNotificationsLocked(const Peer& peer) {
  internal::MutexLock l(&notify_mu_);
  auto it = queued_by_peer_.find(peer.id());
  if (it == queued_by_peer_.end()) return;
  it->second.drop_after = absl::Now() + options_.ended_peer_notification_retention;
  next_notification_drop_ = std::min(next_notification_drop_, it->second.drop_after);
}

void AgentImpl::DropExpiredNotificationsLocked(absl::Time now) {
  std::vector<std::pair<std::string, PeerNotifications>> dropped;
  {
    internal::MutexLock l(&notify_mu_);
    if (now < next_notification_drop_) return;
    absl::flat_hash_set<uint64_t> expired;
    next_notification_drop_ = absl::InfiniteFuture();
    for (auto it = queued_by_peer_.begin(); it != queued_by_peer_.end();) {
      auto here = it++;
      if (here->second.drop_after <= now) {
        expired.insert(here->first);
        notifications_dropped_ += static_cast<int64_t>(here->second.count);
        queued_notification_bytes_ -= here->second.bytes;
        dropped.emplace_back(here->second.name, std::move(here->second));
        queued_by_peer_.erase(here);
      } else {
        next_notification_drop_ = std::min(next_notification_drop_, here->second.drop_after);
      }
    }
    std::erase_if(notifications_,
                  [&](const QueuedNotification& q) { return expired.contains(q.peer_id); });
    if (notifications_.empty()) {
      notifications_.shrink_to_fit();
      completions_->SetNotificationsReady(false);
    }
  }
  for (const auto& [name, q] : dropped) {
    Log(LogSeverity::kWarning,
        absl::StrCat("dropped ", q.count, " notifications (", q.bytes, " bytes) of peer '", name,
                     "': it ended and the application did not poll them within ",
                     absl::FormatDuration(options_.ended_peer_notification_retention),
                     " (ended_peer_notification_retention)"));
  }
}

absl::Time AgentImpl::NotificationWakeLocked(absl::Time wake) const {
  internal::MutexLock l(&notify_mu_);
  wake = std::min(wake, next_notification_drop_);
  for (const PeerPtr& peer : peers_.All()) {
    if (!peer->control().reading_paused()) continue;
    auto it = queued_by_peer_.find(peer->id());
    // Polled meanwhile (the pass that wakes for it resumes reading).
    if (it == queued_by_peer_.end() || it->second.count == 0) return absl::InfinitePast();
  }
  return wake;
}

Stats AgentImpl::GetStats() const {
  Stats s = ledger_->Snapshot();
  {
    ControlLock l(this);
    s.queues.peers_paused = peers_paused_;
    s.queues.notification_pauses = notification_pauses_;
    s.queues.notifications_held = notifications_held_;
    s.queues.notification_holds = notification_holds_;
  }
  internal::MutexLock n(&notify_mu_);
  s.queues.notifications_queued = static_cast<int64_t>(notifications_.size());
  s.queues.notification_bytes_queued = static_cast<int64_t>(queued_notification_bytes_);
  s.queues.notifications_dropped = notifications_dropped_;
  return s;
}

}  // namespace kvferry::internal

namespace kvferry {

uint64_t Transfer::id() const { return core_ ? core_->id() : 0; }

TransferState Transfer::state() const {
  return core_ ? core_->state() : TransferState::kEmpty;
}

absl::Status Transfer::status() const {
  return core_ ? core_->status() : absl::FailedPreconditionError("empty Transfer handle");
}

EndReason Transfer::reason() const { return core_ ? ReasonOf(core_->status()) : EndReason::kNone; }

TransferTelemetry Transfer::telemetry() const {
  return core_ ? core_->telemetry() : TransferTelemetry{};
}

absl::Status Transfer::Wait(absl::Duration timeout) {
  if (!core_) return absl::FailedPreconditionError("empty Transfer handle");
  return internal::WaitForRelease(*core_->link(), core_->outcome(), timeout,
                                  [] { return std::string("transfer still in flight"); });
}

absl::Status Transfer::Cancel(absl::Duration grace) {
  if (!core_) return absl::FailedPreconditionError("empty Transfer handle");
  {
    internal::AgentPin agent(core_->link().get());
    if (agent.get() != nullptr) agent.get()->Cancel(core_.get(), grace);
  }
  return core_->status();
}

}  // namespace kvferry
