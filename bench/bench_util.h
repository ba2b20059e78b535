// Helpers shared by the bench tools (kvferry-bench, kvferry_transfer_bench,
// kvferry_soak): machine facts, process figures, and the two baselines that
// need no kvferry: single-core memcpy over a cold working set and
// ucx_perftest. Plain functions; thread-compatible.
#ifndef KVFERRY_BENCH_BENCH_UTIL_H_
#define KVFERRY_BENCH_BENCH_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

namespace kvferry::bench {

// Makes `--help` list the flags defined in the bench's own sources. absl's
// --help shows only flags from files named after the program (kvferry_soak
// looks for kvferry_soak.cc, kvferry_soak_main.cc, ...), so for a program
// whose main file has another name it printed "No flags matched". Call
// before absl::ParseCommandLine.
void InstallBenchHelp(const char* usage);

// "a b c" from /proc/loadavg.
std::string LoadAverage();
// The CPU model from /proc/cpuinfo ("unknown" when absent).
std::string CpuModel();
// Online CPUs.
int NumCpus();
// This process's resident set (VmRSS), bytes.
uint64_t RssBytes();
// This process's user + system CPU seconds so far.
double CpuSeconds();
// A TCP port on 127.0.0.1 that was free a moment ago (0 when none found).
uint16_t FreePort();
// Least-squares slope of ys over xs (0 with fewer than two points).
double Slope(const std::vector<double>& xs, const std::vector<double>& ys);

// Bytes mapped private and anonymous (never freed while the run lasts is the
// caller's business: BenchUnmap undoes it). Dies on failure.
void* BenchMap(uint64_t bytes);
void BenchUnmap(void* p, uint64_t bytes);

// Single-core memcpy GB/s (1e9 bytes/s) between two fresh buffers of
// `working_set` bytes each, `chunk` bytes per copy, sources ascending; the
// destination of copy i is chunk i (contiguous) or chunk n-1-i (mirrored).
// Both buffers are touched once first (so page faults are not measured), then
// copied over for at least `seconds`: each copy touches memory that the last
// pass left cache-cold once the working set exceeds the caches.
double ColdMemcpyGBps(uint64_t working_set, uint64_t chunk, bool mirrored, double seconds);

// ucx_perftest's overall bandwidth in GB/s for `test` (ucp_put_bw or
// ucp_get) at `size` bytes between two local processes; `tls` goes in
// UCX_TLS for both. 0 when the binary is missing or printed no result.
double PerftestGBps(const std::string& binary, const std::string& test, uint64_t size,
                    const std::string& tls);

}  // namespace kvferry::bench

#endif  // KVFERRY_BENCH_BENCH_UTIL_H_
