// CompletionQueue: the ends of an agent's transfers and offers, waiting for
// Agent::PollCompletions, and the eventfd that says whether anything waits.
//
// Contract:
//  - The fd (an eventfd, EFD_NONBLOCK | EFD_CLOEXEC) is owned here and
//    closed by the destructor. It is readable exactly while a recorded end,
//    a dropped count or ready notifications wait: every member that changes
//    that sets or drains the fd under the queue's lock, so the fd's level
//    and the state never disagree once a member returns.
//  - At most `capacity` ends are held; further ends are counted as dropped
//    (and make the fd readable) until Take.
//  - Notifications are not held here: their owner says whether any wait
//    (SetNotificationsReady), and Take leaves that flag alone.
//
// Thread-safe. The queue's mutex is a leaf: it is never held while another
// lock is taken, so any of the agent's locks may be held while calling in.
#ifndef KVFERRY_SRC_COMPLETION_QUEUE_H_
#define KVFERRY_SRC_COMPLETION_QUEUE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvferry/completion.h"
#include "kvferry/internal/mutex.h"

namespace kvferry::internal {

class CompletionQueue {
 public:
  // kInternal (naming errno) when no eventfd can be made; kInvalidArgument
  // for a zero capacity.
  static absl::StatusOr<std::unique_ptr<CompletionQueue>> Create(size_t capacity);
  ~CompletionQueue();
  CompletionQueue(const CompletionQueue&) = delete;
  CompletionQueue& operator=(const CompletionQueue&) = delete;

  int fd() const { return fd_; }

  // Records an end; the reason is read from `status`.
  void TransferEnded(uint64_t id, TransferState state, absl::Status status,
                     TransferTelemetry telemetry) ABSL_LOCKS_EXCLUDED(mu_);
  void OfferEnded(uint64_t id, OfferState state, absl::Status status) ABSL_LOCKS_EXCLUDED(mu_);
  // Whether notifications wait to be polled (the fd is readable while so).
  void SetNotificationsReady(bool ready) ABSL_LOCKS_EXCLUDED(mu_);
  // Moves the held ends and the dropped count into `out` (appending) and
  // empties the queue; the fd stays readable only while notifications wait.
  void Take(Completions* out) ABSL_LOCKS_EXCLUDED(mu_);

  // What is held now (tests and stats).
  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  CompletionQueue(int fd, size_t capacity) : fd_(fd), capacity_(capacity) {}
  // Records one end, or counts it as dropped when full.
  bool RoomLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sets or drains the fd to match what waits.
  void UpdateFdLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int fd_;
  const size_t capacity_;
  mutable Mutex mu_;
  std::vector<TransferCompletion> transfers_ ABSL_GUARDED_BY(mu_);
  std::vector<OfferCompletion> offers_ ABSL_GUARDED_BY(mu_);
  uint64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
  bool notifications_ready_ ABSL_GUARDED_BY(mu_) = false;
  bool signalled_ ABSL_GUARDED_BY(mu_) = false;  // the fd's counter is non-zero
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_COMPLETION_QUEUE_H_
