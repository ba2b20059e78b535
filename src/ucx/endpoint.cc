#include "src/ucx/endpoint.h"

#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "src/log_internal.h"
#include "src/ucx/packed_rkey.h"
#include "src/ucx/status.h"

namespace kvferry::internal {

void Endpoint::OnError(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) noexcept {
  auto* self = static_cast<Endpoint*>(arg);
  ucs_status_t expected = UCS_OK;
  self->failure_.compare_exchange_strong(expected, status, std::memory_order_acq_rel);
  State connected = State::kConnected;
  self->state_.compare_exchange_strong(connected, State::kFailed, std::memory_order_acq_rel);
}

absl::StatusOr<EndpointPtr> Endpoint::Create(WorkerPtr worker, ucp_ep_params_t* params,
                                             ErrorMode mode, SourceLocation site) {
  EndpointPtr ep(new Endpoint(worker, Tracked(worker->ledger(), ResourceKind::kEndpoint, site)));
  ep->mode_ = mode;
  params->field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  params->err_mode = mode == ErrorMode::kPeer ? UCP_ERR_HANDLING_MODE_PEER
                                              : UCP_ERR_HANDLING_MODE_NONE;
  if (mode == ErrorMode::kPeer) {
    params->field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
    params->err_handler.cb = &Endpoint::OnError;
    params->err_handler.arg = ep.get();
  }
  ucs_status_t st = ucp_ep_create(worker->native_handle(), params, &ep->handle_);
  if (st != UCS_OK) {
    ep->handle_ = nullptr;
    ep->state_ = State::kClosed;
    if (st == UCS_ERR_SHMEM_SEGMENT) {
      // UCX could not attach a shared-memory segment the peer's address
      // names (its FIFO): the peer process is gone or going.
      return absl::UnavailableError(absl::StrCat(
          "ucp_ep_create: ", ucs_status_string(st),
          ": the peer's shared memory is gone (the peer process exited)"));
    }
    return UcsToStatus(st, "ucp_ep_create");
  }
  return ep;
}

absl::StatusOr<EndpointPtr> Endpoint::ConnectToAddress(WorkerPtr worker, absl::string_view address,
                                                       ErrorMode mode,
                                                       SourceLocation site) {
  if (address.empty()) return absl::InvalidArgumentError("ConnectToAddress: empty worker address");
  ucp_ep_params_t params = {};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
  params.address = reinterpret_cast<const ucp_address_t*>(address.data());
  return Create(std::move(worker), &params, mode, site);
}

absl::Status Endpoint::Close(bool force, absl::Duration timeout) {
  if (step_ == CloseStep::kDone) return close_status_;
  if (step_ == CloseStep::kOpen) BeginClose(force, timeout);
  // Progress while there is work; once the worker is idle, wait out the
  // step's deadline checking now and then (a dead peer never answers).
  while (!AdvanceClose(absl::Now())) (void)worker_->Progress();
  return close_status_;
}

void Endpoint::BeginClose(bool force, absl::Duration timeout) {
  if (step_ != CloseStep::kOpen) return;
  const absl::Time now = absl::Now();
  can_force_ = mode_ == ErrorMode::kPeer;
  close_timeout_ = timeout;
  if (handle_ == nullptr) {
    step_ = CloseStep::kDone;
    return;
  }
  if (force && can_force_) {
    PostClose(UCP_EP_CLOSE_FLAG_FORCE, now + timeout);
    return;
  }
  // Flush first, so that we know whether the operations drained.
  ucp_request_param_t param = {};
  ucs_status_ptr_t flush = ucp_ep_flush_nbx(handle_, &param);
  if (UCS_PTR_IS_ERR(flush)) {
    CloseAfterFlush(UCS_PTR_STATUS(flush), now);
  } else if (flush == nullptr) {
    CloseAfterFlush(UCS_OK, now);
  } else {
    pending_ = flush;
    step_ = CloseStep::kFlushing;
    step_deadline_ = now + timeout;
  }
}

void Endpoint::CloseAfterFlush(ucs_status_t flushed, absl::Time now) {
  if (flushed == UCS_OK && can_force_) {
    // Drained, so a force close loses nothing. It is also the only close that
    // lets go of the endpoint: UCX 1.13 keeps an endpoint that completed a
    // remote-id wireup (which unpacking an rkey for emulated RMA triggers)
    // after a normal close until the worker is destroyed or a keepalive round
    // finds the peer gone, and with it the peer's shared-memory segments
    // (ucp_ep_disconnected returns early for REMOTE_CONNECTED endpoints).
    PostClose(UCP_EP_CLOSE_FLAG_FORCE, now + absl::Seconds(1));
  } else if (flushed == UCS_OK) {
    // Drained: the disconnect itself may linger (a dead peer never answers);
    // UCX finishes it in the background.
    PostClose(0, now + std::min(close_timeout_, absl::Seconds(1)));
  } else if (can_force_) {
    PostClose(UCP_EP_CLOSE_FLAG_FORCE, now + absl::Seconds(1));
  } else {
    PostClose(0, now);
    close_status_ = absl::DeadlineExceededError(absl::StrCat(
        "endpoint did not drain within ", absl::FormatDuration(close_timeout_),
        " and cannot be force-closed (no peer-error mode); its operations may be outstanding"));
  }
}

void Endpoint::PostClose(unsigned flags, absl::Time deadline) {
  ucp_request_param_t param = {};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = flags;
  ucs_status_ptr_t req = ucp_ep_close_nbx(std::exchange(handle_, nullptr), &param);
  state_.store(State::kClosed, std::memory_order_release);
  forced_ = (flags & UCP_EP_CLOSE_FLAG_FORCE) != 0;
  step_ = CloseStep::kClosing;
  step_deadline_ = deadline;
  if (UCS_PTR_IS_ERR(req)) {
    close_status_ = UcsToStatus(UCS_PTR_STATUS(req), "ucp_ep_close_nbx");
    FinishClose();
    return;
  }
  // A force close has already completed every operation (with an error);
  // the request, if any, only tracks the disconnect.
  pending_ = req;
  if (pending_ == nullptr) FinishClose();
}

void Endpoint::FinishClose() {
  if (pending_ != nullptr) ucp_request_free(std::exchange(pending_, nullptr));
  step_ = CloseStep::kDone;
  // UCX 1.13 destroys the transport endpoints of a force-closed endpoint from
  // a one-shot progress callback; until then they keep the peer's
  // shared-memory segments mapped. Run it now rather than at some later
  // progress (or never, on an idle worker).
  if (forced_) (void)worker_->Progress();
}

bool Endpoint::AdvanceClose(absl::Time now) {
  if (step_ == CloseStep::kFlushing) {
    const ucs_status_t st = ucp_request_check_status(pending_);
    if (st == UCS_INPROGRESS && now <= step_deadline_) return false;
    // Still in flight past the deadline: freed, UCX ends it alone.
    ucp_request_free(std::exchange(pending_, nullptr));
    CloseAfterFlush(st, now);
  }
  if (step_ == CloseStep::kClosing) {
    if (ucp_request_check_status(pending_) == UCS_INPROGRESS && now <= step_deadline_) {
      return false;
    }
    FinishClose();
  }
  return step_ == CloseStep::kDone;
}

Endpoint::~Endpoint() {
  if (handle_ != nullptr || closing()) Close(/*force=*/true, absl::Seconds(10)).IgnoreError();
}

absl::StatusOr<RemoteKey> RemoteKey::Unpack(EndpointPtr endpoint, absl::string_view packed,
                                            bool peer_on_this_host, SourceLocation site) {
  if (endpoint == nullptr || endpoint->native_handle() == nullptr) {
    return absl::FailedPreconditionError("RemoteKey::Unpack: endpoint is closed");
  }
  if (packed.empty()) return absl::InvalidArgumentError("RemoteKey::Unpack: empty rkey buffer");
  // Its own length fields checked, and for a peer on this host its
  // shared-memory segments attached here until UCX has attached them too
  // (src/ucx/packed_rkey.h).
  if (absl::StatusOr<ParsedRkey> parsed = ParsePackedRkey(packed); !parsed.ok()) {
    return parsed.status();
  }
  SegmentHold hold;
  if (peer_on_this_host) {
    absl::StatusOr<SegmentHold> prepared = SegmentHold::Prepare(packed);
    if (!prepared.ok()) return prepared.status();
    hold = *std::move(prepared);
    if (!hold.missing().empty()) {
      // UCX would fail to attach these too (and crash on that failure): the
      // key goes on without them. The peer exited or dropped the pool (its
      // control connection says which), or it runs in another IPC namespace.
      LogToProcessSink(LogSeverity::kWarning,
                       endpoint->worker()->ledger() != nullptr
                           ? endpoint->worker()->ledger()->name()
                           : "",
                       absl::StrCat("a peer's remote key names shared memory this process "
                                    "cannot attach (",
                                    absl::StrJoin(hold.missing(), "; "),
                                    "); unpacking it without that segment"));
    }
  }
  const char* key = peer_on_this_host ? hold.key().data() : packed.data();
  ucp_rkey_h handle = nullptr;
  ucs_status_t st = ucp_ep_rkey_unpack(endpoint->native_handle(), key, &handle);
  if (st != UCS_OK) {
    return absl::InvalidArgumentError(absl::StrCat("ucp_ep_rkey_unpack of a ", packed.size(),
                                                   "-byte rkey: ", ucs_status_string(st)));
  }
  Tracked tracked(endpoint->worker()->ledger(), ResourceKind::kRemoteKey, site);
  return RemoteKey(std::move(endpoint), handle, std::move(tracked));
}

RemoteKey::RemoteKey(RemoteKey&& other) noexcept
    : endpoint_(std::move(other.endpoint_)),
      handle_(std::exchange(other.handle_, nullptr)),
      tracked_(std::move(other.tracked_)) {}

RemoteKey& RemoteKey::operator=(RemoteKey&& other) noexcept {
  if (this != &other) {
    Reset();
    endpoint_ = std::move(other.endpoint_);
    handle_ = std::exchange(other.handle_, nullptr);
    tracked_ = std::move(other.tracked_);
  }
  return *this;
}

void RemoteKey::Reset() noexcept {
  if (handle_ != nullptr) ucp_rkey_destroy(std::exchange(handle_, nullptr));
  tracked_.Reset();
  endpoint_.reset();
}

Request Request::Adopt(WorkerPtr worker, ucs_status_ptr_t request, SourceLocation site) {
  if (SortStatusPtr(request) != PtrKind::kInFlight) return Request();
  Tracked tracked(worker->ledger(), ResourceKind::kRequest, site);
  return Request(std::move(worker), request, std::move(tracked));
}

Request::Request(Request&& other) noexcept
    : worker_(std::move(other.worker_)),
      request_(std::exchange(other.request_, nullptr)),
      tracked_(std::move(other.tracked_)) {}

Request& Request::operator=(Request&& other) noexcept {
  if (this != &other) {
    Reset();
    worker_ = std::move(other.worker_);
    request_ = std::exchange(other.request_, nullptr);
    tracked_ = std::move(other.tracked_);
  }
  return *this;
}

void Request::Abandon() noexcept {
  if (request_ != nullptr) ucp_request_free(std::exchange(request_, nullptr));
  tracked_.Reset();
  worker_.reset();
}

ucs_status_t Request::Check() const {
  if (request_ == nullptr) return UCS_OK;
  return ucp_request_check_status(request_);
}

void Request::Reset() noexcept {
  if (request_ != nullptr) {
    if (ucp_request_check_status(request_) == UCS_INPROGRESS) {
      ucp_request_cancel(worker_->native_handle(), request_);
      absl::Time warn_at = absl::Now() + absl::Seconds(10);
      while (ucp_request_check_status(request_) == UCS_INPROGRESS) {
        worker_->Progress();
        if (absl::Now() > warn_at) {
          LogToProcessSink(LogSeverity::kWarning,
                           worker_->ledger() != nullptr ? worker_->ledger()->name() : "",
                           "a UCX request is still in flight after 10 s; waiting for its "
                           "endpoint to close");
          warn_at = absl::InfiniteFuture();
        }
      }
    }
    ucp_request_free(std::exchange(request_, nullptr));
  }
  tracked_.Reset();
  worker_.reset();
}

}  // namespace kvferry::internal
