// Endpoint: owns one ucp_ep_h and keeps its Worker alive.
// RemoteKey: owns one ucp_rkey_h unpacked on an Endpoint; keeps it alive.
// Request: owns one in-flight UCX request (ucp_request_free).
//
// Endpoint is non-movable and heap-held: UCX's error callback receives its
// address. The callback only records the failure (an atomic); the Agent reads
// it after ucp_worker_progress returns, so nothing is destroyed inside UCX.
// All three are thread-compatible: use them with the worker's lock held.
// Destruction order: RemoteKey before its Endpoint, Endpoint before its
// Worker; the references make any other order impossible.
#ifndef KVFERRY_SRC_UCX_ENDPOINT_H_
#define KVFERRY_SRC_UCX_ENDPOINT_H_

#include <sys/socket.h>

#include <atomic>
#include "kvferry/source_location.h"
#include "absl/strings/string_view.h"

#include <ucp/api/ucp.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "src/ucx/worker.h"

namespace kvferry::internal {

class Endpoint : public boost::intrusive_ref_counter<Endpoint> {
 public:
  enum class State { kConnected, kFailed, kClosed };
  // Whether UCX should report peer failure on this endpoint. kPeer restricts
  // UCX to transports that can detect it (on one host: no shared memory).
  enum class ErrorMode { kNone, kPeer };

  // Connects to a packed worker address received from a peer. kUnavailable
  // when a shared-memory segment the address names is gone (the peer exited).
  static absl::StatusOr<boost::intrusive_ptr<Endpoint>> ConnectToAddress(
      WorkerPtr worker, absl::string_view address, ErrorMode mode,
      SourceLocation site = SourceLocation::current());

  // Force-closes if still open. REQUIRES: not inside this worker's progress.
  ~Endpoint();
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;

  ucp_ep_h native_handle() const { return handle_; }
  const WorkerPtr& worker() const { return worker_; }
  State state() const { return state_.load(std::memory_order_acquire); }
  // The status UCX reported through the error callback, or UCS_OK.
  ucs_status_t failure() const { return failure_.load(std::memory_order_acquire); }

  // Closes the endpoint, progressing the worker until UCX is done with it.
  // Graceful (force=false): flushes outstanding operations, then closes. If
  // the flush does not finish within `timeout`, an endpoint in peer-error
  // mode is force-closed instead (its operations complete with an error);
  // one without that mode cannot be (UCX forbids it), and kDeadlineExceeded
  // says its operations may still be outstanding. OkStatus means no operation
  // posted on this endpoint can still move data. Idempotent (later calls
  // repeat that answer). REQUIRES: not inside this worker's progress.
  absl::Status Close(bool force, absl::Duration timeout);

  // The same close without waiting: BeginClose posts what Close would
  // (a flush, or the close itself) and returns; AdvanceClose checks it
  // without progressing the worker (the caller's progress passes move it)
  // and takes the next step when one is due. AdvanceClose returns true once
  // the close is over; close_status() is then what Close would have
  // returned. A close under way may be finished by Close (which waits).
  // REQUIRES: BeginClose at most once, before any Close; neither is called
  // inside this worker's progress.
  void BeginClose(bool force, absl::Duration timeout);
  bool AdvanceClose(absl::Time now);
  bool closing() const { return step_ != CloseStep::kOpen && step_ != CloseStep::kDone; }
  const absl::Status& close_status() const { return close_status_; }

 private:
  enum class CloseStep { kOpen, kFlushing, kClosing, kDone };
  Endpoint(WorkerPtr worker, Tracked tracked)
      : worker_(std::move(worker)), tracked_(std::move(tracked)) {}
  // After the flush (its status `flushed`): the close Close's contract asks
  // for.
  void CloseAfterFlush(ucs_status_t flushed, absl::Time now);
  // Posts ucp_ep_close_nbx; the close is over when its request completes or
  // `deadline` passes (UCX then finishes the disconnect alone).
  void PostClose(unsigned flags, absl::Time deadline);
  void FinishClose();
  static absl::StatusOr<boost::intrusive_ptr<Endpoint>> Create(
      WorkerPtr worker, ucp_ep_params_t* params, ErrorMode mode, SourceLocation site);
  static void OnError(void* arg, ucp_ep_h ep, ucs_status_t status) noexcept;

  const WorkerPtr worker_;
  ucp_ep_h handle_ = nullptr;
  ErrorMode mode_ = ErrorMode::kNone;
  absl::Status close_status_;  // the answer of the first Close
  CloseStep step_ = CloseStep::kOpen;
  bool can_force_ = false;         // mode_ == kPeer
  bool forced_ = false;            // the close posted was a force close
  absl::Duration close_timeout_;   // BeginClose's
  absl::Time step_deadline_;       // of the flush or close request pending
  ucs_status_ptr_t pending_ = nullptr;  // that request
  std::atomic<State> state_{State::kConnected};
  std::atomic<ucs_status_t> failure_{UCS_OK};
  Tracked tracked_;
};

using EndpointPtr = boost::intrusive_ptr<Endpoint>;

class RemoteKey {
 public:
  // kInvalidArgument for an empty buffer, one whose own length fields do not
  // add up (src/ucx/packed_rkey.h), or one UCX cannot unpack. For a peer on
  // this host (same kernel), the shared-memory segments the key names are
  // attached here first and held until UCX has attached them, so a peer that
  // exits meanwhile cannot make UCX's attach fail; a segment this process
  // cannot attach (gone, or in another IPC namespace) is left out of the key
  // (logged). For a peer elsewhere the key goes to UCX as it came (UCX
  // attaches no shared memory of another host). Other transport keys are
  // UCX's to parse: a crafted one from an authenticated peer is inside the
  // trust boundary.
  static absl::StatusOr<RemoteKey> Unpack(
      EndpointPtr endpoint, absl::string_view packed, bool peer_on_this_host = true,
      SourceLocation site = SourceLocation::current());

  RemoteKey() = default;
  ~RemoteKey() { Reset(); }
  RemoteKey(RemoteKey&& other) noexcept;
  RemoteKey& operator=(RemoteKey&& other) noexcept;
  RemoteKey(const RemoteKey&) = delete;
  RemoteKey& operator=(const RemoteKey&) = delete;

  void Reset() noexcept;
  bool empty() const { return handle_ == nullptr; }
  ucp_rkey_h native_handle() const { return handle_; }
  const EndpointPtr& endpoint() const { return endpoint_; }

 private:
  RemoteKey(EndpointPtr endpoint, ucp_rkey_h handle, Tracked tracked)
      : endpoint_(std::move(endpoint)), handle_(handle), tracked_(std::move(tracked)) {}

  EndpointPtr endpoint_;
  ucp_rkey_h handle_ = nullptr;
  Tracked tracked_;
};

class Request {
 public:
  // Takes ownership of `request` if it is a real request pointer; `done` and
  // error pointers make an empty Request.
  static Request Adopt(WorkerPtr worker, ucs_status_ptr_t request,
                       SourceLocation site = SourceLocation::current());

  Request() = default;
  // A pending request is waited for (see Reset).
  ~Request() { Reset(); }
  Request(Request&& other) noexcept;
  Request& operator=(Request&& other) noexcept;
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;

  // UCS_INPROGRESS while in flight, else the final status. An empty Request
  // reports UCS_OK.
  ucs_status_t Check() const;
  // Frees the request. If it is still in flight, first asks UCX to cancel it
  // and progresses the worker until it completes (endpoint close guarantees
  // that), so no buffer it touches can be released under it.
  // REQUIRES: not inside this worker's progress. Idempotent.
  void Reset() noexcept;
  // Frees the request without waiting (ucp_request_free: the operation goes
  // on, no callback follows). REQUIRES: nothing it touches can be released
  // under it, e.g. its endpoint was force-closed or flushed.
  void Abandon() noexcept;
  bool empty() const { return request_ == nullptr; }

 private:
  Request(WorkerPtr worker, void* request, Tracked tracked)
      : worker_(std::move(worker)), request_(request), tracked_(std::move(tracked)) {}

  WorkerPtr worker_;
  void* request_ = nullptr;
  Tracked tracked_;
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_UCX_ENDPOINT_H_
