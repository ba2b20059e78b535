// The raw UCX baseline of kvferry-bench --compare: the same memory, sizes
// and access pattern as kvferry, moved with plain ucp calls (no kvferry).
// Endpoints use UCX's default error mode (none): the fastest UCX offers.
#include <poll.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <optional>
#include <string>

#include <ucp/api/ucp.h>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_agent.h"
#include "bench/bench_compare.h"
#include "bench/bench_util.h"
#include "bench/control_channel.h"

namespace kvferry::bench {
namespace {

void Check(ucs_status_t st, const char* what) {
  if (st != UCS_OK) Die(absl::StrCat("raw UCX: ", what, ": ", ucs_status_string(st)));
}

// A context, a worker and one memory region of the working set, set up as
// kvferry sets up a pool: UCX-allocated shared memory (ALLOC_PRIO
// md:sysv,mmap) for --memory=pool, else anonymous memory registered with
// ucp_mem_map; registration and memory-type caches off, as kvferry has them.
class RawSide {
 public:
  explicit RawSide(const BenchConfig& c) : bytes_(c.layout.total_bytes()) {
    ucp_config_t* cfg = nullptr;
    Check(ucp_config_read(nullptr, nullptr, &cfg), "ucp_config_read");
    if (!c.tls.empty()) Check(ucp_config_modify(cfg, "TLS", c.tls.c_str()), "TLS");
    Check(ucp_config_modify(cfg, "RCACHE_ENABLE", "n"), "RCACHE_ENABLE");
    Check(ucp_config_modify(cfg, "MEMTYPE_CACHE", "n"), "MEMTYPE_CACHE");
    const bool allocate = c.memory == "pool";
    if (allocate) Check(ucp_config_modify(cfg, "ALLOC_PRIO", "md:sysv,mmap"), "ALLOC_PRIO");
    ucp_params_t p{};
    p.field_mask = UCP_PARAM_FIELD_FEATURES;
    p.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
    Check(ucp_init(&p, cfg, &context_), "ucp_init");
    ucp_config_release(cfg);
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    Check(ucp_worker_create(context_, &wp, &worker_), "ucp_worker_create");
    ucp_mem_map_params_t mp{};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                    UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    mp.length = bytes_;
    if (allocate) {
      mp.address = nullptr;
      mp.flags = UCP_MEM_MAP_ALLOCATE;
    } else {
      own_ = BenchMap(bytes_);
      mp.address = own_;
      mp.flags = 0;
    }
    Check(ucp_mem_map(context_, &mp, &memh_), "ucp_mem_map");
    ucp_mem_attr_t attr{};
    attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS;
    Check(ucp_mem_query(memh_, &attr), "ucp_mem_query");
    base_ = static_cast<std::byte*>(attr.address);
    std::memset(base_, 3, bytes_);  // resident, as kvferry's pools are
  }
  ~RawSide() {
    Detach();
    ucp_mem_unmap(context_, memh_);
    if (own_ != nullptr) BenchUnmap(own_, bytes_);
    ucp_worker_destroy(worker_);
    ucp_cleanup(context_);
  }
  RawSide(const RawSide&) = delete;
  RawSide& operator=(const RawSide&) = delete;

  // "RAW <worker address hex> <base> <rkey hex>"
  std::string Describe() {
    ucp_address_t* addr = nullptr;
    size_t addr_len = 0;
    Check(ucp_worker_get_address(worker_, &addr, &addr_len), "ucp_worker_get_address");
    void* rkey = nullptr;
    size_t rkey_len = 0;
    Check(ucp_rkey_pack(context_, memh_, &rkey, &rkey_len), "ucp_rkey_pack");
    std::string out = absl::StrCat(
        "RAW ", absl::BytesToHexString(absl::string_view(reinterpret_cast<char*>(addr), addr_len)),
        " ", reinterpret_cast<uintptr_t>(base_), " ",
        absl::BytesToHexString(absl::string_view(static_cast<char*>(rkey), rkey_len)));
    ucp_rkey_buffer_release(rkey);
    ucp_worker_release_address(worker_, addr);
    return out;
  }

  void Attach(const std::string& description) {
    std::vector<std::string> f = absl::StrSplit(description, ' ');
    uint64_t base = 0;
    if (f.size() != 4 || f[0] != "RAW" || !absl::SimpleAtoi(f[2], &base)) {
      Die("raw UCX: bad description " + description);
    }
    const std::string addr = absl::HexStringToBytes(f[1]);
    const std::string rkey = absl::HexStringToBytes(f[3]);
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
    ep.address = reinterpret_cast<const ucp_address_t*>(addr.data());
    Check(ucp_ep_create(worker_, &ep, &ep_), "ucp_ep_create");
    Check(ucp_ep_rkey_unpack(ep_, rkey.data(), &rkey_), "ucp_ep_rkey_unpack");
    remote_base_ = base;
  }

  // Drops the remote key and closes the endpoint (flushing it); call while
  // the target still drives its worker.
  void Detach() {
    if (rkey_ != nullptr) ucp_rkey_destroy(rkey_);
    rkey_ = nullptr;
    if (ep_ != nullptr) {
      ucp_request_param_t rp{};
      Wait(ucp_ep_close_nbx(ep_, &rp));
    }
    ep_ = nullptr;
  }

  // Waits for a request (or status) to complete by progressing the worker.
  void Wait(ucs_status_ptr_t s) {
    if (s == nullptr) return;
    if (UCS_PTR_IS_ERR(s)) Check(UCS_PTR_STATUS(s), "operation");
    while (ucp_request_check_status(s) == UCS_INPROGRESS) ucp_worker_progress(worker_);
    Check(ucp_request_check_status(s), "request");
    ucp_request_free(s);
  }

  // Drives the worker, sleeping on its event fd when idle, until `ctl` says
  // QUIT or closes.
  void Serve(ControlChannel& ctl) {
    int fd = -1;
    Check(ucp_worker_get_efd(worker_, &fd), "ucp_worker_get_efd");
    while (true) {
      while (ucp_worker_progress(worker_) != 0) {
      }
      if (ucp_worker_arm(worker_) == UCS_OK) {
        pollfd pfd = {fd, POLLIN, 0};
        poll(&pfd, 1, 5);
      }
      std::optional<std::string> line = ctl.Receive(absl::ZeroDuration());
      if ((line && *line == "QUIT") || !ctl.ok()) return;
    }
  }

  // GB/s of put (write) or get for `seconds`.
  double Measure(bool write, uint64_t chunk, uint32_t num_blocks, int batch, int in_flight,
                 double seconds) {
    using Clock = std::chrono::steady_clock;
    const uint32_t groups = num_blocks / static_cast<uint32_t>(batch);
    std::deque<ucs_status_ptr_t> flushes;
    uint32_t next = 0;
    uint64_t ops = 0;
    ucp_request_param_t rp{};
    auto post = [&] {
      const uint32_t k = next++ % groups;
      for (int j = 0; j < batch; ++j) {
        const uint32_t id = k * static_cast<uint32_t>(batch) + static_cast<uint32_t>(j);
        std::byte* local = base_ + uint64_t{id} * chunk;
        const uint64_t remote = remote_base_ + uint64_t{num_blocks - 1 - id} * chunk;
        ucs_status_ptr_t s = write ? ucp_put_nbx(ep_, local, chunk, remote, rkey_, &rp)
                                   : ucp_get_nbx(ep_, local, chunk, remote, rkey_, &rp);
        if (UCS_PTR_IS_ERR(s)) Check(UCS_PTR_STATUS(s), write ? "ucp_put_nbx" : "ucp_get_nbx");
        if (s != nullptr) ucp_request_free(s);  // completes with the flush
      }
      ucs_status_ptr_t f = ucp_ep_flush_nbx(ep_, &rp);
      if (UCS_PTR_IS_ERR(f)) Check(UCS_PTR_STATUS(f), "ucp_ep_flush_nbx");
      flushes.push_back(f);
    };
    const auto start = Clock::now();
    const auto end = start + std::chrono::duration<double>(seconds);
    // seconds == 0: exactly one pass over every chunk (the warm-up).
    auto more = [&] { return seconds > 0 ? Clock::now() < end : next < groups; };
    for (int i = 0; i < in_flight && more(); ++i) post();
    while (!flushes.empty()) {
      Wait(flushes.front());
      flushes.pop_front();
      ops += static_cast<uint64_t>(batch);
      if (more()) post();
    }
    const double secs = std::chrono::duration<double>(Clock::now() - start).count();
    return static_cast<double>(ops * chunk) / secs / 1e9;
  }

 private:
  uint64_t bytes_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_mem_h memh_ = nullptr;
  void* own_ = nullptr;
  std::byte* base_ = nullptr;
  ucp_ep_h ep_ = nullptr;
  ucp_rkey_h rkey_ = nullptr;
  uint64_t remote_base_ = 0;
};

}  // namespace

int RunRawTarget(const BenchConfig& config) {
  RawSide side(config);
  ControlListener listener("127.0.0.1", config.control_port);
  std::printf("READY 0 %u\n", listener.port());
  std::fflush(stdout);
  ControlChannel ctl = listener.Accept(absl::Seconds(120));
  if (!ctl.ok()) Die("raw target: no control connection");
  ctl.Send(side.Describe());
  side.Serve(ctl);
  return 0;
}

RawResult RunRawInitiator(const BenchConfig& config, uint16_t control_port, int batch,
                          int in_flight, double seconds) {
  RawSide side(config);
  ControlChannel ctl = ControlChannel::Connect("127.0.0.1", control_port, absl::Seconds(60));
  std::optional<std::string> description = ctl.Receive(absl::Seconds(60));
  if (!description) Die("raw target sent no description");
  side.Attach(*description);
  const uint64_t chunk = config.layout.chunk_bytes();
  // Every chunk of the working set, whatever its layer and plane.
  const auto chunks = static_cast<uint32_t>(config.layout.total_bytes() / chunk);
  RawResult r;
  if (config.warmup) {  // one untimed pass, as kvferry-bench --warmup does
    side.Measure(true, chunk, chunks, batch, in_flight, 0);
  }
  r.write_gbps = side.Measure(true, chunk, chunks, batch, in_flight, seconds);
  r.read_gbps = side.Measure(false, chunk, chunks, batch, in_flight, seconds);
  side.Detach();
  ctl.Send("QUIT");
  return r;
}

}  // namespace kvferry::bench
