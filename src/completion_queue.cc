#include "src/completion_queue.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvferry::internal {

absl::StatusOr<std::unique_ptr<CompletionQueue>> CompletionQueue::Create(size_t capacity) {
  if (capacity == 0) {
    return absl::InvalidArgumentError(
        "AgentOptions.max_queued_completions = 0 must be at least 1");
  }
  int fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(
        absl::StrCat("eventfd for the completion queue failed: ", std::strerror(errno)));
  }
  return std::unique_ptr<CompletionQueue>(new CompletionQueue(fd, capacity));
}

CompletionQueue::~CompletionQueue() { ::close(fd_); }

bool CompletionQueue::RoomLocked() {
  if (transfers_.size() + offers_.size() < capacity_) return true;
  ++dropped_;
  return false;
}

void CompletionQueue::TransferEnded(uint64_t id, TransferState state, absl::Status status,
                                    TransferTelemetry telemetry) {
  const EndReason reason = ReasonOf(status);
  MutexLock l(&mu_);
  if (RoomLocked()) {
    transfers_.push_back({.id = id,
                          .state = state,
                          .status = std::move(status),
                          .reason = reason,
                          .telemetry = std::move(telemetry)});
  }
  UpdateFdLocked();
}

void CompletionQueue::OfferEnded(uint64_t id, OfferState state, absl::Status status) {
  MutexLock l(&mu_);
  const EndReason reason = ReasonOf(status);
  if (RoomLocked()) {
    offers_.push_back(
        {.id = id, .state = state, .status = std::move(status), .reason = reason});
  }
  UpdateFdLocked();
}

void CompletionQueue::SetNotificationsReady(bool ready) {
  MutexLock l(&mu_);
  notifications_ready_ = ready;
  UpdateFdLocked();
}

void CompletionQueue::Take(Completions* out) {
  MutexLock l(&mu_);
  if (out->transfers.empty()) {
    out->transfers.swap(transfers_);
  } else {
    for (TransferCompletion& t : transfers_) out->transfers.push_back(std::move(t));
  }
  if (out->offers.empty()) {
    out->offers.swap(offers_);
  } else {
    for (OfferCompletion& o : offers_) out->offers.push_back(std::move(o));
  }
  transfers_ = {};  // a burst's capacity is not kept
  offers_ = {};
  out->dropped += std::exchange(dropped_, 0);
  UpdateFdLocked();
}

size_t CompletionQueue::size() const {
  MutexLock l(&mu_);
  return transfers_.size() + offers_.size();
}

void CompletionQueue::UpdateFdLocked() {
  const bool want = !transfers_.empty() || !offers_.empty() || dropped_ != 0 ||
                    notifications_ready_;
  if (want == signalled_) return;
  if (want) {
    const uint64_t one = 1;
    // Cannot fail: the counter is 0 here (non-blocking write of 1 to a
    // counter far from overflow).
    (void)!::write(fd_, &one, sizeof(one));
  } else {
    uint64_t count = 0;
    (void)!::read(fd_, &count, sizeof(count));  // resets the counter to 0
  }
  signalled_ = want;
}

}  // namespace kvferry::internal
