// Watchdog: samples a MemoryReport on a period, fits the growth slope of RSS
// and of unexplained memory over a sliding window (least squares), and calls
// a hook when a slope or the unexplained share of RSS passes its threshold.
//
// One alarm per episode. Each reason (RSS slope, unexplained slope,
// unexplained share) is its own alarm with two states, armed and in alarm:
//   armed    -> in alarm  when its figure passes the threshold: the hook runs
//                         once and alarms() counts one.
//   in alarm -> armed     when the condition has cleared, with hysteresis: the
//                         figure fell under 80% of its threshold (kRearmFraction;
//                         for the share rule, the share under 80% of
//                         max_unexplained_share or the unexplained bytes under
//                         80% of min_unexplained_bytes).
// While in alarm, the same reason fires again only once `realarm_after` has
// passed since it last fired and its figure is still over the threshold (an
// event with `repeat` set); otherwise it is suppressed. Only Reset() clears
// the sample window, so slopes keep being fitted through an episode. A slope's
// state changes only while the samples span at least half the window (the
// same condition under which it may fire). All times are the reports'
// `taken` times, not the clock.
//
// An alarm names the kind of memory that grew (WatchdogEvent::kind(): "rss"
// or "unexplained") and, for the unexplained reasons, where the growth sits
// as far as /proc/self/smaps tells it: the origins (a file's path, the
// kernel's name such as [heap] or [stack], or [anon] for an unnamed
// anonymous mapping) whose resident bytes grew most since the episode's
// baseline, the origins read at the first sample after Create or Reset.
//
// Reset() ends the episode: the sample window, every reason's alarm state
// and the origins' baseline are cleared, so the next growth is judged
// afresh (its first alarm is not a repeat). The alarm counts stay.
//
// Runs no thread unless WatchdogOptions::run_thread; then Stop() (or the
// destructor) ends it cleanly. Thread-safe. The hook runs on the sampling
// thread (or the caller of Sample) without any watchdog lock held.
#ifndef KVFERRY_WATCHDOG_H_
#define KVFERRY_WATCHDOG_H_

#include <array>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvferry/internal/mutex.h"
#include "kvferry/memory_report.h"

namespace kvferry {

class Agent;

// The mappings of one origin in /proc/self/smaps: a file mapping's path, the
// kernel's name for a special or named anonymous mapping ("[heap]",
// "[stack]", "[anon:name]"), or "[anon]" for an unnamed anonymous mapping.
struct MappingOrigin {
  std::string origin;
  uint64_t mappings = 0;
  uint64_t size_bytes = 0;  // virtual
  uint64_t rss_bytes = 0;   // resident
  // In WatchdogEvent::origins only: the growth since the episode's baseline
  // (signed: an origin may shrink).
  int64_t grown_rss_bytes = 0;
  int64_t grown_mappings = 0;
};

// Reads /proc/self/smaps, one entry per origin (largest resident first).
// kUnavailable when it cannot be read.
absl::StatusOr<std::vector<MappingOrigin>> ReadMappingOrigins();

struct WatchdogEvent {
  enum class Reason { kRssSlope, kUnexplainedSlope, kUnexplainedShare };
  static constexpr int kNumReasons = 3;
  Reason reason;
  // False for the alarm that opens an episode; true when it fires again
  // because realarm_after passed while the episode went on.
  bool repeat = false;
  double rss_slope = 0;          // bytes per second over the window
  double unexplained_slope = 0;  // bytes per second over the window (signed figure)
  double unexplained_share = 0;  // unexplained / rss in the last sample
  MemoryReport report;           // the last sample
  // For kUnexplainedSlope and kUnexplainedShare: the origins whose resident
  // bytes grew since the episode's baseline, most growth first, at most
  // WatchdogOptions::max_origins (empty when none grew or smaps could not be
  // read). Empty for kRssSlope.
  std::vector<MappingOrigin> origins;
  // The reason's label: "rss_slope", "unexplained_slope", "unexplained_share".
  static const char* ReasonName(Reason reason);
  // The kind of memory that grew: "rss" or "unexplained".
  const char* kind() const;
  // One line: the reason, the kind, the figures and the origins.
  std::string ToString() const;
};

struct WatchdogOptions {
  absl::Duration period = absl::Seconds(10);  // between samples
  absl::Duration window = absl::Minutes(5);   // slope fitted over this span
  // Thresholds; each alarms when exceeded. Defaults: 10 MiB/min of RSS or
  // unexplained growth, and unexplained memory above half the RSS (checked
  // only once it exceeds min_unexplained_bytes, 64 MiB by default). The
  // unexplained slope is fitted on MemoryReport::unexplained_signed_bytes, so
  // growth shows from any starting point; the share uses unexplained_bytes.
  double max_rss_slope = 10.0 * 1048576 / 60;
  double max_unexplained_slope = 10.0 * 1048576 / 60;
  double max_unexplained_share = 0.5;
  uint64_t min_unexplained_bytes = 64ull << 20;
  // While a reason is in alarm, it fires again (a `repeat` event) once this
  // long has passed since it last fired, if still over its threshold.
  // Default 10 minutes; absl::InfiniteDuration() never repeats within an
  // episode; zero fires on every sample over the threshold. Must not be
  // negative.
  absl::Duration realarm_after = absl::Minutes(10);
  // Called on each alarm. Default: a kWarning LogRecord (WatchdogEvent::
  // ToString()) to the process-wide log sink (kvferry/log.h; stderr unless
  // replaced), naming the agent when created for one.
  std::function<void(const WatchdogEvent&)> on_alarm;
  bool run_thread = false;  // sample every `period` on a thread of its own
  // Reads the mappings' origins for an unexplained alarm. Default
  // ReadMappingOrigins (this process's /proc/self/smaps). Read once for the
  // baseline and once per unexplained alarm, on the sampling thread.
  std::function<absl::StatusOr<std::vector<MappingOrigin>>()> origins;
  // The most origins an event names. Default 3.
  size_t max_origins = 3;
};

class Watchdog {
 public:
  using Source = std::function<absl::StatusOr<MemoryReport>()>;
  using Reason = WatchdogEvent::Reason;

  // A reason in alarm re-arms once its figure falls under this fraction of
  // its threshold.
  static constexpr double kRearmFraction = 0.8;

  // Watches `agent` (which must outlive the watchdog). kInvalidArgument for a
  // non-positive period, a window shorter than two periods, or a negative
  // realarm_after.
  static absl::StatusOr<std::unique_ptr<Watchdog>> Create(const Agent* agent,
                                                           WatchdogOptions options);
  // Watches whatever `source` reports (tests, or an engine's own process).
  // The source fills `taken`, process.rss_bytes, unexplained_bytes and
  // unexplained_signed_bytes as Agent::GetMemoryReport does.
  static absl::StatusOr<std::unique_ptr<Watchdog>> Create(Source source,
                                                          WatchdogOptions options);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Takes one sample now and evaluates the thresholds; returns the events
  // that fired (at most one per reason, in the order unexplained slope, RSS
  // slope, unexplained share; empty if none), after the hook has run for
  // each. The sampling thread calls this; so may anyone else.
  absl::StatusOr<std::vector<WatchdogEvent>> Sample() ABSL_LOCKS_EXCLUDED(mu_);
  // Ends the episode (see the top of this file): clears the sample window,
  // every reason's alarm state and the origins' baseline. alarms() and the
  // per-reason counts stay. A Sample that read its report before the Reset
  // records nothing and fires nothing.
  void Reset() ABSL_LOCKS_EXCLUDED(mu_);
  // Stops the sampling thread, if any. Idempotent.
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);
  // Alarms fired so far, all reasons (repeats included).
  int alarms() const ABSL_LOCKS_EXCLUDED(mu_);
  // Whether `reason` is in alarm now (fired, and not yet cleared).
  bool in_alarm(Reason reason) const ABSL_LOCKS_EXCLUDED(mu_);
  // Prometheus text exposition lines, per reason ("rss_slope",
  // "unexplained_slope", "unexplained_share"): kvferry_watchdog_alarms_total
  // (alarms fired, repeats included) and kvferry_watchdog_in_alarm (1 while
  // in alarm), labelled with the agent the last sample named (empty before
  // the first sample). Serve it next to MemoryReport::ToPrometheus().
  std::string ToPrometheus() const ABSL_LOCKS_EXCLUDED(mu_);

  // Least-squares slope (units per second) of (time, value) points.
  static double Slope(const std::deque<std::pair<absl::Time, double>>& points);

 private:
  // One reason's alarm state.
  struct AlarmState {
    bool in_alarm = false;
    absl::Time fired_at;  // last time it fired; meaningful while in_alarm
    int fired = 0;        // alarms of this reason, repeats included
  };

  Watchdog(Source source, WatchdogOptions options);
  void ThreadMain() ABSL_LOCKS_EXCLUDED(mu_);
  // Moves `reason` between armed and in alarm given whether its figure is
  // over the threshold (`over`) or has cleared (`cleared`; both false: no
  // judgement this sample). Returns true, and sets *repeat, when it fires.
  bool Update(Reason reason, bool over, bool cleared, absl::Time now, bool* repeat)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  const Source source_;
  const WatchdogOptions options_;
  std::thread thread_;

  mutable internal::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  int alarms_ ABSL_GUARDED_BY(mu_) = 0;
  std::string agent_ ABSL_GUARDED_BY(mu_);  // as the last sample named it
  std::array<AlarmState, WatchdogEvent::kNumReasons> state_ ABSL_GUARDED_BY(mu_);
  std::deque<std::pair<absl::Time, double>> rss_ ABSL_GUARDED_BY(mu_);
  std::deque<std::pair<absl::Time, double>> unexplained_ ABSL_GUARDED_BY(mu_);
  // The origins at the episode's first sample; read once baseline_taken_ is
  // false (after Create or Reset).
  bool baseline_taken_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t episode_ ABSL_GUARDED_BY(mu_) = 0;  // Reset()s so far
  std::vector<MappingOrigin> baseline_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvferry

#endif  // KVFERRY_WATCHDOG_H_
