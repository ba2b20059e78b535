// KernelCopier with several threads (AgentOptions::kernel_copy_threads):
// a job cut into slices that run at once, verified byte for byte in another
// process; one slice's error failing the whole job with nothing moving after
// its mark; a target closed while slices run; the destructor failing what
// waits; the option's bounds. The copier runs against real forked processes
// (their memory is the target), the agent cases against kvferry_test_peer.
#include <dirent.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <future>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvferry/agent.h"
#include "src/kernel_copier.h"
#include "src/kernel_copy.h"
#include "src/transfer_core.h"
#include "tests/child_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"

namespace kvferry::internal {
namespace {

using ::kvferry::test::IsOk;

constexpr char kProbe[] = "kernel-copier-threads-test probe";
constexpr absl::Duration kDeadline = absl::Seconds(60);

KernelCopyPtr OpenChild(const test::ForkedTwin& child) {
  auto t = KernelCopyTarget::Open(static_cast<uint64_t>(child.pid()),
                                  reinterpret_cast<uintptr_t>(kProbe), kProbe);
  return t.ok() ? *std::move(t) : nullptr;
}

TransferCorePtr NewCore() {
  return TransferCorePtr(
      new TransferCore(boost::intrusive_ptr<AgentLink>(new AgentLink(nullptr)), {}, {}));
}

bool WaitCopied(const TransferCore& core) {
  const absl::Time deadline = absl::Now() + kDeadline;
  while (!core.copied()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

void Fill(std::byte* p, size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<std::byte>(rng() | 1);  // never zero
}

// The child's bytes at [p, p + n).
std::vector<std::byte> ReadChild(const KernelCopyTarget& target, const std::byte* p, size_t n) {
  std::vector<std::byte> got(n, std::byte{0});
  const iovec l{got.data(), n};
  const iovec r{const_cast<std::byte*>(p), n};
  EXPECT_THAT(target.Copy(TransferOp::kRead, {&l, 1}, {&r, 1}), IsOk());
  return got;
}

// The kernel-copy hook as a barrier: each slice's thread waits there until
// `want` threads arrived (or the deadline passed), so slices that run at
// once all pass it and slices run one after another do not. Records the
// threads that came.
struct Barrier {
  static inline std::mutex mu;
  static inline std::condition_variable cv;
  static inline std::set<std::thread::id> threads;
  static inline int arrived = 0;
  static inline int want = 0;

  static void Hook() {
    std::unique_lock<std::mutex> l(mu);
    threads.insert(std::this_thread::get_id());
    ++arrived;
    cv.notify_all();
    cv.wait_for(l, std::chrono::seconds(30), [] { return arrived >= want; });
  }
  explicit Barrier(int n) {
    std::lock_guard<std::mutex> l(mu);
    threads.clear();
    arrived = 0;
    want = n;
    kernel_copy_test_hook.store(&Hook);
  }
  ~Barrier() { kernel_copy_test_hook.store(nullptr); }
  static size_t distinct() {
    std::lock_guard<std::mutex> l(mu);
    return threads.size();
  }
};

// A scattered job of 2048 4 KiB elements (8 MiB, remote slots mirrored) is
// cut into four slices that run at once, on four threads, and lands exactly.
TEST(KernelCopierThreadsTest, AScatteredJobIsSplitAcrossThreadsAndLandsExactly) {
  constexpr size_t kElem = 4096, kCount = 2048, kBytes = kElem * kCount;
  std::vector<std::byte> remote(kBytes + 2 * kElem, std::byte{0});  // zeros in the child too
  test::ForkedTwin child;
  ASSERT_GT(child.pid(), 0);
  KernelCopyPtr target = OpenChild(child);
  ASSERT_NE(target, nullptr);

  std::vector<std::byte> local(kBytes);
  Fill(local.data(), kBytes, 21);
  KernelCopier::Job job;
  TransferCorePtr core = NewCore();
  job.core = core.get();
  job.target = target;
  job.op = TransferOp::kWrite;
  job.peer_name = "child";
  std::byte* base = remote.data() + kElem;  // a guard element on each side
  for (size_t i = 0; i < kCount; ++i) {
    job.local.push_back({local.data() + i * kElem, kElem});
    job.remote.push_back({base + (kCount - 1 - i) * kElem, kElem});
  }
  std::atomic<int> wakes{0};
  {
    Barrier barrier(4);
    KernelCopier copier([] { return true; }, [&] { ++wakes; }, /*threads=*/4);
    copier.Submit(std::move(job));
    ASSERT_TRUE(WaitCopied(*core));
    EXPECT_THAT(core->copy_status(), IsOk());
    EXPECT_EQ(Barrier::distinct(), 4u) << "the slices did not run at once on four threads";
  }
  EXPECT_GE(wakes.load(), 1);

  const std::vector<std::byte> image = ReadChild(*target, remote.data(), remote.size());
  for (size_t i = 0; i < kCount; ++i) {
    ASSERT_EQ(std::memcmp(image.data() + kElem + (kCount - 1 - i) * kElem,
                          local.data() + i * kElem, kElem),
              0)
        << "element " << i;
  }
  for (size_t k = 0; k < kElem; ++k) {
    ASSERT_EQ(image[k], std::byte{0}) << "before the job's memory, byte " << k;
    ASSERT_EQ(image[kElem + kBytes + k], std::byte{0}) << "after the job's memory, byte " << k;
  }
}

// One slice meets a hole in the peer's memory: the job ends with that
// slice's error (the call and the peer named), and the peer's memory does
// not change after the job was marked (every slice ended before the mark).
TEST(KernelCopierThreadsTest, OneSlicesErrorFailsTheJobAndNothingMovesAfterTheMark) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  constexpr size_t kSlice = 4 << 20;  // per slice: the healthy ones copy for a while
  const size_t bytes = 4 * kSlice;
  auto* region = static_cast<std::byte*>(
      mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(region, MAP_FAILED);
  std::memset(region, 0, bytes);
  // The hole: one page inside the second slice's memory, in the child too.
  std::byte* hole = region + kSlice + kSlice / 2;
  ASSERT_EQ(munmap(hole, page), 0);
  auto child = std::make_unique<test::ForkedTwin>();
  ASSERT_GT(child->pid(), 0);
  KernelCopyPtr target = OpenChild(*child);
  ASSERT_NE(target, nullptr);

  std::vector<std::byte> local(bytes);
  Fill(local.data(), bytes, 5);
  TransferCorePtr core = NewCore();
  KernelCopier::Job job;
  job.core = core.get();
  job.target = target;
  job.op = TransferOp::kWrite;
  job.peer_name = "holey";
  for (size_t off = 0; off < bytes; off += 64 << 10) {
    job.local.push_back({local.data() + off, 64 << 10});
    job.remote.push_back({region + off, 64 << 10});
  }
  std::vector<std::byte> at_mark_before, at_mark_after;
  {
    Barrier barrier(4);
    KernelCopier copier([] { return true; }, [] {}, /*threads=*/4);
    copier.Submit(std::move(job));
    ASSERT_TRUE(WaitCopied(*core));
    // The peer's memory as the mark left it (around the hole)...
    at_mark_before = ReadChild(*target, region, static_cast<size_t>(hole - region));
    at_mark_after = ReadChild(*target, hole + page, bytes - (hole + page - region));
  }  // ...and once every thread was joined: the same.
  EXPECT_EQ(ReadChild(*target, region, static_cast<size_t>(hole - region)), at_mark_before);
  EXPECT_EQ(ReadChild(*target, hole + page, bytes - (hole + page - region)), at_mark_after);

  const absl::Status st = core->copy_status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_TRUE(absl::StrContains(st.message(), "peer 'holey'")) << st;
  EXPECT_TRUE(absl::StrContains(st.message(), "process_vm_writev")) << st;
  // The bytes before the hole in its slice moved; so did the first slice.
  EXPECT_EQ(std::memcmp(at_mark_before.data(), local.data(), kSlice), 0);
  EXPECT_EQ(std::memcmp(at_mark_before.data() + kSlice, local.data() + kSlice,
                        static_cast<size_t>(hole - region) - kSlice),
            0);
  child.reset();
  munmap(region, static_cast<size_t>(hole - region));
  munmap(hole + page, bytes - (hole + page - region));
}

// Holds the first `held` slices at the hook until Open().
struct Gate {
  static inline std::mutex mu;
  static inline std::condition_variable cv;
  static inline int entered = 0;
  static inline bool open = false;

  static void Hook() {
    std::unique_lock<std::mutex> l(mu);
    ++entered;
    cv.notify_all();
    cv.wait(l, [] { return open; });
  }
  Gate() {
    std::lock_guard<std::mutex> l(mu);
    entered = 0;
    open = false;
    kernel_copy_test_hook.store(&Hook);
  }
  ~Gate() { Open(); }
  bool WaitEntered(int n) {
    std::unique_lock<std::mutex> l(mu);
    return cv.wait_for(l, std::chrono::seconds(60), [n] { return entered >= n; });
  }
  void Open() {
    kernel_copy_test_hook.store(nullptr);
    std::lock_guard<std::mutex> l(mu);
    open = true;
    cv.notify_all();
  }
};

// Two threads are held at the hook, one with a small job X, one with the
// first slice of a two-slice job A, when the target is closed: CloseTarget
// waits for both, A's queued slice never copies, A is marked with the
// close's status before CloseTarget returns (X, which ran whole, is OK),
// and a job submitted afterwards fails without copying.
TEST(KernelCopierThreadsTest, ATargetClosedMidJobEndsItWithoutItsQueuedSlice) {
  constexpr size_t kMiB = 1 << 20, kElem = 64 << 10;
  std::vector<std::byte> remote(4 * kMiB, std::byte{0});
  test::ForkedTwin child;
  ASSERT_GT(child.pid(), 0);
  KernelCopyPtr target = OpenChild(child);
  ASSERT_NE(target, nullptr);
  std::vector<std::byte> local(4 * kMiB);
  Fill(local.data(), local.size(), 9);

  // Elements [begin, end) of the 4 MiB, 64 KiB each, at the same offsets.
  auto make_job = [&](TransferCore* core, size_t begin, size_t end) {
    KernelCopier::Job job;
    job.core = core;
    job.target = target;
    job.op = TransferOp::kWrite;
    job.peer_name = "closing";
    for (size_t off = begin; off < end; off += kElem) {
      job.local.push_back({local.data() + off, kElem});
      job.remote.push_back({remote.data() + off, kElem});
    }
    return job;
  };
  TransferCorePtr x = NewCore(), a = NewCore(), later = NewCore();
  {
    Gate gate;
    KernelCopier copier([] { return true; }, [] {}, /*threads=*/2);
    copier.Submit(make_job(x.get(), 0, kElem));           // one slice
    copier.Submit(make_job(a.get(), kMiB, 3 * kMiB));     // two slices of 1 MiB
    ASSERT_TRUE(gate.WaitEntered(2));  // X and A's first slice
    auto closed = std::async(std::launch::async, [&] {
      copier.CloseTarget(*target, absl::UnavailableError("peer 'closing' was closed"));
      return a->copied() && x->copied();
    });
    // It waits for the slices held in progress.
    EXPECT_EQ(closed.wait_for(std::chrono::milliseconds(200)), std::future_status::timeout);
    EXPECT_FALSE(a->copied());
    gate.Open();
    ASSERT_EQ(closed.wait_for(std::chrono::seconds(60)), std::future_status::ready);
    EXPECT_TRUE(closed.get()) << "CloseTarget returned before the jobs were marked";
    EXPECT_THAT(x->copy_status(), IsOk());
    const absl::Status st = a->copy_status();
    EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
    EXPECT_EQ(st.message(), "peer 'closing' was closed");

    copier.Submit(make_job(later.get(), 3 * kMiB, 4 * kMiB));
    ASSERT_TRUE(WaitCopied(*later));
    EXPECT_EQ(later->copy_status().code(), absl::StatusCode::kUnavailable);
    EXPECT_TRUE(absl::StrContains(later->copy_status().message(), "ended before"))
        << later->copy_status();
  }
  // X and A's first slice copied; A's second slice and the later job did not.
  const std::vector<std::byte> image = ReadChild(*target, remote.data(), remote.size());
  EXPECT_EQ(std::memcmp(image.data(), local.data(), kElem), 0);
  EXPECT_EQ(std::memcmp(image.data() + kMiB, local.data() + kMiB, kMiB), 0);
  size_t nonzero = 0;
  for (size_t k = 2 * kMiB; k < image.size(); ++k) nonzero += image[k] != std::byte{0};
  EXPECT_EQ(nonzero, 0u) << "a slice queued behind the close, or a later job, copied";
}

// Destroying a copier whose slices wait for fresh() (two, one per thread)
// and whose other jobs are queued fails them all, as stopped, without
// copying, and joins.
TEST(KernelCopierThreadsTest, TheDestructorFailsWaitingAndQueuedJobsWithoutCopying) {
  std::vector<std::byte> remote(1 << 20, std::byte{0});
  test::ForkedTwin child;
  ASSERT_GT(child.pid(), 0);
  KernelCopyPtr target = OpenChild(child);
  ASSERT_NE(target, nullptr);
  std::vector<std::byte> local(remote.size());
  Fill(local.data(), local.size(), 3);

  std::vector<TransferCorePtr> cores;
  std::mutex mu;
  std::condition_variable cv;
  int wakes = 0;
  auto copier = std::make_unique<KernelCopier>(
      [] { return false; },  // never fresh: every slice waits at the gate
      [&] {
        std::lock_guard<std::mutex> l(mu);
        ++wakes;
        cv.notify_all();
      },
      /*threads=*/2);
  for (int i = 0; i < 4; ++i) {
    cores.push_back(NewCore());
    KernelCopier::Job job;
    job.core = cores.back().get();
    job.target = target;
    job.op = TransferOp::kWrite;
    job.peer_name = "stopped";
    const size_t quarter = remote.size() / 4;
    job.local.push_back({local.data() + i * quarter, quarter});
    job.remote.push_back({remote.data() + i * quarter, quarter});
    copier->Submit(std::move(job));
  }
  {
    // Both threads asked for a pass (each asks again every 10 ms).
    std::unique_lock<std::mutex> l(mu);
    ASSERT_TRUE(cv.wait_for(l, std::chrono::seconds(60), [&] { return wakes >= 4; }));
  }
  for (const TransferCorePtr& c : cores) EXPECT_FALSE(c->copied());
  copier.reset();
  for (size_t i = 0; i < cores.size(); ++i) {
    ASSERT_TRUE(cores[i]->copied()) << i;
    const absl::Status st = cores[i]->copy_status();
    EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
    EXPECT_TRUE(absl::StrContains(st.message(), "the agent stopped before the copy to peer "
                                                "'stopped' started"))
        << st;
  }
  std::vector<std::byte> image(remote.size());
  iovec l{image.data(), image.size()}, r{remote.data(), remote.size()};
  ASSERT_THAT(target->Copy(TransferOp::kRead, {&l, 1}, {&r, 1}), IsOk());
  size_t nonzero = 0;
  for (std::byte b : image) nonzero += b != std::byte{0};
  EXPECT_EQ(nonzero, 0u);
}

}  // namespace
}  // namespace kvferry::internal

namespace kvferry::test {
namespace {

constexpr const char* kPeerBinary = KVFERRY_TEST_PEER;

uint16_t ParsePort(const std::optional<std::string>& line) {
  uint32_t port = 0;
  if (!line || line->rfind("PORT ", 0) != 0 || !absl::SimpleAtoi(line->substr(5), &port)) return 0;
  return static_cast<uint16_t>(port);
}

// This process's threads named kKernelCopierThreadName.
int CopierThreads() {
  int n = 0;
  DIR* dir = opendir("/proc/self/task");
  if (dir == nullptr) return -1;
  while (dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream comm(absl::StrCat("/proc/self/task/", e->d_name, "/comm"));
    std::string name;
    std::getline(comm, name);
    n += name == internal::kKernelCopierThreadName;
  }
  closedir(dir);
  return n;
}

AgentOptions KernelCopyOptions(const std::string& name, int threads) {
  AgentOptions o;
  o.name = name;
  o.leak_policy = LeakPolicy::kAbort;
  o.peer_timeout = absl::Seconds(60);
  o.ucx_config = {{"TLS", "posix,sysv,tcp"}};
  o.pool_memory = PoolMemorySource::kAnonymousMmap;
  o.kernel_copy_threads = threads;
  return o;
}

// Real agents in two processes: a scattered READ of the 32 blocks the peer
// fills (1 MiB: remote block 31-i into local block i, 256 chunks of 4 KiB
// that do not coalesce) runs on four copier threads and lands exactly; then
// an 8 MiB WRITE of the same shape (256 blocks, 2048 chunks), which the peer
// process verifies byte for byte.
TEST(KernelCopierThreadsAgentTest, AScatteredTransferSplitAcrossThreadsMovesExactly) {
  constexpr uint32_t kBlocks = 256;
  {
    ChildProcess child({kPeerBinary, "--role=prefill-serve", "--seed=811",
                        absl::StrCat("--blocks=", kBlocks), "--tls=posix,sysv,tcp",
                        "--pool_memory=anon", "--peer_timeout=60"});
    ASSERT_TRUE(child.started());
    const uint16_t port = ParsePort(child.ReadUntil("PORT"));
    ASSERT_NE(port, 0);
    auto agent = Agent::Create(KernelCopyOptions("decode", 4));
    ASSERT_THAT(agent, IsOk());
    auto pool = (*agent)->CreatePool("kv", Layout(kBlocks));
    ASSERT_THAT(pool, IsOk());
    auto peer = (*agent)->Connect("127.0.0.1", port);
    ASSERT_THAT(peer, IsOk());
    ASSERT_EQ(peer->data_path, kDataPathKernelCopy);

    // The peer fills the 32 blocks it holds (ids 0-31): 1 MiB, 256 chunks.
    constexpr uint32_t kFilled = 32;
    BlockSet local = *(*pool)->Lease(kFilled);
    std::vector<uint32_t> remote(kFilled);
    for (uint32_t i = 0; i < kFilled; ++i) remote[i] = kFilled - 1 - i;
    auto t = (*agent)->PostTransfer({.op = TransferOp::kRead, .peer = peer->name,
                                     .local = &local, .remote_blocks = remote});
    ASSERT_THAT(t, IsOk());
    EXPECT_THAT(t->Wait(absl::Seconds(60)), IsOk());
    for (size_t i = 0; i < kFilled; ++i) {
      ASSERT_EQ(BlockChecksum(local, i), ExpectedChecksum(Layout(kBlocks), 811, remote[i])) << i;
    }
    // One job of 1 MiB: four slices, a thread for each.
    EXPECT_EQ(CopierThreads(), 4);
    child.CloseStdin();
    EXPECT_EQ(child.Wait(), 0);
  }
  {
    ChildProcess child({kPeerBinary, "--role=decode", absl::StrCat("--blocks=", kBlocks),
                        "--tls=posix,sysv,tcp", "--pool_memory=anon", "--peer_timeout=60"});
    ASSERT_TRUE(child.started());
    const uint16_t port = ParsePort(child.ReadUntil("PORT"));
    ASSERT_NE(port, 0);
    auto agent = Agent::Create(KernelCopyOptions("prefill", 4));
    ASSERT_THAT(agent, IsOk());
    auto pool = (*agent)->CreatePool("kv", Layout(kBlocks));
    ASSERT_THAT(pool, IsOk());
    auto peer = (*agent)->Connect("127.0.0.1", port);
    ASSERT_THAT(peer, IsOk());
    ASSERT_EQ(peer->data_path, kDataPathKernelCopy);

    BlockSet local = *(*pool)->Lease(kBlocks);
    std::vector<uint32_t> remote(kBlocks);
    for (uint32_t i = 0; i < kBlocks; ++i) {
      remote[i] = kBlocks - 1 - i;
      FillBlock(local, i, 812, remote[i]);
    }
    auto t = (*agent)->PostTransfer({.op = TransferOp::kWrite, .peer = peer->name,
                                     .local = &local, .remote_blocks = remote,
                                     .notification = "CHECK 812 " + absl::StrJoin(remote, " ")});
    ASSERT_THAT(t, IsOk());
    EXPECT_THAT(t->Wait(absl::Seconds(60)), IsOk());
    EXPECT_EQ(child.ReadUntil("OK", absl::Seconds(60)).value_or("timeout"), "OK 812");
    child.CloseStdin();
    EXPECT_EQ(child.Wait(), 0);
  }
}

TEST(KernelCopierThreadsAgentTest, KernelCopyThreadsOutOfRangeIsInvalidArgument) {
  for (int bad : {0, -1, 65, 1 << 20}) {
    AgentOptions o;
    o.name = "bad-threads";
    o.kernel_copy_threads = bad;
    auto agent = Agent::Create(o);
    ASSERT_FALSE(agent.ok()) << bad;
    EXPECT_EQ(agent.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_TRUE(absl::StrContains(agent.status().message(),
                                  absl::StrCat("kernel_copy_threads = ", bad, " ")))
        << agent.status();
  }
  for (int good : {1, 64}) {
    AgentOptions o;
    o.name = "good-threads";
    o.kernel_copy_threads = good;
    EXPECT_THAT(Agent::Create(o), IsOk()) << good;
  }
  const int def = AgentOptions().kernel_copy_threads;
  EXPECT_GE(def, 1);
  EXPECT_LE(def, 4);
  EXPECT_EQ(def, DefaultKernelCopyThreads());
}

}  // namespace
}  // namespace kvferry::test
