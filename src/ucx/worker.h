// Worker: owns one ucp_worker_h and keeps its Context alive.
// WorkerAddress: owns the buffer from ucp_worker_get_address.
//
// Worker is non-movable and heap-held (endpoints, requests and addresses keep
// it alive through boost::intrusive_ptr<Worker>). A Worker and everything
// under it is thread-compatible: one thread at a time (kvferry's Agent
// serializes all calls under its mutex).
#ifndef KVFERRY_SRC_UCX_WORKER_H_
#define KVFERRY_SRC_UCX_WORKER_H_

#include "kvferry/source_location.h"
#include "absl/strings/string_view.h"

#include <ucp/api/ucp.h>

#include "absl/status/statusor.h"
#include "src/ucx/context.h"

namespace kvferry::internal {

class WorkerAddress;

class Worker : public boost::intrusive_ref_counter<Worker> {
 public:
  static absl::StatusOr<boost::intrusive_ptr<Worker>> Create(
      ContextPtr context, SourceLocation site = SourceLocation::current());
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  ucp_worker_h native_handle() const { return handle_; }
  const ContextPtr& context() const { return context_; }
  const LedgerPtr& ledger() const { return context_->ledger(); }

  // ucp_worker_progress; returns the number of events progressed.
  unsigned Progress() { return ucp_worker_progress(handle_); }

  // Idle waiting, in two steps: Arm() with the worker's lock held (false:
  // events are pending, progress again), then WaitFd() without it, which
  // blocks up to `timeout_ms` on the event fd and the wake fd (or sleeps
  // briefly when the worker has none). Signal() wakes a waiter from any
  // thread, without touching UCX: it writes the wake fd (an eventfd), so it
  // may run while another thread is inside the worker.
  bool Arm();
  void WaitFd(int timeout_ms) const;
  void Signal() const;
  // Empties the wake fd (after a wait it ended).
  void ClearSignal() const;
  // The worker's event fd (-1 without one), for callers that poll it
  // together with descriptors of their own; Arm() before waiting on it.
  int event_fd() const { return efd_; }
  // The eventfd Signal() writes; poll it with the event fd.
  int wake_fd() const { return wake_fd_; }

  absl::StatusOr<WorkerAddress> Address(
      SourceLocation site = SourceLocation::current());

 private:
  Worker(ContextPtr context, ucp_worker_h handle, int efd, int wake_fd, Tracked tracked)
      : context_(std::move(context)),
        handle_(handle),
        efd_(efd),
        wake_fd_(wake_fd),
        tracked_(std::move(tracked)) {}

  const ContextPtr context_;  // destroyed after handle_ is released
  ucp_worker_h handle_;
  const int efd_;  // -1 when the worker has no event fd
  const int wake_fd_;  // owned eventfd
  Tracked tracked_;
};

using WorkerPtr = boost::intrusive_ptr<Worker>;

// Move-only owner of a packed worker address.
class WorkerAddress {
 public:
  WorkerAddress() = default;
  ~WorkerAddress() { Reset(); }
  WorkerAddress(WorkerAddress&& other) noexcept;
  WorkerAddress& operator=(WorkerAddress&& other) noexcept;
  WorkerAddress(const WorkerAddress&) = delete;
  WorkerAddress& operator=(const WorkerAddress&) = delete;

  void Reset() noexcept;
  bool empty() const { return address_ == nullptr; }
  ucp_address_t* native_handle() const { return address_; }
  absl::string_view bytes() const {
    return {reinterpret_cast<const char*>(address_), length_};
  }

 private:
  friend class Worker;
  WorkerAddress(WorkerPtr worker, ucp_address_t* address, size_t length, Tracked tracked)
      : worker_(std::move(worker)), address_(address), length_(length),
        tracked_(std::move(tracked)) {}

  WorkerPtr worker_;
  ucp_address_t* address_ = nullptr;
  size_t length_ = 0;
  Tracked tracked_;
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_UCX_WORKER_H_
