// kvferry::internal::Mutex: an annotated mutex over std::mutex, with
// absl::Mutex-style Await.
//
// Why not absl::Mutex: Debian's prebuilt abseil is not built with
// ThreadSanitizer, so TSan cannot see the ordering absl::Mutex provides and
// reports races on every field it guards. std::mutex goes through pthread,
// which TSan intercepts. The clang thread-safety annotations work the same.
//
// Await semantics: a waiter's condition is re-evaluated whenever any holder
// releases the mutex (like absl::Mutex::Await), so state changes need no
// explicit notification. Thread-safe.
#ifndef KVFERRY_INTERNAL_MUTEX_H_
#define KVFERRY_INTERNAL_MUTEX_H_

#include <condition_variable>
#include <mutex>

#include "absl/base/thread_annotations.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvferry::internal {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  // Takes the mutex if it is free; never waits.
  bool TryLock() ABSL_EXCLUSIVE_TRYLOCK_FUNCTION(true) { return mu_.try_lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() {
    const bool wake = waiters_ > 0;
    mu_.unlock();
    if (wake) cv_.notify_all();
  }

  // REQUIRES: held. Waits until `cond()` is true or `deadline` passes;
  // returns cond(). The mutex is released while waiting.
  // (The analysis cannot see that `cond` runs with this very mutex held.)
  template <typename Cond>
  bool AwaitWithDeadline(Cond cond, absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this)
      ABSL_NO_THREAD_SAFETY_ANALYSIS {
    std::unique_lock<std::mutex> lock(mu_, std::adopt_lock);
    ++waiters_;
    while (!cond()) {
      absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) break;
      // Bounded slices keep an infinite deadline from overflowing chrono.
      cv_.wait_for(lock, absl::ToChronoNanoseconds(std::min(left, absl::Seconds(1))));
    }
    --waiters_;
    const bool done = cond();
    lock.release();
    return done;
  }
  template <typename Cond>
  bool AwaitWithTimeout(Cond cond, absl::Duration timeout) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    return AwaitWithDeadline(std::move(cond), absl::Now() + timeout);
  }
  template <typename Cond>
  void Await(Cond cond) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    AwaitWithDeadline(std::move(cond), absl::InfiniteFuture());
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int waiters_ = 0;  // guarded by mu_
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

}  // namespace kvferry::internal

#endif  // KVFERRY_INTERNAL_MUTEX_H_
