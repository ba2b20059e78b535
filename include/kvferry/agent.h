// Agent: kvferry's entry point (the role of NIXL's agent). Owns a UCX
// context and worker, the KV pools registered on them, and (with the transfer
// API) its peers and in-flight transfers.
//
// Thread safety: thread-safe; any method may be called from any thread. An
// optional progress thread (AgentOptions::progress_thread) drives the
// worker: it posts the copies PostTransfer queued, runs the control plane,
// and when there is nothing to do it sleeps until a socket, the worker or
// its nearest timer (a ping, a deadline) needs it. Calls that wait say so
// and for how long (Connect, ConnectFromMetadata, WaitForPeer, Disconnect,
// WaitForNotifications, Transfer::Wait and Cancel, Offer::Wait and Revoke,
// and a post on or release of a ticket made for this agent's name before it
// connected); the others return
// after their own work, though they may first wait for a progress pass that
// is running. docs/threading.md describes the threads and what each call
// can wait for.
//
// Destruction: closes peers, waits until no transfer can touch memory, then
// releases pools, worker and context, and closes completion_fd(). Objects it created that are still alive
// afterwards (a BlockSet; a Transfer handle, listed as "transfer_handle" with
// its PostTransfer site) are survivors: the agent reports each with its
// creation site and applies AgentOptions::leak_policy. They stay valid (they
// hold their own references), so a kLog policy is safe; a transfer that its
// agent's shutdown ended says so in its status (kCancelled).
#ifndef KVFERRY_AGENT_H_
#define KVFERRY_AGENT_H_

#include <cstdint>
#include <memory>
#include <span>
#include "kvferry/source_location.h"
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvferry/completion.h"
#include "kvferry/end_reason.h"
#include "kvferry/kv_layout.h"
#include "kvferry/kv_pool.h"
#include "kvferry/ledger.h"
#include "kvferry/listener_stats.h"
#include "kvferry/log.h"
#include "kvferry/memory_report.h"
#include "kvferry/offer.h"
#include "kvferry/prepared.h"
#include "kvferry/transfer.h"
#include "kvferry/ucx_settings.h"

namespace kvferry {

// AgentOptions::kernel_copy_threads's default: min(4, the hardware's cores),
// at least 1.
int DefaultKernelCopyThreads();

struct AgentOptions {
  // Name announced to peers; 1..255 characters. Default "kvferry".
  std::string name = "kvferry";
  // What destruction does with survivors. Default: DefaultLeakPolicy()
  // (abort without NDEBUG, log with it).
  LeakPolicy leak_policy = DefaultLeakPolicy();
  // Receives every line this agent logs, with its severity and this agent's
  // name (see kvferry/log.h): refusals, dropped and failed peers, the
  // insecure-listen and emulated-data-path notices, the survivor report
  // (kError when leak_policy is kAbort, which aborts after the sink
  // returns). It runs on the progress thread or a caller's thread, possibly
  // with the agent's mutex held: it must be thread-safe and must not call
  // back into this (or any) Agent. Default (empty): the process-wide sink
  // (SetLogSink), which writes to stderr unless replaced.
  LogSink log_sink;
  // Extra UCX settings as (name, value) without the UCX_ prefix, applied with
  // ucp_config_modify on top of the environment, e.g. {"TLS", "tcp"}.
  // Only UCP-level names (those `ucx_info -c` lists without a transport
  // prefix) are accepted; an unknown name is kInvalidArgument. Transport
  // settings go in the environment (UCX_TCP_..., UCX_POSIX_...). Default: none.
  // kvferry itself sets RCACHE_ENABLE=n, MEMTYPE_CACHE=n and (for posix and
  // sysv) MM_ERROR_HANDLING=y unless the user set them; see UcxSettings.
  std::vector<std::pair<std::string, std::string>> ucx_config;
  // Run a thread that drives the worker, so transfers advance without the
  // caller calling Progress(). Default true. Without it, call Progress()
  // (Transfer::Wait and Connect do) at least every peer_timeout / 4, or
  // peers will take this agent for dead.
  bool progress_thread = true;

  // Shared secret for the control handshake. Both sides prove that they know
  // it (HMAC-SHA256 over fresh nonces, so it never crosses the wire), and no
  // byte a peer sends reaches UCX before it has. A mismatch refuses the
  // connection with kUnauthenticated, reason kUnauthenticated (logged on
  // both sides; see end_reason.h). Empty: taken
  // from the environment variable KVFERRY_SECRET if set. At most 1024 bytes.
  // The control channel is authenticated, not encrypted (see
  // docs/security.md).
  std::string shared_secret;
  // Without a secret, Listen() accepts only loopback addresses, since any
  // host that reaches the port could connect. Setting this (or the
  // environment variable KVFERRY_INSECURE=1) allows other addresses; the
  // agent then logs once that any reachable host may connect. Default false.
  bool allow_insecure = false;
  // A connection must complete its authenticated handshake within this time
  // or it is dropped (logged with its address). Default 5 s.
  absl::Duration handshake_timeout = absl::Seconds(5);
  // At most this many incoming connections may be in their handshake at
  // once. A new connection that finds the table full makes room: the oldest
  // unauthenticated connection that has not delivered its HELLO, or has not
  // answered its CHALLENGE within hello_timeout, is closed unanswered
  // (evicted). Only when none qualifies (every pending connection is newer
  // than the last control pass, or mid-handshake and on time) is the new
  // connection closed at accept. Both are logged (rate-limited) and counted
  // (ListenerStats). An attacker without the secret can thus churn the
  // table but not hold it: a peer's HELLO arrives within milliseconds of
  // its connect, and its connection is read once before anything newer can
  // evict it. Default 64.
  int max_pending_handshakes = 64;
  // At most this many of those pending handshakes may come from one source
  // address (any port; an IPv6 source counts by its /64). A new connection
  // from a source at its limit evicts that source's oldest stalled
  // connection as above, or is closed. One host then cannot fill the table
  // for the others. Raise it when many agents share one address (NAT, one
  // host of many agents) and connect at once. At least 1. Default 16.
  int max_pending_handshakes_per_source = 16;
  // An incoming connection must deliver its whole HELLO (the first frame,
  // which a peer sends as soon as its connect completes) within this time
  // of being accepted, or it is dropped (REJECT(DEADLINE_EXCEEDED), logged,
  // counted in ListenerStats::hello_timeouts). Bounds how long a connection
  // that sends nothing, or drips its HELLO a byte at a time, holds a slot.
  // handshake_timeout still bounds the whole handshake (and caps this).
  // At least 10 ms. Default 1 s.
  absl::Duration hello_timeout = absl::Seconds(1);
  // A peer that sends nothing (pings included) for this long is failed, and
  // its transfers end with kUnavailable. Peers ping every peer_timeout / 4.
  // A killed process is detected at once, through its control connection
  // (the kernel closes the socket); pings catch a dead host or network.
  // Default 10 s.
  absl::Duration peer_timeout = absl::Seconds(10);

  // What one peer's notifications may occupy here until PollNotifications
  // takes them: at most max_notifications_per_peer of them and
  // max_notification_bytes_per_peer bytes of payload (one notification is
  // always let in, so the byte bound is in effect at least 64 KiB). At the
  // bound this agent stops reading that peer's control connection until the
  // application polls: TCP holds the peer back, its later messages (pings
  // included; it is not timed out meanwhile) wait, and its transfers that
  // carry a notification stay in flight until the notification can be sent
  // (Stats::QueueStats, docs/limits.md). Nothing is dropped. Defaults 16 MiB
  // and 4096; each must be at least 1 (bytes at least 64 KiB).
  size_t max_notification_bytes_per_peer = size_t{16} << 20;
  size_t max_notifications_per_peer = 4096;
  // Notifications of a peer that has ended (or that closed its connection
  // while this agent had stopped reading it) wait this long for
  // PollNotifications; then they are freed, logged and counted
  // (Stats::QueueStats::notifications_dropped). Default 60 s.
  absl::Duration ended_peer_notification_retention = absl::Seconds(60);
  // How many ended transfers and offers wait for PollCompletions. Further
  // ends are not recorded but counted (Completions::dropped) until the next
  // poll, so an application that never polls holds at most this many
  // (docs/limits.md). Default 65536; at least 1.
  size_t max_queued_completions = 65536;

  // Put the data endpoint in UCX's peer-error mode, so that a dead peer's
  // operations complete (with an error) and its endpoint can be force-closed.
  // kvferry enables error handling in the shared-memory transports (see
  // UcxSettings::shm_error_handling), so shared memory stays in use in this
  // mode.
  // Turn it off only for a transport that cannot report peer failure; then a
  // dead peer's transfers may stay pinned until this process exits, and the
  // ledger shows them. Default true.
  bool data_error_handling = true;

  // Who allocates the memory of the pools CreatePool makes (see
  // PoolMemorySource). Default kUcxAllocated, because on one host it is what
  // lets peers copy straight into the pool ("shm-direct"): UCX 1.13's
  // shared-memory transports (posix, sysv) can map only memory UCX allocated
  // itself. Peers on this host reach any other memory by kvferry's kernel
  // copy (see kernel_copy), or, where that is off or refused, by put/get
  // emulated with active messages through 8 KiB FIFOs, copied by both
  // processes and moved only when the target progresses; both are slower
  // than shm-direct, the emulated path far slower and worse when CPUs are
  // busy (docs/data-paths.md). Between hosts (RDMA registers any
  // memory) and over TCP the choice makes no difference to speed. What
  // changes with it:
  // - the pool is a shared-memory segment (UcxSettings::alloc_prio; without a
  //   shared-memory transport in UCX_TLS it is anonymous memory from UCX):
  //   the kernel counts it as shared memory, not anonymous (the memory
  //   report accounts for it; see MemoryReport), and a peer on this host
  //   maps all of it while it holds the pool's remote key;
  // - a System V segment is accounted (like memory without MAP_NORESERVE):
  //   a pool larger than the kernel will commit fails with kResourceExhausted
  //   where kAnonymousMmap would reserve it lazily.
  // PeerInfo::data_path says which path a peer's transfers take.
  PoolMemorySource pool_memory = PoolMemorySource::kUcxAllocated;

  // Same-host transfers to a peer's pools that UCX cannot map (engine-owned
  // memory from RegisterPool, kAnonymousMmap pools) move by kernel copy:
  // process_vm_writev / process_vm_readv by the initiator, one copy, no work
  // by the peer (PeerInfo::data_path "shm-kernel-copy"), instead of UCX's
  // am-emulated path. Used only after the peer's process proved it holds
  // this connection's keys (it answers a probe read from its memory), never
  // between two agents of one process, and only where UCX would otherwise
  // emulate put/get over shared memory (UCX_TLS with posix or sysv). The
  // kernel must let this process read and write the peer's memory (same
  // user, or CAP_SYS_PTRACE; with Yama's ptrace_scope 1 a peer that is not
  // a descendant refuses, and UCX's path stays). Turning it off here also
  // stops peers from using it into this process (no probe is offered).
  // Default true.
  bool kernel_copy = true;

  // How many threads of this process run the agent's kernel copies (see
  // kernel_copy) at most: a transfer of 512 KiB or more is cut into up to
  // this many parts (runs of its copies, of about equal bytes, one part per
  // 256 KiB at most) that are copied at once, each by its own thread, so
  // one transfer can use that many cores. Transfers start copying in the order they were posted
  // and may finish in any order. Threads start when first needed and stay
  // until the agent is destroyed. 1 to 64 (else Agent::Create fails with
  // kInvalidArgument). Default DefaultKernelCopyThreads(): the smaller of
  // 4 and the number of cores the hardware reports (1 when unknown).
  int kernel_copy_threads = DefaultKernelCopyThreads();

  // Whether pools are made resident in this process when they appear, so
  // that no transfer pays the page faults of a fresh mapping (each process
  // faults in its own view of a shared pool, page by page): the memory of
  // CreatePool (both sources) when it is created, and each peer's pool that
  // this process maps (shm-direct) when the peer's pools are learned.
  // Uses madvise(MADV_POPULATE_WRITE) (Linux 5.14), else one write of
  // nothing per page; no byte changes. The cost is start-up time (the
  // kernel zeroes and maps every page of a pool on creation) and a pool
  // that is resident from the start, as a KV cache in use is anyway;
  // anonymous pools commit their memory then. A failure to populate a pool
  // of this agent fails CreatePool (kResourceExhausted); a peer's pool that
  // cannot be populated is logged and used as it is. Engine memory
  // (RegisterPool) is the engine's and is never touched. Default true.
  bool populate_pools = true;
};

namespace internal {
class AgentImpl;
class Access;
}  // namespace internal

class Agent {
 public:
  static absl::StatusOr<std::unique_ptr<Agent>> Create(
      AgentOptions options, SourceLocation site = SourceLocation::current());
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  const std::string& name() const;
  // This agent's incarnation (its start, in Unix nanoseconds): what peers see
  // as PeerInfo::incarnation; a restarted agent has a newer one.
  uint64_t incarnation() const;
  // The exported pools with their layouts, sorted by name.
  std::vector<std::pair<std::string, KvLayout>> ExportedPools() const;

  // Allocates and registers a pool (memory per AgentOptions::pool_memory).
  // kInvalidArgument for a bad layout or name, kAlreadyExists for a name in
  // use, kResourceExhausted naming the pool and its size when memory or
  // registration fails. The pointer stays valid until the Agent is destroyed.
  // `exported` pools are offered to peers; others are local only. A pool
  // made while peers are connected is announced to them.
  absl::StatusOr<KvPool*> CreatePool(std::string name, const KvLayout& layout,
                                     bool exported = true,
                                     SourceLocation site = SourceLocation::current());
  // Registers memory the engine allocated as a pool (kvferry never frees it;
  // destruction of the agent deregisters it). `regions` follow the layout
  // (see KvLayout for the order of layers, planes and blocks); their count
  // picks the shape:
  //   1                        the whole layout in one range;
  //   num_layers               one range per layer, its planes in order
  //                            (vLLM's per-layer [2, num_blocks, ...] tensor);
  //   num_layers * num_planes  one range per layer and plane, index
  //                            layer * num_planes + plane (separate K and V
  //                            tensors per layer).
  // Each region must be exactly as long as the layout puts in it, aligned to
  // KvLayout::kChunkAlignment, mapped (host memory), and overlap no other
  // region or pool. One ucp_mem_map per region; exported pools send one
  // descriptor (address, length, rkey) per region, and blocks adjacent in
  // a region still move as one operation. Errors name the region:
  // kInvalidArgument (count, length, alignment, overlap, unmapped pages, bad
  // layout or name), kAlreadyExists (name in use), kFailedPrecondition
  // (a memory type this UCX cannot register, e.g. kCuda without CUDA
  // support). Nothing stays registered on failure. If peers are connected,
  // an exported pool is announced to them.
  // REQUIRES: the memory outlives the Agent (and every BlockSet of the pool).
  absl::StatusOr<KvPool*> RegisterPool(std::string name, const KvLayout& layout,
                                       std::span<const KvRegion> regions,
                                       bool exported = true,
                                       MemoryType memory_type = MemoryType::kHost,
                                       SourceLocation site = SourceLocation::current());
  // nullptr when no pool has that name.
  KvPool* FindPool(absl::string_view name) const;
  // Removes a pool (made by CreatePool or RegisterPool) while the agent
  // lives, e.g. before an engine reallocates its KV cache. In order:
  //  1. The pool is marked: from here on Lease/LeaseIds on it, PostTransfer
  //     with its blocks and Offer of its blocks fail with
  //     kFailedPrecondition naming the pool. If it is exported, every peer
  //     is told (POOL_REMOVED): the peer forgets the pool, and its later
  //     posts to it fail with kNotFound naming the pool and this agent.
  //  2. Waits up to `timeout` until every block is back in the pool: this
  //     agent's transfers on it ended (and were fenced), its offers of the
  //     pool's blocks ended, and the application released its BlockSets.
  //  3. If blocks are still leased then, the transfers still in flight on
  //     the pool are cancelled (they end kCancelled, the status naming the
  //     pool's removal) and its open offers are revoked (kRevoked, the peer
  //     fences its transfers on them first), and the call waits for both
  //     to end (a transfer that does not drain fails its peer, as Cancel
  //     does; a revoke is bounded by the peer's answer or its failure).
  //     If blocks are still leased after that, the application holds them:
  //     the removal is undone (the pool stays registered, usable, and is
  //     announced to peers again) and kFailedPrecondition says how many
  //     blocks are leased.
  //  4. Otherwise the pool is gone: deregistered from UCX, its memory freed
  //     if kvferry allocated it (engine memory is the engine's again), the
  //     ledger and the memory report no longer count it, and the name may
  //     be used again (peers learn the new pool by POOL_ADDED).
  // Transfers posted by block ids (TransferSpec::local_pool) count as the
  // pool's use in 2 and 3 like those on a BlockSet: step 2 also waits until
  // no block is named by one (KvPool::busy_blocks() is 0), and step 3
  // cancels them and waits until they are fenced.
  // So when it returns OK, no transfer of this agent and no offer can touch
  // the pool's memory any more; the KvPool* for it is then invalid.
  // Transfers a peer posted to this pool without an offer are the
  // application's to finish first, as before reusing blocks under them:
  // kvferry cannot see them (over RDMA or kernel copy their bytes could
  // land after this returns). kInvalidArgument for a bad name or a negative
  // timeout, kNotFound naming an unknown pool, kFailedPrecondition when a
  // removal of that pool is already under way. Default timeout 10 s.
  absl::Status RemovePool(absl::string_view name, absl::Duration timeout = absl::Seconds(10));
  // Fence before reuse for engines that own their block ids: waits until no
  // transfer of this agent names any of `ids` of pool `pool` as a local
  // block (posted by ids or on a BlockSet; KvPool::InFlight is 0 for each),
  // driving progress itself when there is no progress thread. When it
  // returns OK, no byte of those transfers can still move into or out of
  // the blocks: the engine may free and rewrite them. It does not stop
  // transfers (Transfer::Cancel does), and transfers posted later are not
  // waited for. Transfers a peer posts into this agent's pool are the peer's
  // to fence (kvferry cannot see them; offers fence them, see offer.h).
  // kOk at once for an empty list; kDeadlineExceeded when some are still
  // named after `timeout`, saying how many and the first; kNotFound naming
  // an unknown pool; kOutOfRange naming an id past the pool;
  // kInvalidArgument for a negative timeout. Default timeout 10 s.
  absl::Status FenceBlocks(absl::string_view pool, std::span<const uint32_t> ids,
                           absl::Duration timeout = absl::Seconds(10));

  // Drives the UCX worker once; returns the number of events progressed.
  int Progress();

  // --- Connections ---------------------------------------------------------
  // Listens for peers on `address` (an IPv4/IPv6 literal) and `port`; 0 picks
  // a free port. Returns the port. kAlreadyExists if already listening,
  // kInvalidArgument for a bad address, kUnavailable if the port is taken,
  // kFailedPrecondition for a non-loopback address without a shared secret
  // (see AgentOptions::allow_insecure). The listener is kvferry's own TCP
  // socket; UCX sees a peer only after it authenticated.
  absl::StatusOr<uint16_t> Listen(const std::string& address, uint16_t port = 0);
  // Connects to a listening agent and performs the handshake (mutual
  // authentication, then descriptors and layouts). Returns the peer. Errors
  // name the address: kInvalidArgument (bad address), kDeadlineExceeded (no
  // answer in `timeout`), kUnauthenticated (secret mismatch, or a handshake
  // frame altered on the way; reason kUnauthenticated), kFailedPrecondition
  // (pools of one name whose layouts are neither compatible nor head-sliced,
  // see KvLayout, naming both values; reason kLayoutMismatch), kAlreadyExists
  // (this agent is already connected to that agent), kUnavailable
  // (unreachable or the connection dropped). A connection the listener
  // closes or resets before its CHALLENGE (refused at the door: its table
  // of pending handshakes full, see AgentOptions::max_pending_handshakes)
  // is tried again after a short backoff (10 ms, doubling to 500 ms) until
  // `timeout`; the error then says how many attempts were refused. A
  // refused TCP connect (nothing listening) is not retried. A restarted
  // peer (same name, newer incarnation) replaces the old connection, whose
  // transfers end with kUnavailable.
  absl::StatusOr<PeerInfo> Connect(const std::string& address, uint16_t port,
                                   absl::Duration timeout = absl::Seconds(10));
  // kNotFound for a name this agent never connected to (or has forgotten).
  absl::StatusOr<PeerInfo> GetPeer(const std::string& name) const;
  std::vector<PeerInfo> ListPeers() const;
  // Waits until a peer of that name is connected (e.g. on the listening
  // side). A peer of that name that connected and ended before this call
  // (or in it, before it looked) does not count: the kDeadlineExceeded then
  // says that one came and went.
  absl::StatusOr<PeerInfo> WaitForPeer(const std::string& name,
                                       absl::Duration timeout = absl::Seconds(10));
  // Orderly disconnect: refuses new posts to the peer, lets posted transfers
  // finish (bounded by peer_timeout, then force-closes): each one that
  // completes ends kDone and its notification reaches the peer before the
  // goodbye. Then closes the data endpoint (a graceful close waits up to
  // another peer_timeout for it to drain) and the connection. Later posts
  // fail with kFailedPrecondition. kNotFound for an unknown name.
  absl::Status Disconnect(const std::string& name);

  // Connection metadata: what a peer needs to connect to this agent, as
  // bytes for the engine's own side channel (binary; see
  // ConnectFromMetadata). It holds this agent's name, incarnation, the
  // address and port it listens on, and the wire version it speaks; no
  // secret (the authenticated handshake still runs when a peer connects
  // with it). `advertise_address` (an IPv4 or IPv6 literal) replaces the
  // address Listen was given, and is required when that is a wildcard
  // (0.0.0.0, ::). kFailedPrecondition when this agent does not listen,
  // kInvalidArgument for a bad or wildcard address.
  absl::StatusOr<std::string> LocalMetadata(const std::string& advertise_address = "") const;
  // Connects (as Connect, with the same errors and the same handshake) to
  // the agent a peer's LocalMetadata describes, trying its addresses in
  // order until one answers, within `timeout` in all. Malformed metadata
  // (truncated, not metadata, another format or wire version, no or bad
  // addresses, bytes after the end, this agent's own name) is
  // kInvalidArgument naming what is wrong, and nothing is connected. An
  // agent that authenticates under another name than the metadata's is
  // disconnected again: kFailedPrecondition naming both. The metadata's
  // incarnation is not checked: a peer restarted under the same name is
  // reached (PeerInfo::incarnation says which one).
  absl::StatusOr<PeerInfo> ConnectFromMetadata(absl::string_view metadata,
                                               absl::Duration timeout = absl::Seconds(10));

  // --- Transfers -----------------------------------------------------------
  // Posts a batch; never blocks on the network. With a progress thread it
  // checks and plans the batch and queues it: the thread posts the copies to
  // UCX, so the caller neither copies data nor waits for the thread's UCX
  // work (without one, the copies are posted in the call, as the caller
  // drives progress). Neither a kernel copy nor UCX work of the progress
  // thread delays it, on an offer ticket too: a ticket the offering peer
  // ended but whose end this agent has not read yet fails the transfer
  // (kAborted) instead of the call (docs/threading.md). Bad input leaves nothing
  // behind: kInvalidArgument (empty batch, size mismatch, bad layer range,
  // foreign BlockSet, oversized notification), kNotFound (unknown peer or
  // remote pool, or a local_pool this agent does not have),
  // kFailedPrecondition (peer closed, layout mismatch, local pool being
  // removed), kUnavailable (peer failed), kOutOfRange (remote block id past
  // the peer's pool, or a local block id past the local pool). Both or
  // neither of the local forms (TransferSpec::local, local_pool +
  // local_blocks), both remote forms, or an id listed twice on one side is
  // kInvalidArgument. A transfer posted by ids counts in the local pool's
  // KvPool::InFlight from here until it is fenced; no lease is taken (see
  // Agent::FenceBlocks). A post on a ticket made for this agent's name may
  // wait up to 5 s for the offering agent's binding right after the
  // connection came up.
  absl::StatusOr<Transfer> PostTransfer(
      const TransferSpec& spec, SourceLocation site = SourceLocation::current());
  // Resolves a list of blocks once (see prepared.h): a local list of a pool
  // of this agent (spec.peer empty), or a remote list of a connected peer's
  // exported pool. Errors name the value: kInvalidArgument (no blocks, a
  // slice not of whole heads or past the chunk, slice_offset without
  // slice_bytes), kNotFound (unknown pool or peer, or the peer exports no
  // such pool), kOutOfRange (a block id past the pool, with its index),
  // kFailedPrecondition (local pool being removed, peer closing or closed),
  // kUnavailable (peer failed).
  absl::StatusOr<PreparedList> Prepare(const PrepareSpec& spec,
                                       SourceLocation site = SourceLocation::current());
  // Posts a transfer between two prepared lists of this agent: the i-th
  // descriptor named by `local_indices` pairs with the i-th named by
  // `remote_indices` (indices may come in any order and repeat; a local
  // block read into twice, or a remote block written twice, by one post
  // gets one of the copies, unspecified which). Each pair is its own copy
  // per layer and plane: nothing is sorted or merged. The Transfer behaves
  // as one posted by block ids (PostTransfer with local_pool): the local
  // blocks count in KvPool::InFlight until it is fenced (once per time they
  // are named), Agent::FenceBlocks waits for it, RemovePool cancels it.
  // Refused before anything moves, leaving no count behind:
  // kInvalidArgument (an empty handle, a handle of another agent, `local`
  // not a local list or `remote` not a remote one, empty or unequal index
  // lists, descriptors of different byte lengths, layer range, oversized
  // notification, an op that is neither kRead nor kWrite), kOutOfRange (an
  // index past its list, naming the index, its position and the list's
  // length), kFailedPrecondition (layouts neither compatible nor
  // head-sliced; the local pool removed or being removed; the peer's pool
  // removed or replaced, the peer disconnected or restarted since the list
  // was prepared: naming peer and pool), kUnavailable (the peer failed,
  // naming peer and pool).
  absl::StatusOr<Transfer> PostPrepared(const PreparedList& local,
                                        std::span<const uint32_t> local_indices,
                                        const PreparedList& remote,
                                        std::span<const uint32_t> remote_indices,
                                        const PreparedPost& post = {},
                                        SourceLocation site = SourceLocation::current());
  // Lends `blocks` (of an exported pool of this agent) to the agent named
  // `peer` for one move: it posts a READ from them or a WRITE into them with
  // the returned Offer's ticket (TransferSpec::offer_ticket), or releases it
  // (ReleaseOffer). The offer holds its own reference to the lease until it
  // ends: consumed, released, peer failed, expired after `ttl`, or revoked;
  // each way fences the peer first (see offer.h). `peer` need not be
  // connected: the offer then waits, open, and binds to the next connection
  // of an agent of that name once it authenticated (as client or server);
  // the ttl covers the wait, and an offer nobody of that name connected for
  // ends kExpired. The ttl is counted on this agent's clock alone.
  // kInvalidArgument (empty or foreign BlockSet, pool not exported or being
  // removed, ttl not in (0, 24 h], `peer` not a valid agent name or this
  // agent's own), kFailedPrecondition (peer connected and being disconnected
  // by this agent).
  absl::StatusOr<kvferry::Offer> Offer(const BlockSet& blocks, const std::string& peer,
                                       absl::Duration ttl,
                                       SourceLocation site = SourceLocation::current());
  // The taking side declines a peer's offer it will not (or no longer) move
  // anything on, for instance on a full prefix-cache hit, so that the
  // offering agent gets its blocks back now rather than at the ttl. Refuses
  // later posts on the ticket, and tells the offering agent, which fences
  // the transfers this agent still has in flight on the offer (they fail
  // with kAborted naming the offer) and then ends it kReleased. Does not wait
  // for that. OkStatus also when the offer had ended or was released
  // already. A ticket made for this agent's name waits for its binding as a
  // post does (TransferSpec::offer_ticket). kInvalidArgument (not a ticket),
  // kPermissionDenied (made for another agent or connection, or altered),
  // kFailedPrecondition (the offering agent is not connected, is a later
  // incarnation, or bound the offer to another connection), kNotFound
  // (unknown offering agent).
  absl::Status ReleaseOffer(const std::string& ticket);

  // Sends `payload` to connected peer `peer` on its own, without a
  // transfer (the peer receives a Notification as for a transfer's:
  // PollNotifications, PollCompletions). Never blocks. Ordering, between this
  // agent and that peer:
  //  - it is delivered after the notification of every transfer to `peer`
  //    posted (PostTransfer returned) before this call: it waits here until
  //    each of them has ended (a transfer that fails or is cancelled sends
  //    no notification, and then only holds it back until it ends);
  //  - notifications sent by this call arrive in the order of the calls;
  //  - a transfer posted after this call may deliver its notification
  //    before this one (transfers notify in the order they complete).
  // Bounded as transfers' notifications are: at most 64 KiB, held back here
  // (not dropped) while the peer does not read, and counted against the
  // peer's AgentOptions::max_notification_bytes_per_peer there. It is lost
  // only if the peer fails or is disconnected, or this agent is destroyed,
  // before it is sent; a Disconnect sends it before the goodbye. kInvalidArgument (empty or over
  // 64 KiB), kNotFound (unknown peer), kUnavailable or kFailedPrecondition
  // (the peer failed, was disconnected or is being disconnected; with its
  // EndReason), kFailedPrecondition (still in its handshake),
  // kResourceExhausted (4096 notifications to that peer already wait).
  absl::Status SendNotification(const std::string& peer, std::string payload);

  // Notifications received so far, oldest first; the queue is emptied. A
  // peer's notifications are bounded here (see
  // AgentOptions::max_notification_bytes_per_peer): an application that
  // polls late holds its peers back rather than growing memory.
  // [[nodiscard]]: the notifications are taken from the queue, so a call
  // whose result is dropped loses them.
  [[nodiscard]] std::vector<Notification> PollNotifications();
  // Like PollNotifications, but waits up to `timeout` for at least one.
  [[nodiscard]] std::vector<Notification> WaitForNotifications(absl::Duration timeout);

  // A file descriptor that is readable exactly while PollCompletions has
  // something to return: a transfer posted here or an offer made here has
  // ended (every one is recorded, whether or not its handle was kept), a
  // notification arrived, or ends were dropped. An eventfd (non-blocking,
  // close-on-exec) owned by the agent: never read, write or close it; wait
  // on it (poll, epoll, asyncio's add_reader) and call PollCompletions when
  // it is readable, which drains it. It stays the same for the agent's life
  // and is closed when the agent is destroyed: remove it from any epoll set
  // before. Without a progress thread nothing ends, so the fd does not
  // become readable, except inside calls that drive progress (Progress,
  // PollCompletions, waits).
  int completion_fd() const;
  // Everything that ended or arrived since the previous call, without
  // blocking; each transfer end, offer end and notification is returned
  // once (a notification by this call or by PollNotifications, whichever
  // takes it first). Afterwards completion_fd() is not readable until
  // something new ends or arrives. Without a progress thread it first drives
  // one progress pass.
  // [[nodiscard]]: what it returns is taken from the queue.
  [[nodiscard]] Completions PollCompletions();

  // Live counters of everything this agent created.
  Stats GetStats() const;
  // What the listener did with incoming connections (see listener_stats.h).
  ListenerStats GetListenerStats() const;
  // The ledger (counters and, with KVFERRY_LEDGER, creation sites).
  const Ledger& ledger() const;
  // UCX memory settings in force (hook mode, caches).
  const UcxSettings& ucx_settings() const;
  // The process's memory as this agent explains it (see memory_report.h).
  // kUnavailable when /proc cannot be read.
  absl::StatusOr<MemoryReport> GetMemoryReport() const;

 private:
  friend class internal::Access;
  explicit Agent(std::unique_ptr<internal::AgentImpl> impl);
  std::unique_ptr<internal::AgentImpl> impl_;
};

}  // namespace kvferry

#endif  // KVFERRY_AGENT_H_
