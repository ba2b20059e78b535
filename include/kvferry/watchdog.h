// Watchdog: samples a MemoryReport on a period, fits the growth slope of RSS
// and of unexplained memory over a sliding window (least squares), and calls
// a hook when a slope or the unexplained share of RSS passes its threshold:
// the alarm the 400 MB/min leak needed.
//
// Runs no thread unless WatchdogOptions::run_thread; then Stop() (or the
// destructor) ends it cleanly. Thread-safe. The hook runs on the sampling
// thread (or the caller of Sample) without any watchdog lock held.
#ifndef KVFERRY_WATCHDOG_H_
#define KVFERRY_WATCHDOG_H_

#include <deque>
#include <optional>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "kvferry/internal/mutex.h"
#include "absl/time/time.h"
#include "kvferry/memory_report.h"

namespace kvferry {

class Agent;

struct WatchdogEvent {
  enum class Reason { kRssSlope, kUnexplainedSlope, kUnexplainedShare };
  Reason reason;
  double rss_slope = 0;          // bytes per second over the window
  double unexplained_slope = 0;  // bytes per second over the window
  double unexplained_share = 0;  // unexplained / rss in the last sample
  MemoryReport report;           // the last sample
  std::string ToString() const;
};

struct WatchdogOptions {
  absl::Duration period = absl::Seconds(10);  // between samples
  absl::Duration window = absl::Minutes(5);   // slope fitted over this span
  // Thresholds; each alarms when exceeded. Defaults: 10 MiB/min of RSS or
  // unexplained growth, and unexplained memory above half the RSS (checked
  // only once it exceeds min_unexplained_bytes, 64 MiB by default).
  double max_rss_slope = 10.0 * 1048576 / 60;
  double max_unexplained_slope = 10.0 * 1048576 / 60;
  double max_unexplained_share = 0.5;
  uint64_t min_unexplained_bytes = 64ull << 20;
  // Called on each alarm; then the window starts afresh. Default: a line on
  // stderr.
  std::function<void(const WatchdogEvent&)> on_alarm;
  bool run_thread = false;  // sample every `period` on a thread of its own
};

class Watchdog {
 public:
  using Source = std::function<absl::StatusOr<MemoryReport>()>;

  // Watches `agent` (which must outlive the watchdog). kInvalidArgument for a
  // non-positive period or a window shorter than two periods.
  static absl::StatusOr<std::unique_ptr<Watchdog>> Create(const Agent* agent,
                                                           WatchdogOptions options);
  // Watches whatever `source` reports (tests, or an engine's own process).
  static absl::StatusOr<std::unique_ptr<Watchdog>> Create(Source source,
                                                          WatchdogOptions options);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Takes one sample now and evaluates the thresholds; returns the event if
  // one fired. The sampling thread calls this; so may anyone else.
  absl::StatusOr<std::optional<WatchdogEvent>> Sample() ABSL_LOCKS_EXCLUDED(mu_);
  // Stops the sampling thread, if any. Idempotent.
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);
  int alarms() const ABSL_LOCKS_EXCLUDED(mu_);

  // Least-squares slope (units per second) of (time, value) points.
  static double Slope(const std::deque<std::pair<absl::Time, double>>& points);

 private:
  Watchdog(Source source, WatchdogOptions options);
  void ThreadMain() ABSL_LOCKS_EXCLUDED(mu_);

  const Source source_;
  const WatchdogOptions options_;
  std::thread thread_;

  mutable internal::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  int alarms_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<std::pair<absl::Time, double>> rss_ ABSL_GUARDED_BY(mu_);
  std::deque<std::pair<absl::Time, double>> unexplained_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvferry

#endif  // KVFERRY_WATCHDOG_H_
