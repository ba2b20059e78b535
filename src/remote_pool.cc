#include "src/remote_pool.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "src/end_reason_internal.h"
#include "src/kernel_copier.h"
#include "src/populate.h"
#include "src/region_extent.h"
#include "src/transfer_core.h"
#include "src/ucx/data_path.h"
#include "src/ucx/status.h"

namespace kvferry::internal {

absl::StatusOr<RemotePoolKeysPtr> RemotePoolKeys::Unpack(EndpointPtr endpoint,
                                                         wire::PoolDescriptor desc,
                                                         bool peer_on_this_host,
                                                         AttachWatch& watch,
                                                         SourceLocation site) {
  boost::intrusive_ptr<RemotePoolKeys> keys(new RemotePoolKeys(std::move(endpoint),
                                                               std::move(desc)));
  const wire::PoolDescriptor& d = keys->desc_;
  keys->rkeys_.reserve(d.regions.size());
  for (size_t i = 0; i < d.regions.size(); ++i) {
    absl::StatusOr<RemoteKey> rkey =
        RemoteKey::Unpack(keys->endpoint_, d.regions[i].rkey, peer_on_this_host, site);
    if (!rkey.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("pool '", d.name, "' region ", i, ": ", rkey.status().message()));
    }
    absl::Status inside = watch.Check(rkey->native_handle(), d.regions[i].base,
                                      d.regions[i].length);
    if (!inside.ok()) {
      return absl::Status(inside.code(), absl::StrCat("pool '", d.name, "' region ", i, ": ",
                                                      inside.message()));
    }
    keys->rkeys_.push_back(*std::move(rkey));
  }
  return RemotePoolKeysPtr(std::move(keys));
}

bool RemotePoolKeys::MapsEveryRegion() const {
  for (size_t i = 0; i < rkeys_.size(); ++i) {
    if (!RkeyMapsRemoteMemory(rkeys_[i].native_handle(), desc_.regions[i].base)) return false;
  }
  return true;
}

absl::Status RemotePoolKeys::PopulateMapping() const {
  for (size_t i = 0; i < rkeys_.size(); ++i) {
    void* local = nullptr;
    if (ucp_rkey_ptr(rkeys_[i].native_handle(), desc_.regions[i].base, &local) != UCS_OK ||
        local == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("pool '", desc_.name, "' region ", i, " is not mapped here"));
    }
    if (absl::Status st = PopulatePages(local, desc_.regions[i].length); !st.ok()) {
      return absl::Status(st.code(), absl::StrCat("pool '", desc_.name, "' region ", i, ": ",
                                                  st.message()));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<RemotePoolKeysPtr>> UnpackRemotePools(
    const EndpointPtr& endpoint, const std::vector<wire::PoolDescriptor>& descriptors,
    bool peer_on_this_host) {
  std::vector<RemotePoolKeysPtr> pools;
  pools.reserve(descriptors.size());
  AttachWatch watch = AttachWatch::Start();
  for (const wire::PoolDescriptor& d : descriptors) {
    absl::StatusOr<RemotePoolKeysPtr> keys =
        RemotePoolKeys::Unpack(endpoint, d, peer_on_this_host, watch);
    if (!keys.ok()) return keys.status();
    pools.push_back(*std::move(keys));
  }
  return pools;
}

void UcxRmaPath::Post(TransferCore& core, const CopyBatch& batch, const WorkerPtr& worker,
                      KernelCopier& /*copier*/) const {
  const RemotePoolKeys& remote = *keys();
  ucp_request_param_t param = {};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_MEMH;
  ucp_ep_h ep = remote.endpoint()->native_handle();
  absl::Status post_error;
  ucs_status_t post_ucs = UCS_OK;
  for (const CopyOp& op : batch.ops) {
    const auto& [local_base, memh] = batch.local[op.local_region];
    param.memh = memh;
    void* local_addr = local_base + op.local_offset;
    const uint64_t remote_addr = remote.base(op.remote_region) + op.remote_offset;
    ucp_rkey_h rkey = remote.rkey(op.remote_region);
    ucs_status_ptr_t ptr =
        batch.op == TransferOp::kWrite
            ? ucp_put_nbx(ep, local_addr, op.bytes, remote_addr, rkey, &param)
            : ucp_get_nbx(ep, local_addr, op.bytes, remote_addr, rkey, &param);
    if (UCS_PTR_IS_ERR(ptr)) {
      post_ucs = UCS_PTR_STATUS(ptr);
      post_error = UcsToStatus(post_ucs,
                               batch.op == TransferOp::kWrite ? "ucp_put_nbx" : "ucp_get_nbx");
      break;
    }
    // The operation goes on without its request; the flush below completes
    // only after it (UCX flush semantics), and that is what fences the blocks.
    if (ptr != nullptr) ucp_request_free(ptr);
  }
  ucp_request_param_t flush_param = {};
  ucs_status_ptr_t flush = ucp_ep_flush_nbx(ep, &flush_param);
  core.flush = Request::Adopt(worker, flush, batch.site);
  if (UCS_PTR_IS_ERR(flush) && post_error.ok()) {
    post_ucs = UCS_PTR_STATUS(flush);
    post_error = UcsToStatus(post_ucs, "ucp_ep_flush_nbx");
  }
  if (!post_error.ok()) {
    core.End(TransferState::kFailed, WithReason(post_error, UcsFailureReason(post_ucs)));
  }
  core.posted = true;
}

ucs_status_t UcxRmaPath::Check(TransferCore& core, bool endpoint_fenced) const {
  const ucs_status_t st = core.flush.Check();
  if (st != UCS_INPROGRESS || !endpoint_fenced) return st;
  // No copy of the transfer can move any more, even though UCX has not
  // completed the flush request.
  core.flush.Abandon();
  return UCS_ERR_CANCELED;
}

void KernelCopyPath::Post(TransferCore& core, const CopyBatch& batch,
                          const WorkerPtr& /*worker*/, KernelCopier& copier) const {
  const RemotePoolKeys& remote = *keys();
  KernelCopier::Job job;
  job.core = &core;  // alive on the agent's in-flight list until the copier marks it
  job.target = target_;
  job.op = batch.op;
  job.peer_name = batch.peer_name;
  job.local.reserve(batch.ops.size());
  job.remote.reserve(batch.ops.size());
  for (const CopyOp& op : batch.ops) {
    job.local.push_back({batch.local[op.local_region].first + op.local_offset, op.bytes});
    job.remote.push_back(
        {reinterpret_cast<void*>(remote.base(op.remote_region) + op.remote_offset), op.bytes});
  }
  core.posted = true;
  copier.Submit(std::move(job));
}

ucs_status_t KernelCopyPath::Check(TransferCore& core, bool /*endpoint_fenced*/) const {
  return core.copied() ? UCS_OK : UCS_INPROGRESS;
}

absl::Status KernelCopyPath::Outcome(const TransferCore& core) const {
  return core.copy_status();
}

RemotePoolPathPtr ChooseRemotePoolPath(RemotePoolKeysPtr keys, bool mapped,
                                       const KernelCopyPtr& kernel_copy) {
  if (kernel_copy != nullptr && !mapped) {
    return RemotePoolPathPtr(new KernelCopyPath(std::move(keys), kernel_copy));
  }
  return RemotePoolPathPtr(new UcxRmaPath(std::move(keys)));
}

}  // namespace kvferry::internal
