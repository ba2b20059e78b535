// How this agent reaches one exported pool of a peer.
//
// RemotePoolKeys: the pool as unpacked here: its descriptor, the data
// endpoint its keys were unpacked on, and one UCX remote key per region.
// Immutable once made and shared by reference count: the peer holds it
// while the pool is announced, and every transfer to the pool holds it
// (through its RemotePoolPath) from PostTransfer until the transfer is
// fenced. So the peer's pool set may be replaced or dropped at any time,
// and the keys an operation was posted with stay valid until it is fenced.
// The keys are destroyed (ucp_rkey_destroy) before the endpoint reference
// goes, and each key holds its endpoint as well.
//
// RemotePoolPath: how copies to that pool move, chosen once when the peer's
// pools are judged (AgentImpl::JudgeDataPathLocked); a later judgement
// replaces the peer's path objects, never changes one. UcxRmaPath posts
// UCX put/get on the keys' endpoint and a flush that fences them;
// KernelCopyPath hands the copies to the agent's KernelCopier
// (src/kernel_copier.h), which starts a copy only while its agent read its
// control connections lately (KernelCopyPath::Fresh) and the verified
// process is still there (src/kernel_copy.h). Another path is another
// subclass.
//
// Thread safety: the reference counts are atomic, everything else is
// immutable. REQUIRES: the last reference to a RemotePoolKeys (and so to a
// path) is dropped with the worker's lock held (AgentImpl::ucx_mu_), as its
// destructor calls into UCX; and Post and Check run with that lock held
// (they require kAgentData, its role: src/agent_role.h).
#ifndef KVFERRY_SRC_REMOTE_POOL_H_
#define KVFERRY_SRC_REMOTE_POOL_H_

#include <algorithm>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include <boost/smart_ptr/intrusive_ptr.hpp>
#include <boost/smart_ptr/intrusive_ref_counter.hpp>
#include <ucp/api/ucp.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvferry/source_location.h"
#include "kvferry/transfer.h"
#include "src/agent_role.h"
#include "src/kernel_copy.h"
#include "src/transfer_plan.h"
#include "src/ucx/endpoint.h"
#include "src/wire/message.h"

namespace kvferry::internal {

class AttachWatch;
class KernelCopier;
class TransferCore;

class RemotePoolKeys : public boost::intrusive_ref_counter<RemotePoolKeys> {
 public:
  // Unpacks every region's key of `desc` on `endpoint` (RemoteKey::Unpack)
  // and, where UCX maps the peer's memory into this process, checks with
  // `watch` that the region lies inside the segment the key attached
  // (src/region_extent.h). kInvalidArgument naming the pool and the region
  // when a key does not unpack; the watch's code when a region lies
  // outside. Nothing is left unpacked on failure.
  static absl::StatusOr<boost::intrusive_ptr<const RemotePoolKeys>> Unpack(
      EndpointPtr endpoint, wire::PoolDescriptor desc, bool peer_on_this_host,
      AttachWatch& watch, SourceLocation site = SourceLocation::current());

  RemotePoolKeys(const RemotePoolKeys&) = delete;
  RemotePoolKeys& operator=(const RemotePoolKeys&) = delete;

  const wire::PoolDescriptor& desc() const { return desc_; }
  const std::string& name() const { return desc_.name; }
  const EndpointPtr& endpoint() const { return endpoint_; }
  size_t regions() const { return rkeys_.size(); }
  ucp_rkey_h rkey(size_t region) const { return rkeys_[region].native_handle(); }
  uint64_t base(size_t region) const { return desc_.regions[region].base; }
  // Whether every region's key maps the peer's memory into this process
  // (shared memory on this host): put/get are then plain copies by UCX.
  bool MapsEveryRegion() const;
  // Faults in this process's mapping of every region for writing
  // (src/populate.h), changing no byte. REQUIRES: MapsEveryRegion().
  absl::Status PopulateMapping() const;

 private:
  RemotePoolKeys(EndpointPtr endpoint, wire::PoolDescriptor desc)
      : desc_(std::move(desc)), endpoint_(std::move(endpoint)) {}

  const wire::PoolDescriptor desc_;
  const EndpointPtr endpoint_;
  // Declared after endpoint_: destroyed first.
  std::vector<RemoteKey> rkeys_;
};

using RemotePoolKeysPtr = boost::intrusive_ptr<const RemotePoolKeys>;

// Every pool of `descriptors`, unpacked on `endpoint` (one AttachWatch over
// them all). The first failure is returned; nothing stays unpacked then.
absl::StatusOr<std::vector<RemotePoolKeysPtr>> UnpackRemotePools(
    const EndpointPtr& endpoint, const std::vector<wire::PoolDescriptor>& descriptors,
    bool peer_on_this_host);

// One transfer's copies as posting needs them, copied out of the agent's
// guarded state.
struct CopyBatch {
  TransferOp op = TransferOp::kWrite;
  std::vector<CopyOp> ops;
  std::vector<std::pair<std::byte*, ucp_mem_h>> local;  // per local region
  std::string peer_name;  // for messages
  SourceLocation site;
};

class RemotePoolPath : public boost::intrusive_ref_counter<RemotePoolPath> {
 public:
  enum class Kind { kUcxRma, kKernelCopy };

  virtual ~RemotePoolPath() = default;
  RemotePoolPath(const RemotePoolPath&) = delete;
  RemotePoolPath& operator=(const RemotePoolPath&) = delete;

  virtual Kind kind() const = 0;
  const RemotePoolKeysPtr& keys() const { return keys_; }
  const wire::PoolDescriptor& desc() const { return keys_->desc(); }

  // Posts `batch`'s copies of `core` (every op inside the pool's regions,
  // as PlanCopies proves) and sets core.posted. A post that fails ends
  // `core` kFailed; otherwise Check() says when the copies are done.
  // `core` stays alive until then (the agent's in-flight list).
  virtual void Post(TransferCore& core, const CopyBatch& batch, const WorkerPtr& worker,
                    KernelCopier& copier) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentData) = 0;
  // UCS_INPROGRESS while the posted copies may still move; then UCS_OK or
  // the error that ended them. `endpoint_fenced`: the peer's data endpoint
  // was closed such that nothing posted on it can still move.
  virtual ucs_status_t Check(TransferCore& core, bool endpoint_fenced) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentData) = 0;
  // Once Check() is no longer UCS_INPROGRESS: an error the copies ended
  // with that Check() does not carry (with its message), else OK.
  virtual absl::Status Outcome(const TransferCore& core) const = 0;

 protected:
  explicit RemotePoolPath(RemotePoolKeysPtr keys) : keys_(std::move(keys)) {}

 private:
  const RemotePoolKeysPtr keys_;
};

using RemotePoolPathPtr = boost::intrusive_ptr<const RemotePoolPath>;

// UCX put/get with the pool's keys on their endpoint, then ucp_ep_flush_nbx
// (TransferCore::flush), whose completion fences them. Once the endpoint
// is fenced the flush is abandoned (a force close does not always complete
// flushes already posted) and Check() says UCS_ERR_CANCELED.
class UcxRmaPath final : public RemotePoolPath {
 public:
  explicit UcxRmaPath(RemotePoolKeysPtr keys) : RemotePoolPath(std::move(keys)) {}
  Kind kind() const override { return Kind::kUcxRma; }
  void Post(TransferCore& core, const CopyBatch& batch, const WorkerPtr& worker,
            KernelCopier& copier) const override ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentData);
  ucs_status_t Check(TransferCore& core, bool endpoint_fenced) const override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentData);
  absl::Status Outcome(const TransferCore& /*core*/) const override {
    return absl::OkStatus();
  }
};

// process_vm_writev/readv into the verified peer process (src/kernel_copy.h)
// on the agent's copier threads; done when the copier marked the transfer
// (TransferCore::MarkCopied), even after the peer was closed: until then
// its blocks may still be moving (a closed target fails the copies that
// have not started). Outcome() is the copy's status.
class KernelCopyPath final : public RemotePoolPath {
 public:
  // A copy starts within this long (or peer_timeout / 8, if less) of a read
  // of the agent's control connections.
  static constexpr absl::Duration kFreshness = absl::Milliseconds(100);
  // Whether a copy may start at `now`, the control connections last read
  // at `serviced` (the KernelCopier's `fresh`): a process that was stopped
  // must first learn whether its peer gave up on it.
  static bool Fresh(absl::Time serviced, absl::Time now, absl::Duration peer_timeout) {
    return now - serviced <= std::min(peer_timeout / 8, kFreshness);
  }

  KernelCopyPath(RemotePoolKeysPtr keys, KernelCopyPtr target)
      : RemotePoolPath(std::move(keys)), target_(std::move(target)) {}
  Kind kind() const override { return Kind::kKernelCopy; }
  const KernelCopyPtr& target() const { return target_; }
  void Post(TransferCore& core, const CopyBatch& batch, const WorkerPtr& worker,
            KernelCopier& copier) const override ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentData);
  ucs_status_t Check(TransferCore& core, bool endpoint_fenced) const override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentData);
  absl::Status Outcome(const TransferCore& core) const override;

 private:
  const KernelCopyPtr target_;
};

// The path for a pool: kernel copy when the peer's process was verified
// (`kernel_copy` set) and UCX does not map the pool here (`mapped` false);
// UCX otherwise.
RemotePoolPathPtr ChooseRemotePoolPath(RemotePoolKeysPtr keys, bool mapped,
                                       const KernelCopyPtr& kernel_copy);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_REMOTE_POOL_H_
