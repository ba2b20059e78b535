// kvferry_serve: a small disaggregated serving engine without a neural
// network. One binary: the router (default role) starts N prefill and M
// decode workers as child processes (this binary again, --role=prefill or
// --role=decode) and drives them; see docs/serving.md.
#include <signal.h>

#include <cstdio>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/flag.h"
#include "absl/flags/internal/usage.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "examples/disagg_serving/flags.h"
#include "examples/disagg_serving/router.h"
#include "examples/disagg_serving/worker.h"

namespace {

// Exit codes: 0 every request served and checked correct; 1 the run failed
// (a request failed or came out wrong, a worker did not end clean, a time
// limit, an interruption); 2 bad usage (a flag, its value, the prompt file).
constexpr int kBadUsage = 2;

// absl's parser exits 1 on an unknown flag or a bad value; kvferry_serve
// checks them first so that bad usage always exits 2. Returns false (having
// said why) on the first bad argument.
bool CheckArgs(const std::vector<std::string>& args) {
  static const std::set<std::string> kAbslOwn = {
      "help", "helpfull", "helpshort", "helppackage", "helpon", "helpmatch", "version",
      "only_check_args", "flagfile", "fromenv", "tryfromenv", "undefok"};
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--") break;
    if (a.size() < 2 || a[0] != '-') continue;  // not a flag: reported later
    const std::string body = a.substr(a[1] == '-' ? 2 : 1);
    const size_t eq = body.find('=');
    const std::string name = body.substr(0, eq);
    if (kAbslOwn.count(name) != 0) continue;
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr && name.rfind("no", 0) == 0) {
      absl::CommandLineFlag* positive = absl::FindCommandLineFlag(name.substr(2));
      if (positive != nullptr && positive->IsOfType<bool>() && eq == std::string::npos) continue;
    }
    if (flag == nullptr) {
      std::fprintf(stderr, "kvferry_serve: unknown flag '--%s' (see --help)\n", name.c_str());
      return false;
    }
    std::string value;
    if (eq != std::string::npos) {
      value = body.substr(eq + 1);
    } else if (flag->IsOfType<bool>()) {
      continue;
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      std::fprintf(stderr, "kvferry_serve: --%s needs a value\n", name.c_str());
      return false;
    }
    std::string error;
    if (!flag->ParseFrom(value, &error)) {  // parsed again below, to the same value
      std::fprintf(stderr, "kvferry_serve: --%s='%s' is not a valid value: %s\n", name.c_str(),
                   value.c_str(), error.c_str());
      return false;
    }
  }
  return true;
}

}  // namespace

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
      "On one host the engine-owned KV cache (the default --pool_memory=engine) moves by the\n"
      "kernel's cross-process copy (data path shm-kernel-copy); --pool_memory=ucx: shm-direct.\n"
      "The summary's process table names each peer's data path.\n"
      "Exit status: 0 every request served and correct; 1 the run failed (a request failed or\n"
      "was wrong, a worker did not end clean, --timeout_s, Ctrl-C/SIGTERM); 2 bad usage.\n"
      "Example: kvferry_serve --prefill 2 --decode 2 --requests 48 --kill-decode-after 10");
  for (size_t i = 1; i < args.size(); ++i) {
    if (args[i] == "--help" || args[i] == "--helpfull" || args[i] == "--helpshort" ||
        args[i] == "-help" || args[i] == "-h") {
      absl::flags_internal::FlagsHelp(std::cout, "disagg_serving",
                                      absl::flags_internal::HelpFormat::kHumanReadable,
                                      absl::ProgramUsageMessage());
      return 0;
    }
  }
  if (!CheckArgs(args)) return kBadUsage;
  std::vector<char*> rest = absl::ParseCommandLine(static_cast<int>(fixed.size()), fixed.data());
  if (rest.size() > 1) {
    std::fprintf(stderr, "kvferry_serve: unexpected argument '%s' (flags start with --; see --help)\n",
                 rest[1]);
    return kBadUsage;
  }
  if (absl::Status s = kvferry::serving::ValidateFlags(); !s.ok()) {
    std::fprintf(stderr, "kvferry_serve: %s\n", std::string(s.message()).c_str());
    return kBadUsage;
  }
  const std::string role = absl::GetFlag(FLAGS_role);
  // Ctrl-C reaches the whole process group: the router ends the run and
  // shuts the workers down itself.
  if (role != "router") signal(SIGINT, SIG_IGN);
  if (role == "prefill") return kvferry::serving::RunPrefill();
  if (role == "decode") return kvferry::serving::RunDecode();
  return kvferry::serving::Router().Run();
}
