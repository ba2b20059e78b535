// kvferry._kvferry: the pybind11 layer under the pure-Python package
// python/kvferry. It stays thin: it turns absl::Status into the package's
// typed exceptions, releases the GIL around every call that can wait, keeps
// the Python objects whose memory kvferry registered alive as long as the
// agent, refuses to run in a forked child, and moves kvferry's log lines
// into a queue that Python code drains (no Python code ever runs on a
// kvferry thread). The Pythonic surface (keyword arguments, tensors,
// asyncio, survivors with Python sites) lives in python/kvferry/*.py.
#include <pthread.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvferry/agent.h"
#include "kvferry/directory.h"
#include "kvferry/prepared.h"
#include "kvferry/end_reason.h"
#include "kvferry/internal/mutex.h"

namespace py = pybind11;

using kvferry::internal::Mutex;
using kvferry::internal::MutexLock;

namespace kvferry::python {
namespace {

// --- Errors ------------------------------------------------------------------

// absl code (int) -> Python exception class; filled by kvferry/errors.py
// through _set_error_classes. Only touched with the GIL held.
py::dict* g_error_classes = nullptr;

[[noreturn]] void Raise(const absl::Status& status) {
  py::object cls = py::reinterpret_borrow<py::object>(PyExc_RuntimeError);
  if (g_error_classes != nullptr) {
    py::int_ code(static_cast<int>(status.code()));
    if (g_error_classes->contains(code)) {
      cls = (*g_error_classes)[code];
    } else if (g_error_classes->contains(py::int_(-1))) {
      cls = (*g_error_classes)[py::int_(-1)];
    }
  }
  std::string message(status.message());
  if (message.empty()) message = absl::StatusCodeToString(status.code());
  // The reason the status carries (end_reason.h) rides on the exception as
  // `_end_reason`; kvferry.Error.end_reason reads it.
  py::object error = cls(message);
  error.attr("_end_reason") = py::int_(static_cast<int>(ReasonOf(status)));
  PyErr_SetObject(cls.ptr(), error.ptr());
  throw py::error_already_set();
}

void Check(const absl::Status& status) {
  if (!status.ok()) Raise(status);
}

template <typename T>
T Take(absl::StatusOr<T> value) {
  if (!value.ok()) Raise(value.status());
  return *std::move(value);
}

absl::Duration Seconds(std::optional<double> seconds) {
  if (!seconds.has_value()) return absl::InfiniteDuration();
  if (*seconds < 0) {
    Raise(absl::InvalidArgumentError(absl::StrCat("timeout ", *seconds, " s is negative")));
  }
  return absl::Seconds(*seconds);
}

// Block ids from Python as a span, without per-element Python work. The
// package hands over a one-dimensional buffer (numpy array, array.array,
// a torch CPU tensor's numpy view): one of 4-byte native unsigned integers
// with unit stride (numpy uint32, array.array('I')) is used in place, the
// exporter's view held until this object dies; any other integer buffer is
// converted here, each value checked. `what` names the argument in errors.
// Built with the GIL held; span() may be read without it.
class Ids {
 public:
  Ids() = default;
  Ids(const py::handle& obj, const std::string& what) {
    if (obj.is_none()) return;
    if (!PyObject_CheckBuffer(obj.ptr())) {
      Raise(absl::InvalidArgumentError(absl::StrCat(
          what, ": ", std::string(py::str(obj.get_type().attr("__name__"))),
          " is not a buffer of block ids")));
    }
    py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request();
    if (info.ndim > 1) {
      Raise(absl::InvalidArgumentError(absl::StrCat(
          what, ": an array of ", info.ndim, " dimensions; block ids are one-dimensional")));
    }
    std::string format = info.format;
    bool swapped = false;
    if (!format.empty() && (format[0] == '@' || format[0] == '=' || format[0] == '<' ||
                            format[0] == '>' || format[0] == '!')) {
      swapped = format[0] == '>' || format[0] == '!';  // little-endian hosts only
      format.erase(0, 1);
    }
    static const std::string kSigned = "bhilqn";
    static const std::string kUnsigned = "BHILQN";
    const bool is_signed = format.size() == 1 && kSigned.find(format[0]) != std::string::npos;
    const bool is_unsigned = format.size() == 1 && kUnsigned.find(format[0]) != std::string::npos;
    if (!is_signed && !is_unsigned) {
      Raise(absl::InvalidArgumentError(absl::StrCat(
          what, ": elements of buffer format '", info.format, "' are not integers")));
    }
    const size_t n = info.ndim == 0 ? 1 : static_cast<size_t>(info.shape[0]);
    const ssize_t stride = info.ndim == 0 ? info.itemsize : info.strides[0];
    const auto* base = static_cast<const unsigned char*>(info.ptr);
    if (is_unsigned && !swapped && info.itemsize == 4 && (stride == 4 || n <= 1)) {
      span_ = std::span<const uint32_t>(static_cast<const uint32_t*>(info.ptr), n);
      info_.emplace(std::move(info));
      return;
    }
    copy_.reserve(n);
    if (!swapped && stride == info.itemsize &&
        (info.itemsize == 8 || (is_signed && info.itemsize == 4))) {
      // The common dense cases (int64, uint64, int32), one typed pass.
      if (ConvertDense(base, n, info.itemsize, is_signed, what)) return;
    }
    for (size_t i = 0; i < n; ++i) {
      const unsigned char* p = base + static_cast<ssize_t>(i) * stride;
      unsigned char bytes[8] = {};
      for (ssize_t b = 0; b < info.itemsize && b < 8; ++b) {
        bytes[b] = swapped ? p[info.itemsize - 1 - b] : p[b];
      }
      uint64_t raw = 0;
      std::memcpy(&raw, bytes, 8);
      int64_t value;
      bool negative = false;
      if (is_signed) {
        const int shift = 64 - 8 * static_cast<int>(info.itemsize);
        value = static_cast<int64_t>(raw << shift) >> shift;
        negative = value < 0;
      } else {
        value = static_cast<int64_t>(raw);
        negative = false;
      }
      if (negative || raw > 0xFFFFFFFFull) {
        Raise(absl::InvalidArgumentError(absl::StrCat(
            what, "[", i, "] ", is_signed ? absl::StrCat(value) : absl::StrCat(raw),
            " is not a block id (0 <= id < 2**32)")));
      }
      copy_.push_back(static_cast<uint32_t>(raw));
    }
    span_ = std::span<const uint32_t>(copy_);
  }
  // Ids already converted (owned).
  explicit Ids(std::vector<uint32_t> ids) : copy_(std::move(ids)), span_(copy_) {}
  Ids(Ids&&) = default;
  Ids& operator=(Ids&&) = default;

  std::span<const uint32_t> span() const { return span_; }
  size_t size() const { return span_.size(); }
  // Whether span() points into the caller's buffer (no copy was made).
  bool borrowed() const { return info_.has_value(); }

 private:
  template <typename T>
  void ConvertTyped(const unsigned char* base, size_t n, const std::string& what) {
    const T* values = reinterpret_cast<const T*>(base);
    for (size_t i = 0; i < n; ++i) {
      T v;
      std::memcpy(&v, values + i, sizeof(T));  // the buffer may be unaligned
      bool negative = false;
      if constexpr (std::is_signed_v<T>) negative = v < 0;
      if (negative || static_cast<uint64_t>(v) > 0xFFFFFFFFull) {
        Raise(absl::InvalidArgumentError(absl::StrCat(
            what, "[", i, "] ", v, " is not a block id (0 <= id < 2**32)")));
      }
      copy_.push_back(static_cast<uint32_t>(v));
    }
  }
  // Fills copy_ and span_ from a dense buffer of a common type; false when
  // the type is not one of them.
  bool ConvertDense(const unsigned char* base, size_t n, ssize_t itemsize, bool is_signed,
                    const std::string& what) {
    if (itemsize == 8 && is_signed) {
      ConvertTyped<int64_t>(base, n, what);
    } else if (itemsize == 8) {
      ConvertTyped<uint64_t>(base, n, what);
    } else if (itemsize == 4 && is_signed) {
      ConvertTyped<int32_t>(base, n, what);
    } else {
      return false;
    }
    span_ = std::span<const uint32_t>(copy_);
    return true;
  }

  std::optional<py::buffer_info> info_;
  std::vector<uint32_t> copy_;
  std::span<const uint32_t> span_;
};

// --- Fork detection ----------------------------------------------------------

std::atomic<uint64_t> g_fork_generation{0};
void OnForkChild() { g_fork_generation.fetch_add(1, std::memory_order_relaxed); }

uint64_t ForkGeneration() { return g_fork_generation.load(std::memory_order_relaxed); }

// Raises in a forked child: the handle's agent lives in the parent, and
// waiting on it here would never end.
void CheckNotForked(uint64_t generation, const std::string& what) {
  if (ForkGeneration() != generation) {
    Raise(absl::FailedPreconditionError(absl::StrCat(
        what, " belongs to an agent of the parent process and cannot be used in a forked "
        "child: create the agent in the process that uses it (multiprocessing's 'spawn' "
        "context)")));
  }
}

// Releases the GIL for a destructor's C++ work, except while the
// interpreter finalizes (when only the main thread runs Python anyway).
class ReleaseInDestructor {
 public:
  ReleaseInDestructor() {
    if (PyGILState_Check() && !_Py_IsFinalizing()) release_.emplace();
  }

 private:
  std::optional<py::gil_scoped_release> release_;
};

// --- Logs --------------------------------------------------------------------

// kvferry's sinks run on its threads, possibly with an agent's mutex held:
// they only append here. Python drains the queue (drain_logs).
class LogQueue {
 public:
  static constexpr size_t kMaxRecords = 100000;
  void Push(const LogRecord& record) {
    MutexLock lock(&mu_);
    if (records_.size() >= kMaxRecords) {
      ++dropped_;
      return;
    }
    records_.push_back(record);
    size_.store(records_.size(), std::memory_order_release);
  }
  bool Empty() const { return size_.load(std::memory_order_acquire) == 0; }
  std::deque<LogRecord> Take(uint64_t* dropped) {
    MutexLock lock(&mu_);
    std::deque<LogRecord> out;
    out.swap(records_);
    *dropped = dropped_;
    dropped_ = 0;
    size_.store(0, std::memory_order_release);
    return out;
  }

 private:
  Mutex mu_;
  std::deque<LogRecord> records_ ABSL_GUARDED_BY(mu_);
  uint64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<size_t> size_{0};  // records_.size(), read without the lock
};

LogQueue& Logs() {
  static LogQueue* queue = new LogQueue();  // never destroyed: sinks may outlive Python
  return *queue;
}

void QueueSink(const LogRecord& record) { Logs().Push(record); }

// --- Python creation sites ---------------------------------------------------

// Strings a SourceLocation may point to must outlive every ledger: interned
// forever (one per distinct file or function, a small set).
const char* Intern(const std::string& s) {
  static Mutex* mu = new Mutex();
  static auto* strings = new std::map<std::string, std::unique_ptr<std::string>>();
  MutexLock lock(mu);
  auto& slot = (*strings)[s];
  if (!slot) slot = std::make_unique<std::string>(s);
  return slot->c_str();
}

// --- The agent ---------------------------------------------------------------

struct PoolRecord {
  uint64_t generation = 0;
  int views = 0;             // live memory views (kvferry-allocated pools)
  py::list keep_alive;       // registered tensors/arrays
};

// Owns the C++ Agent. Shared by every Python object made through it (pools,
// views), so the memory views point to stays mapped while they live.
// The calls under way that released the GIL while they use an owner's
// object (an agent, a directory): its close() refuses new calls, then waits
// for these before it destroys the object. Enter, Leave and Close are called
// with the GIL held; Close releases it while it waits.
class CallGate {
 public:
  void Enter() {
    MutexLock lock(&mu_);
    ++calls_;
  }
  void Leave() {
    MutexLock lock(&mu_);
    --calls_;
  }
  // New calls are refused from here on (closing()); returns once none is
  // under way.
  void Close() {
    closing_ = true;
    py::gil_scoped_release release;
    MutexLock lock(&mu_);
    mu_.Await([this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return calls_ == 0; });
  }
  bool closing() const { return closing_; }

 private:
  bool closing_ = false;  // GIL-guarded
  Mutex mu_;
  int calls_ ABSL_GUARDED_BY(mu_) = 0;
};

// Scope of one such call: `holder.Get()` (which raises when the object is
// closed or belongs to the parent of a fork), then the gate is held until
// the scope ends.
template <typename Holder, typename T>
class GatedCall {
 public:
  explicit GatedCall(Holder& holder) : gate_(holder.gate()), object_(holder.Get()) {
    gate_.Enter();
  }
  ~GatedCall() { gate_.Leave(); }
  GatedCall(const GatedCall&) = delete;
  GatedCall& operator=(const GatedCall&) = delete;

 protected:
  T& object() const { return object_; }

 private:
  CallGate& gate_;
  T& object_;
};

class AgentHolder {
 public:
  explicit AgentHolder(std::unique_ptr<Agent> agent)
      : agent_(std::move(agent)),
        pid_(getpid()),
        fork_generation_(g_fork_generation.load(std::memory_order_relaxed)),
        name_(agent_->name()) {}

  ~AgentHolder() {
    if (agent_ == nullptr) return;
    if (Forked()) {
      // The UCX state belongs to the parent: destroying it here would hang
      // or corrupt the parent's shared segments. Leave it to exit().
      (void)agent_.release();
      return;
    }
    std::unique_ptr<Agent> agent = std::move(agent_);
    {
      ReleaseInDestructor release;
      agent.reset();
    }
    pools_.clear();  // the GIL is held again: dropping references is safe
  }

  bool Forked() const {
    return ForkGeneration() != fork_generation_;
  }

  // Raises unless the agent is open and this is the process that made it.
  Agent& Get() {
    if (Forked()) {
      Raise(absl::FailedPreconditionError(absl::StrCat(
          "agent '", name_, "' was created in process ", pid_, " and cannot be used in process ",
          getpid(), " (a forked child): create the agent in the process that uses it "
          "(multiprocessing's 'spawn' context)")));
    }
    if (agent_ == nullptr || gate_.closing()) {
      Raise(absl::FailedPreconditionError(absl::StrCat("agent '", name_, "' is closed")));
    }
    return *agent_;
  }

  // The calls that released the GIL while they use the agent (AgentCall).
  CallGate& gate() { return gate_; }

  bool closed() const { return agent_ == nullptr; }
  const std::string& name() const { return name_; }

  void Close() {
    if (agent_ == nullptr) return;
    if (Forked()) {
      (void)agent_.release();
      pools_.clear();
      return;
    }
    for (const auto& [pool, record] : pools_) {
      if (record.views > 0) {
        Raise(absl::FailedPreconditionError(absl::StrCat(
            "agent '", name_, "': ", record.views, " memory view(s) of pool '", pool,
            "' are alive; drop them before close()")));
      }
    }
    gate_.Close();  // new calls raise; calls under way finish first
    std::unique_ptr<Agent> agent = std::move(agent_);
    {
      py::gil_scoped_release release;
      agent.reset();
    }
    pools_.clear();
  }

  std::map<std::string, PoolRecord>& pools() { return pools_; }
  uint64_t NextGeneration() { return ++generation_; }

 private:
  std::unique_ptr<Agent> agent_;
  const pid_t pid_;
  const uint64_t fork_generation_;
  const std::string name_;
  std::map<std::string, PoolRecord> pools_;  // GIL-guarded
  uint64_t generation_ = 0;                   // GIL-guarded
  CallGate gate_;
};

// Scope of a call into the agent that releases the GIL.
class AgentCall : public GatedCall<AgentHolder, Agent> {
 public:
  using GatedCall::GatedCall;
  Agent& agent() const { return object(); }
};

using AgentRef = std::shared_ptr<AgentHolder>;

// A pool as Python sees it: valid while its agent is open and the pool was
// not removed (its generation still recorded).
class Pool {
 public:
  Pool(AgentRef agent, KvPool* pool, uint64_t generation)
      : agent_(std::move(agent)), pool_(pool), name_(pool->name()), generation_(generation) {}

  KvPool& Get() const {
    agent_->Get();
    auto it = agent_->pools().find(name_);
    if (it == agent_->pools().end() || it->second.generation != generation_) {
      Raise(absl::FailedPreconditionError(absl::StrCat("pool '", name_, "' was removed")));
    }
    return *pool_;
  }
  const std::string& name() const { return name_; }
  const AgentRef& agent() const { return agent_; }
  uint64_t generation() const { return generation_; }

 private:
  AgentRef agent_;
  KvPool* pool_;
  std::string name_;
  uint64_t generation_;
};

// Keeps a kvferry-allocated pool (and its agent) alive while a numpy array
// over its memory lives; counted so close()/remove_pool can refuse.
class ViewGuard {
 public:
  ViewGuard(AgentRef agent, std::string pool, uint64_t generation)
      : agent_(std::move(agent)), pool_(std::move(pool)), generation_(generation) {
    auto it = agent_->pools().find(pool_);
    if (it != agent_->pools().end()) ++it->second.views;
  }
  ~ViewGuard() {
    auto it = agent_->pools().find(pool_);
    if (it != agent_->pools().end() && it->second.generation == generation_) {
      --it->second.views;
    }
  }

 private:
  AgentRef agent_;
  std::string pool_;
  uint64_t generation_;
};

// Handles used from several Python threads: the C++ handles are
// thread-compatible, so each wrapper serializes its own calls. The GIL is
// always released before the mutex is taken.
class PyBlockSet {
 public:
  explicit PyBlockSet(BlockSet blocks)
      : fork_generation_(ForkGeneration()), blocks_(std::move(blocks)) {
    ids_.assign(blocks_.ids().begin(), blocks_.ids().end());
    pool_name_ = blocks_.pool_name();
  }
  ~PyBlockSet() {
    if (ForkGeneration() != fork_generation_) {
      new BlockSet(std::move(blocks_));  // the parent's: never touched here
      return;
    }
    ReleaseInDestructor release;
    MutexLock lock(&mu_);
    blocks_.Reset();
  }
  void Release() {
    CheckNotForked(fork_generation_, "this BlockSet");
    py::gil_scoped_release release;
    MutexLock lock(&mu_);
    blocks_.Reset();
  }
  bool released() {
    py::gil_scoped_release release;
    MutexLock lock(&mu_);
    return blocks_.empty();
  }
  const std::vector<uint32_t>& ids() const { return ids_; }
  const std::string& pool_name() const { return pool_name_; }
  Mutex& mu() ABSL_LOCK_RETURNED(mu_) { return mu_; }
  BlockSet& blocks() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return blocks_; }

 private:
  const uint64_t fork_generation_;
  Mutex mu_;
  BlockSet blocks_ ABSL_GUARDED_BY(mu_);
  std::vector<uint32_t> ids_;
  std::string pool_name_;
};

const char* TransferStateName(TransferState state) {
  switch (state) {
    case TransferState::kInFlight: return "in_flight";
    case TransferState::kDone: return "done";
    case TransferState::kFailed: return "failed";
    case TransferState::kCancelled: return "cancelled";
    case TransferState::kEmpty: return "empty";
  }
  return "unknown";
}

const char* PeerStateName(PeerState state) {
  switch (state) {
    case PeerState::kHandshaking: return "handshaking";
    case PeerState::kConnected: return "connected";
    case PeerState::kFailed: return "failed";
    case PeerState::kClosed: return "closed";
  }
  return "unknown";
}

// (code, message, end reason) of a status: code 0 for OK.
py::tuple StatusTuple(const absl::Status& status) {
  return py::make_tuple(static_cast<int>(status.code()), std::string(status.message()),
                        static_cast<int>(ReasonOf(status)));
}

// A Transfer or an Offer shared with Python: its calls serialized, the GIL
// released while they may wait, never touched in a forked child (the
// parent's handle is leaked there rather than ended).
template <typename Handle>
class PyHandle {
 public:
  // `kind` names it in errors ("this transfer").
  PyHandle(Handle handle, const char* kind)
      : fork_generation_(ForkGeneration()), kind_(kind), handle_(std::move(handle)),
        id_(handle_.id()) {}
  ~PyHandle() {
    if (ForkGeneration() != fork_generation_) {
      new Handle(std::move(handle_));  // the parent's: never touched here
      return;
    }
    ReleaseInDestructor release;
    MutexLock lock(&mu_);
    handle_ = Handle();
  }
  PyHandle(const PyHandle&) = delete;
  PyHandle& operator=(const PyHandle&) = delete;

  uint64_t id() const { return id_; }
  py::tuple status() {
    return StatusTuple(Call([](Handle& h) { return h.status(); }));
  }
  void Wait(std::optional<double> timeout) {
    const absl::Duration d = Seconds(timeout);
    Check(Call([d](Handle& h) { return h.Wait(d); }));
  }

 protected:
  // f(handle) under the handle's lock, with the GIL released.
  template <typename F>
  auto Call(F f) {
    CheckNotForked(fork_generation_, kind_);
    py::gil_scoped_release release;
    MutexLock lock(&mu_);
    return f(handle_);
  }

 private:
  const uint64_t fork_generation_;
  const char* const kind_;
  Mutex mu_;
  Handle handle_ ABSL_GUARDED_BY(mu_);
  const uint64_t id_;
};

class PyTransfer : public PyHandle<Transfer> {
 public:
  explicit PyTransfer(Transfer transfer) : PyHandle(std::move(transfer), "this transfer") {}
  std::string state() {
    return TransferStateName(Call([](Transfer& t) { return t.state(); }));
  }
  // (code, message) of the final status (kCancelled when this call ended it).
  py::tuple Cancel(double grace) {
    const absl::Duration g = Seconds(grace);
    return StatusTuple(Call([g](Transfer& t) { return t.Cancel(g); }));
  }
  int reason() {
    return static_cast<int>(Call([](Transfer& t) { return t.reason(); }));
  }
  // (bytes, posted, ended, data_path): times as Unix seconds, None while
  // unknown (posted) or in flight (ended).
  py::tuple telemetry() {
    TransferTelemetry t = Call([](Transfer& h) { return h.telemetry(); });
    auto unix_seconds = [](absl::Time time) -> py::object {
      if (time == absl::InfinitePast() || time == absl::InfiniteFuture()) return py::none();
      return py::float_(absl::ToDoubleSeconds(time - absl::UnixEpoch()));
    };
    return py::make_tuple(t.bytes, unix_seconds(t.posted), unix_seconds(t.ended), t.data_path);
  }
};

class PyOffer : public PyHandle<kvferry::Offer> {
 public:
  explicit PyOffer(kvferry::Offer offer)
      : PyHandle(std::move(offer), "this offer"),
        ticket_(Call([](kvferry::Offer& o) { return o.ticket(); })),
        peer_(Call([](kvferry::Offer& o) { return o.peer(); })) {}
  py::bytes ticket() const { return py::bytes(ticket_); }
  const std::string& peer() const { return peer_; }
  std::string state() {
    return OfferStateName(Call([](kvferry::Offer& o) { return o.state(); }));
  }
  py::tuple Revoke() {
    return StatusTuple(Call([](kvferry::Offer& o) { return o.Revoke(); }));
  }
  int reason() {
    return static_cast<int>(Call([](kvferry::Offer& o) { return o.reason(); }));
  }

 private:
  const std::string ticket_;
  const std::string peer_;
};

// The Python caller's site for the ledger: the (file, line, function) tuple
// the package passes with every call that creates a handle, as interned
// strings that outlive every ledger. The binding's own site when the tuple
// is not one.
// The interned copy of a site string, looked up by the str object: the
// table holds a reference to each key, so a key's address is never reused
// for another string. Only called with the GIL held (which guards it).
const char* InternStr(const py::handle& s) {
  static auto* by_object = new std::unordered_map<PyObject*, const char*>();
  auto it = by_object->find(s.ptr());
  if (it != by_object->end()) return it->second;
  const char* interned = Intern(s.cast<std::string>());
  by_object->emplace(s.inc_ref().ptr(), interned);
  return interned;
}

SourceLocation Site(const py::tuple& site) {
  if (site.size() != 3) return SourceLocation::current();
  return SourceLocation::FromValues(InternStr(site[0]), site[1].cast<uint32_t>(),
                                    InternStr(site[2]));
}

py::dict PeerDict(const PeerInfo& p) {
  py::dict d;
  d["name"] = p.name;
  d["state"] = PeerStateName(p.state);
  d["status"] = StatusTuple(p.status);
  d["pools"] = p.pools;
  d["same_host"] = p.same_host;
  d["data_error_handling"] = p.data_error_handling;
  d["data_path"] = p.data_path;
  d["address"] = p.address;
  d["incarnation"] = p.incarnation;
  return d;
}

py::list NotificationList(const std::vector<Notification>& ns) {
  py::list out;
  for (const Notification& n : ns) out.append(py::make_tuple(n.peer, py::bytes(n.payload)));
  return out;
}

py::dict StatsDict(const Stats& s) {
  py::dict d;
  py::dict live;
  for (int k = 0; k < kNumResourceKinds; ++k) {
    live[py::str(std::string(ResourceKindName(static_cast<ResourceKind>(k))))] = s.live[k];
  }
  d["live"] = live;
  d["registered_bytes"] = s.registered_bytes;
  py::dict q;
  q["notifications_queued"] = s.queues.notifications_queued;
  q["notification_bytes_queued"] = s.queues.notification_bytes_queued;
  q["peers_paused"] = s.queues.peers_paused;
  q["notifications_held"] = s.queues.notifications_held;
  q["notification_pauses"] = s.queues.notification_pauses;
  q["notification_holds"] = s.queues.notification_holds;
  q["notifications_dropped"] = s.queues.notifications_dropped;
  d["queues"] = q;
  d["text"] = s.ToString();
  return d;
}

KvLayout LayoutFromDict(const py::dict& d) {
  KvLayout l;
  l.num_layers = d["num_layers"].cast<uint32_t>();
  l.num_blocks = d["num_blocks"].cast<uint32_t>();
  l.tokens_per_block = d["tokens_per_block"].cast<uint32_t>();
  l.num_kv_heads = d["num_kv_heads"].cast<uint32_t>();
  l.head_dim = d["head_dim"].cast<uint32_t>();
  l.element_bytes = d["element_bytes"].cast<uint32_t>();
  l.separate_kv = d["separate_kv"].cast<bool>();
  return l;
}

AgentRef CreateAgent(const py::dict& o, const py::tuple& site) {
  AgentOptions options;
  options.name = o["name"].cast<std::string>();
  options.leak_policy = LeakPolicy::kLog;  // never abort the interpreter
  if (o.contains("leak_policy")) {
    std::string p = o["leak_policy"].cast<std::string>();
    if (p == "abort") options.leak_policy = LeakPolicy::kAbort;
    else if (p == "ignore") options.leak_policy = LeakPolicy::kIgnore;
    else if (p != "log") Raise(absl::InvalidArgumentError(absl::StrCat("leak_policy '", p, "' is not one of log, ignore, abort")));
  }
  options.log_sink = &QueueSink;
  if (o.contains("ucx_config")) {
    options.ucx_config = o["ucx_config"].cast<std::vector<std::pair<std::string, std::string>>>();
  }
  options.progress_thread = o["progress_thread"].cast<bool>();
  options.shared_secret = o["secret"].cast<std::string>();
  options.allow_insecure = o["allow_insecure"].cast<bool>();
  if (o.contains("peer_timeout")) options.peer_timeout = absl::Seconds(o["peer_timeout"].cast<double>());
  if (o.contains("handshake_timeout")) options.handshake_timeout = absl::Seconds(o["handshake_timeout"].cast<double>());
  if (o.contains("max_queued_completions")) options.max_queued_completions = o["max_queued_completions"].cast<size_t>();
  if (o.contains("pool_memory")) {
    std::string m = o["pool_memory"].cast<std::string>();
    if (m == "ucx-allocated") options.pool_memory = PoolMemorySource::kUcxAllocated;
    else if (m == "anonymous-mmap") options.pool_memory = PoolMemorySource::kAnonymousMmap;
    else Raise(absl::InvalidArgumentError(absl::StrCat("pool_memory '", m, "' is not one of ucx-allocated, anonymous-mmap")));
  }
  if (o.contains("kernel_copy")) options.kernel_copy = o["kernel_copy"].cast<bool>();
  SourceLocation where = Site(site);
  absl::StatusOr<std::unique_ptr<Agent>> agent;
  {
    py::gil_scoped_release release;
    agent = Agent::Create(std::move(options), where);
  }
  return std::make_shared<AgentHolder>(Take(std::move(agent)));
}

std::shared_ptr<Pool> CreatePool(const AgentRef& self, const std::string& name, const py::dict& layout,
                                 bool exported, const py::tuple& site) {
  AgentCall call(*self);
  Agent& agent = call.agent();
  KvLayout l = LayoutFromDict(layout);
  SourceLocation where = Site(site);
  absl::StatusOr<KvPool*> pool;
  {
    py::gil_scoped_release release;
    pool = agent.CreatePool(name, l, exported, where);
  }
  KvPool* p = Take(std::move(pool));
  uint64_t gen = self->NextGeneration();
  self->pools()[name] = PoolRecord{gen, 0, py::list()};
  return std::make_shared<Pool>(self, p, gen);
}

// regions: list of (address, length); keep: the objects owning that memory.
std::shared_ptr<Pool> RegisterPool(const AgentRef& self, const std::string& name, const py::dict& layout,
                                   const std::vector<std::pair<uintptr_t, uint64_t>>& regions,
                                   py::list keep, bool exported, const py::tuple& site) {
  AgentCall call(*self);
  Agent& agent = call.agent();
  KvLayout l = LayoutFromDict(layout);
  std::vector<KvRegion> rs;
  rs.reserve(regions.size());
  for (const auto& [addr, len] : regions) rs.push_back(KvRegion{reinterpret_cast<void*>(addr), len});
  SourceLocation where = Site(site);
  absl::StatusOr<KvPool*> pool;
  {
    py::gil_scoped_release release;
    pool = agent.RegisterPool(name, l, rs, exported, MemoryType::kHost, where);
  }
  KvPool* p = Take(std::move(pool));
  uint64_t gen = self->NextGeneration();
  self->pools()[name] = PoolRecord{gen, 0, std::move(keep)};
  return std::make_shared<Pool>(self, p, gen);
}

void RemovePool(const AgentRef& self, const std::string& name, double timeout) {
  AgentCall call(*self);
  Agent& agent = call.agent();
  auto it = self->pools().find(name);
  if (it != self->pools().end() && it->second.views > 0) {
    Raise(absl::FailedPreconditionError(absl::StrCat(
        it->second.views, " memory view(s) of pool '", name, "' are alive; drop them first")));
  }
  absl::Duration t = Seconds(timeout);
  absl::Status status;
  {
    py::gil_scoped_release release;
    status = agent.RemovePool(name, t);
  }
  Check(status);
  self->pools().erase(name);  // drops the registered tensors' references
}

// What Agent.post passes: every TransferSpec field Python sets.
struct PostArgs {
  std::string op;
  std::string peer;
  std::shared_ptr<PyBlockSet> local;  // or local_pool + local_blocks
  std::string local_pool;
  Ids local_blocks;
  std::string remote_pool;
  Ids remote_ids;
  uint32_t layer_begin = 0;
  uint32_t layer_end = 0;
  uint64_t slice_bytes = 0;
  uint64_t local_slice_offset = 0;
  uint64_t remote_slice_offset = 0;
  std::string notification;
  std::string offer_ticket;
  Ids offer_blocks;
};

// The ids of a list whose elements are all exact ints in [0, 2**32);
// false (nothing raised) for any other element.
bool ListIds(PyObject* list, std::vector<uint32_t>* out) {
  const Py_ssize_t n = PyList_GET_SIZE(list);
  out->reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(list, i);
    if (!PyLong_CheckExact(item)) return false;
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0 || v < 0 || v > 0xFFFFFFFFLL) return false;
    out->push_back(static_cast<uint32_t>(v));
  }
  return true;
}

// The fields of Agent.post / Agent.post_fields, in the order post_fields
// takes them.
enum PostField { kOp, kPeer, kLocal, kLocalPool, kLocalBlocks, kRemotePool, kRemoteIds,
                 kLayerBegin, kLayerEnd, kSliceBytes, kLocalSliceOffset, kRemoteSliceOffset,
                 kNotification, kTicket, kOfferBlocks, kNumPostFields };

PostArgs PostArgsOf(const std::array<py::object, kNumPostFields>& f) {
  PostArgs args;
  args.op = f[kOp].cast<std::string>();
  args.peer = f[kPeer].cast<std::string>();
  if (!f[kLocal].is_none()) args.local = f[kLocal].cast<std::shared_ptr<PyBlockSet>>();
  args.local_pool = f[kLocalPool].cast<std::string>();
  args.local_blocks = Ids(f[kLocalBlocks], "local_blocks");
  args.remote_pool = f[kRemotePool].cast<std::string>();
  args.remote_ids = Ids(f[kRemoteIds], "remote_ids");
  args.layer_begin = f[kLayerBegin].cast<uint32_t>();
  args.layer_end = f[kLayerEnd].cast<uint32_t>();
  args.slice_bytes = f[kSliceBytes].cast<uint64_t>();
  args.local_slice_offset = f[kLocalSliceOffset].cast<uint64_t>();
  args.remote_slice_offset = f[kRemoteSliceOffset].cast<uint64_t>();
  args.notification = f[kNotification].cast<std::string>();
  args.offer_ticket = f[kTicket].cast<std::string>();
  args.offer_blocks = Ids(f[kOfferBlocks], "offer_blocks");
  return args;
}

std::shared_ptr<PyTransfer> Post(const AgentRef& self, const PostArgs& args,
                                 const py::tuple& site) {
  AgentCall call(*self);
  Agent& agent = call.agent();
  TransferSpec spec;
  if (args.op == "read") {
    spec.op = TransferOp::kRead;
  } else if (args.op == "write") {
    spec.op = TransferOp::kWrite;
  } else {
    Raise(absl::InvalidArgumentError(absl::StrCat("op '", args.op, "' is not 'read' or 'write'")));
  }
  spec.peer = args.peer;
  spec.remote_pool = args.remote_pool;
  spec.remote_ids = args.remote_ids.span();
  spec.local_pool = args.local_pool;
  spec.local_blocks = args.local_blocks.span();
  spec.layer_begin = args.layer_begin;
  spec.layer_end = args.layer_end;
  spec.slice_bytes = args.slice_bytes;
  spec.local_slice_offset = args.local_slice_offset;
  spec.remote_slice_offset = args.remote_slice_offset;
  spec.notification = args.notification;
  spec.offer_ticket = args.offer_ticket;
  std::span<const uint32_t> offer_blocks = args.offer_blocks.span();
  spec.offer_blocks = absl::Span<const uint32_t>(offer_blocks.data(), offer_blocks.size());
  SourceLocation where = Site(site);
  absl::StatusOr<Transfer> transfer;
  {
    py::gil_scoped_release release;
    if (args.local == nullptr) {
      transfer = agent.PostTransfer(spec, where);
    } else {
      PyBlockSet& local = *args.local;
      MutexLock lock(&local.mu());
      if (local.blocks().empty()) {
        transfer = absl::InvalidArgumentError(absl::StrCat(
            "the BlockSet of pool '", local.pool_name(), "' was released"));
      } else {
        spec.local = &local.blocks();
        transfer = agent.PostTransfer(spec, where);
      }
    }
  }
  return std::make_shared<PyTransfer>(Take(std::move(transfer)));
}

// A PreparedList shared with Python. The list is immutable, so posts use
// it without holding the wrapper's lock: each post takes its own reference,
// and release() only drops the wrapper's (the list goes when the last post
// call returns). Never touched in a forked child.
class PyPreparedList {
 public:
  explicit PyPreparedList(PreparedList list)
      : fork_generation_(ForkGeneration()),
        size_(list.size()),
        remote_(list.remote()),
        peer_(list.peer()),
        pool_(list.pool()),
        list_(std::make_shared<const PreparedList>(std::move(list))) {}
  ~PyPreparedList() {
    if (ForkGeneration() != fork_generation_) {
      new std::shared_ptr<const PreparedList>(std::move(list_));  // the parent's
      return;
    }
    ReleaseInDestructor release;
    MutexLock lock(&mu_);
    list_.reset();
  }
  PyPreparedList(const PyPreparedList&) = delete;
  PyPreparedList& operator=(const PyPreparedList&) = delete;

  void Release() {
    CheckNotForked(fork_generation_, "this PreparedList");
    std::shared_ptr<const PreparedList> gone;
    {
      MutexLock lock(&mu_);
      gone = std::move(list_);
    }
    py::gil_scoped_release release;
    gone.reset();
  }
  bool released() {
    MutexLock lock(&mu_);
    return list_ == nullptr;
  }
  // The list, for one post; kInvalidArgument naming it once released.
  std::shared_ptr<const PreparedList> Use(const char* side) {
    CheckNotForked(fork_generation_, "this PreparedList");
    MutexLock lock(&mu_);
    if (list_ == nullptr) {
      Raise(absl::InvalidArgumentError(absl::StrCat(
          "the ", side, " PreparedList (pool '", pool_, "'", peer_.empty() ? "" : " of peer '",
          peer_, peer_.empty() ? "" : "'", ") was released")));
    }
    return list_;
  }
  size_t size() const { return size_; }
  bool remote() const { return remote_; }
  const std::string& peer() const { return peer_; }
  const std::string& pool() const { return pool_; }

 private:
  const uint64_t fork_generation_;
  const size_t size_;
  const bool remote_;
  const std::string peer_;
  const std::string pool_;
  Mutex mu_;
  std::shared_ptr<const PreparedList> list_ ABSL_GUARDED_BY(mu_);
};

std::shared_ptr<PyPreparedList> Prepare(const AgentRef& self, const std::string& peer,
                                        const std::string& pool, const py::object& blocks,
                                        uint64_t slice_offset, uint64_t slice_bytes,
                                        const py::tuple& site) {
  AgentCall call(*self);
  Agent& agent = call.agent();
  Ids ids(blocks, "blocks");
  PrepareSpec spec{.peer = peer, .pool = pool, .blocks = ids.span(),
                   .slice_offset = slice_offset, .slice_bytes = slice_bytes};
  SourceLocation where = Site(site);
  absl::StatusOr<PreparedList> list;
  {
    py::gil_scoped_release release;
    list = agent.Prepare(spec, where);
  }
  return std::make_shared<PyPreparedList>(Take(std::move(list)));
}

std::shared_ptr<PyTransfer> PostPrepared(const AgentRef& self, const std::string& op,
                                         PyPreparedList& local, const py::object& local_indices,
                                         PyPreparedList& remote, const py::object& remote_indices,
                                         const std::string& notification, uint32_t layer_begin,
                                         uint32_t layer_end, const py::tuple& site) {
  AgentCall call(*self);
  Agent& agent = call.agent();
  PreparedPost post;
  if (op == "read") {
    post.op = TransferOp::kRead;
  } else if (op == "write") {
    post.op = TransferOp::kWrite;
  } else {
    Raise(absl::InvalidArgumentError(absl::StrCat("op '", op, "' is not 'read' or 'write'")));
  }
  post.notification = notification;
  post.layer_begin = layer_begin;
  post.layer_end = layer_end;
  Ids li(local_indices, "local_indices");
  Ids ri(remote_indices, "remote_indices");
  std::shared_ptr<const PreparedList> l = local.Use("local");
  std::shared_ptr<const PreparedList> r = remote.Use("remote");
  SourceLocation where = Site(site);
  absl::StatusOr<Transfer> transfer;
  {
    py::gil_scoped_release release;
    transfer = agent.PostPrepared(*l, li.span(), *r, ri.span(), post, where);
  }
  return std::make_shared<PyTransfer>(Take(std::move(transfer)));
}

}  // namespace
}  // namespace kvferry::python

// --- The directory (kvferry::Directory) --------------------------------------
// kvferry.Directory: agents find each other by name through etcd. The C++
// Directory is thread-safe; this wrapper adds what every owner here has:
// close() waits for calls under way, calls after it raise, a forked child
// cannot use the parent's, and every call that can wait on etcd releases the
// GIL. Watch events never run Python on the watch thread: its callback only
// queues them, and Python drains the queue (poll_events / wait_events).
namespace kvferry::python {
namespace {

// Watch events between the directory's watch thread and Python. Bounded
// like the C++ queue: past kMaxEvents the oldest are dropped and counted.
class DirectoryEventQueue {
 public:
  static constexpr size_t kMaxEvents = 100000;

  void Push(const DirectoryEvent& event) {
    MutexLock lock(&mu_);
    if (events_.size() >= kMaxEvents) {
      events_.pop_front();
      ++dropped_;
    }
    events_.push_back(event);
  }
  // Waits up to `timeout` for at least one event (none when `timeout` is
  // zero), then drains the queue. Returns early, empty, once shut down.
  std::deque<DirectoryEvent> Take(absl::Duration timeout, uint64_t* dropped) {
    MutexLock lock(&mu_);
    if (timeout > absl::ZeroDuration()) {
      mu_.AwaitWithTimeout(
          [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return !events_.empty() || shut_down_; },
          timeout);
    }
    std::deque<DirectoryEvent> out;
    out.swap(events_);
    *dropped = dropped_;
    dropped_ = 0;
    return out;
  }
  // Wakes waiters for good (the directory is closing).
  void ShutDown() {
    MutexLock lock(&mu_);
    shut_down_ = true;
  }
  void Clear() {
    MutexLock lock(&mu_);
    events_.clear();
    dropped_ = 0;
  }

 private:
  Mutex mu_;
  std::deque<DirectoryEvent> events_ ABSL_GUARDED_BY(mu_);
  uint64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

// Owns the C++ Directory; the Python Directory holds one.
class DirectoryHolder {
 public:
  explicit DirectoryHolder(std::unique_ptr<Directory> directory)
      : directory_(std::move(directory)),
        events_(std::make_shared<DirectoryEventQueue>()),
        fork_generation_(ForkGeneration()),
        cluster_(directory_->options().cluster),
        endpoints_(directory_->options().endpoints) {}

  ~DirectoryHolder() {
    if (directory_ == nullptr) return;
    if (Forked()) {
      (void)directory_.release();  // the parent's threads: not ours to stop
      return;
    }
    events_->ShutDown();
    ReleaseInDestructor release;
    directory_.reset();
  }
  DirectoryHolder(const DirectoryHolder&) = delete;
  DirectoryHolder& operator=(const DirectoryHolder&) = delete;

  bool Forked() const { return ForkGeneration() != fork_generation_; }

  // Raises unless open and in the process that made it.
  Directory& Get() {
    CheckNotForked(fork_generation_, absl::StrCat("the directory of cluster '", cluster_, "'"));
    if (directory_ == nullptr || gate_.closing()) {
      Raise(absl::FailedPreconditionError(
          absl::StrCat("the directory of cluster '", cluster_, "' is closed")));
    }
    return *directory_;
  }
  // The calls that released the GIL while they use the directory.
  CallGate& gate() { return gate_; }

  // Stops the watch, revokes the lease (every entry it published goes at
  // once) after the calls under way returned. Idempotent.
  void Close() {
    if (directory_ == nullptr) return;
    if (Forked()) {
      (void)directory_.release();
      return;
    }
    events_->ShutDown();  // a wait_events under way returns
    gate_.Close();
    std::unique_ptr<Directory> directory = std::move(directory_);
    {
      py::gil_scoped_release release;
      directory.reset();
    }
  }

  bool closed() const { return directory_ == nullptr; }
  const std::string& cluster() const { return cluster_; }
  const std::vector<std::string>& endpoints() const { return endpoints_; }
  const std::shared_ptr<DirectoryEventQueue>& events() const { return events_; }

 private:
  std::unique_ptr<Directory> directory_;  // GIL-guarded (the pointer)
  const std::shared_ptr<DirectoryEventQueue> events_;
  const uint64_t fork_generation_;
  const std::string cluster_;
  const std::vector<std::string> endpoints_;
  CallGate gate_;
};

// Scope of a call that releases the GIL while it uses the directory.
class DirectoryCall : public GatedCall<DirectoryHolder, Directory> {
 public:
  using GatedCall::GatedCall;
  Directory& directory() const { return object(); }
};

py::dict DirectoryLayoutDict(const KvLayout& l) {
  py::dict d;
  d["num_layers"] = l.num_layers;
  d["num_blocks"] = l.num_blocks;
  d["tokens_per_block"] = l.tokens_per_block;
  d["num_kv_heads"] = l.num_kv_heads;
  d["head_dim"] = l.head_dim;
  d["element_bytes"] = l.element_bytes;
  d["separate_kv"] = l.separate_kv;
  return d;
}

py::dict AgentRecordDict(const AgentRecord& r) {
  py::dict d;
  d["name"] = r.name;
  d["address"] = r.address;
  d["port"] = r.port;
  d["incarnation"] = r.incarnation;
  d["role"] = r.role;
  py::list pools;
  for (const DirectoryPool& p : r.pools) {
    pools.append(py::make_tuple(p.name, DirectoryLayoutDict(p.layout)));
  }
  d["pools"] = pools;
  d["create_revision"] = r.create_revision;
  d["mod_revision"] = r.mod_revision;
  return d;
}

absl::Duration PositiveSeconds(const py::dict& o, const char* key, absl::Duration fallback) {
  if (!o.contains(key)) return fallback;
  const double s = o[key].cast<double>();
  if (!(s > 0) || s > 1e9) {
    Raise(absl::InvalidArgumentError(
        absl::StrCat(key, " ", s, " s is not a positive number of seconds")));
  }
  return absl::Seconds(s);
}

std::shared_ptr<DirectoryHolder> CreateDirectory(const py::dict& o) {
  DirectoryOptions options;
  if (o.contains("endpoints")) options.endpoints = o["endpoints"].cast<std::vector<std::string>>();
  if (o.contains("cluster")) options.cluster = o["cluster"].cast<std::string>();
  if (o.contains("username")) options.username = o["username"].cast<std::string>();
  if (o.contains("password")) options.password = o["password"].cast<std::string>();
  options.lease_ttl = PositiveSeconds(o, "lease_ttl", options.lease_ttl);
  options.connect_timeout = PositiveSeconds(o, "connect_timeout", options.connect_timeout);
  options.request_timeout = PositiveSeconds(o, "request_timeout", options.request_timeout);
  options.retry_deadline = PositiveSeconds(o, "retry_deadline", options.retry_deadline);
  absl::StatusOr<std::unique_ptr<Directory>> directory;
  {
    py::gil_scoped_release release;
    directory = Directory::Create(std::move(options));
  }
  return std::make_shared<DirectoryHolder>(Take(std::move(directory)));
}

// (type, name, record, revision) of each event, and the count dropped.
py::tuple DirectoryEventsTuple(const std::deque<DirectoryEvent>& events, uint64_t dropped) {
  py::list out;
  for (const DirectoryEvent& e : events) {
    out.append(py::make_tuple(std::string(DirectoryEventTypeName(e.type)), e.name,
                              AgentRecordDict(e.record), e.revision));
  }
  return py::make_tuple(out, dropped);
}

void BindDirectory(py::module_& m) {
  using DirectoryRef = std::shared_ptr<DirectoryHolder>;
  py::class_<DirectoryHolder, DirectoryRef>(m, "Directory")
      .def(py::init(&CreateDirectory), py::arg("options"))
      .def_property_readonly("closed", &DirectoryHolder::closed)
      .def_property_readonly("cluster", &DirectoryHolder::cluster)
      .def_property_readonly("endpoints", &DirectoryHolder::endpoints)
      .def("close", &DirectoryHolder::Close)
      .def("key_of", [](DirectoryHolder& h, const std::string& name) {
        return h.Get().KeyOf(name);
      })
      .def("publish", [](DirectoryHolder& h, AgentHolder& agent, const std::string& address,
                         int64_t port, const std::string& role) {
        if (port < 1 || port > 65535) {
          Raise(absl::InvalidArgumentError(absl::StrCat(
              "publish '", agent.name(), "': port ", port, " is not in 1..65535")));
        }
        DirectoryCall call(h);
        AgentCall agent_call(agent);
        Directory& d = call.directory();
        const Agent& a = agent_call.agent();
        absl::Status s;
        {
          py::gil_scoped_release release;
          s = d.Publish(a, address, static_cast<uint16_t>(port), role);
        }
        Check(s);
      })
      .def("unpublish", [](DirectoryHolder& h, const std::string& name) {
        DirectoryCall call(h);
        Directory& d = call.directory();
        absl::Status s;
        { py::gil_scoped_release release; s = d.Unpublish(name); }
        Check(s);
      })
      .def("publications", [](DirectoryHolder& h) {
        DirectoryCall call(h);
        Directory& d = call.directory();
        std::vector<std::pair<std::string, absl::Status>> r;
        { py::gil_scoped_release release; r = d.Publications(); }
        py::list out;
        for (const auto& [name, status] : r) out.append(py::make_tuple(name, StatusTuple(status)));
        return out;
      })
      .def("resolve", [](DirectoryHolder& h, const std::string& name) {
        DirectoryCall call(h);
        Directory& d = call.directory();
        absl::StatusOr<AgentRecord> r;
        { py::gil_scoped_release release; r = d.Resolve(name); }
        return AgentRecordDict(Take(std::move(r)));
      })
      .def("list", [](DirectoryHolder& h) {
        DirectoryCall call(h);
        Directory& d = call.directory();
        absl::StatusOr<std::vector<AgentRecord>> r;
        { py::gil_scoped_release release; r = d.List(); }
        py::list out;
        for (const AgentRecord& record : Take(std::move(r))) out.append(AgentRecordDict(record));
        return out;
      })
      .def("connect", [](DirectoryHolder& h, AgentHolder& agent, const std::string& name,
                         double timeout) {
        DirectoryCall call(h);
        AgentCall agent_call(agent);
        Directory& d = call.directory();
        Agent& a = agent_call.agent();
        absl::Duration t = Seconds(timeout);
        absl::StatusOr<PeerInfo> r;
        { py::gil_scoped_release release; r = d.Connect(a, name, t); }
        return PeerDict(Take(std::move(r)));
      })
      .def("watch", [](DirectoryHolder& h, int64_t start_revision) {
        if (start_revision < 0) {
          Raise(absl::InvalidArgumentError(absl::StrCat(
              "start_revision ", start_revision, " is negative (0: from a snapshot)")));
        }
        DirectoryCall call(h);
        Directory& d = call.directory();
        std::shared_ptr<DirectoryEventQueue> events = h.events();
        absl::Status s;
        {
          py::gil_scoped_release release;
          events->Clear();
          s = d.Watch([events](const DirectoryEvent& e) { events->Push(e); }, start_revision);
        }
        Check(s);
      })
      .def("unwatch", [](DirectoryHolder& h) {
        DirectoryCall call(h);
        Directory& d = call.directory();
        py::gil_scoped_release release;
        d.Unwatch();
      })
      .def("wait_events", [](DirectoryHolder& h, std::optional<double> timeout) {
        DirectoryCall call(h);
        absl::Duration t = Seconds(timeout);
        std::shared_ptr<DirectoryEventQueue> events = h.events();
        std::deque<DirectoryEvent> out;
        uint64_t dropped = 0;
        { py::gil_scoped_release release; out = events->Take(t, &dropped); }
        return DirectoryEventsTuple(out, dropped);
      })
      .def("watch_revision", [](DirectoryHolder& h) {
        DirectoryCall call(h);
        Directory& d = call.directory();
        py::gil_scoped_release release;
        return d.WatchRevision();
      })
      .def("watched_agents", [](DirectoryHolder& h) {
        DirectoryCall call(h);
        Directory& d = call.directory();
        std::vector<AgentRecord> r;
        { py::gil_scoped_release release; r = d.WatchedAgents(); }
        py::list out;
        for (const AgentRecord& record : r) out.append(AgentRecordDict(record));
        return out;
      });
}

}  // namespace
}  // namespace kvferry::python

PYBIND11_MODULE(_kvferry, m) {
  using namespace kvferry;
  using namespace kvferry::python;
  m.doc() = "kvferry's C++ binding; use the 'kvferry' package instead.";
  pthread_atfork(nullptr, nullptr, &OnForkChild);
  SetLogSink(&QueueSink);  // lines tied to no agent reach Python too

  m.def("_set_error_classes", [](py::dict classes) {
    if (g_error_classes == nullptr) g_error_classes = new py::dict();
    *g_error_classes = std::move(classes);
  });
  m.def("ledger_sites_enabled", &Ledger::SitesEnabled);
  m.def("_logs_pending", [] { return !Logs().Empty(); });
  // [(severity, agent, message)], dropped count.
  m.def("drain_logs", [] {
    py::list out;
    uint64_t dropped = 0;
    if (Logs().Empty()) return py::make_tuple(out, 0);
    std::deque<LogRecord> records = Logs().Take(&dropped);
    for (const LogRecord& r : records) {
      out.append(py::make_tuple(LogSeverityName(r.severity), r.agent, r.message));
    }
    return py::make_tuple(out, dropped);
  });
  m.def("_fork_generation", [] { return g_fork_generation.load(); });

  py::class_<AgentHolder, AgentRef>(m, "Agent")
      .def(py::init(&CreateAgent), py::arg("options"), py::arg("site"))
      .def_property_readonly("name", &AgentHolder::name)
      .def_property_readonly("closed", &AgentHolder::closed)
      .def("close", &AgentHolder::Close)
      .def("incarnation", [](AgentHolder& h) { return h.Get().incarnation(); })
      .def("listen", [](AgentHolder& h, const std::string& address, uint16_t port) {
        AgentCall call(h);
        Agent& a = call.agent();
        absl::StatusOr<uint16_t> r;
        { py::gil_scoped_release release; r = a.Listen(address, port); }
        return Take(std::move(r));
      })
      .def("connect", [](AgentHolder& h, const std::string& address, uint16_t port, double timeout) {
        AgentCall call(h);
        Agent& a = call.agent();
        absl::Duration t = Seconds(timeout);
        absl::StatusOr<PeerInfo> r;
        { py::gil_scoped_release release; r = a.Connect(address, port, t); }
        return PeerDict(Take(std::move(r)));
      })
      .def("wait_for_peer", [](AgentHolder& h, const std::string& name, double timeout) {
        AgentCall call(h);
        Agent& a = call.agent();
        absl::Duration t = Seconds(timeout);
        absl::StatusOr<PeerInfo> r;
        { py::gil_scoped_release release; r = a.WaitForPeer(name, t); }
        return PeerDict(Take(std::move(r)));
      })
      .def("get_peer", [](AgentHolder& h, const std::string& name) {
        AgentCall call(h);
        Agent& a = call.agent();
        absl::StatusOr<PeerInfo> r;
        { py::gil_scoped_release release; r = a.GetPeer(name); }
        return PeerDict(Take(std::move(r)));
      })
      .def("peers", [](AgentHolder& h) {
        AgentCall call(h);
        Agent& a = call.agent();
        std::vector<PeerInfo> r;
        { py::gil_scoped_release release; r = a.ListPeers(); }
        py::list out;
        for (const PeerInfo& p : r) out.append(PeerDict(p));
        return out;
      })
      .def("disconnect", [](AgentHolder& h, const std::string& name) {
        AgentCall call(h);
        Agent& a = call.agent();
        absl::Status s;
        { py::gil_scoped_release release; s = a.Disconnect(name); }
        Check(s);
      })
      .def("progress", [](AgentHolder& h) {
        AgentCall call(h);
        Agent& a = call.agent();
        py::gil_scoped_release release;
        return a.Progress();
      })
      .def("create_pool", [](const AgentRef& self, const std::string& name, const py::dict& layout,
                             bool exported, const py::tuple& site) {
        return CreatePool(self, name, layout, exported, site);
      })
      .def("register_pool", [](const AgentRef& self, const std::string& name, const py::dict& layout,
                               const std::vector<std::pair<uintptr_t, uint64_t>>& regions, py::list keep,
                               bool exported, const py::tuple& site) {
        return RegisterPool(self, name, layout, regions, std::move(keep), exported, site);
      })
      .def("remove_pool", [](const AgentRef& self, const std::string& name, double timeout) {
        RemovePool(self, name, timeout);
      })
      .def("find_pool", [](const AgentRef& self, const std::string& name) -> std::shared_ptr<Pool> {
        AgentCall call(*self);
        Agent& a = call.agent();
        KvPool* p = a.FindPool(name);
        auto it = self->pools().find(name);
        if (p == nullptr || it == self->pools().end()) return nullptr;
        return std::make_shared<Pool>(self, p, it->second.generation);
      })
      .def("exported_pools", [](AgentHolder& h) {
        AgentCall call(h);
        Agent& a = call.agent();
        std::vector<std::string> names;
        for (const auto& [n, l] : a.ExportedPools()) names.push_back(n);
        return names;
      })
      .def("post", [](const AgentRef& self, const py::dict& a, const py::tuple& site) {
        // The keys as str objects made once (never freed), not per call.
        static const auto* keys = new std::array<py::str, kNumPostFields>{
            py::str("op"), py::str("peer"), py::str("local"), py::str("local_pool"),
            py::str("local_blocks"), py::str("remote_pool"), py::str("remote_ids"),
            py::str("layer_begin"), py::str("layer_end"), py::str("slice_bytes"),
            py::str("local_slice_offset"), py::str("remote_slice_offset"),
            py::str("notification"), py::str("ticket"), py::str("offer_blocks")};
        std::array<py::object, kNumPostFields> fields;
        for (int k = 0; k < kNumPostFields; ++k) fields[k] = a[(*keys)[k]];
        return Post(self, PostArgsOf(fields), site);
      })
      // The same as post, the fields passed in PostField order instead of a
      // dict (Agent.post_transfer's path).
      .def("post_fields", [](const AgentRef& self, py::object op, py::object peer,
                             py::object local, py::object local_pool, py::object local_blocks,
                             py::object remote_pool, py::object remote_ids,
                             py::object layer_begin, py::object layer_end,
                             py::object slice_bytes, py::object local_slice_offset,
                             py::object remote_slice_offset, py::object notification,
                             py::object ticket, py::object offer_blocks, const py::tuple& site) {
        // remote_ids may also be a list (Agent.read/write's plain call):
        // converted here when every element is an int in [0, 2**32), else
        // by the package's _id_buffer, which names the offending element.
        std::vector<uint32_t> listed;
        bool from_list = false;
        if (PyList_CheckExact(remote_ids.ptr())) {
          from_list = ListIds(remote_ids.ptr(), &listed);
          remote_ids = from_list ? py::none()
                                 : py::module_::import("kvferry._agent")
                                       .attr("_id_buffer")(remote_ids, "remote_blocks");
        }
        const std::array<py::object, kNumPostFields> fields{
            std::move(op), std::move(peer), std::move(local), std::move(local_pool),
            std::move(local_blocks), std::move(remote_pool), std::move(remote_ids),
            std::move(layer_begin), std::move(layer_end), std::move(slice_bytes),
            std::move(local_slice_offset), std::move(remote_slice_offset),
            std::move(notification), std::move(ticket), std::move(offer_blocks)};
        PostArgs args = PostArgsOf(fields);
        if (from_list) args.remote_ids = Ids(std::move(listed));
        return Post(self, args, site);
      })
      .def("prepare", &Prepare)
      .def("post_prepared", &PostPrepared)
      .def_static("_ids_borrowed", [](const py::object& ids) { return Ids(ids, "ids").borrowed(); })
      .def("fence_blocks", [](AgentHolder& h, const std::string& pool, const py::object& ids,
                              double timeout) {
        AgentCall call(h);
        Agent& a = call.agent();
        Ids list(ids, "ids");
        absl::Duration t = Seconds(timeout);
        absl::Status s;
        { py::gil_scoped_release release; s = a.FenceBlocks(pool, list.span(), t); }
        Check(s);
      })
      .def("local_metadata", [](AgentHolder& h, const std::string& advertise_address) {
        AgentCall call(h);
        Agent& a = call.agent();
        absl::StatusOr<std::string> r;
        { py::gil_scoped_release release; r = a.LocalMetadata(advertise_address); }
        return py::bytes(Take(std::move(r)));
      })
      .def("connect_from_metadata", [](AgentHolder& h, const py::bytes& metadata, double timeout) {
        AgentCall call(h);
        Agent& a = call.agent();
        absl::Duration t = Seconds(timeout);
        std::string bytes(metadata);
        absl::StatusOr<PeerInfo> r;
        { py::gil_scoped_release release; r = a.ConnectFromMetadata(bytes, t); }
        return PeerDict(Take(std::move(r)));
      })
      .def("send_notification", [](AgentHolder& h, const std::string& peer, const py::bytes& payload) {
        AgentCall call(h);
        Agent& a = call.agent();
        std::string p(payload);
        absl::Status s;
        { py::gil_scoped_release release; s = a.SendNotification(peer, std::move(p)); }
        Check(s);
      })
      .def("release_offer", [](AgentHolder& h, const py::bytes& ticket) {
        AgentCall call(h);
        Agent& a = call.agent();
        std::string t(ticket);
        absl::Status s;
        { py::gil_scoped_release release; s = a.ReleaseOffer(t); }
        Check(s);
      })
      .def("offer", [](const AgentRef& self, PyBlockSet& blocks, const std::string& peer, double ttl,
                       const py::tuple& site) {
        AgentCall call(*self);
        Agent& a = call.agent();
        if (ttl <= 0) {
          Raise(absl::InvalidArgumentError(absl::StrCat("ttl ", ttl, " s is not positive")));
        }
        absl::Duration t = absl::Seconds(ttl);
        SourceLocation where = Site(site);
        absl::StatusOr<kvferry::Offer> r;
        {
          py::gil_scoped_release release;
          MutexLock lock(&blocks.mu());
          r = a.Offer(blocks.blocks(), peer, t, where);
        }
        return std::make_shared<PyOffer>(Take(std::move(r)));
      })
      .def("poll_notifications", [](AgentHolder& h) {
        AgentCall call(h);
        Agent& a = call.agent();
        std::vector<Notification> r;
        { py::gil_scoped_release release; r = a.PollNotifications(); }
        return NotificationList(r);
      })
      .def("wait_for_notifications", [](AgentHolder& h, double timeout) {
        AgentCall call(h);
        Agent& a = call.agent();
        absl::Duration t = Seconds(timeout);
        std::vector<Notification> r;
        { py::gil_scoped_release release; r = a.WaitForNotifications(t); }
        return NotificationList(r);
      })
      .def("completion_fd", [](AgentHolder& h) { return h.Get().completion_fd(); })
      // (transfers [(id, state, (code, msg), reason)], offers [...], notifications, dropped)
      .def("poll_completions", [](AgentHolder& h) {
        AgentCall call(h);
        Agent& a = call.agent();
        Completions c;
        { py::gil_scoped_release release; c = a.PollCompletions(); }
        py::list ts, os;
        for (const auto& t : c.transfers) {
          ts.append(py::make_tuple(t.id, TransferStateName(t.state), StatusTuple(t.status),
                                   static_cast<int>(ReasonOf(t.status))));
        }
        for (const auto& o : c.offers) {
          os.append(py::make_tuple(o.id, OfferStateName(o.state), StatusTuple(o.status),
                                   static_cast<int>(ReasonOf(o.status))));
        }
        return py::make_tuple(ts, os, NotificationList(c.notifications), c.dropped);
      })
      .def("stats", [](AgentHolder& h) { return StatsDict(h.Get().GetStats()); })
      .def("listener_stats", [](AgentHolder& h) { return h.Get().GetListenerStats().ToString(); })
      .def("ledger_report", [](AgentHolder& h) { return h.Get().ledger().Report(); })
      .def("ledger_survivors", [](AgentHolder& h) {
        py::list out;
        for (const LiveObject& o : h.Get().ledger().Survivors()) {
          out.append(py::make_tuple(std::string(ResourceKindName(o.kind)), o.file, o.line, o.function));
        }
        return out;
      })
      .def("memory_report", [](AgentHolder& h, const std::string& format) {
        AgentCall call(h);
        Agent& a = call.agent();
        absl::StatusOr<MemoryReport> r;
        { py::gil_scoped_release release; r = a.GetMemoryReport(); }
        MemoryReport report = Take(std::move(r));
        if (format == "text") return report.ToText();
        if (format == "json") return report.ToJson();
        if (format == "prometheus") return report.ToPrometheus();
        Raise(absl::InvalidArgumentError(absl::StrCat("format '", format, "' is not one of text, json, prometheus")));
      });

  py::class_<Pool, std::shared_ptr<Pool>>(m, "Pool")
      .def_property_readonly("name", &Pool::name)
      .def("layout", [](const Pool& p) {
        const KvLayout& l = p.Get().layout();
        py::dict d;
        d["num_layers"] = l.num_layers;
        d["num_blocks"] = l.num_blocks;
        d["tokens_per_block"] = l.tokens_per_block;
        d["num_kv_heads"] = l.num_kv_heads;
        d["head_dim"] = l.head_dim;
        d["element_bytes"] = l.element_bytes;
        d["separate_kv"] = l.separate_kv;
        return d;
      })
      .def("exported", [](const Pool& p) { return p.Get().exported(); })
      .def("free_blocks", [](const Pool& p) { return p.Get().free_blocks(); })
      .def("num_regions", [](const Pool& p) { return p.Get().num_regions(); })
      .def("size_bytes", [](const Pool& p) { return p.Get().size_bytes(); })
      .def("backing", [](const Pool& p) { return p.Get().backing(); })
      .def("memory_source", [](const Pool& p) {
        return std::string(PoolMemorySourceName(p.Get().memory_source()));
      })
      // (address, length, guard): the guard keeps the memory mapped and is
      // counted as a live view; numpy holds it as the array's base.
      .def("_memory", [](const Pool& p) {
        KvPool& pool = p.Get();
        if (pool.memory_source() == PoolMemorySource::kEngineOwned) {
          Raise(absl::FailedPreconditionError(absl::StrCat(
              "pool '", p.name(), "' is engine memory: use the tensors you registered")));
        }
        auto guard = std::make_shared<ViewGuard>(p.agent(), p.name(), p.generation());
        return py::make_tuple(reinterpret_cast<uintptr_t>(pool.base()), pool.size_bytes(),
                              py::cast(guard));
      })
      .def("lease", [](const Pool& p, uint32_t count, const py::tuple& site) {
        AgentCall call(*p.agent());
        KvPool& pool = p.Get();
        SourceLocation where = Site(site);
        absl::StatusOr<BlockSet> r;
        { py::gil_scoped_release release; r = pool.Lease(count, where); }
        return std::make_shared<PyBlockSet>(Take(std::move(r)));
      })
      .def("in_flight", [](const Pool& p, uint32_t id) {
        KvPool& pool = p.Get();
        return Take(pool.InFlight(id));
      })
      .def("busy_blocks", [](const Pool& p) { return p.Get().busy_blocks(); })
      .def("lease_ids", [](const Pool& p, const std::vector<uint32_t>& ids, const py::tuple& site) {
        AgentCall call(*p.agent());
        KvPool& pool = p.Get();
        SourceLocation where = Site(site);
        absl::StatusOr<BlockSet> r;
        { py::gil_scoped_release release; r = pool.LeaseIds(ids, where); }
        return std::make_shared<PyBlockSet>(Take(std::move(r)));
      });

  py::class_<ViewGuard, std::shared_ptr<ViewGuard>>(m, "_ViewGuard");

  py::class_<PyBlockSet, std::shared_ptr<PyBlockSet>>(m, "BlockSet")
      .def_property_readonly("ids", &PyBlockSet::ids)
      .def_property_readonly("pool_name", &PyBlockSet::pool_name)
      .def_property_readonly("released", &PyBlockSet::released)
      .def("release", &PyBlockSet::Release);

  py::class_<PyPreparedList, std::shared_ptr<PyPreparedList>>(m, "PreparedList")
      .def("size", &PyPreparedList::size)
      .def("remote", &PyPreparedList::remote)
      .def("peer", &PyPreparedList::peer)
      .def("pool", &PyPreparedList::pool)
      .def("released", &PyPreparedList::released)
      .def("release", &PyPreparedList::Release);

  py::class_<PyTransfer, std::shared_ptr<PyTransfer>>(m, "Transfer")
      .def_property_readonly("id", &PyTransfer::id)
      .def("state", &PyTransfer::state)
      .def("status", &PyTransfer::status)
      .def("wait", &PyTransfer::Wait, py::arg("timeout") = py::none())
      .def("cancel", &PyTransfer::Cancel, py::arg("grace") = 5.0)
      .def("reason", &PyTransfer::reason)
      .def("telemetry", &PyTransfer::telemetry);

  py::class_<PyOffer, std::shared_ptr<PyOffer>>(m, "Offer")
      .def_property_readonly("id", &PyOffer::id)
      .def_property_readonly("ticket", &PyOffer::ticket)
      .def_property_readonly("peer", &PyOffer::peer)
      .def("state", &PyOffer::state)
      .def("status", &PyOffer::status)
      .def("wait", &PyOffer::Wait, py::arg("timeout") = py::none())
      .def("revoke", &PyOffer::Revoke)
      .def("reason", &PyOffer::reason);
  m.def("end_reason_name", [](int reason) {
    return std::string(EndReasonName(static_cast<EndReason>(reason)));
  });
  BindDirectory(m);
}
