// KernelCopier: the threads that run an agent's kernel copies
// (src/kernel_copy.h), so that no agent lock and no UCX worker call waits
// behind one. A copy is synchronous and may take milliseconds; the agent's
// control pass (handshakes, pings, offer messages) and its UCX data pass go
// on meanwhile.
//
// A job is cut into slices (runs of whole elements of about equal bytes; a
// job has at most one slice per kMinSliceBytes, so one under twice that is
// one slice, and no more slices than the copier has threads), and up to
// `threads` slices run at once, each on its own thread. Slices start in
// submission order (a job's slices are queued together, behind every slice
// of every earlier job), so jobs start in submission order; they may end in
// any order.
//
// A slice starts only while `fresh()` holds (the agent read its control
// connections lately: a process that was stopped must first learn whether
// its peer gave up on it); otherwise its thread calls `wake()` and waits
// for NoteConnectionsServiced(). A slice whose target was closed (its
// peer's connection ended), or whose job already failed, ends without
// copying. When the last slice of a job ends, the job's outcome is recorded
// once (TransferCore::MarkCopied): OK if every slice copied, else the first
// error a slice met; no byte of the job moves after that. Then `wake()` is
// called, so that the agent ends the transfer on its next pass.
//
// Thread-safe. Threads start with the jobs that need them and stay until
// the copier is destroyed; each is named kKernelCopierThreadName. `fresh`
// and `wake` run on the copier's threads (several at once) and must not
// take agent locks. The destructor fails queued jobs (as closed) and joins
// the threads; the agent destroys the copier only after every transfer it
// queued has ended.
#ifndef KVFERRY_SRC_KERNEL_COPIER_H_
#define KVFERRY_SRC_KERNEL_COPIER_H_

#include <sys/uio.h>

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
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

// Tests only: when set, the copier calls it before each slice's copy, on
// that slice's thread (CloseTarget of that copy's target waits for it).
extern std::atomic<void (*)()> kernel_copy_test_hook;

// The name of every agent's copier threads (/proc/self/task/*/comm).
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

  // A job is cut into slices of at least this many bytes.
  static constexpr uint64_t kMinSliceBytes = 256 << 10;
  // The most threads a copier runs (AgentOptions::kernel_copy_threads).
  static constexpr int kMaxThreads = 64;

  // `threads`: 1 to kMaxThreads (the agent checked it).
  KernelCopier(std::function<bool()> fresh, std::function<void()> wake, int threads = 1);
  ~KernelCopier() ABSL_LOCKS_EXCLUDED(mu_);
  KernelCopier(const KernelCopier&) = delete;
  KernelCopier& operator=(const KernelCopier&) = delete;

  void Submit(Job job) ABSL_LOCKS_EXCLUDED(mu_);
  // The target's peer is closed: no copy to it starts from here on; its
  // queued slices end at once with `why`, and slices to it in progress are
  // waited for (their transfers are marked before this returns). So when
  // this returns, every transfer ever submitted for `target` is marked
  // copied, and nothing more reaches the peer's memory.
  void CloseTarget(KernelCopyTarget& target, const absl::Status& why) ABSL_LOCKS_EXCLUDED(mu_);
  // The agent read its control connections: slices waiting for that start.
  void NoteConnectionsServiced() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // A submitted job until it is marked; shared by its slices.
  struct Task {
    Job job;
    size_t slices_left = 0;  // queued or running; guarded by mu_
    absl::Status status;     // the first error; guarded by mu_
  };
  struct Slice {
    std::shared_ptr<Task> task;
    size_t begin = 0;  // elements [begin, end) of the job
    size_t end = 0;
  };

  void Main(size_t slot) ABSL_LOCKS_EXCLUDED(mu_);
  // Copies one slice (unless its job failed or its target closed); the
  // status it ends with.
  absl::Status Run(const Slice& slice) ABSL_LOCKS_EXCLUDED(mu_);
  // Waits until fresh() or the target closed or the copier stops; whether
  // fresh() held.
  bool AwaitFresh(const KernelCopyTarget& target) ABSL_LOCKS_EXCLUDED(mu_);
  // Records a slice's end; true when it was its job's last (the caller
  // marks the job, outside mu_).
  bool EndSliceLocked(Task& task, absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  const std::function<bool()> fresh_;
  const std::function<void()> wake_;
  const size_t max_threads_;

  Mutex mu_;
  std::deque<Slice> queue_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Bumped by NoteConnectionsServiced while a thread waits for it.
  uint64_t serviced_ ABSL_GUARDED_BY(mu_) = 0;
  int awaiting_fresh_ ABSL_GUARDED_BY(mu_) = 0;  // threads waiting for fresh()
  size_t idle_ ABSL_GUARDED_BY(mu_) = 0;         // threads holding no slice
  // Per thread: the target of the slice it took, until that slice's end
  // is recorded (and its transfer marked, if it was the last).
  std::vector<const KernelCopyTarget*> running_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_KERNEL_COPIER_H_
