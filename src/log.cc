#include "kvferry/log.h"

#include <cstdio>
#include <memory>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"
#include "src/log_internal.h"

namespace kvferry {
namespace {

std::mutex& SinkMutex() {
  static std::mutex* const mu = new std::mutex();
  return *mu;
}

// Guarded by SinkMutex(); null means StderrLogSink. Held by shared_ptr so a
// line in progress keeps the sink it started with while another thread
// replaces it.
std::shared_ptr<const LogSink>& ProcessSink() {
  static std::shared_ptr<const LogSink>* const sink = new std::shared_ptr<const LogSink>();
  return *sink;
}

}  // namespace

const char* LogSeverityName(LogSeverity severity) {
  switch (severity) {
    case LogSeverity::kInfo:
      return "info";
    case LogSeverity::kWarning:
      return "warning";
    case LogSeverity::kError:
      return "error";
  }
  return "unknown";
}

void StderrLogSink(const LogRecord& record) {
  std::string text = record.agent.empty()
                         ? absl::StrCat("kvferry: ", record.message, "\n")
                         : absl::StrCat("kvferry: agent '", record.agent, "': ", record.message,
                                        "\n");
  std::fputs(text.c_str(), stderr);  // stdio locks the stream: one line stays whole
  std::fflush(stderr);
}

LogSink SetLogSink(LogSink sink) {
  std::shared_ptr<const LogSink> next;
  if (sink) next = std::make_shared<const LogSink>(std::move(sink));
  std::shared_ptr<const LogSink> previous;
  {
    std::lock_guard<std::mutex> l(SinkMutex());
    previous = std::exchange(ProcessSink(), std::move(next));
  }
  return previous != nullptr ? *previous : LogSink();
}

namespace internal {

void LogToProcessSink(const LogRecord& record) {
  std::shared_ptr<const LogSink> sink;
  {
    std::lock_guard<std::mutex> l(SinkMutex());
    sink = ProcessSink();
  }
  if (sink != nullptr) {
    (*sink)(record);
  } else {
    StderrLogSink(record);
  }
}

void LogToProcessSink(LogSeverity severity, std::string agent, std::string message) {
  LogToProcessSink(LogRecord{severity, std::move(agent), std::move(message)});
}

}  // namespace internal
}  // namespace kvferry
