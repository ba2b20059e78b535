// Helpers for Prometheus's text exposition format, shared by everything in
// kvferry that renders metrics (the memory report, the work metrics, the
// watchdog).
#ifndef KVFERRY_SRC_PROMETHEUS_TEXT_H_
#define KVFERRY_SRC_PROMETHEUS_TEXT_H_

#include <string>

#include "absl/strings/string_view.h"

namespace kvferry::internal {

// `value` escaped for use inside a label's double quotes: backslash, double
// quote and newline, as the format requires.
inline std::string PrometheusLabelValue(absl::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    if (c == '\\' || c == '"') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_PROMETHEUS_TEXT_H_
