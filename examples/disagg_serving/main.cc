// kvferry_serve: a small disaggregated serving engine without a neural
// network. One binary: the router (default role) starts N prefill and M
// decode workers as child processes (this binary again, --role=prefill or
// --role=decode) and drives them; see docs/serving.md.
#include <signal.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "examples/disagg_serving/flags.h"
#include "examples/disagg_serving/router.h"
#include "examples/disagg_serving/worker.h"

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  // Accept --kill-decode-after as well as --kill_decode_after.
  std::vector<std::string> args(argv, argv + argc);
  for (size_t i = 1; i < args.size(); ++i) {
    std::string& a = args[i];
    if (a.rfind("--", 0) != 0) continue;
    const size_t end = std::min(a.find('='), a.size());
    for (size_t k = 2; k < end; ++k) {
      if (a[k] == '-') a[k] = '_';
    }
  }
  std::vector<char*> fixed;
  for (std::string& a : args) fixed.push_back(a.data());
  absl::FlagsUsageConfig config;
  config.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "disagg_serving");
  };
  config.contains_helpshort_flags = config.contains_help_flags;
  config.normalize_filename = [](absl::string_view file) { return std::string(file); };
  absl::SetFlagsUsageConfig(config);
  absl::SetProgramUsageMessage(
      "a disaggregated serving engine on kvferry, without a neural network.\n"
      "The router starts --prefill prefill and --decode decode worker processes, sends them\n"
      "generated requests (or --prompt_file), moves each request's KV cache from prefill to\n"
      "decode with kvferry (READ on prefill's offer, layer by layer; --push: WRITE), checks\n"
      "every output, and prints live progress and a summary (--json: as JSON).\n"
      "Flags may be spelled with dashes or underscores (--kill-decode-after=5).\n"
      "Example: kvferry_serve --prefill 2 --decode 2 --requests 48 --kill-decode-after 10");
  std::vector<char*> rest = absl::ParseCommandLine(static_cast<int>(fixed.size()), fixed.data());
  if (rest.size() > 1) {
    std::fprintf(stderr, "kvferry_serve: unexpected argument '%s' (flags start with --; see --help)\n",
                 rest[1]);
    return 2;
  }
  if (absl::Status s = kvferry::serving::ValidateFlags(); !s.ok()) {
    std::fprintf(stderr, "kvferry_serve: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  const std::string role = absl::GetFlag(FLAGS_role);
  if (role == "prefill") return kvferry::serving::RunPrefill();
  if (role == "decode") return kvferry::serving::RunDecode();
  return kvferry::serving::Router().Run();
}
