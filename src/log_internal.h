// Library-side entry to the process-wide log sink (kvferry/log.h).
#ifndef KVFERRY_SRC_LOG_INTERNAL_H_
#define KVFERRY_SRC_LOG_INTERNAL_H_

#include <string>

#include "kvferry/log.h"

namespace kvferry::internal {

// Hands the record to the process-wide sink (StderrLogSink unless replaced).
// Does not hold the sink's lock while the sink runs.
void LogToProcessSink(const LogRecord& record);
void LogToProcessSink(LogSeverity severity, std::string agent, std::string message);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_LOG_INTERNAL_H_
