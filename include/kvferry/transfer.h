// Transfers between agents: what to move (TransferSpec), the handle of a
// posted batch (Transfer), notifications, and what an agent knows of a peer.
//
// A posted transfer pins its local blocks (the BlockSet's lease, or for a
// transfer posted by block ids the pool and the blocks' in-flight counts,
// KvPool::InFlight) and the peer's remote key until UCX has completed every operation it posted, or
// the endpoint has been closed and flushed. Dropping the Transfer handle does
// not cancel it and never releases memory under the NIC: the agent keeps the
// transfer until it is fenced.
//
// Thread safety: Transfer is thread-compatible (one handle, one thread at a
// time); PeerInfo and Notification are plain values.
#ifndef KVFERRY_TRANSFER_H_
#define KVFERRY_TRANSFER_H_

#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include <boost/smart_ptr/intrusive_ptr.hpp>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvferry/end_reason.h"
#include "kvferry/kv_layout.h"
#include "kvferry/kv_pool.h"

namespace kvferry {

enum class TransferOp {
  kRead,   // pull remote blocks into local ones (decode pulls; vLLM's default)
  kWrite,  // push local blocks into remote ones (prefill pushes)
};

struct TransferSpec {
  TransferOp op = TransferOp::kRead;
  std::string peer;  // name of a connected peer
  // The peer's exported pool; empty means the pool with the local one's name.
  std::string remote_pool;
  // The local side, in one of two forms (exactly one; both or neither is
  // kInvalidArgument):
  //  - `local`: a BlockSet lease. The transfer holds the lease until it is
  //    fenced. REQUIRES: outlives the PostTransfer call only.
  //  - `local_pool` and `local_blocks`: block ids of a pool of this agent
  //    (CreatePool or RegisterPool), without a lease: the engine owns its
  //    block ids. Several transfers in flight may name the same block (a
  //    prefix shared by two requests); an id may appear once per transfer.
  //    The transfer holds the pool, not the blocks: before reusing a block,
  //    the engine fences it (Agent::FenceBlocks, KvPool::InFlight) or waits
  //    for the transfers that name it. Ids past the pool are kOutOfRange.
  // Either way the local blocks pair in order with the remote ones.
  const BlockSet* local = nullptr;
  std::string local_pool;
  // REQUIRES: the ids stay valid for the PostTransfer call (it copies them).
  std::span<const uint32_t> local_blocks;
  // The peer's block ids, in one of two forms (at most one non-empty; both
  // is kInvalidArgument): a vector, or a span over the caller's ids that
  // stays valid for the PostTransfer call (it copies what it keeps). Each
  // id at most once per transfer.
  std::vector<uint32_t> remote_blocks;
  std::span<const uint32_t> remote_ids;
  // Heterogeneous tensor parallelism: move a byte range of every chunk
  // (each block, layer and plane) instead of whole chunks. slice_bytes bytes
  // from local_slice_offset inside each local chunk pair with as many from
  // remote_slice_offset inside each remote chunk. 0 (the default): whole
  // chunks, and both pools' layouts must be compatible
  // (KvLayout::CheckCompatible). Otherwise they must be head-sliced peers
  // (KvLayout::CheckHeadSliced), and offsets and length must be whole heads
  // (multiples of KvLayout::head_bytes()) with each range inside its side's
  // chunk (kInvalidArgument naming the side and values). Head slices are
  // the rank's heads only when heads are outermost within a chunk (vLLM's
  // HND layout). For decode TP = ratio x prefill TP, decode rank r reads
  // slice_bytes = its chunk, remote_slice_offset = (r % ratio) x its chunk;
  // for prefill TP = ratio x decode TP, decode reads each prefill rank r's
  // whole chunk into local_slice_offset = (r % ratio) x that chunk. A slice
  // as wide as both chunks moves runs of adjacent blocks as one copy, like
  // whole chunks; a narrower one moves each block's slice as its own copy.
  uint64_t slice_bytes = 0;
  uint64_t local_slice_offset = 0;
  uint64_t remote_slice_offset = 0;
  // Layers [layer_begin, layer_end) move; the default is all of them. Post
  // one layer at a time to pipeline with the model's forward pass.
  uint32_t layer_begin = 0;
  uint32_t layer_end = std::numeric_limits<uint32_t>::max();
  // Delivered to the peer (Agent::PollNotifications) only after the data is
  // visible there. Empty: no notification. At most 64 KiB.
  std::string notification;
  // An offer's ticket (Offer::ticket() of the peer, passed here by the
  // engine): move the offered blocks instead of naming them. Then
  // remote_pool, remote_blocks and remote_ids stay empty (the ticket names
  // them), `peer` is empty or the offering agent, and the local side (either
  // form) has as many blocks as the offer. Each layer of an offer moves at
  // most once (post all layers at once, or one range at a time); the offer
  // is consumed once every layer moved. Refused before anything moves: kPermissionDenied (a ticket made
  // for another agent or connection, or altered), kDeadlineExceeded
  // (expired), kFailedPrecondition (revoked or otherwise ended, or from an
  // earlier connection), kAlreadyExists (a layer moved already),
  // kInvalidArgument (not a ticket, or used with remote_blocks). A transfer
  // on an offer that ends while it runs fails with kAborted naming the offer.
  // A ticket made for this agent's name before it connected (Agent::Offer)
  // is good only on the connection its offerer bound it to; a post right
  // after connecting waits up to 5 s for that word.
  std::string offer_ticket;
  // With offer_ticket, a partial take: indices into the offer's blocks (in
  // the ticket's order), paired in order with `local`, naming the blocks to
  // move; empty moves all of them. The offer is consumed once every layer
  // moved, whichever blocks each transfer took: the blocks no transfer took
  // go back with the rest, never touched. kInvalidArgument names an index
  // past the offer or given twice, or offer_blocks without offer_ticket.
  // REQUIRES: outlives the PostTransfer call only.
  absl::Span<const uint32_t> offer_blocks;
};

enum class TransferState {
  kInFlight,
  kDone,       // every byte is where it belongs; notification sent
  // status() says why: kUnavailable when the peer failed (or was fenced by
  // another transfer's Cancel, which the message then names),
  // kFailedPrecondition when it was disconnected, kCancelled ("agent '<name>'
  // shut down ...") when this handle's own agent was destroyed first;
  // reason() says the same as a value (see end_reason.h).
  kFailed,
  kCancelled,  // Cancel() took effect; no notification was sent
  kEmpty,      // an empty handle (default-constructed or moved from): no transfer
};

struct Notification {
  std::string peer;     // sender's agent name
  std::string payload;  // TransferSpec::notification
};

enum class PeerState { kHandshaking, kConnected, kFailed, kClosed };

// PeerInfo::data_path values: how this agent's put/get (WRITE and READ) to a
// peer's pools move their bytes, as UCX decided when the peer connected.
// Direct paths: the initiator's side does all the work.
//   The peer's pools are UCX shared-memory segments mapped into this
//   process; put/get are plain copies by the initiator.
inline constexpr char kDataPathShmDirect[] = "shm-direct";
//   RDMA (InfiniBand/RoCE: UCX's rc/dc transports) into registered memory.
inline constexpr char kDataPathRdma[] = "rdma";
//   One copy through the kernel by the initiator: kvferry's own
//   process_vm_writev / process_vm_readv into the peer's process for pools
//   UCX cannot map (engine-owned or anonymous memory on one host; see
//   AgentOptions::kernel_copy), or UCX's cma/knem transport.
inline constexpr char kDataPathKernelCopy[] = "shm-kernel-copy";
// Emulated paths: UCX runs put/get as active messages. Every byte is copied
// by both processes and moves only when the peer's worker progresses (its
// progress thread); on one host this runs at a small fraction of shm-direct
// bandwidth and collapses when CPUs are busy. The agent logs one line per
// peer when the path is emulated.
//   Over shared-memory FIFOs (sysv/posix): the peer's pools are not in
//   UCX-allocated shared memory (engine-owned memory, its
//   AgentOptions::pool_memory is kAnonymousMmap, or UCX could not give it a
//   segment), and the kernel copy is off or was refused.
inline constexpr char kDataPathAmEmulated[] = "am-emulated";
//   Over TCP: UCX 1.13's tcp transport has no RMA, so this is the only way
//   put/get run over TCP.
inline constexpr char kDataPathTcp[] = "tcp";
// The peer exports no pool: nothing can be posted to it.
inline constexpr char kDataPathNone[] = "none";
// UCX's answer could not be read. Another RMA transport is named
// "rma:<transport>".
inline constexpr char kDataPathUnknown[] = "unknown";

struct PeerInfo {
  std::string name;
  PeerState state = PeerState::kHandshaking;
  absl::Status status;  // why it failed or closed
  std::vector<std::string> pools;  // the peer's exported pools
  bool same_host = false;            // same kernel boot id
  bool data_error_handling = false;  // data endpoint in UCX peer-error mode
  // How this agent's transfers to the peer's pools move (kDataPath* above),
  // e.g. "shm-direct", "rdma", "am-emulated", "tcp". Judged on the peer's
  // pools as seen from here: the peer's view of this agent's pools may
  // differ (each side's pool_memory decides what the other can map). With
  // pools on different paths, the slower one is reported.
  std::string data_path;
  std::string address;      // the remote end of the control connection, "ip:port"
  uint64_t incarnation = 0;  // the peer agent's start (a restart changes it)
};

// What one transfer moved, and when. Times are this host's clock.
struct TransferTelemetry {
  // The bytes its copies move (every block, layer and plane named), whether
  // or not they all moved: a failed transfer's bytes are what it was posted
  // with.
  uint64_t bytes = 0;
  // When PostTransfer accepted it.
  absl::Time posted = absl::InfinitePast();
  // When it ended (the agent recorded its state, before its blocks went
  // back); absl::InfiniteFuture() while in flight.
  absl::Time ended = absl::InfiniteFuture();
  // How its bytes moved (a kDataPath* value): kDataPathKernelCopy when the
  // peer's pool is reached by kvferry's kernel copy, else the peer's
  // PeerInfo::data_path when it was posted.
  std::string data_path;

  // ended - posted; absl::InfiniteDuration() while in flight.
  absl::Duration duration() const {
    return ended == absl::InfiniteFuture() ? absl::InfiniteDuration() : ended - posted;
  }
};

namespace internal {
class TransferCore;
class Access;
}  // namespace internal

class Transfer {
 public:
  // The special members are defined in the library, where the reference
  // count of the transfer's state is reachable.
  Transfer() noexcept;
  Transfer(Transfer&&) noexcept;
  Transfer& operator=(Transfer&&) noexcept;
  Transfer(const Transfer&) = delete;
  Transfer& operator=(const Transfer&) = delete;
  ~Transfer();  // does not cancel; see the file comment

  bool empty() const { return core_ == nullptr; }
  // Unique per agent, from 1, in the order PostTransfer accepted them (the
  // id of TransferCompletion); 0 for an empty handle.
  uint64_t id() const;
  // kEmpty for an empty handle, so that "no transfer" is never mistaken for
  // a transfer that failed.
  TransferState state() const;
  // OkStatus while in flight or done; the error once failed or cancelled;
  // kFailedPrecondition for an empty handle.
  absl::Status status() const;
  // ReasonOf(status()): kNone while in flight, when done, and for an empty
  // handle; else why it ended (kPeerFailed, kPeerDisconnected, kCancelled,
  // kPoolRemoved, kAgentShutDown, kTicketRevoked, kTicketExpired,
  // kTransportError).
  EndReason reason() const;
  // Bytes, post and end times, data path; a default TransferTelemetry for
  // an empty handle.
  TransferTelemetry telemetry() const;
  // Waits until the transfer has ended and released its blocks, or until
  // `timeout` passes. OkStatus when done,
  // kDeadlineExceeded when still in flight (it goes on), else the failure.
  // Drives progress itself when the agent has no progress thread.
  absl::Status Wait(absl::Duration timeout = absl::InfiniteDuration());
  // Stops the transfer: no notification is sent, and the call returns only
  // when no byte of it can still move (usually at once: the operations
  // drain). Only if they have not drained within `grace` (raised to at least
  // 1 s and 64 progress passes, since the remedy costs every other transfer
  // to the peer; to at least AgentOptions::peer_timeout for a READ over an
  // emulated data path, kDataPathTcp or kDataPathAmEmulated, whose peer
  // answers the reads and must not lose its endpoint while it still has
  // answers queued) is the peer failed and its endpoints force-closed; then this
  // transfer's status, the peer's status and the status of its other
  // transfers (kUnavailable) say that a Cancel with that grace forced it.
  // Returns kCancelled, or the final status if the transfer had already ended.
  absl::Status Cancel(absl::Duration grace = absl::Seconds(5));

 private:
  friend class Agent;
  friend class internal::Access;
  explicit Transfer(boost::intrusive_ptr<internal::TransferCore> core) noexcept;
  boost::intrusive_ptr<internal::TransferCore> core_;
};

}  // namespace kvferry

#endif  // KVFERRY_TRANSFER_H_
