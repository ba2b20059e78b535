// Where kvferry's log lines go. Every line kvferry writes (refused and
// dropped connections, peer failures, the emulated-data-path and
// insecure-listen notices, survivor reports, watchdog alarms, stuck UCX
// requests) is handed to a sink as a LogRecord with a severity and, when the
// line belongs to an agent, that agent's name. An agent's lines go to its
// AgentOptions::log_sink when set, else to the process-wide sink; lines tied
// to no agent's options (stuck UCX requests, default watchdog alarms) go to
// the process-wide sink. The process-wide sink writes to stderr unless
// replaced with SetLogSink.
//
// A sink may be called from any thread, from several at once (each agent's
// progress thread, callers of Agent methods, the watchdog's thread), and
// with an agent's internal mutex held. So a sink must be thread-safe, should
// return quickly, and must not call back into any kvferry Agent (that can
// deadlock); queue the record if it needs more work.
#ifndef KVFERRY_LOG_H_
#define KVFERRY_LOG_H_

#include <functional>
#include <string>

namespace kvferry {

enum class LogSeverity {
  kInfo,
  kWarning,  // something went wrong that kvferry handled (a refused peer, a slow path)
  kError,    // an outcome the engine should act on (survivors at destruction)
};

// "info", "warning" or "error".
const char* LogSeverityName(LogSeverity severity);

struct LogRecord {
  LogSeverity severity = LogSeverity::kInfo;
  // The agent the line belongs to (AgentOptions::name); empty when none.
  std::string agent;
  // The text, without a "kvferry:" prefix or a trailing newline. One line,
  // except survivor reports, which list one object per line.
  std::string message;
};

using LogSink = std::function<void(const LogRecord&)>;

// The default sink: "kvferry: agent '<agent>': <message>\n" (or
// "kvferry: <message>\n" without an agent) on stderr, in one write.
// Thread-safe.
void StderrLogSink(const LogRecord& record);

// Replaces the process-wide sink and returns the previous one (empty when it
// was the default); an empty function restores StderrLogSink. Thread-safe; a line being logged
// concurrently goes to either the old or the new sink.
LogSink SetLogSink(LogSink sink);

}  // namespace kvferry

#endif  // KVFERRY_LOG_H_
