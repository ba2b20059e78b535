#include "src/ucx/context.h"

#include <cstdio>
#include <cstdlib>

#include <ucm/api/ucm.h>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/ascii.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "src/ucx/status.h"

namespace kvferry {

std::string UcxSettings::ToString() const {
  return absl::StrCat("ucx=", ucx_version, " mmap_hook_mode=", mmap_hook_mode,
                      mmap_hook_from_env ? "(env)" : "(default)",
                      " rcache=", rcache, rcache_from_user ? "(user)" : "(kvferry)",
                      " memtype_cache=", memtype_cache,
                      memtype_cache_from_user ? "(user)" : "(kvferry)",
                      " shm_error_handling=", shm_error_handling,
                      shm_error_handling_from_user ? "(user)" : "(kvferry)",
                      " keepalive=", keepalive_interval,
                      keepalive_interval_from_user ? "(user)" : "(kvferry)",
                      " alloc_prio=", alloc_prio, alloc_prio_from_user ? "(user)" : "(kvferry)");
}

namespace internal {
namespace {

bool EnvSet(const char* name) { return std::getenv(name) != nullptr; }

std::string EnvOr(const char* name, std::string fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : fallback;
}

// Finds a user-supplied value for `key` in options, if any.
const std::string* FindOption(const Context::Options& options, absl::string_view key) {
  for (const auto& [k, v] : options.config) {
    if (absl::AsciiStrToUpper(k) == key) return &v;
  }
  return nullptr;
}

// Names of every setting `config` knows ("TLS", "RCACHE_ENABLE", ...).
// ucp_config_modify accepts any name in UCX 1.13, so kvferry checks names
// against the printed configuration itself.
absl::flat_hash_set<std::string> KnownSettings(const ucp_config_t* config) {
  absl::flat_hash_set<std::string> names;
  char* text = nullptr;
  size_t size = 0;
  FILE* stream = open_memstream(&text, &size);
  if (stream == nullptr) return names;
  ucp_config_print(config, stream, nullptr, UCS_CONFIG_PRINT_CONFIG);
  std::fclose(stream);
  for (absl::string_view line : absl::StrSplit(absl::string_view(text, size), '\n')) {
    if (!absl::ConsumePrefix(&line, "UCX_")) continue;
    size_t eq = line.find('=');
    if (eq != absl::string_view::npos) names.insert(std::string(line.substr(0, eq)));
  }
  std::free(text);
  return names;
}

}  // namespace

std::string MmapHookModeInForce() {
  switch (ucm_global_opts.mmap_hook_mode) {
    case UCM_MMAP_HOOK_NONE:
      return "none";
    case UCM_MMAP_HOOK_RELOC:
      return "reloc";
    case UCM_MMAP_HOOK_BISTRO:
      return "bistro";
    default:
      return absl::StrCat("mode#", static_cast<int>(ucm_global_opts.mmap_hook_mode));
  }
}

absl::StatusOr<ContextPtr> Context::Create(const Options& options,
                                           SourceLocation site) {
  ucp_config_t* config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &config);
  if (st != UCS_OK) return UcsToStatus(st, "ucp_config_read");
  absl::Cleanup release_config = [config] { ucp_config_release(config); };

  UcxSettings settings;
  unsigned major = 0, minor = 0, release = 0;
  ucp_get_version(&major, &minor, &release);
  settings.ucx_version = absl::StrCat(major, ".", minor, ".", release);
  settings.mmap_hook_mode = MmapHookModeInForce();
  settings.mmap_hook_from_env = EnvSet("UCX_MEM_MMAP_HOOK_MODE");

  // kvferry's defaults, each applied only when the user set nothing for it
  // (environment or options.config):
  // - RCACHE_ENABLE=n, MEMTYPE_CACHE=n: pools are registered explicitly, so
  //   the registration and memory-type caches (the users of UCX's mmap
  //   hooks) have nothing to do.
  // - MM_ERROR_HANDLING=y (UCX_POSIX_/UCX_SYSV_ERROR_HANDLING): the
  //   shared-memory transports then take part in UCX's peer-error mode (they
  //   detect a dead peer by its pid), so data endpoints use that mode without
  //   losing shared memory. Measured with ucx_perftest ucp_put_bw, 64 KiB, one
  //   host: 76 GB/s in mode none, 0.63 GB/s in peer mode, 71 GB/s in peer mode
  //   with error handling on in posix and sysv.
  // - KEEPALIVE_INTERVAL=options.keepalive_interval: UCX keeps a departed
  //   peer's shared-memory segments (and its internal wireup endpoint) mapped
  //   until its next keepalive round finds the peer gone: 20 s by default.
  //   Measured: 4 churned peers left 4 extra segments for 19.8 s; with a 2 s
  //   interval they were gone in 1.7 s.
  // - ALLOC_PRIO=options.alloc_prio: how pools that UCX allocates get their
  //   memory (see UcxSettings::alloc_prio for why not UCX's default list).
  const std::string keepalive =
      options.keepalive_interval > absl::ZeroDuration()
          ? absl::StrCat(absl::ToInt64Milliseconds(options.keepalive_interval), "ms")
          : std::string();
  struct Default {
    const char* key;  // as ucp_config_modify takes it
    const char* value;
    std::vector<const char*> env;  // any of these set means the user chose
    std::string* report;
    bool* from_user;
  };
  Default defaults[] = {
      {"RCACHE_ENABLE", "n", {"UCX_RCACHE_ENABLE"}, &settings.rcache, &settings.rcache_from_user},
      {"MEMTYPE_CACHE", "n", {"UCX_MEMTYPE_CACHE"}, &settings.memtype_cache,
       &settings.memtype_cache_from_user},
      {"MM_ERROR_HANDLING", "y",
       {"UCX_MM_ERROR_HANDLING", "UCX_POSIX_ERROR_HANDLING", "UCX_SYSV_ERROR_HANDLING"},
       &settings.shm_error_handling, &settings.shm_error_handling_from_user},
      {"KEEPALIVE_INTERVAL", keepalive.c_str(), {"UCX_KEEPALIVE_INTERVAL"},
       &settings.keepalive_interval, &settings.keepalive_interval_from_user},
      {"ALLOC_PRIO", options.alloc_prio.c_str(), {"UCX_ALLOC_PRIO"}, &settings.alloc_prio,
       &settings.alloc_prio_from_user},
  };
  // Without a shared-memory transport in UCX_TLS, MM_ERROR_HANDLING has no
  // taker and UCX would warn about it.
  std::string tls = EnvOr("UCX_TLS", "all");
  if (const std::string* v = FindOption(options, "TLS")) tls = *v;
  bool shm_possible = false;
  for (const char* name : {"all", "sm", "shm", "posix", "sysv", "mm", "^"}) {
    if (absl::StrContains(tls, name)) shm_possible = true;
  }
  for (Default& d : defaults) {
    if (!shm_possible && absl::string_view(d.key) == "MM_ERROR_HANDLING") {
      *d.report = "unused (no shared-memory transport in UCX_TLS)";
      continue;
    }
    if (*d.value == '\0') {
      *d.report = absl::string_view(d.key) == "ALLOC_PRIO"
                      ? "unused (pools are not UCX-allocated)"
                      : "ucx default";
      continue;
    }
    const char* user_env = nullptr;
    for (const char* e : d.env) {
      if (EnvSet(e)) user_env = e;
    }
    if (const std::string* v = FindOption(options, d.key)) {
      *d.report = *v;
      *d.from_user = true;
    } else if (user_env != nullptr) {
      *d.report = absl::StrCat(user_env, "=", EnvOr(user_env, ""));
      *d.from_user = true;
    } else {
      st = ucp_config_modify(config, d.key, d.value);
      if (st != UCS_OK) return UcsToStatus(st, absl::StrCat("ucp_config_modify ", d.key));
      *d.report = d.value;
    }
  }
  absl::flat_hash_set<std::string> known = KnownSettings(config);
  for (const auto& [key, value] : options.config) {
    if (!known.empty() && !known.contains(absl::AsciiStrToUpper(key))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown UCX setting ", key, "=", value,
          " (UCP-level names without the UCX_ prefix; set transport settings such as "
          "UCX_TCP_* in the environment)"));
    }
    st = ucp_config_modify(config, key.c_str(), value.c_str());
    if (st != UCS_OK) {
      return absl::InvalidArgumentError(absl::StrCat(
          "UCX setting ", key, "=", value, " rejected: ", ucs_status_string(st)));
    }
  }

  ucp_params_t params = {};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME |
                      UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.name = options.name.c_str();
  params.mt_workers_shared = 0;
  ucp_context_h handle = nullptr;
  st = ucp_init(&params, config, &handle);
  if (st != UCS_OK) {
    absl::Status status = UcsToStatus(st, "ucp_init");
    return absl::Status(options.config.empty() ? status.code() : absl::StatusCode::kInvalidArgument,
                        absl::StrCat(status.message(), " (check AgentOptions.ucx_config)"));
  }
  Tracked tracked(options.ledger, ResourceKind::kContext, site);
  return ContextPtr(new Context(handle, std::move(settings), std::move(tracked)));
}

Context::~Context() { ucp_cleanup(handle_); }

}  // namespace internal
}  // namespace kvferry

namespace kvferry::internal {

bool Context::SupportsMemoryType(MemoryType type) const {
  if (type == MemoryType::kHost) return true;
  ucp_context_attr_t attr = {};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (ucp_context_query(handle_, &attr) != UCS_OK) return false;
  const ucs_memory_type_t want = UCS_MEMORY_TYPE_CUDA;
  return (attr.memory_types & UCS_BIT(want)) != 0;
}

}  // namespace kvferry::internal
