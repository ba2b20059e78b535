// The router: starts the workers, generates (or reads) the load, schedules
// each request on a prefill and a decode worker with room for it, relays
// tickets and layer announcements between them, checks every output, fails
// requests over when a worker dies, and prints progress and the summary.
#ifndef KVFERRY_EXAMPLES_DISAGG_SERVING_ROUTER_H_
#define KVFERRY_EXAMPLES_DISAGG_SERVING_ROUTER_H_

#include <sys/types.h>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "examples/disagg_serving/protocol.h"
#include "kvferry/kv_layout.h"

namespace kvferry::serving {

struct Request {
  int64_t id = 0;
  std::vector<uint32_t> tokens;
  uint32_t output_len = 0;
  std::vector<uint32_t> expected;
  int64_t arrival_us = 0;  // planned arrival, relative to the start, then absolute
  int64_t job = -1;        // the current attempt
  int attempts = 0;        // dispatches, failovers included
  int retries = 0;         // attempts that failed on a live worker (bounded by --max_retries)
  int64_t not_before_us = 0;  // the retry's backoff: not dispatched before this
  bool done = false;
  bool failed = false;     // gave up: `failure` says why
  std::string failure;
  bool correct = false;
  // Milliseconds, set when done. TTFT leaves out decode's verification of
  // the received bytes (`verify`), which a real engine does not do.
  double ttft = 0, queue = 0, prefill = 0, transfer = 0, decode_start = 0;
  double verify = 0, e2e = 0, tpot = 0;
  std::vector<double> itl;  // between consecutive output tokens
  // The KV cache's move itself: the time its READs (or WRITEs) were in
  // flight, and the bytes they moved; kv_ms < 0 until known.
  double kv_ms = -1;
  uint64_t kv_bytes = 0;
};

struct WorkerProc {
  std::string name;
  std::string role;  // "prefill" or "decode"
  pid_t pid = -1;
  std::unique_ptr<Channel> channel;
  bool ready = false;
  bool connected = false;
  bool alive = true;
  bool killed = false;  // by a --kill_*_after
  // Silent for --worker_timeout_s (no heartbeat, no message): killed by the
  // router and failed over.
  bool unresponsive = false;
  int64_t last_heard_us = 0;  // its last message (heartbeats included)
  int blocking = 0;           // "connect"/"await" sent and not yet answered
  int dispatched = 0;         // requests scheduled on it, retries included
  uint16_t port = 0;
  uint16_t metrics_port = 0;  // 0: the worker serves no /metrics
  uint32_t blocks_total = 0;
  uint32_t blocks_committed = 0;
  int jobs = 0;  // open jobs (until the worker ends them)
  Json report = nullptr;
  int wait_status = -1;
  bool reaped = false;
  // The graceful reset: draining from its "draining" until its new
  // incarnation is connected again (no new requests meanwhile); resetting
  // from its "resetting" until the old process is reaped.
  bool draining = false;
  bool resetting = false;
  int incarnation = 1;      // processes started under this name
  int reset = -1;           // index into Router::resets_ while draining
  int pending_connects = 0; // peers still connecting to the new incarnation
};

struct Job {
  int64_t request = 0;
  int prefill = -1, decode = -1;  // worker indices
  uint32_t prefill_blocks = 0, decode_blocks = 0;
  bool current = true;            // false once failed over
  // Its prefill worker died after decode had the job: decode's verdict
  // (done, or decode_failed after the router's abort) decides whether it
  // is failed over, so that a request decode finished is not run again.
  bool awaiting_decode = false;
  bool prefill_open = true, decode_open = true;
  int64_t dispatch_us = 0, prefill_done_us = 0;
};

// Reads --prompt_file: one prompt per line. Errors name the file, line and value.
absl::StatusOr<std::vector<std::vector<uint32_t>>> ReadPromptFile(const std::string& path,
                                                                  uint32_t vocab);

class Router {
 public:
  int Run();

 private:
  absl::Status MakeLoad();
  absl::Status StartWorkers();
  // Starts worker `w`'s process (this binary again); `leak` passes the
  // injected leak on.
  absl::Status Spawn(WorkerProc& w, bool leak);
  // The graceful reset: the old process is gone; reap it and start the next
  // incarnation under the same name.
  void Respawn(int w);
  // The new incarnation is ready: its peers connect to it (or it to them).
  void Rewire(int w);
  // The new incarnation is connected: it takes requests again.
  void BackInService(int w);
  absl::Status Rendezvous();
  // With --prometheus_sd_file: writes each role's /metrics targets there
  // (written whole, then renamed into place). kUnavailable naming the file
  // when it cannot be written.
  absl::Status WriteServiceDiscovery() const;
  void Dispatch();
  void Handle(int w, const Json& m);
  void WorkerDied(int w);
  // SIGKILLs worker `w`, reaps it, handles what it sent before, and fails
  // the rest of its requests over.
  void KillWorker(int w);
  void MaybeKill();
  void CloseJobSide(int64_t job, bool prefill_side);
  // The job's attempt is over without a result: the request goes back to
  // the queue, unless it already completed or failed, or a later attempt
  // replaced this one. `retry` counts against --max_retries (a failure on a
  // live worker) and backs off; a failover (the worker died) does not.
  void Requeue(int64_t job, bool retry, const std::string& why);
  // Fails request `r` for good (it cannot be served).
  void FailRequest(Request& r, const std::string& why);
  // Workers silent for --worker_timeout_s are killed and failed over.
  void CheckHeartbeats();
  // Reads every worker's channel once (polling up to `poll_ms`).
  void PollWorkers(int poll_ms);
  void PrintProgress(bool final);
  void Shutdown();
  Json Summary() const;
  void PrintSummary(const Json& s) const;

  KvLayout layout_;
  std::vector<Request> requests_;
  std::vector<WorkerProc> workers_;
  std::map<int64_t, Job> jobs_;
  std::deque<int64_t> queue_;   // arrived, waiting for workers
  size_t next_arrival_ = 0;     // requests_ are in arrival order
  int64_t next_job_ = 1;
  int64_t start_us_ = 0, first_dispatch_us_ = 0, end_us_ = 0;
  int completed_ = 0, correct_ = 0, failed_over_ = 0, failed_ = 0, retries_ = 0;
  std::map<std::string, int> rr_;  // per role: where the round-robin among ties starts
  int signal_ = 0;                 // SIGINT or SIGTERM that ended the run
  uint64_t bytes_moved_ = 0;
  std::map<std::string, int64_t> prefill_outcomes_;
  std::vector<std::string> kills_;
  std::vector<std::string> spawn_args_;  // every worker's flags but role and name
  std::vector<Json> alarms_;             // every watchdog alarm, in arrival order
  std::vector<Json> resets_;             // one per graceful reset
  std::vector<Json> directory_events_;   // with --etcd: leases lost and back, as they came
  int resets_in_progress_ = 0;
  // Per prefill worker: the workers its pending "connect"s are for, in order.
  std::map<int, std::deque<int>> connecting_for_;
  std::string error_;
  int64_t last_progress_us_ = 0;
};

}  // namespace kvferry::serving

#endif  // KVFERRY_EXAMPLES_DISAGG_SERVING_ROUTER_H_
