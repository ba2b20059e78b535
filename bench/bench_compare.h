// kvferry-bench --compare: kvferry against three baselines in the same run,
// per operation size and op (see bench/README.md):
//   - ucx_perftest ucp_put_bw / ucp_get at the same size and UCX_TLS (one
//     cache-hot buffer: UCX's best case, for reference);
//   - a raw UCX loop (plain ucp calls, no kvferry) over memory allocated the
//     same way, the same working set, sizes and access pattern;
//   - single-core memcpy over the same cold working set.
#ifndef KVFERRY_BENCH_BENCH_COMPARE_H_
#define KVFERRY_BENCH_BENCH_COMPARE_H_

#include <cstdint>

#include "bench/bench_config.h"

namespace kvferry::bench {

int RunCompare(const BenchConfig& config);

// The raw UCX loop's two halves (bench/raw_ucx.cc). The target allocates and
// registers its memory as kvferry would, prints "READY 0 <control port>",
// hands its worker address and remote key over the control channel and
// drives its worker until told to quit.
int RunRawTarget(const BenchConfig& config);
struct RawResult {
  double write_gbps = 0;
  double read_gbps = 0;
};
// Connects to a raw target on 127.0.0.1:control_port and measures put (as
// WRITE) and get (as READ) for `seconds` each: `batch` operations of
// chunk_bytes per flush, `in_flight` flushes outstanding, local chunks
// ascending and remote chunks mirrored (as kvferry-bench --scattered).
RawResult RunRawInitiator(const BenchConfig& config, uint16_t control_port, int batch,
                          int in_flight, double seconds);

}  // namespace kvferry::bench

#endif  // KVFERRY_BENCH_BENCH_COMPARE_H_
