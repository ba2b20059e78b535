#include "src/kernel_copier.h"

#include <pthread.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "src/transfer_core.h"

namespace kvferry::internal {

std::atomic<void (*)()> kernel_copy_test_hook{nullptr};

KernelCopier::KernelCopier(std::function<bool()> fresh, std::function<void()> wake, int threads)
    : fresh_(std::move(fresh)),
      wake_(std::move(wake)),
      max_threads_(static_cast<size_t>(std::clamp(threads, 1, kMaxThreads))) {}

KernelCopier::~KernelCopier() {
  std::vector<std::thread> threads;
  {
    MutexLock l(&mu_);
    stop_ = true;
    threads.swap(threads_);
  }
  for (std::thread& t : threads) t.join();
  // What the threads left (nothing, when the agent waited for its transfers).
  std::vector<std::shared_ptr<Task>> done;
  {
    MutexLock l(&mu_);
    for (Slice& s : queue_) {
      if (EndSliceLocked(*s.task, absl::UnavailableError(absl::StrCat(
                                      "the agent stopped before the copy to peer '",
                                      s.task->job.peer_name, "' started")))) {
        done.push_back(s.task);
      }
    }
    queue_.clear();
  }
  for (const std::shared_ptr<Task>& t : done) t->job.core->MarkCopied(t->status);
}

void KernelCopier::Submit(Job job) {
  auto task = std::make_shared<Task>();
  task->job = std::move(job);
  const std::vector<iovec>& local = task->job.local;
  uint64_t total = 0;
  for (const iovec& v : local) total += v.iov_len;
  const size_t slices = static_cast<size_t>(std::clamp<uint64_t>(
      total / kMinSliceBytes, 1, std::max<uint64_t>(std::min(max_threads_, local.size()), 1)));
  // Cut at element boundaries, each slice ending once it holds its share.
  std::vector<Slice> cut;
  cut.reserve(slices);
  size_t begin = 0;
  uint64_t acc = 0;
  for (size_t i = 0; i < local.size() && cut.size() + 1 < slices; ++i) {
    acc += local[i].iov_len;
    if (acc * slices >= total * (cut.size() + 1)) {
      cut.push_back({task, begin, i + 1});
      begin = i + 1;
    }
  }
  cut.push_back({task, begin, local.size()});
  task->slices_left = cut.size();

  MutexLock l(&mu_);
  for (Slice& s : cut) queue_.push_back(std::move(s));
  while (threads_.size() < max_threads_ && queue_.size() > idle_) {
    const size_t slot = threads_.size();
    running_.push_back(nullptr);
    ++idle_;
    threads_.emplace_back([this, slot] { Main(slot); });
    // Named before Submit returns, not when the thread first runs.
    (void)pthread_setname_np(threads_.back().native_handle(), kKernelCopierThreadName);
  }
}

void KernelCopier::CloseTarget(KernelCopyTarget& target, const absl::Status& why) {
  target.Close();
  std::vector<std::shared_ptr<Task>> done;
  {
    MutexLock l(&mu_);
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (it->task->job.target.get() == &target) {
        if (EndSliceLocked(*it->task, why)) done.push_back(it->task);
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    // A slice in progress marks its job (if it is the last) before it
    // clears its entry.
    mu_.Await([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return std::find(running_.begin(), running_.end(), &target) == running_.end();
    });
  }
  for (const std::shared_ptr<Task>& t : done) t->job.core->MarkCopied(t->status);
}

void KernelCopier::NoteConnectionsServiced() {
  MutexLock l(&mu_);
  if (awaiting_fresh_ > 0) ++serviced_;  // Unlock wakes the waiters
}

bool KernelCopier::EndSliceLocked(Task& task, absl::Status status) {
  if (!status.ok() && task.status.ok()) task.status = std::move(status);
  return --task.slices_left == 0;
}

void KernelCopier::Main(size_t slot) {
  while (true) {
    Slice slice;
    {
      MutexLock l(&mu_);
      mu_.Await([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); });
      if (stop_) return;
      slice = std::move(queue_.front());
      queue_.pop_front();
      running_[slot] = slice.task->job.target.get();
      --idle_;
    }
    absl::Status status = Run(slice);
    bool last;
    {
      MutexLock l(&mu_);
      last = EndSliceLocked(*slice.task, std::move(status));
    }
    // Nothing of the job is left in flight: it is fenced as it stands. The
    // agent may end (and free) its transfer from here on.
    if (last) slice.task->job.core->MarkCopied(slice.task->status);
    {
      MutexLock l(&mu_);
      running_[slot] = nullptr;  // Unlock wakes CloseTarget
      ++idle_;
    }
    if (last) wake_();
  }
}

bool KernelCopier::AwaitFresh(const KernelCopyTarget& target) {
  while (!fresh_()) {
    if (!target.open()) return false;
    uint64_t seen;
    {
      MutexLock l(&mu_);
      if (stop_) return false;
      ++awaiting_fresh_;
      seen = serviced_;
    }
    wake_();
    MutexLock l(&mu_);
    // Bounded: the target may close without a pass reporting it here.
    mu_.AwaitWithTimeout(
        [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || serviced_ != seen; },
        absl::Milliseconds(10));
    --awaiting_fresh_;
  }
  return true;
}

absl::Status KernelCopier::Run(const Slice& slice) {
  const Job& job = slice.task->job;
  {
    MutexLock l(&mu_);
    // Another slice failed: the job's outcome is decided, nothing more moves.
    if (!slice.task->status.ok()) return absl::OkStatus();
  }
  const KernelCopyTarget& target = *job.target;
  const bool fresh = AwaitFresh(target);
  if (!target.open()) {
    return absl::UnavailableError(absl::StrCat(
        "the connection to peer '", job.peer_name, "' ended before the transfer's copy started"));
  }
  if (!fresh) {
    return absl::UnavailableError(absl::StrCat("the agent stopped before the copy to peer '",
                                               job.peer_name, "' started"));
  }
  if (auto* hook = kernel_copy_test_hook.load(std::memory_order_acquire)) hook();
  if (target.Exited()) {
    return absl::UnavailableError(absl::StrCat("peer '", job.peer_name, "': its process (pid ",
                                               target.pid(), ") exited"));
  }
  const size_t n = slice.end - slice.begin;
  absl::Status status =
      target.Copy(job.op, absl::MakeConstSpan(job.local.data() + slice.begin, n),
                  absl::MakeConstSpan(job.remote.data() + slice.begin, n));
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrCat("peer '", job.peer_name, "': ", status.message()));
  }
  return absl::OkStatus();
}

}  // namespace kvferry::internal
