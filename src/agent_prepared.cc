// AgentImpl: prepared descriptor lists (kvferry/prepared.h). Prepare
// resolves a pool (and a peer) once and computes every descriptor's
// offsets; PostPrepared checks that what was resolved is still current,
// builds the copies by addition and hands them to the ordinary post path
// (EnqueueTransferLocked), so fencing, in-flight counts and telemetry are
// those of a transfer posted by block ids.
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "src/agent_impl.h"
#include "src/end_reason_internal.h"
#include "src/status_macros.h"

namespace kvferry::internal {
namespace {

std::string Describe(const PreparedCore& list) {
  return list.remote() ? absl::StrCat("remote list of peer '", list.peer(), "' pool '", list.pool(),
                                      "' (", list.blocks().size(), " descriptors)")
                       : absl::StrCat("local list of pool '", list.pool(), "' (",
                                      list.blocks().size(), " descriptors)");
}

// The same status code and reason, its message prefixed with `where`.
absl::Status Prefixed(absl::string_view where, const absl::Status& status) {
  return WithReason(absl::Status(status.code(), absl::StrCat(where, status.message())),
                    ReasonOf(status));
}

absl::Status CheckIndices(std::span<const uint32_t> indices, size_t size, const char* side) {
  for (size_t i = 0; i < indices.size(); ++i) {
    if (indices[i] >= size) {
      return absl::OutOfRangeError(absl::StrCat(side, " index ", indices[i], " (position ", i,
                                                ") is past the ", side, " list's ", size,
                                                " descriptors"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PreparedCorePtr> AgentImpl::Prepare(const PrepareSpec& spec, SourceLocation site) {
  const bool remote = !spec.peer.empty();
  if (spec.pool.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PrepareSpec.pool is empty: name the ", remote ? "peer's" : "local", " pool"));
  }
  if (spec.blocks.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("PrepareSpec.blocks is empty (pool '", spec.pool, "')"));
  }
  if (spec.slice_bytes == 0 && spec.slice_offset != 0) {
    return absl::InvalidArgumentError(absl::StrCat("PrepareSpec.slice_offset ", spec.slice_offset,
                                                   " without slice_bytes: set the slice's length"));
  }
  Tracked tracked(ledger_, ResourceKind::kPreparedList, site);
  PreparedCore::Contents c;
  c.agent = link_;
  c.remote = remote;
  c.peer = spec.peer;
  c.pool = spec.pool;
  {
    ControlLock l(this);
    if (!remote) {
      auto found = pools_.find(spec.pool);
      if (found == pools_.end()) {
        return absl::NotFoundError(
            absl::StrCat("PrepareSpec.pool: this agent has no pool '", spec.pool, "'"));
      }
      PoolCore& pool = Access::Pool(*found->second);
      if (pool.removing()) return pool.RemovingError();
      c.local_pool = PoolCorePtr(&pool);
      c.layout = pool.layout();
      c.num_regions = pool.regions().size();
    } else {
      KVFERRY_ASSIGN_OR_RETURN(PeerPtr peer, PeerForWorkLocked(spec.peer));
      const RemotePool* pool = peer->FindPool(spec.pool);
      if (pool == nullptr) {
        return absl::NotFoundError(
            absl::StrCat("peer '", spec.peer, "' exports no pool '", spec.pool, "'"));
      }
      c.peer_id = peer->id();
      c.keys = pool->keys.get();
      c.desc = pool->desc();
      c.layout = pool->desc().layout;
      c.num_regions = pool->desc().regions.size();
    }
  }
  const KvLayout& layout = c.layout;
  const uint64_t chunk = layout.chunk_bytes();
  if (spec.slice_bytes != 0) {
    const uint64_t head = layout.head_bytes();
    if (spec.slice_offset % head != 0 || spec.slice_bytes % head != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "PrepareSpec.slice_offset ", spec.slice_offset, " and slice_bytes ", spec.slice_bytes,
          " must be whole heads (multiples of ", head, " bytes) of pool '", spec.pool, "'"));
    }
    if (spec.slice_offset > chunk || spec.slice_bytes > chunk - spec.slice_offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          "PrepareSpec.slice_offset ", spec.slice_offset, " + slice_bytes ", spec.slice_bytes,
          " is past the ", chunk, "-byte chunk of pool '", spec.pool, "'"));
    }
  }
  c.slice_offset = spec.slice_offset;
  c.bytes = spec.slice_bytes == 0 ? chunk : spec.slice_bytes;
  c.blocks.assign(spec.blocks.begin(), spec.blocks.end());
  c.offsets.resize(spec.blocks.size());
  for (size_t i = 0; i < spec.blocks.size(); ++i) {
    const uint32_t id = spec.blocks[i];
    if (id >= layout.num_blocks) {
      return absl::OutOfRangeError(absl::StrCat(
          "PrepareSpec.blocks[", i, "]: block id ", id, " is past the end of ",
          remote ? absl::StrCat("peer '", spec.peer, "' pool '") : std::string("pool '"),
          spec.pool, "' (", layout.num_blocks, " blocks)"));
    }
    c.offsets[i] = uint64_t{id} * chunk + spec.slice_offset;
  }
  c.planes.reserve(size_t{layout.num_layers} * layout.num_planes());
  for (uint32_t layer = 0; layer < layout.num_layers; ++layer) {
    for (uint32_t plane = 0; plane < layout.num_planes(); ++plane) {
      c.planes.push_back(LocatePlane(layout, c.num_regions, layer, plane));
    }
  }
  return PreparedCorePtr(new PreparedCore(std::move(tracked), std::move(c)));
}

absl::StatusOr<TransferCorePtr> AgentImpl::PostPrepared(const PreparedCore& local,
                                                        std::span<const uint32_t> local_indices,
                                                        const PreparedCore& remote,
                                                        std::span<const uint32_t> remote_indices,
                                                        const PreparedPost& post,
                                                        SourceLocation site) {
  if (local.agent() != link_ || remote.agent() != link_) {
    return absl::InvalidArgumentError(
        absl::StrCat("the ", local.agent() != link_ ? Describe(local) : Describe(remote),
                     " was prepared by another agent, not by agent '", options_.name, "'"));
  }
  if (local.remote()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the local side is a ", Describe(local), ": pass a local list"));
  }
  if (!remote.remote()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the remote side is a ", Describe(remote), ": pass a peer's list"));
  }
  if (post.op != TransferOp::kRead && post.op != TransferOp::kWrite) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PreparedPost.op ", static_cast<int>(post.op), " is neither kRead nor kWrite"));
  }
  if (local_indices.empty() || remote_indices.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "empty batch: ", local_indices.size(), " local and ", remote_indices.size(),
        " remote indices"));
  }
  if (local_indices.size() != remote_indices.size()) {
    return absl::InvalidArgumentError(absl::StrCat("batch pairs ", local_indices.size(),
                                                   " local indices with ",
                                                   remote_indices.size(), " remote indices"));
  }
  if (post.notification.size() > wire::kMaxPayloadBytes) {
    return absl::InvalidArgumentError(absl::StrCat("notification of ", post.notification.size(),
                                                   " bytes exceeds ", wire::kMaxPayloadBytes));
  }
  const KvLayout& here = local.layout();
  const KvLayout& there = remote.layout();
  const uint32_t layer_end =
      post.layer_end == std::numeric_limits<uint32_t>::max() ? here.num_layers : post.layer_end;
  if (post.layer_begin >= layer_end || layer_end > here.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer range [", post.layer_begin, ", ",
                                                   layer_end, ") is empty or past ",
                                                   here.num_layers, " layers"));
  }
  // Whole chunks on both sides need compatible layouts; anything else is a
  // head slice of head-sliced peers, of one length on both sides.
  const bool whole = local.bytes() == here.chunk_bytes() && remote.bytes() == there.chunk_bytes();
  if (!(whole && here.CheckCompatible(there).ok())) {
    if (absl::Status s = here.CheckHeadSliced(there); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("pool '", local.pool(), "' vs peer '",
                                                        remote.peer(), "' pool '", remote.pool(),
                                                        "': ", s.message()));
    }
    if (local.bytes() != remote.bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the ", Describe(local), " moves ", local.bytes(), " bytes per chunk but the ",
          Describe(remote), " ", remote.bytes(), ": prepare slices of one length"));
    }
  }
  KVFERRY_RETURN_IF_ERROR(CheckIndices(local_indices, local.blocks().size(), "local"));
  KVFERRY_RETURN_IF_ERROR(CheckIndices(remote_indices, remote.blocks().size(), "remote"));

  // The copies, planned without a lock: offsets were computed by Prepare.
  const size_t n = local_indices.size();
  const uint32_t planes = here.num_planes();
  std::vector<CopyOp> ops(n * (layer_end - post.layer_begin) * planes);
  CopyOp* op = ops.data();
  for (uint32_t layer = post.layer_begin; layer < layer_end; ++layer) {
    for (uint32_t plane = 0; plane < planes; ++plane) {
      const PlaneAt lp = local.planes()[size_t{layer} * planes + plane];
      const PlaneAt rp = remote.planes()[size_t{layer} * planes + plane];
      for (size_t i = 0; i < n; ++i) {
        *op++ = {lp.region, lp.offset + local.offsets()[local_indices[i]], rp.region,
                 rp.offset + remote.offsets()[remote_indices[i]], local.bytes()};
      }
    }
  }
  std::vector<uint32_t> local_ids(n);
  for (size_t i = 0; i < n; ++i) local_ids[i] = local.blocks()[local_indices[i]];

  WakeAfterUnlock wake{this};  // before the lock: wakes after it
  ControlLock l(this);
  PoolCore& pool = *local.local_pool();
  if (!OwnsPoolLocked(&pool)) {
    return WithReason(absl::FailedPreconditionError(absl::StrCat(
                          "the ", Describe(local), " is of a pool this agent removed")),
                      EndReason::kPoolRemoved);
  }
  if (pool.removing()) return pool.RemovingError();
  PeerPtr peer = peers_.FindById(remote.peer_id());
  const std::string where = absl::StrCat("the ", Describe(remote), ": ");
  if (peer == nullptr || peer->name() != remote.peer()) {
    if (PeerPtr now = peers_.Find(remote.peer())) {
      return WithReason(absl::FailedPreconditionError(absl::StrCat(
                            where, "peer '", remote.peer(),
                            "' connected again since the list was prepared; prepare it again")),
                        EndReason::kPeerDisconnected);
    }
    if (const PeerInfo* ended = peers_.FindEnded(remote.peer())) {
      return Prefixed(where, PeerGoneStatus(remote.peer(), ended->state, ended->status));
    }
    return WithReason(
        absl::FailedPreconditionError(absl::StrCat(where, "peer '", remote.peer(), "' is gone")),
        EndReason::kPeerDisconnected);
  }
  if (absl::Status takes = PeerTakesWorkLocked(*peer, remote.peer()); !takes.ok()) {
    return Prefixed(where, takes);
  }
  // The announcement the list was prepared on, still current: the same
  // keys (their address, on this connection) for the same descriptor.
  const RemotePool* target = nullptr;
  for (const RemotePool& p : peer->link().pools()) {
    if (p.keys.get() == remote.keys() && p.desc() == remote.desc()) {
      target = &p;
      break;
    }
  }
  if (target == nullptr) {
    return WithReason(
        absl::FailedPreconditionError(absl::StrCat(
            where, "peer '", remote.peer(), "' ",
            peer->FindPool(remote.pool()) != nullptr ? "replaced" : "no longer exports", " pool '",
            remote.pool(), "' since the list was prepared")),
        EndReason::kPoolRemoved);
  }
  TransferCorePtr core = EnqueueTransferLocked({.op = post.op,
                                                .peer = peer,
                                                .path = target->path,
                                                .local_pool = pool,
                                                .lease = nullptr,
                                                .id_pool = local.local_pool(),
                                                .local_ids = local_ids,
                                                .notification = post.notification,
                                                .layer_begin = post.layer_begin,
                                                .layer_end = layer_end,
                                                .offer_id = 0,
                                                .site = site},
                                               std::move(ops));
  SubmitQueuedLocked(wake);
  return core;
}

}  // namespace kvferry::internal

namespace kvferry {

PreparedList::PreparedList() noexcept = default;
PreparedList::PreparedList(boost::intrusive_ptr<internal::PreparedCore> core) noexcept
    : core_(std::move(core)) {}
PreparedList::PreparedList(PreparedList&&) noexcept = default;
PreparedList& PreparedList::operator=(PreparedList&&) noexcept = default;
PreparedList::~PreparedList() = default;

size_t PreparedList::size() const { return core_ ? core_->blocks().size() : 0; }
bool PreparedList::remote() const { return core_ && core_->remote(); }
const std::string& PreparedList::peer() const {
  static const std::string* const kEmpty = new std::string;
  return core_ ? core_->peer() : *kEmpty;
}
const std::string& PreparedList::pool() const {
  static const std::string* const kEmpty = new std::string;
  return core_ ? core_->pool() : *kEmpty;
}

absl::StatusOr<PreparedList> Agent::Prepare(const PrepareSpec& spec, SourceLocation site) {
  KVFERRY_ASSIGN_OR_RETURN(internal::PreparedCorePtr core, impl_->Prepare(spec, site));
  return PreparedList(std::move(core));
}

absl::StatusOr<Transfer> Agent::PostPrepared(const PreparedList& local,
                                             std::span<const uint32_t> local_indices,
                                             const PreparedList& remote,
                                             std::span<const uint32_t> remote_indices,
                                             const PreparedPost& post, SourceLocation site) {
  if (local.empty() || remote.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("empty PreparedList handle on the ",
                                                   local.empty() ? "local" : "remote", " side"));
  }
  KVFERRY_ASSIGN_OR_RETURN(internal::TransferCorePtr core,
                           impl_->PostPrepared(*local.core_, local_indices, *remote.core_,
                                               remote_indices, post, site));
  return Transfer(std::move(core));
}

}  // namespace kvferry
