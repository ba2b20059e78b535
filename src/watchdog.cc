#include "kvferry/watchdog.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "kvferry/agent.h"
#include "src/log_internal.h"
#include "src/prometheus_text.h"

namespace kvferry {

namespace {

// The level a figure must fall under to clear an alarm whose threshold is
// `threshold`: kRearmFraction of it when positive, and as far below it
// otherwise.
double ClearLevel(double threshold) {
  return threshold - (1 - Watchdog::kRearmFraction) * std::abs(threshold);
}

// A smaps header line: "begin-end perms offset dev inode [path]".
bool ParseHeader(absl::string_view line, uint64_t* size, std::string* origin) {
  std::vector<absl::string_view> f = absl::StrSplit(line, absl::MaxSplits(' ', 5));
  if (f.size() < 5) return false;
  std::vector<absl::string_view> range = absl::StrSplit(f[0], '-');
  uint64_t begin = 0, end = 0;
  if (range.size() != 2 || !absl::SimpleHexAtoi(range[0], &begin) ||
      !absl::SimpleHexAtoi(range[1], &end) || end < begin) {
    return false;
  }
  *size = end - begin;
  const absl::string_view path = f.size() == 6 ? absl::StripAsciiWhitespace(f[5]) : "";
  *origin = path.empty() ? "[anon]" : std::string(path);
  return true;
}

// A smaps field line ("Rss:   1234 kB"), in bytes.
bool ParseKb(absl::string_view line, absl::string_view key, uint64_t* bytes) {
  if (!absl::ConsumePrefix(&line, key)) return false;
  line = absl::StripAsciiWhitespace(line);
  if (!absl::ConsumeSuffix(&line, "kB")) return false;
  uint64_t kb = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &kb)) return false;
  *bytes = kb * 1024;
  return true;
}

// The origins of `now` that grew against `base`, most first, at most `max`.
std::vector<MappingOrigin> Growth(const std::vector<MappingOrigin>& base,
                                  std::vector<MappingOrigin> now, size_t max) {
  std::map<std::string, const MappingOrigin*> before;
  for (const MappingOrigin& o : base) before[o.origin] = &o;
  std::vector<MappingOrigin> grown;
  for (MappingOrigin& o : now) {
    auto it = before.find(o.origin);
    const uint64_t rss = it == before.end() ? 0 : it->second->rss_bytes;
    const uint64_t maps = it == before.end() ? 0 : it->second->mappings;
    o.grown_rss_bytes = static_cast<int64_t>(o.rss_bytes) - static_cast<int64_t>(rss);
    o.grown_mappings = static_cast<int64_t>(o.mappings) - static_cast<int64_t>(maps);
    if (o.grown_rss_bytes > 0) grown.push_back(std::move(o));
  }
  std::stable_sort(grown.begin(), grown.end(), [](const MappingOrigin& a, const MappingOrigin& b) {
    return a.grown_rss_bytes > b.grown_rss_bytes;
  });
  if (grown.size() > max) grown.resize(max);
  return grown;
}

}  // namespace

absl::StatusOr<std::vector<MappingOrigin>> ReadMappingOrigins() {
  std::ifstream in("/proc/self/smaps");
  if (!in) return absl::UnavailableError("cannot read /proc/self/smaps");
  std::map<std::string, MappingOrigin> by_origin;
  MappingOrigin* current = nullptr;
  std::string line;
  while (std::getline(in, line)) {
    uint64_t size = 0, rss = 0;
    std::string origin;
    // Field lines start with a capitalized key; header lines with a hex address.
    if (!line.empty() && absl::ascii_isupper(static_cast<unsigned char>(line[0]))) {
      if (current != nullptr && ParseKb(line, "Rss:", &rss)) current->rss_bytes += rss;
      continue;
    }
    if (!ParseHeader(line, &size, &origin)) continue;
    current = &by_origin[origin];
    current->origin = origin;
    ++current->mappings;
    current->size_bytes += size;
  }
  if (by_origin.empty()) return absl::UnavailableError("/proc/self/smaps lists no mappings");
  std::vector<MappingOrigin> out;
  for (auto& [name, o] : by_origin) out.push_back(std::move(o));
  std::stable_sort(out.begin(), out.end(), [](const MappingOrigin& a, const MappingOrigin& b) {
    return a.rss_bytes > b.rss_bytes;
  });
  return out;
}

const char* WatchdogEvent::ReasonName(Reason reason) {
  switch (reason) {
    case Reason::kRssSlope:
      return "rss_slope";
    case Reason::kUnexplainedSlope:
      return "unexplained_slope";
    case Reason::kUnexplainedShare:
      return "unexplained_share";
  }
  return "unknown";
}

const char* WatchdogEvent::kind() const {
  return reason == Reason::kRssSlope ? "rss" : "unexplained";
}

std::string WatchdogEvent::ToString() const {
  const char* why = reason == Reason::kRssSlope           ? "RSS growth"
                    : reason == Reason::kUnexplainedSlope ? "unexplained-memory growth"
                                                          : "unexplained share of RSS";
  std::string out = absl::StrFormat(
      "kvferry watchdog: %s%s (kind %s) on agent '%s': rss %.1f MiB/min, unexplained %.1f "
      "MiB/min, unexplained %.0f%% of rss (%.1f MiB)",
      why, repeat ? " (continuing)" : "", kind(), report.agent, rss_slope * 60 / 1048576,
      unexplained_slope * 60 / 1048576, unexplained_share * 100,
      static_cast<double>(report.unexplained_signed_bytes) / 1048576.0);
  for (size_t i = 0; i < origins.size(); ++i) {
    const MappingOrigin& o = origins[i];
    const double grown = static_cast<double>(o.grown_rss_bytes);
    const std::string amount = std::abs(grown) < 1048576
                                   ? absl::StrFormat("%+.0f KiB", grown / 1024)
                                   : absl::StrFormat("%+.1f MiB", grown / 1048576);
    absl::StrAppendFormat(&out, "%s%s %s resident (%+d mappings, %.1f MiB now)",
                          i == 0 ? "; grew in: " : ", ", o.origin, amount,
                          static_cast<int>(o.grown_mappings),
                          static_cast<double>(o.rss_bytes) / 1048576.0);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Watchdog>> Watchdog::Create(const Agent* agent,
                                                           WatchdogOptions options) {
  if (agent == nullptr) return absl::InvalidArgumentError("Watchdog::Create: null agent");
  if (!options.on_alarm) {
    options.on_alarm = [name = agent->name()](const WatchdogEvent& e) {
      internal::LogToProcessSink(LogSeverity::kWarning, name, e.ToString());
    };
  }
  return Create([agent] { return agent->GetMemoryReport(); }, std::move(options));
}

absl::StatusOr<std::unique_ptr<Watchdog>> Watchdog::Create(Source source,
                                                           WatchdogOptions options) {
  if (options.period <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "WatchdogOptions.period must be positive (got %s)", absl::FormatDuration(options.period)));
  }
  if (options.window < 2 * options.period) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "WatchdogOptions.window (%s) must span at least two periods (%s)",
        absl::FormatDuration(options.window), absl::FormatDuration(options.period)));
  }
  if (options.realarm_after < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("WatchdogOptions.realarm_after must not be negative (got %s)",
                        absl::FormatDuration(options.realarm_after)));
  }
  if (!options.on_alarm) {
    options.on_alarm = [](const WatchdogEvent& e) {
      internal::LogToProcessSink(LogSeverity::kWarning, "", e.ToString());
    };
  }
  if (!options.origins) options.origins = ReadMappingOrigins;
  std::unique_ptr<Watchdog> w(new Watchdog(std::move(source), std::move(options)));
  if (w->options_.run_thread) w->thread_ = std::thread([p = w.get()] { p->ThreadMain(); });
  return w;
}

Watchdog::Watchdog(Source source, WatchdogOptions options)
    : source_(std::move(source)), options_(std::move(options)) {}

Watchdog::~Watchdog() { Stop(); }

void Watchdog::Stop() {
  {
    internal::MutexLock l(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

int Watchdog::alarms() const {
  internal::MutexLock l(&mu_);
  return alarms_;
}

void Watchdog::Reset() {
  internal::MutexLock l(&mu_);
  rss_.clear();
  unexplained_.clear();
  for (AlarmState& s : state_) s.in_alarm = false;
  baseline_taken_ = false;
  baseline_.clear();
  ++episode_;
}

bool Watchdog::in_alarm(Reason reason) const {
  internal::MutexLock l(&mu_);
  return state_[static_cast<int>(reason)].in_alarm;
}

std::string Watchdog::ToPrometheus() const {
  internal::MutexLock l(&mu_);
  const std::string agent = internal::PrometheusLabelValue(agent_);
  std::string out =
      "# HELP kvferry_watchdog_alarms_total Watchdog alarms fired by reason, repeats included.\n"
      "# TYPE kvferry_watchdog_alarms_total counter\n";
  for (int i = 0; i < WatchdogEvent::kNumReasons; ++i) {
    absl::StrAppendFormat(&out, "kvferry_watchdog_alarms_total{agent=\"%s\",reason=\"%s\"} %d\n",
                          agent, WatchdogEvent::ReasonName(static_cast<Reason>(i)),
                          state_[i].fired);
  }
  out +=
      "# HELP kvferry_watchdog_in_alarm 1 while the watchdog's reason is in alarm.\n"
      "# TYPE kvferry_watchdog_in_alarm gauge\n";
  for (int i = 0; i < WatchdogEvent::kNumReasons; ++i) {
    absl::StrAppendFormat(&out, "kvferry_watchdog_in_alarm{agent=\"%s\",reason=\"%s\"} %d\n",
                          agent, WatchdogEvent::ReasonName(static_cast<Reason>(i)),
                          state_[i].in_alarm ? 1 : 0);
  }
  return out;
}

void Watchdog::ThreadMain() {
  while (true) {
    {
      internal::MutexLock l(&mu_);
      if (mu_.AwaitWithTimeout([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_; },
                               options_.period)) {
        return;
      }
    }
    Sample().IgnoreError();  // a failed read is retried next period
  }
}

double Watchdog::Slope(const std::deque<std::pair<absl::Time, double>>& points) {
  if (points.size() < 2) return 0;
  const absl::Time t0 = points.front().first;
  double n = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (const auto& [t, y] : points) {
    double x = absl::ToDoubleSeconds(t - t0);
    n += 1;
    sx += x;
    sy += y;
    sxx += x * x;
    sxy += x * y;
  }
  double den = n * sxx - sx * sx;
  return den <= 0 ? 0 : (n * sxy - sx * sy) / den;
}

bool Watchdog::Update(Reason reason, bool over, bool cleared, absl::Time now, bool* repeat) {
  AlarmState& s = state_[static_cast<int>(reason)];
  if (cleared) {
    s.in_alarm = false;
    return false;
  }
  if (!over) return false;  // under the threshold but not yet cleared: no change
  if (s.in_alarm && now - s.fired_at < options_.realarm_after) return false;  // suppressed
  *repeat = s.in_alarm;
  s.in_alarm = true;
  s.fired_at = now;
  ++s.fired;
  ++alarms_;
  return true;
}

absl::StatusOr<std::vector<WatchdogEvent>> Watchdog::Sample() {
  uint64_t episode = 0;
  bool need_baseline = false;
  {
    internal::MutexLock l(&mu_);
    episode = episode_;
    need_baseline = !baseline_taken_;
  }
  absl::StatusOr<MemoryReport> report = source_();
  if (!report.ok()) return report.status();
  // The episode's baseline of origins, read outside the lock (smaps is slow).
  if (need_baseline) {
    absl::StatusOr<std::vector<MappingOrigin>> base = options_.origins();
    internal::MutexLock l(&mu_);
    if (episode_ == episode && !baseline_taken_) {
      baseline_taken_ = true;
      if (base.ok()) baseline_ = *std::move(base);
    }
  }
  std::vector<WatchdogEvent> events;
  std::vector<MappingOrigin> baseline;
  {
    internal::MutexLock l(&mu_);
    // A report read before a Reset belongs to the episode that ended.
    if (episode_ != episode) return events;
    const absl::Time now = report->taken;
    agent_ = report->agent;
    rss_.emplace_back(now, static_cast<double>(report->process.rss_bytes));
    unexplained_.emplace_back(now, static_cast<double>(report->unexplained_signed_bytes));
    while (!rss_.empty() && now - rss_.front().first > options_.window) {
      rss_.pop_front();
      unexplained_.pop_front();
    }
    // A slope is judged (may fire or clear) once the samples span at least
    // half the window.
    const bool enough = rss_.size() >= 3 && now - rss_.front().first >= options_.window / 2;
    WatchdogEvent e;
    e.rss_slope = Slope(rss_);
    e.unexplained_slope = Slope(unexplained_);
    e.unexplained_share = report->process.rss_bytes == 0
                              ? 0
                              : static_cast<double>(report->unexplained_bytes) /
                                    static_cast<double>(report->process.rss_bytes);
    const double unexplained = static_cast<double>(report->unexplained_bytes);
    const double min_unexplained = static_cast<double>(options_.min_unexplained_bytes);
    const bool share_over = report->unexplained_bytes >= options_.min_unexplained_bytes &&
                            e.unexplained_share > options_.max_unexplained_share;
    const bool share_cleared =
        !share_over && (e.unexplained_share < ClearLevel(options_.max_unexplained_share) ||
                        unexplained < kRearmFraction * min_unexplained);
    struct Judgement {
      Reason reason;
      bool over;
      bool cleared;
    };
    const Judgement judgements[] = {
        {Reason::kUnexplainedSlope, enough && e.unexplained_slope > options_.max_unexplained_slope,
         enough && e.unexplained_slope < ClearLevel(options_.max_unexplained_slope)},
        {Reason::kRssSlope, enough && e.rss_slope > options_.max_rss_slope,
         enough && e.rss_slope < ClearLevel(options_.max_rss_slope)},
        {Reason::kUnexplainedShare, share_over, share_cleared},
    };
    e.report = *std::move(report);
    for (const Judgement& j : judgements) {
      bool repeat = false;
      if (!Update(j.reason, j.over, j.cleared, now, &repeat)) continue;
      e.reason = j.reason;
      e.repeat = repeat;
      events.push_back(e);
    }
    for (const WatchdogEvent& event : events) {
      if (event.reason != Reason::kRssSlope) {
        baseline = baseline_;
        break;
      }
    }
  }
  // Where the unexplained growth sits, against the baseline.
  for (WatchdogEvent& event : events) {
    if (event.reason == Reason::kRssSlope) continue;
    absl::StatusOr<std::vector<MappingOrigin>> now = options_.origins();
    if (!now.ok()) break;
    std::vector<MappingOrigin> grown = Growth(baseline, *std::move(now), options_.max_origins);
    for (WatchdogEvent& e : events) {
      if (e.reason != Reason::kRssSlope) e.origins = grown;
    }
    break;
  }
  for (const WatchdogEvent& event : events) options_.on_alarm(event);
  return events;
}

}  // namespace kvferry
