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
// explicit notification. Each waiter registers its condition; the thread
// that releases the mutex evaluates the registered conditions while it still
// holds it and wakes only the waiters whose condition became true. A waiter
// whose condition stays false is not woken (it sleeps until it is, or until
// its deadline). Thread-safe.
//
// So a condition runs with the mutex held, on the waiting thread or on any
// thread that releases the mutex. It must be a cheap function of state
// changed only while the mutex is held; it must not block, and it may take
// only locks that are ordered after this one (never held by a thread while
// it releases this mutex).
#ifndef KVFERRY_INTERNAL_MUTEX_H_
#define KVFERRY_INTERNAL_MUTEX_H_

#include <algorithm>
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
    if (waiters_ != nullptr) WakeReady(nullptr);
    mu_.unlock();
  }

  // REQUIRES: held. Waits until `cond()` is true or `deadline` passes;
  // returns cond(). The mutex is released while waiting.
  // (The analysis cannot see that `cond` runs with this very mutex held.)
  template <typename Cond>
  bool AwaitWithDeadline(Cond cond, absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this)
      ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (cond()) return true;
    Waiter self;
    self.eval = &Evaluate<Cond>;
    self.cond = &cond;
    std::unique_lock<std::mutex> lock(mu_, std::adopt_lock);
    Link(&self);
    // The caller may have changed state before waiting: this release counts.
    WakeReady(&self);
    bool done = false;
    for (;;) {
      if (self.ready) {
        // Woken by a releaser that saw cond() true; a thread that held the
        // mutex since may have made it false again.
        if (cond()) {
          done = true;
          break;
        }
        self.ready = false;
      }
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) {
        done = cond();
        break;
      }
      // Bounded slices keep an infinite deadline from overflowing chrono;
      // waking at a slice's end evaluates nothing.
      self.cv.wait_for(lock, absl::ToChronoNanoseconds(std::min(left, absl::Seconds(1))));
    }
    Unlink(&self);
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
  // One per thread in AwaitWithDeadline, on its stack; linked into waiters_
  // while it waits. All fields are reached with mu_ held.
  struct Waiter {
    bool (*eval)(void*) = nullptr;  // runs *cond
    void* cond = nullptr;
    std::condition_variable cv;
    bool ready = false;  // a releaser saw the condition true and notified cv
    Waiter* prev = nullptr;
    Waiter* next = nullptr;
  };

  // Runs a waiter's condition. REQUIRES: mu_ held (the analysis cannot
  // see it through the type erasure).
  template <typename Cond>
  static bool Evaluate(void* cond) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return static_cast<bool>((*static_cast<Cond*>(cond))());
  }
  // REQUIRES: mu_ held (all three).
  void Link(Waiter* w) {
    w->next = waiters_;
    if (waiters_ != nullptr) waiters_->prev = w;
    waiters_ = w;
  }
  void Unlink(Waiter* w) {
    if (w->prev != nullptr) w->prev->next = w->next;
    else waiters_ = w->next;
    if (w->next != nullptr) w->next->prev = w->prev;
  }
  // Wakes every waiter but `skip` whose condition is now true. Notifies
  // with mu_ held: a waiter's Waiter lives only until it unlinks itself,
  // which needs mu_.
  void WakeReady(Waiter* skip) {
    for (Waiter* w = waiters_; w != nullptr; w = w->next) {
      if (w == skip || w->ready || !w->eval(w->cond)) continue;
      w->ready = true;
      w->cv.notify_one();
    }
  }

  std::mutex mu_;
  Waiter* waiters_ = nullptr;  // guarded by mu_
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
