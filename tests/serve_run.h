// Running kvferry_serve (examples/disagg_serving) from a test: its output,
// exit status and --json summary. The binary is KVFERRY_SERVE (set by
// tests/CMakeLists.txt) unless KVFERRY_SERVE_BIN in the environment names
// another (to show that a test fails on an older build).
#ifndef KVFERRY_TESTS_SERVE_RUN_H_
#define KVFERRY_TESTS_SERVE_RUN_H_

#include <sys/wait.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/child_process.h"

namespace kvferry::test {

struct ServeRun {
  int exit_status = -1;    // the exit code; -1 if killed by a signal
  std::string output;      // stdout and stderr
  nlohmann::json summary;  // the --json line, or null
};

inline std::string ServeBinary() {
  const char* b = std::getenv("KVFERRY_SERVE_BIN");
  return b != nullptr && *b != '\0' ? b : KVFERRY_SERVE;
}

// Starts kvferry_serve with `args` (the shell execs it: the child's pid is
// the router's).
inline std::unique_ptr<ChildProcess> StartServe(const std::vector<std::string>& args) {
  std::string cmd = absl::StrCat("exec ", ServeBinary());
  for (const std::string& a : args) absl::StrAppend(&cmd, " '", a, "'");
  absl::StrAppend(&cmd, " 2>&1");
  return std::make_unique<ChildProcess>(std::vector<std::string>{"/bin/sh", "-c", cmd});
}

// Appends `line` to the run's output; a JSON line is the summary.
inline void TakeServeLine(const std::string& line, ServeRun& run) {
  absl::StrAppend(&run.output, line, "\n");
  if (!line.empty() && line[0] == '{') run.summary = nlohmann::json::parse(line, nullptr, false);
}

// Reads the rest of the run's output (up to 5 minutes) and waits for it.
inline void FinishServe(ChildProcess& child, ServeRun& run) {
  while (auto line = child.ReadLine(absl::Minutes(5))) TakeServeLine(*line, run);
  const int status = child.Wait();
  run.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Runs kvferry_serve with `args` to its end.
inline ServeRun Serve(const std::vector<std::string>& args) {
  ServeRun run;
  auto child = StartServe(args);
  FinishServe(*child, run);
  return run;
}

}  // namespace kvferry::test

#endif  // KVFERRY_TESTS_SERVE_RUN_H_
