// KernelCopier: the thread that runs an agent's kernel copies
// (src/kernel_copy.h), so that no agent lock and no UCX worker call waits
// behind one. A copy is synchronous and may take milliseconds; the agent's
// control pass (handshakes, pings, offer messages) and its UCX data pass go
// on meanwhile.
//
// Jobs run one at a time, in submission order. A job whose target was
// closed (its peer's connection ended) fails without copying. A job starts
// only while `fresh()` holds (the agent read its control connections
// lately: a process that was stopped must first learn whether its peer
// gave up on it); otherwise the copier calls `wake()` and waits for
// NoteConnectionsServiced(). When a job ends, its outcome is recorded
// (TransferCore::MarkCopied) and `wake()` is called, so that the agent ends
// the transfer on its next pass.
//
// Thread-safe. The thread starts with the first job. `fresh` and `wake`
// run on the copier's thread and must not take agent locks. The destructor
// fails queued jobs (as closed) and joins the thread; the agent destroys
// the copier only after every transfer it queued has ended.
#ifndef KVFERRY_SRC_KERNEL_COPIER_H_
#define KVFERRY_SRC_KERNEL_COPIER_H_

#include <sys/uio.h>

#include <atomic>
#include <deque>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "kvferry/internal/mutex.h"
#include "kvferry/transfer.h"
#include "src/kernel_copy.h"

namespace kvferry::internal {

class TransferCore;

// Tests only: when set, the copier calls it before each copy (CloseTarget
// of that copy's target waits for it).
extern std::atomic<void (*)()> kernel_copy_test_hook;

// The name of every agent's copier thread (/proc/self/task/*/comm).
inline constexpr char kKernelCopierThreadName[] = "kvf-kcopy";

class KernelCopier {
 public:
  struct Job {
    // Kept alive by its agent's in-flight list until MarkCopied().
    TransferCore* core = nullptr;
    KernelCopyPtr target;
    TransferOp op = TransferOp::kWrite;
    std::vector<iovec> local;
    std::vector<iovec> remote;
    std::string peer_name;  // for messages
  };

  KernelCopier(std::function<bool()> fresh, std::function<void()> wake);
  ~KernelCopier() ABSL_LOCKS_EXCLUDED(mu_);
  KernelCopier(const KernelCopier&) = delete;
  KernelCopier& operator=(const KernelCopier&) = delete;

  void Submit(Job job) ABSL_LOCKS_EXCLUDED(mu_);
  // The target's peer is closed: no copy to it starts from here on; its
  // queued jobs end at once with `why`, and a copy to it in progress is
  // waited for (its transfer is marked before this returns). So when this
  // returns, every transfer ever submitted for `target` is marked copied,
  // and nothing more reaches the peer's memory.
  void CloseTarget(KernelCopyTarget& target, const absl::Status& why) ABSL_LOCKS_EXCLUDED(mu_);
  // The agent read its control connections: a job waiting for that starts.
  void NoteConnectionsServiced() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Main() ABSL_LOCKS_EXCLUDED(mu_);
  // Runs one job; records its outcome.
  void Run(Job& job) ABSL_LOCKS_EXCLUDED(mu_);
  // Waits until fresh() or the target closed or the copier stops.
  void AwaitFresh(const KernelCopyTarget& target) ABSL_LOCKS_EXCLUDED(mu_);

  // Constant after construction.
  const std::function<bool()> fresh_;
  const std::function<void()> wake_;

  Mutex mu_;
  std::deque<Job> jobs_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Bumped by NoteConnectionsServiced.
  uint64_t serviced_ ABSL_GUARDED_BY(mu_) = 0;
  bool awaiting_fresh_ ABSL_GUARDED_BY(mu_) = false;
  // The target of the job the thread took, until its transfer is marked.
  const KernelCopyTarget* running_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::thread thread_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_KERNEL_COPIER_H_
