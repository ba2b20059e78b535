#include "src/kernel_copier.h"

#include <pthread.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "src/transfer_core.h"

namespace kvferry::internal {

std::atomic<void (*)()> kernel_copy_test_hook{nullptr};

KernelCopier::KernelCopier(std::function<bool()> fresh, std::function<void()> wake)
    : fresh_(std::move(fresh)), wake_(std::move(wake)) {}

KernelCopier::~KernelCopier() {
  std::thread thread;
  {
    MutexLock l(&mu_);
    stop_ = true;
    thread = std::move(thread_);
  }
  if (thread.joinable()) thread.join();
  // What the thread left (nothing, when the agent waited for its transfers).
  std::deque<Job> left;
  {
    MutexLock l(&mu_);
    left.swap(jobs_);
  }
  for (Job& job : left) {
    job.core->MarkCopied(absl::UnavailableError(
        absl::StrCat("the agent stopped before the copy to peer '", job.peer_name, "' started")));
  }
}

void KernelCopier::Submit(Job job) {
  MutexLock l(&mu_);
  jobs_.push_back(std::move(job));
  if (!thread_.joinable()) thread_ = std::thread([this] { Main(); });
}

void KernelCopier::CloseTarget(KernelCopyTarget& target, const absl::Status& why) {
  target.Close();
  std::vector<Job> dropped;
  {
    MutexLock l(&mu_);
    for (auto it = jobs_.begin(); it != jobs_.end();) {
      if (it->target.get() == &target) {
        dropped.push_back(std::move(*it));
        it = jobs_.erase(it);
      } else {
        ++it;
      }
    }
    mu_.Await([&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_ != &target; });
  }
  for (Job& job : dropped) job.core->MarkCopied(why);
}

void KernelCopier::NoteConnectionsServiced() {
  MutexLock l(&mu_);
  if (awaiting_fresh_) ++serviced_;  // Unlock wakes the waiter
}

void KernelCopier::Main() {
  (void)pthread_setname_np(pthread_self(), kKernelCopierThreadName);
  while (true) {
    Job job;
    {
      MutexLock l(&mu_);
      mu_.Await([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
      running_ = job.target.get();
    }
    Run(job);
    {
      MutexLock l(&mu_);
      running_ = nullptr;  // Unlock wakes CloseTarget
    }
    wake_();
  }
}

void KernelCopier::AwaitFresh(const KernelCopyTarget& target) {
  while (!fresh_() && target.open()) {
    uint64_t seen;
    {
      MutexLock l(&mu_);
      if (stop_) return;
      awaiting_fresh_ = true;
      seen = serviced_;
    }
    wake_();
    MutexLock l(&mu_);
    // Bounded: the target may close without a pass reporting it here.
    mu_.AwaitWithTimeout(
        [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || serviced_ != seen; },
        absl::Milliseconds(10));
    awaiting_fresh_ = false;
  }
}

void KernelCopier::Run(Job& job) {
  KernelCopyTarget& target = *job.target;
  AwaitFresh(target);
  absl::Status status;
  if (!target.open()) {
    status = absl::UnavailableError(absl::StrCat(
        "the connection to peer '", job.peer_name, "' ended before the transfer's copy started"));
  } else {
    if (auto* hook = kernel_copy_test_hook.load(std::memory_order_acquire)) hook();
    if (target.Exited()) {
      status = absl::UnavailableError(absl::StrCat("peer '", job.peer_name,
                                                   "': its process (pid ", target.pid(),
                                                   ") exited"));
    } else {
      status = target.Copy(job.op, job.local, job.remote);
      if (!status.ok()) {
        status = absl::Status(status.code(),
                              absl::StrCat("peer '", job.peer_name, "': ", status.message()));
      }
    }
  }
  // Nothing is left in flight: the transfer is fenced as it stands. The
  // agent may end (and free) it from here on.
  job.core->MarkCopied(std::move(status));
}

}  // namespace kvferry::internal
