// --spawn: both roles on this host, the other one as a child process.
#include <sys/wait.h>

#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_agent.h"
#include "bench/bench_roles.h"
#include "tests/child_process.h"

namespace kvferry::bench {
namespace {

constexpr char kSelf[] = "/proc/self/exe";

}  // namespace

std::vector<std::string> ChildCommand(const BenchConfig& c, const std::string& role,
                                 std::vector<std::string> extra) {
  std::vector<std::string> argv = {kSelf};
  for (std::string& a : ChildArgs(c, role)) argv.push_back(std::move(a));
  for (std::string& a : extra) argv.push_back(std::move(a));
  return argv;
}

RunResult SpawnRun(BenchConfig c) {
  std::optional<kvferry::test::ChildProcess> child;
  RunResult r;
  if (c.InitiatorRole() == "decode") {
    child.emplace(ChildCommand(c, "prefill", {"--listen=127.0.0.1", "--port=0", "--control_port=0"}));
    std::optional<std::string> line = child->ReadUntil("READY", absl::Seconds(120));
    std::vector<std::string> f = absl::StrSplit(line.value_or(""), ' ');
    uint32_t kv = 0, ctl = 0;
    if (f.size() != 3 || f[0] != "READY" || !absl::SimpleAtoi(f[1], &kv) ||
        !absl::SimpleAtoi(f[2], &ctl)) {
      Die("the prefill process did not start: " + line.value_or("no output"));
    }
    c.peer_address = absl::StrCat("127.0.0.1:", kv);
    c.control_port = static_cast<uint16_t>(ctl);
    r = RunInitiator(c, nullptr);
  } else {
    c.listen_address = "127.0.0.1";
    c.port = 0;
    c.control_port = 0;
    r = RunInitiator(c, [&](uint16_t kv, uint16_t ctl) {
      child.emplace(ChildCommand(c, "decode", {absl::StrCat("--peer=127.0.0.1:", kv),
                                          absl::StrCat("--control_port=", ctl)}));
    });
  }
  const int status = child->Wait();
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    r.failures.push_back(absl::StrCat("the spawned process exited with status ", status));
  }
  return r;
}


}  // namespace kvferry::bench
