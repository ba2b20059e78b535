#include "bench/bench_util.h"

#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "tests/child_process.h"

namespace kvferry::bench {

void InstallBenchHelp(const char* usage) {
  absl::FlagsUsageConfig config;
  // Every flag defined under bench/ is this program's own; absl's and
  // other libraries' flags stay behind --helpfull.
  config.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "bench/");
  };
  config.contains_helpshort_flags = config.contains_help_flags;
  absl::SetFlagsUsageConfig(config);
  absl::SetProgramUsageMessage(usage);
}

std::string LoadAverage() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return absl::StrCat(a, " ", b, " ", c);
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "model name")) {
      return std::string(absl::StripAsciiWhitespace(line.substr(line.find(':') + 1)));
    }
  }
  return "unknown";
}

int NumCpus() { return static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)); }

uint64_t RssBytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "VmRSS:")) {
      std::vector<std::string> f = absl::StrSplit(line, ' ', absl::SkipWhitespace());
      uint64_t kib = 0;
      if (f.size() >= 2 && absl::SimpleAtoi(f[1], &kib)) return kib * 1024;
    }
  }
  return 0;
}

double CpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto secs = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
  return secs(ru.ru_utime) + secs(ru.ru_stime);
}

uint16_t FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a = {};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  uint16_t port = 0;
  if (fd >= 0 && bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  if (fd >= 0) close(fd);
  return port;
}

double Slope(const std::vector<double>& xs, const std::vector<double>& ys) {
  const size_t n = std::min(xs.size(), ys.size());
  if (n < 2) return 0;
  double mx = 0, my = 0;
  for (size_t i = 0; i < n; ++i) {
    mx += xs[i];
    my += ys[i];
  }
  mx /= static_cast<double>(n);
  my /= static_cast<double>(n);
  double sxy = 0, sxx = 0;
  for (size_t i = 0; i < n; ++i) {
    sxy += (xs[i] - mx) * (ys[i] - my);
    sxx += (xs[i] - mx) * (xs[i] - mx);
  }
  return sxx > 0 ? sxy / sxx : 0;
}

void* BenchMap(uint64_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "ERROR mmap of %llu bytes failed\n", static_cast<unsigned long long>(bytes));
    std::exit(2);
  }
  return p;
}

void BenchUnmap(void* p, uint64_t bytes) { munmap(p, bytes); }

double ColdMemcpyGBps(uint64_t working_set, uint64_t chunk, bool mirrored, double seconds) {
  const uint64_t n = std::max<uint64_t>(1, working_set / chunk);
  const uint64_t bytes = n * chunk;
  auto* src = static_cast<std::byte*>(BenchMap(bytes));
  auto* dst = static_cast<std::byte*>(BenchMap(bytes));
  std::memset(src, 1, bytes);
  std::memset(dst, 2, bytes);
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + std::chrono::duration<double>(seconds);
  uint64_t copies = 0;
  do {
    for (uint64_t i = 0; i < n; ++i) {
      std::memcpy(dst + (mirrored ? n - 1 - i : i) * chunk, src + i * chunk, chunk);
    }
    copies += n;
  } while (std::chrono::steady_clock::now() < end);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  BenchUnmap(src, bytes);
  BenchUnmap(dst, bytes);
  return static_cast<double>(copies * chunk) / secs / 1e9;
}

double PerftestGBps(const std::string& binary, const std::string& test, uint64_t size,
                    const std::string& tls) {
  if (binary.empty() || access(binary.c_str(), X_OK) != 0) return 0;
  // UCX_TLS for both processes when given (else the environment's).
  const std::string port = absl::StrCat(FreePort());
  const uint64_t iterations = std::clamp<uint64_t>((uint64_t{4} << 30) / size, 1000, 200000);
  const std::string env = tls.empty() ? std::string("KVFERRY_BENCH=1") : "UCX_TLS=" + tls;
  kvferry::test::ChildProcess server({"env", env, binary, "-p", port});
  absl::SleepFor(absl::Milliseconds(300));  // its listener comes up
  kvferry::test::ChildProcess client({"env", env, binary, "127.0.0.1", "-p", port, "-t", test,
                                         "-s", absl::StrCat(size), "-n",
                                         absl::StrCat(iterations)});
  double gbps = 0;
  while (auto line = client.ReadLine(absl::Seconds(120))) {
    if (line->rfind("Final:", 0) != 0) continue;
    std::vector<std::string> f = absl::StrSplit(*line, ' ', absl::SkipWhitespace());
    double mbps = 0;  // f: Final:, iterations, 3 latencies, bw average, bw overall, ...
    if (f.size() >= 7 && absl::SimpleAtod(f[6], &mbps)) gbps = mbps * 1048576.0 / 1e9;
  }
  client.Wait();
  return gbps;
}

}  // namespace kvferry::bench
