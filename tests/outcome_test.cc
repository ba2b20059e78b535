// Outcome<State> (src/outcome.h) and internal::Mutex's Await
// (include/kvferry/internal/mutex.h): real threads, no agent.
#include "src/outcome.h"

#include <atomic>
#include <thread>
#include <vector>

#include "kvferry/internal/mutex.h"
#include "kvferry/transfer.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

using internal::Mutex;
using internal::MutexLock;
using internal::Outcome;

TEST(OutcomeTest, StartsOpen) {
  Outcome<TransferState> o(TransferState::kInFlight);
  EXPECT_EQ(o.state(), TransferState::kInFlight);
  EXPECT_THAT(o.status(), IsOk());
  EXPECT_FALSE(o.released());
}

TEST(OutcomeTest, FirstEndWinsLaterEndsAreIgnored) {
  Outcome<TransferState> o(TransferState::kInFlight);
  EXPECT_TRUE(o.End(TransferState::kFailed, absl::UnavailableError("first")));
  EXPECT_FALSE(o.End(TransferState::kDone, absl::OkStatus()));
  EXPECT_FALSE(o.End(TransferState::kCancelled, absl::CancelledError("third")));
  EXPECT_EQ(o.state(), TransferState::kFailed);
  EXPECT_THAT(o.status(), StatusIs(absl::StatusCode::kUnavailable, "first"));
  // Ending does not release.
  EXPECT_FALSE(o.released());
  o.MarkReleased();
  EXPECT_TRUE(o.released());
  EXPECT_FALSE(o.End(TransferState::kDone, absl::OkStatus()));
  EXPECT_EQ(o.state(), TransferState::kFailed);
}

TEST(OutcomeTest, EndingWithTheOpenStateStillEndsIt) {
  Outcome<OfferState> o(OfferState::kOpen);
  EXPECT_TRUE(o.End(OfferState::kOpen, absl::OkStatus()));
  EXPECT_FALSE(o.End(OfferState::kRevoked, absl::CancelledError("late")));
  EXPECT_EQ(o.state(), OfferState::kOpen);
  EXPECT_THAT(o.status(), IsOk());
}

TEST(OutcomeTest, AwaitReleasedTimesOutWhileNotReleased) {
  Outcome<OfferState> o(OfferState::kOpen);
  const absl::Time start = absl::Now();
  EXPECT_FALSE(o.AwaitReleased(absl::Milliseconds(50)));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(50));
  // Zero and negative timeouts answer at once.
  EXPECT_FALSE(o.AwaitReleased(absl::ZeroDuration()));
  EXPECT_FALSE(o.AwaitReleased(-absl::Seconds(1)));
  o.MarkReleased();
  EXPECT_TRUE(o.AwaitReleased(absl::ZeroDuration()));
  EXPECT_TRUE(o.AwaitReleased(absl::Seconds(30)));
}

TEST(OutcomeTest, ManyWaitersWakeOnReleaseAndSeeTheOutcome) {
  constexpr int kWaiters = 16;
  Outcome<OfferState> o(OfferState::kOpen);
  std::atomic<int> started{0};
  std::atomic<int> woke{0};
  std::vector<std::thread> threads;
  std::vector<OfferState> seen(kWaiters, OfferState::kEmpty);
  for (int i = 0; i < kWaiters; ++i) {
    threads.emplace_back([&, i] {
      started.fetch_add(1);
      if (o.AwaitReleased(absl::Seconds(60))) {
        seen[i] = o.state();
        woke.fetch_add(1);
      }
    });
  }
  ASSERT_TRUE(WaitFor([&] { return started.load() == kWaiters; }));
  EXPECT_EQ(woke.load(), 0);  // nothing is released yet
  o.End(OfferState::kConsumed, absl::OkStatus());
  o.MarkReleased();
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(woke.load(), kWaiters);
  for (OfferState s : seen) EXPECT_EQ(s, OfferState::kConsumed);
}

TEST(OutcomeTest, ConcurrentEndsRecordExactlyOne) {
  constexpr int kThreads = 8;
  Outcome<TransferState> o(TransferState::kInFlight);
  std::atomic<int> won{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      const TransferState s = i % 2 == 0 ? TransferState::kDone : TransferState::kFailed;
      if (o.End(s, absl::InternalError(absl::StrCat("thread ", i)))) won.fetch_add(1);
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(won.load(), 1);
  EXPECT_NE(o.state(), TransferState::kInFlight);
}

// A waiter whose condition becomes true is woken by the release that made
// it true.
TEST(MutexAwaitTest, WaiterWokenWhenItsConditionBecomesTrue) {
  Mutex mu;
  bool flag = false;  // guarded by mu
  std::atomic<bool> entered{false};
  std::atomic<bool> done{false};
  std::thread waiter([&] {
    MutexLock l(&mu);
    entered = true;
    mu.Await([&] { return flag; });
    done = true;
  });
  ASSERT_TRUE(WaitFor([&] { return entered.load(); }));
  {
    MutexLock l(&mu);
    flag = true;
  }
  EXPECT_TRUE(WaitFor([&] { return done.load(); }));
  waiter.join();
}

// A waiter whose condition stays false is not woken by unrelated releases:
// its own thread evaluates the condition only when it starts waiting. (With
// a notify_all on every release it would evaluate it on every wake.)
TEST(MutexAwaitTest, WaiterWhoseConditionStaysFalseIsNotSpun) {
  constexpr int kUnrelatedReleases = 200;
  Mutex mu;
  bool flag = false;  // guarded by mu
  int other = 0;      // guarded by mu
  std::atomic<std::thread::id> waiter_id;
  std::atomic<int> waiter_evals{0};
  std::atomic<int> other_evals{0};
  std::atomic<int> first_evals{0};
  std::thread waiter([&] {
    waiter_id = std::this_thread::get_id();
    MutexLock l(&mu);
    mu.Await([&] {
      first_evals.fetch_add(1);
      if (std::this_thread::get_id() == waiter_id.load()) {
        waiter_evals.fetch_add(1);
      } else {
        other_evals.fetch_add(1);
      }
      return flag;
    });
  });
  // The first evaluation happens with mu held; mu is free again only once
  // the waiter sleeps in Await.
  ASSERT_TRUE(WaitFor([&] { return first_evals.load() >= 1; }));
  const absl::Time start = absl::Now();
  for (int i = 0; i < kUnrelatedReleases; ++i) {
    {
      MutexLock l(&mu);
      ++other;
    }
    // Room for a woken waiter to run (not a synchronization: with the
    // registration, nothing wakes it).
    absl::SleepFor(absl::Microseconds(500));
  }
  const int evals_while_false = waiter_evals.load();
  // Each release evaluated the condition on the releasing thread instead.
  EXPECT_GE(other_evals.load(), kUnrelatedReleases);
  {
    MutexLock l(&mu);
    flag = true;
  }
  waiter.join();
  EXPECT_EQ(evals_while_false, 1) << "over " << absl::FormatDuration(absl::Now() - start);
  // Woken once, it re-checks on its own thread and returns.
  EXPECT_EQ(waiter_evals.load(), 2);
}

// Two waiters on one mutex, different conditions: making one true wakes
// that one only; the other keeps waiting until its own becomes true.
TEST(MutexAwaitTest, OnlyTheWaiterWhoseConditionHoldsIsWoken) {
  Mutex mu;
  bool a = false, b = false;  // guarded by mu
  std::atomic<bool> a_entered{false}, b_entered{false};
  std::atomic<bool> a_done{false}, b_done{false};
  std::thread ta([&] {
    MutexLock l(&mu);
    a_entered = true;
    mu.Await([&] { return a; });
    a_done = true;
  });
  std::thread tb([&] {
    MutexLock l(&mu);
    b_entered = true;
    mu.Await([&] { return b; });
    b_done = true;
  });
  ASSERT_TRUE(WaitFor([&] { return a_entered.load() && b_entered.load(); }));
  {
    MutexLock l(&mu);
    a = true;
  }
  EXPECT_TRUE(WaitFor([&] { return a_done.load(); }));
  EXPECT_FALSE(b_done.load());
  {
    MutexLock l(&mu);
    b = true;
  }
  EXPECT_TRUE(WaitFor([&] { return b_done.load(); }));
  ta.join();
  tb.join();
}

// Await returns with its condition true even when another thread made it
// false again between the wake and the waiter taking the mutex.
TEST(MutexAwaitTest, AwaitReturnsOnlyWithItsConditionTrue) {
  constexpr int kRounds = 2000;
  Mutex mu;
  int tokens = 0;  // guarded by mu
  std::atomic<int> taken{0};
  auto consumer = [&] {
    for (;;) {
      MutexLock l(&mu);
      if (!mu.AwaitWithTimeout([&] { return tokens > 0 || taken.load() >= kRounds; },
                               absl::Seconds(60))) {
        ADD_FAILURE() << "consumer timed out";
        return;
      }
      if (taken.load() >= kRounds) return;
      ASSERT_GT(tokens, 0);
      --tokens;
      taken.fetch_add(1);
    }
  };
  std::thread c1(consumer), c2(consumer), c3(consumer);
  for (int i = 0; i < kRounds; ++i) {
    MutexLock l(&mu);
    ++tokens;
  }
  EXPECT_TRUE(WaitFor([&] { return taken.load() >= kRounds; }, absl::Seconds(60)));
  {
    MutexLock l(&mu);  // the release re-evaluates the consumers' conditions
  }
  c1.join();
  c2.join();
  c3.join();
  EXPECT_EQ(taken.load(), kRounds);
}

TEST(MutexAwaitTest, AwaitWithTimeoutTimesOutAndReturnsTheCondition) {
  Mutex mu;
  bool flag = false;
  MutexLock l(&mu);
  const absl::Time start = absl::Now();
  EXPECT_FALSE(mu.AwaitWithTimeout([&] { return flag; }, absl::Milliseconds(50)));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(50));
  flag = true;
  EXPECT_TRUE(mu.AwaitWithTimeout([&] { return flag; }, absl::ZeroDuration()));
}

}  // namespace
}  // namespace kvferry::test
