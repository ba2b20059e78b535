// kvferry-bench's flags (every one listed by --help with its default) and
// their translation into a BenchConfig.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_config.h"

ABSL_FLAG(std::string, role, "", "prefill or decode: run one side of a two-process run "
          "(prefill listens, decode connects to --peer). Empty with --spawn: this process "
          "runs the side that posts (decode for READ, prefill for WRITE) and starts the other.");
ABSL_FLAG(bool, spawn, true, "Start the other role as a child process on this host (loopback).");
ABSL_FLAG(std::string, listen, "127.0.0.1", "prefill: IPv4 address to listen on.");
ABSL_FLAG(int, port, 0, "prefill: kvferry port to listen on (0 picks a free one).");
ABSL_FLAG(int, control_port, 0, "prefill: the bench's control port (0 picks a free one); "
          "decode: the prefill's control port.");
ABSL_FLAG(std::string, peer, "", "decode: the prefill's kvferry address, IPv4:port.");
ABSL_FLAG(std::string, preset, "llama-3-8b",
          "Model shape: llama-3-8b (32 layers, 8 KV heads, head dim 128, bf16), llama-3-70b "
          "(80, 8, 128), mistral-large (88, 8, 128), or custom (set the layout flags).");
ABSL_FLAG(int, layers, 0, "Layers (0: the preset's).");
ABSL_FLAG(int, kv_heads, 0, "KV heads (0: the preset's).");
ABSL_FLAG(int, head_dim, 0, "Head dimension (0: the preset's).");
ABSL_FLAG(std::string, dtype, "bf16", "Element type: fp8, bf16, fp16, fp32.");
ABSL_FLAG(int, tokens_per_block, 16, "Tokens per KV block.");
ABSL_FLAG(bool, mla, false, "One latent plane per layer instead of K and V.");
ABSL_FLAG(std::string, memory, "pool",
          "pool (Agent::CreatePool, UCX-allocated shared memory), anonymous-pool (CreatePool "
          "with kAnonymousMmap), engine (the bench mmaps one region per layer and K/V and "
          "registers them with Agent::RegisterPool).");
ABSL_FLAG(bool, kernel_copy, true,
          "AgentOptions::kernel_copy in both processes: on one host, anonymous-pool and engine "
          "memory move by process_vm_writev/readv (shm-kernel-copy); false leaves them on UCX's "
          "am-emulated path.");
ABSL_FLAG(int, kernel_copy_threads, 0,
          "AgentOptions::kernel_copy_threads in both processes (the most threads one "
          "agent's kernel copies use); 0 keeps the agent's default "
          "(kvferry::DefaultKernelCopyThreads()).");
ABSL_FLAG(bool, engine_hugepages, false,
          "--memory=engine: madvise(MADV_HUGEPAGE) the engine's regions in both processes "
          "(transparent huge pages where the kernel allows them; the kernel copy then pins "
          "the peer's memory by huge page, not by 4 KiB page).");
ABSL_FLAG(int64_t, working_set_mib, 2048,
          "Pool size per process, MiB (at least 2048 to defeat the CPU caches; smaller for "
          "tests).");
ABSL_FLAG(std::string, op, "read", "read (decode pulls) or write (prefill pushes).");
ABSL_FLAG(bool, offers, false, "Move offered blocks: the passive side makes an Agent::Offer "
          "per request and the poster uses TransferSpec::offer_ticket.");
ABSL_FLAG(bool, per_layer, false, "Post one transfer per layer (pipelined with the forward "
          "pass) instead of one per request.");
ABSL_FLAG(bool, scattered, false, "Mirror remote block ids so that no two blocks coalesce "
          "(one operation per chunk).");
ABSL_FLAG(std::string, prompt_tokens, "uniform:512:2048",
          "Prompt length distribution: N, uniform:A:B or normal:MEAN:STDDEV (tokens).");
ABSL_FLAG(int, requests, 64, "Requests to move (ignored with --duration).");
ABSL_FLAG(int, concurrency, 2, "Requests in flight.");
ABSL_FLAG(bool, populate, true,
          "AgentOptions::populate_pools in both processes: pools made resident when created "
          "and when a peer's pool is mapped (false: pages fault in on first use).");
ABSL_FLAG(double, duration, 0, "Seconds to run (soak); 0: run --requests.");
ABSL_FLAG(bool, warmup, true, "One untimed pass over the whole pool before measuring (each "
          "process maps its peer's pool on first use: one page fault per page, paid once).");
ABSL_FLAG(bool, verify, false, "Check every byte on arrival (the receiver compares each "
          "block against the sender's pattern and clears it).");
ABSL_FLAG(std::string, tls, "", "UCX_TLS for both processes (empty: the environment's).");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the prompt-length draws.");
ABSL_FLAG(bool, json, false, "Print the result as JSON on stdout (the table goes to stderr).");
ABSL_FLAG(double, progress_seconds, 5, "Progress line on stderr this often (0: none).");
ABSL_FLAG(double, sample_seconds, 60, "Soak: RSS and counters sampled and printed this often.");
ABSL_FLAG(double, max_rss_slope_mb_per_min, 0,
          "Exit 1 when the RSS slope (MB/min, least squares) passes this (0: no limit).");
ABSL_FLAG(double, churn, 0, "Soak churn: the decode side drops its agent and connects a new "
          "one every this many seconds (0: never).");
ABSL_FLAG(bool, compare, false, "Baselines in the same run: kvferry vs ucx_perftest, a raw UCX "
          "loop over the same memory and pattern, and cold single-core memcpy, per size and op.");
ABSL_FLAG(std::string, compare_sizes, "16384,32768,65536,262144,1048576,4194304",
          "--compare: bytes per operation.");
ABSL_FLAG(int, compare_batch, 8,
          "--compare: blocks per transfer; each block is --compare_layers x 2 (K, V) chunks of "
          "the size (raw UCX: the same chunks per flush).");
ABSL_FLAG(int, compare_layers, 32,
          "--compare: layers per block (llama-3-8b has 32), fewer where the working set cannot "
          "hold --concurrency + 1 transfers; 1 measures kvferry's cost per transfer.");
ABSL_FLAG(double, compare_seconds, 2, "--compare: seconds per measurement.");
ABSL_FLAG(std::string, perftest, "/usr/bin/ucx_perftest",
          "ucx_perftest binary for --compare (empty: skip it).");

namespace kvferry::bench {
namespace {

[[noreturn]] void Bad(const std::string& why) {
  std::fprintf(stderr, "kvferry-bench: %s\n", why.c_str());
  std::exit(2);
}

PromptDistribution ParsePrompt(const std::string& text) {
  PromptDistribution d;
  std::vector<std::string> f = absl::StrSplit(text, ':');
  auto num = [&](const std::string& s) {
    double v = 0;
    if (!absl::SimpleAtod(s, &v) || v <= 0) Bad("bad --prompt_tokens '" + text + "'");
    return v;
  };
  if (f.size() == 1) {
    d.a = num(f[0]);
    d.max_tokens = static_cast<uint32_t>(d.a);
  } else if (f.size() == 3 && f[0] == "uniform") {
    d.kind = PromptDistribution::Kind::kUniform;
    d.a = num(f[1]);
    d.b = num(f[2]);
    if (d.b < d.a) Bad("--prompt_tokens uniform:A:B needs A <= B");
    d.max_tokens = static_cast<uint32_t>(d.b);
  } else if (f.size() == 3 && f[0] == "normal") {
    d.kind = PromptDistribution::Kind::kNormal;
    d.a = num(f[1]);
    d.b = num(f[2]);
    d.max_tokens = static_cast<uint32_t>(d.a + 3 * d.b);
  } else {
    Bad("bad --prompt_tokens '" + text + "' (N, uniform:A:B or normal:MEAN:STDDEV)");
  }
  return d;
}

}  // namespace

uint32_t PromptDistribution::Draw(std::mt19937_64& rng) const {
  double v = a;
  if (kind == Kind::kUniform) v = std::uniform_real_distribution<double>(a, b)(rng);
  if (kind == Kind::kNormal) v = std::normal_distribution<double>(a, b)(rng);
  return static_cast<uint32_t>(std::clamp(v, 1.0, static_cast<double>(max_tokens)));
}

uint32_t BenchConfig::MaxBlocksPerRequest() const {
  return (prompt.max_tokens + layout.tokens_per_block - 1) / layout.tokens_per_block;
}

std::vector<std::string> ChildArgs(const BenchConfig& c, const std::string& role) {
  const KvLayout& l = c.layout;
  const char* dtype = l.element_bytes == 1 ? "fp8" : l.element_bytes == 4 ? "fp32" : "bf16";
  std::string prompt = absl::StrCat(c.prompt.a);
  if (c.prompt.kind == PromptDistribution::Kind::kUniform) {
    prompt = absl::StrCat("uniform:", c.prompt.a, ":", c.prompt.b);
  } else if (c.prompt.kind == PromptDistribution::Kind::kNormal) {
    prompt = absl::StrCat("normal:", c.prompt.a, ":", c.prompt.b);
  }
  // Everything the other side needs to build the same pool and to check
  // the same blocks; the workload itself is the initiator's business.
  return {"--role=" + role,
          "--spawn=false",
          "--preset=custom",
          absl::StrCat("--layers=", l.num_layers),
          absl::StrCat("--kv_heads=", l.num_kv_heads),
          absl::StrCat("--head_dim=", l.head_dim),
          absl::StrCat("--dtype=", dtype),
          absl::StrCat("--tokens_per_block=", l.tokens_per_block),
          absl::StrCat("--mla=", !l.separate_kv),
          "--memory=" + c.memory,
          absl::StrCat("--kernel_copy=", c.kernel_copy),
          absl::StrCat("--kernel_copy_threads=", c.kernel_copy_threads),
          absl::StrCat("--engine_hugepages=", c.engine_hugepages),
          absl::StrCat("--populate=", c.populate),
          absl::StrCat("--working_set_mib=", c.working_set_bytes >> 20),
          std::string("--op=") + (c.op == TransferOp::kRead ? "read" : "write"),
          absl::StrCat("--offers=", c.offers),
          absl::StrCat("--scattered=", c.scattered),
          "--prompt_tokens=" + prompt,
          absl::StrCat("--concurrency=", c.concurrency),
          absl::StrCat("--verify=", c.verify),
          absl::StrCat("--warmup=", c.warmup),
          "--tls=" + c.tls,
          "--progress_seconds=0"};
}

BenchConfig ConfigFromFlags() {
  BenchConfig c;
  c.role = absl::GetFlag(FLAGS_role);
  c.spawn = absl::GetFlag(FLAGS_spawn) && c.role.empty();
  if (!c.role.empty() && c.role != "prefill" && c.role != "decode" && c.role != "raw-target") {
    Bad("--role is prefill or decode");
  }
  if (c.role.empty() && !absl::GetFlag(FLAGS_spawn)) Bad("--spawn=false needs --role");
  c.listen_address = absl::GetFlag(FLAGS_listen);
  c.port = static_cast<uint16_t>(absl::GetFlag(FLAGS_port));
  c.control_port = static_cast<uint16_t>(absl::GetFlag(FLAGS_control_port));
  c.peer_address = absl::GetFlag(FLAGS_peer);
  if (c.role == "decode" && c.peer_address.empty()) Bad("--role=decode needs --peer=IP:PORT");

  c.preset = absl::GetFlag(FLAGS_preset);
  uint32_t layers = 0, heads = 8, dim = 128;
  if (c.preset == "llama-3-8b") {
    layers = 32;
  } else if (c.preset == "llama-3-70b") {
    layers = 80;
  } else if (c.preset == "mistral-large") {
    layers = 88;
  } else if (c.preset != "custom") {
    Bad("unknown --preset '" + c.preset + "'");
  }
  if (absl::GetFlag(FLAGS_layers) > 0) layers = static_cast<uint32_t>(absl::GetFlag(FLAGS_layers));
  if (absl::GetFlag(FLAGS_kv_heads) > 0) heads = static_cast<uint32_t>(absl::GetFlag(FLAGS_kv_heads));
  if (absl::GetFlag(FLAGS_head_dim) > 0) dim = static_cast<uint32_t>(absl::GetFlag(FLAGS_head_dim));
  if (layers == 0) Bad("--preset=custom needs --layers");
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  uint32_t element = 0;
  if (dtype == "fp8") element = 1;
  if (dtype == "bf16" || dtype == "fp16") element = 2;
  if (dtype == "fp32") element = 4;
  if (element == 0) Bad("unknown --dtype '" + dtype + "'");
  c.layout = KvLayout{.num_layers = layers, .num_blocks = 1,
                      .tokens_per_block = static_cast<uint32_t>(absl::GetFlag(FLAGS_tokens_per_block)),
                      .num_kv_heads = heads, .head_dim = dim, .element_bytes = element,
                      .separate_kv = !absl::GetFlag(FLAGS_mla)};
  if (absl::Status st = c.layout.Validate(); !st.ok()) Bad("layout: " + st.ToString());
  c.memory = absl::GetFlag(FLAGS_memory);
  c.populate = absl::GetFlag(FLAGS_populate);
  c.kernel_copy = absl::GetFlag(FLAGS_kernel_copy);
  c.kernel_copy_threads = absl::GetFlag(FLAGS_kernel_copy_threads);
  c.engine_hugepages = absl::GetFlag(FLAGS_engine_hugepages);
  if (c.kernel_copy_threads < 0) Bad("--kernel_copy_threads must be 0 (the default) or more");
  if (c.memory != "pool" && c.memory != "anonymous-pool" && c.memory != "engine") {
    Bad("--memory is pool, anonymous-pool or engine");
  }
  if (absl::GetFlag(FLAGS_working_set_mib) <= 0) Bad("--working_set_mib must be positive");
  c.working_set_bytes = static_cast<uint64_t>(absl::GetFlag(FLAGS_working_set_mib)) << 20;
  c.layout.num_blocks = static_cast<uint32_t>(
      std::max<uint64_t>(1, c.working_set_bytes / c.layout.block_bytes()));

  const std::string op = absl::GetFlag(FLAGS_op);
  if (op == "read") {
    c.op = TransferOp::kRead;
  } else if (op == "write") {
    c.op = TransferOp::kWrite;
  } else {
    Bad("--op is read or write");
  }
  c.offers = absl::GetFlag(FLAGS_offers);
  c.per_layer = absl::GetFlag(FLAGS_per_layer);
  c.scattered = absl::GetFlag(FLAGS_scattered);
  c.prompt = ParsePrompt(absl::GetFlag(FLAGS_prompt_tokens));
  c.requests = absl::GetFlag(FLAGS_requests);
  c.concurrency = absl::GetFlag(FLAGS_concurrency);
  c.duration_s = absl::GetFlag(FLAGS_duration);
  if (c.requests <= 0 || c.concurrency <= 0 || c.duration_s < 0) {
    Bad("--requests and --concurrency must be positive, --duration >= 0");
  }
  // Requests take consecutive ids from a ring; one that would pass the end
  // starts again at 0, so up to one request's worth at the end goes unused.
  if (!absl::GetFlag(FLAGS_compare) &&  // --compare sizes its own requests
      uint64_t{c.MaxBlocksPerRequest()} * (static_cast<uint64_t>(c.concurrency) + 1) >
          c.layout.num_blocks) {
    Bad(absl::StrCat("the working set holds ", c.layout.num_blocks, " blocks of ",
                     c.layout.block_bytes(), " bytes; --concurrency=", c.concurrency,
                     " requests of up to ", c.MaxBlocksPerRequest(),
                     " blocks (plus one for the ring's wrap) do not fit: raise --working_set_mib or lower --prompt_tokens"));
  }
  c.verify = absl::GetFlag(FLAGS_verify);
  c.warmup = absl::GetFlag(FLAGS_warmup);
  c.tls = absl::GetFlag(FLAGS_tls);
  c.seed = absl::GetFlag(FLAGS_seed);
  c.json = absl::GetFlag(FLAGS_json);
  c.progress_s = absl::GetFlag(FLAGS_progress_seconds);
  c.sample_s = absl::GetFlag(FLAGS_sample_seconds);
  c.max_rss_slope_mb_per_min = absl::GetFlag(FLAGS_max_rss_slope_mb_per_min);
  c.churn_s = absl::GetFlag(FLAGS_churn);
  if (c.sample_s <= 0) Bad("--sample_seconds must be positive");
  if (c.churn_s > 0 && (c.duration_s <= 0 || c.op != TransferOp::kRead)) {
    Bad("--churn needs --duration and --op=read (the decode side, which posts, comes and goes)");
  }
  c.compare = absl::GetFlag(FLAGS_compare);
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_compare_sizes), ',',
                                            absl::SkipEmpty())) {
    uint64_t v = 0;
    if (!absl::SimpleAtoi(s, &v) || v < 64 || v % 64 != 0 || v > (uint64_t{1} << 22)) {
      Bad(absl::StrCat("bad --compare_sizes entry '", s, "' (64 .. 4 MiB, a multiple of 64)"));
    }
    c.compare_sizes.push_back(v);
  }
  c.compare_batch = absl::GetFlag(FLAGS_compare_batch);
  c.compare_seconds = absl::GetFlag(FLAGS_compare_seconds);
  const int compare_layers = absl::GetFlag(FLAGS_compare_layers);
  if (c.compare_batch <= 0 || c.compare_seconds <= 0 || compare_layers <= 0) {
    Bad("--compare_batch, --compare_layers and --compare_seconds must be > 0");
  }
  c.compare_layers = static_cast<uint32_t>(compare_layers);
  c.perftest = absl::GetFlag(FLAGS_perftest);
  return c;
}

}  // namespace kvferry::bench
