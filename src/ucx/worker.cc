#include "src/ucx/worker.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <cerrno>
#include <unistd.h>

#include <thread>
#include <utility>

#include "src/ucx/status.h"

namespace kvferry::internal {

absl::StatusOr<WorkerPtr> Worker::Create(ContextPtr context, SourceLocation site) {
  if (context == nullptr) return absl::InvalidArgumentError("Worker::Create: null context");
  ucp_worker_params_t params = {};
  params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  // The Agent serializes every call on this worker under its mutex.
  params.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  ucp_worker_h handle = nullptr;
  ucs_status_t st = ucp_worker_create(context->native_handle(), &params, &handle);
  if (st != UCS_OK) return UcsToStatus(st, "ucp_worker_create");
  int efd = -1;
  if (ucp_worker_get_efd(handle, &efd) != UCS_OK) efd = -1;
  const int wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd < 0) {
    ucp_worker_destroy(handle);
    return absl::ErrnoToStatus(errno, "eventfd");
  }
  Tracked tracked(context->ledger(), ResourceKind::kWorker, site);
  return WorkerPtr(new Worker(std::move(context), handle, efd, wake_fd, std::move(tracked)));
}

Worker::~Worker() {
  ucp_worker_destroy(handle_);
  close(wake_fd_);
}

void Worker::Signal() const {
  const uint64_t one = 1;
  // EAGAIN (the counter is full) still leaves the fd readable.
  (void)!write(wake_fd_, &one, sizeof(one));
}

void Worker::ClearSignal() const {
  uint64_t count = 0;
  (void)!read(wake_fd_, &count, sizeof(count));
}

bool Worker::Arm() {
  if (efd_ < 0) return true;
  return ucp_worker_arm(handle_) == UCS_OK;
}

void Worker::WaitFd(int timeout_ms) const {
  if (efd_ < 0) {
    pollfd wake = {wake_fd_, POLLIN, 0};
    if (poll(&wake, 1, 0) > 0) ClearSignal();
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    return;
  }
  pollfd pfd[2] = {{efd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
  (void)poll(pfd, 2, timeout_ms);
  if (pfd[1].revents != 0) ClearSignal();
}

absl::StatusOr<WorkerAddress> Worker::Address(SourceLocation site) {
  ucp_address_t* address = nullptr;
  size_t length = 0;
  ucs_status_t st = ucp_worker_get_address(handle_, &address, &length);
  if (st != UCS_OK) return UcsToStatus(st, "ucp_worker_get_address");
  return WorkerAddress(WorkerPtr(this), address, length,
                       Tracked(ledger(), ResourceKind::kWorkerAddress, site));
}

WorkerAddress::WorkerAddress(WorkerAddress&& other) noexcept
    : worker_(std::move(other.worker_)),
      address_(std::exchange(other.address_, nullptr)),
      length_(std::exchange(other.length_, 0)),
      tracked_(std::move(other.tracked_)) {}

WorkerAddress& WorkerAddress::operator=(WorkerAddress&& other) noexcept {
  if (this != &other) {
    Reset();
    worker_ = std::move(other.worker_);
    address_ = std::exchange(other.address_, nullptr);
    length_ = std::exchange(other.length_, 0);
    tracked_ = std::move(other.tracked_);
  }
  return *this;
}

void WorkerAddress::Reset() noexcept {
  if (address_ != nullptr) {
    ucp_worker_release_address(worker_->native_handle(), address_);
    address_ = nullptr;
    length_ = 0;
  }
  tracked_.Reset();
  worker_.reset();
}

}  // namespace kvferry::internal
